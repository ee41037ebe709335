"""FedBuff: asynchronous FL with a buffer of K staleness-weighted client updates.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
https://arxiv.org/abs/2106.06639

Nodes train continuously, each on the newest model it was given; the server folds every
arriving update ``delta = update - base`` (``base``: the model version the task started
from) into a buffer, scaled by ``1 / sqrt(1 + s)`` where the staleness ``s`` is how many
server updates happened since that version. After ``buffer_size`` (K) updates it steps
``weights + server_learning_rate * sum_i(n_i s_i delta_i) / sum_i(n_i)`` — with
``n_i = 1`` (``weight_by_examples = false``) exactly the paper's
``(1/K) sum_i s_i delta_i``: normalising by the example weights alone, not by the
staleness factors, keeps the paper's discount of a stale buffer's step. Each server
update is one round of the run's history. The workflow that keeps ``concurrency`` tasks
outstanding is `fedge.asynchronous.BufferedAsync`; here are the pure steps it uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedge.aggregate import Aggregator
from fedge.errors import ConfigError
from fedge.strategy.base import RoundContext, State, Strategy, _check
from fedge.weights import Array, Weights


def staleness_weight(staleness: int) -> float:
    """The paper's polynomial discount ``1 / sqrt(1 + s)`` of an update `staleness`
    server versions old."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class Buffer:
    """The server's buffer as plain data, so it checkpoints as-is: the running sum of
    ``n_i s_i delta_i`` per floating tensor (float64: a finite float32 delta cannot
    overflow it), the sum of ``n_i``, and the task ids folded in (a result is folded once)."""

    round: int
    """The server update (round) this buffer builds."""
    sums: Weights = field(default_factory=dict)
    weight: float = 0.0
    tasks: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.tasks)

    def fold(
        self,
        task_id: str,
        update: Mapping[str, Array],
        base: Weights,
        examples: int,
        staleness: int,
    ) -> None:
        """Add one validated update trained from `base`; integer tensors (counters) are
        not averaged: the global model keeps its own."""
        if task_id in self.tasks:
            raise ValueError(f"task {task_id!r} is in the buffer already")
        scale = examples * staleness_weight(staleness)
        for name, b in base.items():
            if not np.issubdtype(b.dtype, np.floating):
                continue
            delta = np.empty(b.shape, np.float64)  # an array for 0-d tensors too
            np.subtract(update[name], b, out=delta)
            np.multiply(delta, scale, out=delta)
            if name in self.sums:
                np.add(self.sums[name], delta, out=self.sums[name])
            else:
                self.sums[name] = delta
        self.weight += examples
        self.tasks.append(task_id)

    def mean(self) -> Weights:
        """The buffered mean delta, ``sum_i n_i s_i delta_i / sum_i n_i``."""
        if not self.tasks or self.weight <= 0:
            raise ValueError("the buffer is empty")
        return {name: np.asarray(np.divide(s, self.weight)) for name, s in self.sums.items()}


class _NotSynchronous(Aggregator):
    def _add(self, weights: object, num_examples: int, cid: int | None) -> None:
        raise ConfigError("FedBuff runs with the asynchronous workflow, not in synchronous rounds")

    def result(self) -> Weights:
        raise ConfigError("FedBuff runs with the asynchronous workflow, not in synchronous rounds")


@dataclass(kw_only=True)
class FedBuff(Strategy):
    """Buffered asynchronous aggregation; evaluation is centralized (``evaluate_fn``):
    federated evaluation would wait behind the fit tasks that stay outstanding."""

    asynchronous: ClassVar[bool] = True

    buffer_size: int = 10
    """K: client updates folded per server update."""
    concurrency: int = 20
    """Fit tasks kept outstanding at once (the paper's concurrency); at most one per client."""
    server_learning_rate: float = 1.0
    max_staleness: int = 10
    """Updates more server versions old than this are dropped (and counted in the round)."""
    weight_by_examples: bool = True
    """Weigh updates by their example counts (False: each counts 1, as in the paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("buffer_size", "concurrency"):
            value = getattr(self, key)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                key,
                value,
                "an integer >= 1",
            )
        _check(
            self.server_learning_rate > 0, "server_learning_rate", self.server_learning_rate, "> 0"
        )
        _check(
            isinstance(self.max_staleness, int) and self.max_staleness >= 0,
            "max_staleness",
            self.max_staleness,
            "an integer >= 0",
        )
        _check(
            self.fraction_evaluate == 0.0,
            "fraction_evaluate",
            self.fraction_evaluate,
            "0 under FedBuff (evaluation is centralized: federated evaluation tasks would "
            "wait behind the fit tasks that stay outstanding)",
        )

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return _NotSynchronous()

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        """``weights + server_learning_rate * aggregate``, where the aggregate is the
        buffered mean delta (`Buffer.mean`); integer tensors stay as they are."""
        new: Weights = {}
        for name, w in weights.items():
            if name not in aggregate:
                new[name] = w
                continue
            step: Array = np.multiply(self.server_learning_rate, aggregate[name])
            new[name] = np.asarray(np.add(w, step), dtype=w.dtype)
        return new, state
