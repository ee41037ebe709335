"""What a run did, round by round: metrics, participants, failures and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedge.client import Metrics
from fedge.weights import Weights


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
    metrics: Metrics = field(default_factory=dict)
    """Centralized evaluation (``evaluate_fn``) of the new global weights."""
    fit_metrics: Metrics = field(default_factory=dict)
    """Example-weighted mean of the metrics clients reported from `fit`."""
    evaluate_metrics: Metrics = field(default_factory=dict)
    """Federated evaluation: example-weighted ``loss`` and metrics from clients."""
    fit_time: float = 0.0
    evaluate_time: float = 0.0
    wall_time: float = 0.0


@dataclass
class History:
    initial_metrics: Metrics = field(default_factory=dict)
    """Centralized evaluation of the initial weights (before round 1)."""
    rounds: list[RoundRecord] = field(default_factory=list)
    wall_time: float = 0.0
    weights: Weights | None = field(default=None, repr=False, compare=False)
    """The final global weights."""

    @property
    def completed(self) -> list[RoundRecord]:
        return [r for r in self.rounds if r.status == "ok"]

    def to_dict(self) -> dict[str, Any]:
        rounds = [
            asdict(r) | {"failures": {str(k): v for k, v in r.failures.items()}}
            for r in self.rounds
        ]
        return {
            "initial_metrics": self.initial_metrics,
            "rounds": rounds,
            "wall_time": self.wall_time,
        }
