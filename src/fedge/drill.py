"""A fault drill: a real fleet in a lab network (`fedge.netlab`) taken through packet
loss, a partition and a device offline, on either transport.

The nodes run a probe app: node `cid` answers ``w + (cid + 1) / 1000`` for ``cid + 1``
examples, in float64. Replaying the run's history (who took part in each round) gives
the exact final weights, so an update counted twice, or one counted that the history
does not show, moves them. Training sleeps for the pace the drill sets in a file: slow
while faults last, so rounds keep running through them, and quick afterwards, so the
rest of the run finishes soon. A poller records the server's round as time passes,
which gives each phase's rounds per second (the overhead against the clean phase).
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.checkpoint import latest_checkpoint
from fedge.launch import Launcher, wait_for
from fedge.netlab import Lab

PROBE_APP = """
import time
from pathlib import Path

import numpy as np
from fedge import App
from fedge.client import Client, FitResult


class Probe(Client):
    def __init__(self, cid, pace_file):
        self.cid, self.pace_file = cid, Path(pace_file)

    def fit(self, weights, config):
        time.sleep(float(self.pace_file.read_text() or 0))
        step = (self.cid + 1) / 1000
        return FitResult({k: v + step for k, v in weights.items()}, self.cid + 1)


def create_app(num_clients, seed, pace_file):
    return App(lambda cid: Probe(cid, pace_file), {"w": np.zeros(1000, np.float64)})
"""


@dataclass
class Schedule:
    """The faults of issue 9 §2, in order, with a clean phase first for the baseline."""

    clean: float = 20.0
    loss: float = 60.0
    loss_percent: int = 20
    partition: float = 30.0
    offline: float = 120.0
    offline_node: int = -1  # the last node
    settle_timeout: float = 90.0
    pace: float = 0.5
    """Seconds each fit sleeps while the schedule runs."""


@dataclass
class Phase:
    name: str
    start: float
    end: float
    rounds: int
    """Rounds completed (status ``round`` advanced) during the phase."""


@dataclass
class DrillResult:
    transport: str
    history: dict[str, Any]
    weights: np.ndarray
    phases: list[Phase] = field(default_factory=list)
    wall_time: float = 0.0
    logs: dict[str, str] = field(default_factory=dict)

    def expected_weights(self, nodes: int) -> float:
        """The final weight replayed from the history: each round's mean of
        ``w + (cid + 1) / 1000`` weighted by ``cid + 1`` over its participants."""
        value = 0.0
        for record in self.history["rounds"]:
            if record["status"] == "ok":
                cids = record["participants"]
                value += sum((c + 1) ** 2 / 1000 for c in cids) / sum(c + 1 for c in cids)
        return value


def probe_config(directory: Path, nodes: int, rounds: int, pace_file: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "probeapp.py").write_text(PROBE_APP)
    path = directory / "fedge.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [app]
            target = "probeapp:create_app"
            options = {{ pace_file = "{pace_file}" }}

            [run]
            num_clients = {nodes}
            rounds = {rounds}
            round_timeout = 10
            max_round_retries = 30

            [strategy]
            name = "fedavg"
            min_available_clients = {max(1, nodes - 1)}
            fraction_evaluate = 0.0
            """
        )
    )
    return path


class _Rounds:
    """The server's round number over time, polled over the operator's link."""

    def __init__(self, fleet: Launcher) -> None:
        self.fleet = fleet
        self.samples: list[tuple[float, int]] = []
        self.nodes_live = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            status = self.fleet.status(timeout=1.0)
            if status is not None:
                self.samples.append((time.monotonic(), int(status.round)))
                self.nodes_live = sum(1 for n in status.nodes if n.live)

    def now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_drill(
    work: Path,
    transport: str,
    *,
    nodes: int = 4,
    rounds: int = 500,
    schedule: Schedule | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> DrillResult:
    """Runs the whole drill and returns what happened; raises TimeoutError if the fleet
    does not recover from a fault within ``settle_timeout`` or the run does not end."""
    schedule = schedule or Schedule()
    pace = work / "pace"
    pace.write_text(str(schedule.pace))
    config = probe_config(work / "app", nodes, rounds, pace)
    out = work / "history.json"
    offline = schedule.offline_node % nodes
    with (
        Lab(nodes) as lab,
        Launcher(work, config, transport=transport, host=lab.hub_address, netns=lab.hub) as fleet,
    ):
        started = time.monotonic()
        server = fleet.server("--out", out)
        procs = [fleet.node(i, netns=lab.nodes[i]) for i in range(nodes)]
        watch = _Rounds(fleet)
        phases: list[Phase] = []

        def phase(
            name: str, seconds: float, fault: Callable[[], None], heal: Callable[[], None]
        ) -> None:
            if on_phase is not None:
                on_phase(name)
            begin, first = time.monotonic(), watch.now()
            fault()
            time.sleep(seconds)
            heal()
            phases.append(
                Phase(name, begin - started, time.monotonic() - started, watch.now() - first)
            )
            recover(f"recovery after {name}")

        def recover(name: str) -> None:
            """Every node live again and two more rounds done."""
            begin, first = time.monotonic(), watch.now()
            wait_for(
                lambda: watch.nodes_live == nodes and watch.now() >= first + 2,
                f"{transport}: {name}",
                schedule.settle_timeout,
            )
            phases.append(
                Phase(name, begin - started, time.monotonic() - started, watch.now() - first)
            )

        try:
            wait_for(
                lambda: watch.nodes_live == nodes and watch.now() >= 2,
                f"{transport}: every node and round 2",
                120,
            )
            phase("clean", schedule.clean, lambda: None, lambda: None)
            phase(
                f"{schedule.loss_percent}% loss",
                schedule.loss,
                lambda: lab.loss(schedule.loss_percent),
                lab.clear_loss,
            )
            phase("partition", schedule.partition, lab.partition, lambda: lab.partition(up=True))
            phase(
                f"node {offline} offline",
                schedule.offline,
                lambda: lab.offline(offline),
                lambda: lab.offline(offline, up=True),
            )
            pace.write_text("0")
            code = server.wait(timeout=300)
            down = [i for i, proc in enumerate(procs) if proc.poll() is not None]
        finally:
            watch.stop()
            logs = {name: fleet.log(name, tail=20_000) for name in fleet.procs}
        if code != 0:
            raise RuntimeError(f"{transport}: the server exited with {code}:\n{logs['server']}")
        if down:
            raise RuntimeError(f"{transport}: nodes {down} exited during the drill")
        run = next((fleet.state_dir / "runs").iterdir())
        ckpt = latest_checkpoint(run / "checkpoints")
        assert ckpt is not None
        return DrillResult(
            transport,
            json.loads(out.read_text()),
            ckpt.weights["w"],
            phases,
            time.monotonic() - started,
            logs,
        )
