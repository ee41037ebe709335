"""The metrics' own rules: bounded labels, failure reasons, and a node that loads no
metrics library unless asked to."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from fedge.coordinator import NO_RESULT
from fedge.observe.fleet import failure_reason
from fedge.observe.node import MAX_KINDS, NodeMetrics


def test_failures_are_told_apart_by_a_few_reasons() -> None:
    assert failure_reason(NO_RESULT) == "deadline"
    assert failure_reason("secagg.keys: no reply") == "deadline"
    stale = (
        "task r/5.0/fit/3 trained on the model of round 1, more than "
        "strategy.max_staleness = 2 versions old; dropped"
    )
    assert failure_reason(stale) == "stale"
    assert failure_reason("node n (cid 3), task t: ValueError: bad batch") == "error"
    assert failure_reason("client 3: tensor 'w' has 1 NaN") == "error"


def test_node_labels_stay_bounded_whatever_the_server_names() -> None:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, "node-0", 0, "127.0.0.1:9091")
    for i in range(40):
        metrics.task_finished(f"kind{i}", 0.1, ok=True)
    metrics.task_finished("x" * 500, 0.1, ok=True)
    metrics.task_finished("Not A Name!", 0.1, ok=False)
    kinds = {
        s.labels["kind"]
        for family in registry.collect()
        if family.name == "fedge_node_task_duration_seconds"
        for s in family.samples
    }
    assert len(kinds) == MAX_KINDS + 1 and "other" in kinds and "x" * 500 not in kinds
    other = registry.get_sample_value(
        "fedge_node_task_duration_seconds_count", {"kind": "other", "outcome": "ok"}
    )
    assert other == 40 - (MAX_KINDS - 2) + 1
    metrics.upload_failed("NOT_A_CODE", final=True)
    metrics.upload_failed("UNAVAILABLE", final=False)
    count = registry.get_sample_value
    assert count("fedge_node_upload_errors_total", {"code": "UNKNOWN", "final": "true"}) == 1
    assert count("fedge_node_upload_errors_total", {"code": "UNAVAILABLE", "final": "false"}) == 1


def test_sessions_after_the_first_are_reconnects() -> None:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, "node-0", 0, "server:1")
    for _ in range(3):
        metrics.joined()
        metrics.disconnected()
    metrics.joined()
    metrics.uploaded(4000, 0.5)
    value = registry.get_sample_value
    assert value("fedge_node_joins_total") == 4 and value("fedge_node_reconnects_total") == 3
    assert value("fedge_node_disconnects_total") == 3 and value("fedge_node_connected") == 1
    speed = value("fedge_node_transfer_bytes_per_second", {"direction": "upload"})
    assert speed == 8000


def test_a_node_without_metrics_loads_no_metrics_library() -> None:
    code = (
        "import sys, fedge.cli, fedge.node.runtime, fedge.transport.grpc.link, "
        "fedge.transport.mqtt.link; print('prometheus_client' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_the_metrics_port_bounds_its_connections_and_drops_idle_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sockets that never ask take no thread for ever, and a scrape still answers."""
    from fedge.observe import exposition

    monkeypatch.setattr(exposition, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(exposition, "READ_TIMEOUT", 0.5)
    server = exposition.serve_metrics(exposition.new_registry("node"), 0)
    address = ("127.0.0.1", server.server_port)
    try:
        idle = [socket.create_connection(address, timeout=10) for _ in range(6)]
        for sock in idle:  # beyond the bound at once, the others after READ_TIMEOUT
            assert sock.recv(1) == b""
            sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{address[1]}/metrics", timeout=10) as r:
            assert r.status == 200 and b"fedge_build_info" in r.read()
    finally:
        server.shutdown()
        server.server_close()
