"""Prometheus metrics of a fleet server, fed by the fleet's events and read from its state
when Prometheus scrapes — the same for every transport, since both come from the
transport-neutral fleet core.

Counters and histograms (rounds, failures, refusals, checkpoints) follow
`fedge.fleet.events`; gauges (nodes by state, bytes moved, the model's size, free disk)
are read at scrape time, so nothing extra runs on the fleet's hot paths. No series is
per node: a fleet of thousands of nodes has a few dozen series, and every label takes
one of a few values the server chooses (never a string a node sent). A node's own
``/metrics`` has its details.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from fedge.coordinator import NO_RESULT
from fedge.fleet.events import Event
from fedge.history import RoundRecord
from fedge.messages import Code

if TYPE_CHECKING:
    from prometheus_client import Metric

    from fedge.fleet.server import Aggregator

ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
RUN_STATES = ("starting", "running", "waiting", "paused", "finished", "failed", "stopped")
NODE_STATES = ("connected", "silent", "joining", "offline")
"""connected: task stream open and heard from within the liveness window; silent: stream
open but not heard from (frozen, or its link is gone); joining: joined without a task
stream yet; offline: bound to a client id, no session."""
FAILURE_REASONS = ("deadline", "stale", "error")
NODE_EVENTS = ("joined", "left", "replaced", "expired")
MAX_MODEL_METRICS = 32
"""Evaluation metrics exported (their names come from the app and the clients)."""


def failure_reason(text: str) -> str:
    """The bounded label of a client's failure in a round: it did not answer in time,
    its result was too stale (FedBuff), or it failed (the node said so, or its result
    was refused: the round's record has the words)."""
    if text.endswith((NO_RESULT, "no reply")):
        return "deadline"
    if "max_staleness" in text:
        return "stale"
    return "error"


class FleetMetrics(Collector):
    """The server's metrics in `registry`, from `aggregator`'s events and state."""

    def __init__(self, aggregator: Aggregator, registry: CollectorRegistry) -> None:
        self.aggregator = aggregator
        self.state_dir = aggregator.settings.state_dir
        self._started = time.time()
        self._heard: dict[str, float] = {}
        """When each node was last heard of, from the state database and node events."""
        for row in aggregator.runs.store.nodes():
            if row["last_seen"]:
                self._heard[row["node_id"]] = float(row["last_seen"])

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.rounds = counter("fedge_server_rounds", "Round attempts finished.", ("status",))
        self.round_seconds = Histogram(
            "fedge_server_round_duration_seconds", "Wall time of a round attempt.",
            ("status",), buckets=ROUND_BUCKETS, registry=registry,
        )  # fmt: skip
        self.participants = counter(
            "fedge_server_participants", "Client results aggregated into rounds."
        )
        self.failures = counter(
            "fedge_server_client_failures",
            "Selected clients without a usable result, by stage (fit, evaluate) and reason.",
            ("stage", "reason"),
        )
        self.results = counter(
            "fedge_server_results",
            "Results accepted from nodes, by task kind; outcome failed: the node reported "
            "that its task failed.",
            ("kind", "outcome"),
        )
        self.rejections = counter(
            "fedge_server_upload_rejections", "Uploads refused, by status code.", ("code",)
        )
        self.node_events = counter(
            "fedge_server_node_events", "Sessions joined, left, replaced or expired.", ("event",)
        )
        self.round_participants = Gauge(
            "fedge_server_round_participants",
            "Results aggregated in the last round attempt.",
            registry=registry,
        )
        self.round_selected = Gauge(
            "fedge_server_round_selected", "Clients selected in the last round attempt.",
            registry=registry,
        )  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "fedge_server_checkpoint_write_seconds",
            "Time to write a round's checkpoint durably (fsync included).",
            buckets=CHECKPOINT_BUCKETS,
            registry=registry,
        )
        self.checkpoint_bytes = Gauge(
            "fedge_server_checkpoint_bytes", "Size of the last checkpoint.", registry=registry
        )
        for status in ("ok", "failed"):  # series exist from the start: rate() sees the first
            self.rounds.labels(status)
            self.round_seconds.labels(status)
        for stage in ("fit", "evaluate"):
            for reason in FAILURE_REASONS:
                self.failures.labels(stage, reason)
        for code in Code:
            self.rejections.labels(code.value)
        for event in NODE_EVENTS:
            self.node_events.labels(event)
        registry.register(self)
        aggregator.events.subscribe(self.on_event)

    # --- events (the loop's thread, or the coordinator's) -----------------------------

    def on_event(self, event: Event) -> None:
        name, fields = event.name, event.fields
        if name == "round.finished":
            self._round(fields["record"])
        elif name == "checkpoint.written":
            self.checkpoint_seconds.observe(fields["seconds"])
            self.checkpoint_bytes.set(fields["size"])
        elif name == "upload.refused":
            self.rejections.labels(fields["code"]).inc()
        elif name == "upload.accepted":
            kind = fields.get("kind", "fit")
            self.results.labels(kind, "failed" if fields.get("failed") else "ok").inc()
        elif name.startswith("node.") and name[5:] in NODE_EVENTS:
            self.node_events.labels(name[5:]).inc()
            self._heard[fields["node"]] = event.time

    def _round(self, record: RoundRecord) -> None:
        self.rounds.labels(record.status).inc()
        self.round_seconds.labels(record.status).observe(record.wall_time)
        self.participants.inc(len(record.participants))
        self.round_participants.set(len(record.participants))
        self.round_selected.set(len(record.selected))
        for stage, failures in (("fit", record.failures), ("evaluate", record.evaluate_failures)):
            for text in failures.values():
                self.failures.labels(stage, failure_reason(text)).inc()

    # --- state, at scrape time (prometheus-client's HTTP thread) ----------------------

    def collect(self) -> Iterator[Metric]:
        aggregator = self.aggregator
        service = aggregator.service
        now = time.time()
        info = InfoMetricFamily("fedge_server_run", "The run served.")
        info.add_metric(
            [], {"run_id": aggregator.runs.run_id, "strategy": aggregator.coordinator.strategy.name}
        )
        yield info
        state, _ = aggregator.run_state()
        run_state = GaugeMetricFamily(
            "fedge_server_run_state", "1 for the run's current state.", labels=["state"]
        )
        for name in RUN_STATES:
            run_state.add_metric([name], float(name == state))
        yield run_state
        yield _gauge("fedge_server_round", "The round in progress (or last).", aggregator.round)
        yield _gauge(
            "fedge_server_rounds_planned", "Rounds the run trains.", aggregator.coordinator.rounds
        )
        waiting = service.waiting
        yield _gauge(
            "fedge_server_clients_needed",
            "Clients a round waits for (0: not waiting).",
            0 if waiting is None else waiting.needed,
        )
        yield _gauge(
            "fedge_server_waiting_for_clients_seconds",
            "How long the round has waited for enough clients (0: not waiting).",
            0.0 if waiting is None else now - waiting.since,
        )
        yield _gauge(
            "fedge_server_round_results_received",
            "Results accepted in the latest fit stage.",
            service.board.received,
        )
        yield _gauge(
            "fedge_server_round_results_expected",
            "Tasks opened in the latest fit stage.",
            service.board.expected,
        )
        yield from self._nodes(now)
        traffic = service.traffic
        yield _counter(
            "fedge_server_received_bytes", "Update payload bytes received from nodes.",
            traffic.received,
        )  # fmt: skip
        yield _counter(
            "fedge_server_sent_bytes",
            "Model bytes sent (downloads, models sent with tasks; over MQTT once, to the broker).",
            traffic.sent,
        )
        latest = service.models.latest
        yield _gauge(
            "fedge_server_model_bytes",
            "Encoded size of the newest global model.",
            0 if latest is None else latest.size,
        )
        yield from self._disk()
        yield _gauge(
            "fedge_server_disk_full",
            "1 while uploads are refused or the run is paused for a full disk.",
            float(service.disk_full is not None or aggregator.runs.paused is not None),
        )
        metrics = GaugeMetricFamily(
            "fedge_server_model_metric",
            "The last successful round's evaluation (centralized, else federated).",
            labels=["name"],
        )
        for key, value in list(aggregator.last_metrics.items())[:MAX_MODEL_METRICS]:
            metrics.add_metric([key], value)
        yield metrics

    def _nodes(self, now: float) -> Iterator[Metric]:
        sessions = self.aggregator.service.sessions
        live_since = now - sessions.window
        current = list(sessions.by_node.values())  # copied at once: the loop changes it
        known = list(sessions.bound)
        seen: dict[str, float] = {}
        joining = connected = 0
        for session in current:
            if not session.streaming:
                joining += 1
            elif session.last_seen >= live_since:
                connected += 1
            seen[session.node_id] = session.last_seen
        heard, started = self._heard, self._started  # get() needs no lock under the GIL
        oldest, offline = now, 0
        for node in known:
            last = seen.get(node)
            if last is None:
                offline += 1
                last = heard.get(node, started)
            oldest = min(oldest, last)
        counts = {
            "connected": connected,
            "silent": len(current) - joining - connected,
            "joining": joining,
            "offline": offline,
        }
        yield _gauge(
            "fedge_server_connected_nodes",
            "Nodes with an open task stream.",
            counts["connected"] + counts["silent"],
        )
        nodes = GaugeMetricFamily("fedge_server_nodes", "Known nodes by state.", labels=["state"])
        for state in NODE_STATES:
            nodes.add_metric([state], counts[state])
        yield nodes
        yield _gauge(
            "fedge_server_node_silence_seconds_max",
            "Seconds since the least recently heard node bound to a client id was heard "
            "from (nodes never heard of count from the server's start).",
            now - oldest,
        )

    def _disk(self) -> Iterator[Metric]:
        try:
            stat = os.statvfs(self.state_dir)
        except OSError:
            return
        yield _gauge(
            "fedge_server_state_dir_free_bytes",
            "Bytes available to the server in the state directory's file system.",
            stat.f_bavail * stat.f_frsize,
        )
        yield _gauge(
            "fedge_server_state_dir_size_bytes",
            "Size of the state directory's file system.",
            stat.f_blocks * stat.f_frsize,
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
