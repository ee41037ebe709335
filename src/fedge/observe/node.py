"""Prometheus metrics of one edge node: tasks and how long they took, bytes moved and at
what speed, sessions and reconnects (and, from the registry, the process's CPU and
memory). Labels take values the node bounds: task kinds (which the server names) are
kept to a few short names."""

from __future__ import annotations

import re
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from fedge.client import EVALUATE, FIT
from fedge.messages import Code
from fedge.node.observer import NodeObserver

TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MAX_KINDS = 16
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")


class NodeMetrics(NodeObserver):
    def __init__(self, registry: CollectorRegistry, name: str, cid: int, server: str) -> None:
        self._kinds: set[str] = {FIT, EVALUATE}
        self._lock = threading.Lock()
        self._sessions = 0
        info = Info("fedge_node", "Identity, client id and server.", registry=registry)
        info.info({"node": name, "cid": str(cid), "server": server})
        self.connected = Gauge(
            "fedge_node_connected", "1 while a session with the server is open.", registry=registry
        )
        self.joins = Counter("fedge_node_joins", "Sessions begun.", registry=registry)
        self.reconnects = Counter(
            "fedge_node_reconnects", "Sessions begun after the first.", registry=registry
        )
        self.disconnects = Counter(
            "fedge_node_disconnects", "Sessions ended (link lost, server gone, stop).",
            registry=registry,
        )  # fmt: skip
        self.tasks = Histogram(
            "fedge_node_task_duration_seconds",
            "Time a task took (model download, training or evaluation, encoding), by kind "
            "and outcome (failed: the client's code raised).",
            ("kind", "outcome"),
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "fedge_node_transferred_bytes",
            "Payload bytes over the link: models down, results up.",
            ("direction",),
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "fedge_node_transfer_duration_seconds", "Time a model download or result upload took.",
            ("direction",), buckets=TRANSFER_BUCKETS, registry=registry,
        )  # fmt: skip
        self.speed = Gauge(
            "fedge_node_transfer_bytes_per_second",
            "Speed of the last model download or result upload.",
            ("direction",),
            registry=registry,
        )
        self.upload_errors = Counter(
            "fedge_node_upload_errors",
            "Uploads cut (retried) or refused for good, by status code.",
            ("code", "final"),
            registry=registry,
        )
        for kind in (FIT, EVALUATE):
            for outcome in ("ok", "failed"):
                self.tasks.labels(kind, outcome)
        for direction in ("download", "upload"):
            self.bytes.labels(direction)
            self.transfer_seconds.labels(direction)
            self.speed.labels(direction)

    def joined(self) -> None:
        with self._lock:
            self._sessions += 1
            again = self._sessions > 1
        self.joins.inc()
        if again:
            self.reconnects.inc()
        self.connected.set(1)

    def disconnected(self) -> None:
        self.disconnects.inc()
        self.connected.set(0)

    def task_finished(self, kind: str, seconds: float, ok: bool) -> None:
        self.tasks.labels(self._kind(kind), "ok" if ok else "failed").observe(seconds)

    def downloaded(self, size: int, seconds: float) -> None:
        self._transfer("download", size, seconds)

    def uploaded(self, size: int, seconds: float) -> None:
        self._transfer("upload", size, seconds)

    def upload_failed(self, code: str, final: bool) -> None:
        known = code if code in Code.__members__ else "UNKNOWN"
        self.upload_errors.labels(known, "true" if final else "false").inc()

    def _transfer(self, direction: str, size: int, seconds: float) -> None:
        self.bytes.labels(direction).inc(size)
        self.transfer_seconds.labels(direction).observe(seconds)
        if size and seconds > 0:
            self.speed.labels(direction).set(size / seconds)

    def _kind(self, kind: str) -> str:
        """`kind`, if it is a short name and one of the first few seen; else "other"."""
        with self._lock:
            if kind in self._kinds:
                return kind
            if _KIND.match(kind) and len(self._kinds) < MAX_KINDS:
                self._kinds.add(kind)
                return kind
        return "other"
