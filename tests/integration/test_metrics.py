"""Prometheus metrics of a real fleet: a server and a node with ``--metrics-port``, scraped
over HTTP while they train; and the dashboard and alert rules in deploy/ ask only for
series that the scrapes have."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, attacker, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from fedge.launch import Launcher, free_port
from fedge.messages import PROTOCOL, Capabilities, Code, UploadHeader
from fedge.node.link import LinkError

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "info": ("_info",),
    "gauge": ("",),
}


def exported(text: str) -> set[str]:
    """Every series name a scrape declares, whether or not it has samples yet (a counter
    with labels has none until it first counts)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scraped(port: int) -> Samples | None:
    try:
        return scrape(port)[1]
    except OSError:
        return None


def test_server_and_node_metrics_count_what_happened(tmp_path: Path, transport: str) -> None:
    # round 3 sleeps in fit, so the run is still there to scrape after two full rounds
    config = write_config(
        tmp_path / "app", num_clients=3, rounds=3, fit_delay=60.0, slow_round=3,
        fraction_evaluate=0.0,
    )  # fmt: skip
    server_port, node_port = free_port(), free_port()
    options = ("--wait-for", "2", "--metrics-port", str(server_port))
    with Launcher(tmp_path, config, transport=transport) as fleet:
        first = fleet.server(*options)
        fleet.node(0, "--metrics-port", str(node_port))
        fleet.node(1)
        two_rounds = wait_for(
            lambda: (
                (s := scraped(server_port))
                and value(s, "fedge_server_rounds_total", status="ok") == 2
                and value(s, "fedge_server_round") == 3
                and s
            ),
            "two finished rounds in the server's metrics",
        )
        # a node that joined but uploads for a task that does not exist: refused, counted
        link = attacker(fleet, transport, "intruder")
        joined = link.join(2, Capabilities(), PROTOCOL)
        with pytest.raises(LinkError) as refused:
            link.upload(UploadHeader("no-such-task", token=joined.token, num_examples=1), [])
        assert refused.value.code == Code.NOT_FOUND
        server_text, server = scrape(server_port)
        node_text, node = scrape(node_port)
        link.close()
        # the server restarts (and resumes round 3): the node's session is a reconnect
        first.terminate()
        assert first.wait(timeout=30) == 0, fleet.log("server")
        fleet.server(*options, name="server-2")
        wait_for(
            lambda: (s := scraped(server_port)) and value(s, "fedge_server_connected_nodes") == 2,
            "both nodes to join the restarted server",
        )
        again = wait_for(
            lambda: (
                (s := scraped(node_port))
                and value(s, "fedge_node_connected") == 1
                and value(s, "fedge_node_joins_total") >= 2
                and s
            ),
            "the node to count its new session",
        )

    assert value(server, "fedge_server_rounds_total", status="failed") == 0
    assert value(server, "fedge_server_round_duration_seconds_count", status="ok") == 2
    assert value(server, "fedge_server_checkpoint_write_seconds_count") == 2
    assert value(server, "fedge_server_checkpoint_bytes") > 0
    assert value(server, "fedge_server_participants_total") == 4
    assert value(server, "fedge_server_round_participants") == 2
    assert value(server, "fedge_server_results_total", kind="fit", outcome="ok") >= 4
    failures = "fedge_server_client_failures_total"
    for stage in ("fit", "evaluate"):
        for reason in ("deadline", "stale", "error"):
            assert value(server, failures, stage=stage, reason=reason) == 0
    assert value(server, "fedge_server_upload_rejections_total", code="NOT_FOUND") == 1
    assert value(two_rounds, "fedge_server_upload_rejections_total", code="NOT_FOUND") == 0
    assert value(server, "fedge_server_received_bytes_total") > 0
    assert value(server, "fedge_server_sent_bytes_total") > 0
    model_bytes = value(server, "fedge_server_model_bytes")
    assert model_bytes > 1000
    assert value(server, "fedge_server_connected_nodes") == 2
    assert value(server, "fedge_server_nodes", state="connected") == 2
    assert value(server, "fedge_server_nodes", state="joining") == 1  # the intruder
    assert value(server, "fedge_server_nodes", state="offline") == 0
    assert value(server, "fedge_server_node_events_total", event="joined") == 3
    assert value(server, "fedge_server_run_state", state="running") == 1
    assert value(server, "fedge_server_state_dir_free_bytes") > 0
    assert value(server, "fedge_server_model_metric", name="accuracy") > 0.5
    assert value(server, "process_resident_memory_bytes") > 10 << 20

    fits = value(node, "fedge_node_task_duration_seconds_count", kind="fit", outcome="ok")
    assert fits >= 2
    downloaded = value(node, "fedge_node_transferred_bytes_total", direction="download")
    assert downloaded >= 2 * model_bytes  # one model per round (rounds 1-3)
    assert value(node, "fedge_node_transferred_bytes_total", direction="upload") > 0
    assert value(node, "fedge_node_transfer_bytes_per_second", direction="upload") > 0
    assert value(node, "fedge_node_connected") == 1
    assert value(node, "fedge_node_joins_total") == 1
    assert value(node, "fedge_node_reconnects_total") == 0
    assert value(node, "process_cpu_seconds_total") > 0
    # (a node may also have joined the old server once more while it was stopping)
    joins = value(again, "fedge_node_joins_total")
    assert joins >= 2 and value(again, "fedge_node_reconnects_total") == joins - 1
    assert value(again, "fedge_node_disconnects_total") == joins - 1
    assert value(again, "fedge_node_connected") == 1

    names = exported(server_text) | exported(node_text)
    for asked in deploy_metric_names():
        assert asked in names, f"deploy/ asks for {asked!r}, which no scrape has"
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's prometheus package (scripts/system-deps.sh)
        for text in (server_text, node_text):
            lint = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr


def deploy_metric_names() -> set[str]:
    """Series names the Grafana dashboards and the alert rules query."""
    exprs = []
    for board in (ROOT / "deploy" / "grafana").glob("*.json"):
        exprs += _exprs(json.loads(board.read_text()))
    import yaml

    for rules in [ROOT / "deploy" / "prometheus" / "fedge-rules.yml"]:
        for group in yaml.safe_load(rules.read_text())["groups"]:
            exprs += [rule["expr"] for rule in group["rules"]]
    assert exprs, "no queries found in deploy/"
    return {n for e in exprs for n in re.findall(r"\b(?:fedge|process)_[a-z0-9_]+", e)}


def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []
