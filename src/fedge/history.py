"""What a run did, round by round: metrics, participants, failures and timings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from fedge.metrics import Metrics
from fedge.weights import State, Weights


@dataclass
class RoundRecord:
    """One attempt at one round. A failed attempt (no quorum) is followed by a retry."""

    round: int
    attempt: int = 0
    status: Literal["ok", "failed"] = "ok"
    reason: str = ""
    """Why a failed attempt failed."""
    selected: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    """Clients whose fit results were aggregated."""
    failures: dict[int, str] = field(default_factory=dict)
    """Selected clients without a usable result, and why."""
    num_examples: int = 0
    tasks: list[str] = field(default_factory=list)
    """Asynchronous rounds: the fit tasks whose results were aggregated (a client can
    contribute several); empty for synchronous rounds, where `participants` says it all."""
    stale: int = 0
    """Asynchronous rounds: results dropped as more than ``max_staleness`` versions old."""
    metrics: Metrics = field(default_factory=dict)
    """Centralized evaluation (``evaluate_fn``) of the new global weights."""
    fit_metrics: Metrics = field(default_factory=dict)
    """Example-weighted mean of the metrics clients reported from `fit`."""
    evaluate_metrics: Metrics = field(default_factory=dict)
    """Federated evaluation: example-weighted ``loss`` and metrics from clients."""
    evaluate_failures: dict[int, str] = field(default_factory=dict)
    """Clients asked to evaluate without a usable answer, and why."""
    strategy_metrics: Metrics = field(default_factory=dict)
    """What the strategy reports about itself after the round, e.g. ``epsilon`` spent."""
    fit_time: float = 0.0
    wait_time: float = 0.0
    """Seconds of `fit_time` spent waiting for enough clients to be available (a round
    started before its nodes connected); the work itself is ``wall_time - wait_time``."""
    evaluate_time: float = 0.0
    wall_time: float = 0.0
    cpu_time: float = 0.0
    """CPU seconds the process used during the attempt, all threads (server or simulator)."""
    sim_time: float = 0.0
    """Simulated seconds from the start of the run to the end of the attempt, when the
    simulation models node speeds (``[simulation] speed_spread`` or ``task_times``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; `failures` keys become strings, as JSON object keys must be."""
        return asdict(self) | {
            key: {str(k): v for k, v in getattr(self, key).items()}
            for key in ("failures", "evaluate_failures")
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Inverse of `to_dict` (e.g. after a JSON round trip); unknown keys are ignored
        so records written by a newer fedge still load."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("failures", "evaluate_failures"):
            values[key] = {int(k): str(v) for k, v in data.get(key, {}).items()}
        for key in ("selected", "participants"):
            if key in values:
                values[key] = [int(c) for c in values[key]]
        for key in ("metrics", "fit_metrics", "evaluate_metrics", "strategy_metrics"):
            if key in values:
                values[key] = dict(values[key])
        return cls(**values)


@dataclass
class History:
    initial_metrics: Metrics = field(default_factory=dict)
    """Centralized evaluation of the initial weights (before round 1)."""
    rounds: list[RoundRecord] = field(default_factory=list)
    wall_time: float = 0.0
    weights: Weights | None = field(default=None, repr=False, compare=False)
    """The final global weights."""
    ended_early: str = ""
    """Why the run ended before its last round (e.g. its privacy budget was spent), or ""."""

    @property
    def completed(self) -> list[RoundRecord]:
        return [r for r in self.rounds if r.status == "ok"]

    # A History records a run in memory (`fedge.coordinator.Recorder`); the server records
    # to its database instead, so its memory does not grow with the run.
    def on_start(self, initial_metrics: Metrics) -> None:
        self.initial_metrics = dict(initial_metrics)

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        self.rounds.append(record)
        self.weights = weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_metrics": self.initial_metrics,
            "rounds": [r.to_dict() for r in self.rounds],
            "wall_time": self.wall_time,
            "ended_early": self.ended_early,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Inverse of `to_dict`; the final weights are not part of it and stay None."""
        return cls(
            initial_metrics=dict(data.get("initial_metrics", {})),
            rounds=[RoundRecord.from_dict(r) for r in data.get("rounds", [])],
            wall_time=float(data.get("wall_time", 0.0)),
            ended_early=str(data.get("ended_early", "")),
        )
