"""The Strategy interface: who trains each round, with what settings, and how to combine.

A strategy is configuration plus two pure steps, in the spirit of FedJAX's
``init(params) -> state`` / ``apply(state, clients) -> state``:

* `aggregator(ctx)` gives a fresh accumulator for one round's client updates;
* `apply(weights, aggregate, state, ctx)` turns the aggregate into the next global
  weights (a server optimizer lives here) and returns the new server state.

Both see the round's `RoundContext`: its number, the reference weights the clients
started from (so a wrapper can look at updates as deltas) and a seeded RNG (so noise is
reproducible). Server state is a flat ``name -> ndarray`` dict, so checkpoints store it
as-is. A `StrategyWrapper` wraps any strategy and changes one step, the way middleware
wraps an app. Strategies never import transports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedge.aggregate import Aggregator, WeightedMean
from fedge.errors import ConfigError
from fedge.weights import State, Weights

__all__ = ["RoundContext", "State", "Strategy", "StrategyWrapper"]


@dataclass(frozen=True)
class RoundContext:
    """What a strategy may know about the round it aggregates."""

    round: int
    attempt: int
    weights: Weights
    """The global weights the clients started from: ``update - weights`` is a delta."""
    rng: np.random.Generator
    """Seeded from (run seed, round, attempt): the same draws in a resumed run."""
    state: State = dataclasses.field(default_factory=dict)
    """The strategy's state at the start of the round (e.g. an adaptive clipping norm)."""
    population: int = 0
    """Clients available when the round sampled (0 before it did)."""
    selected: int = 0
    """Clients sampled to train this round: ``selected / population`` is its sampling rate."""


@dataclass(kw_only=True)
class Strategy:
    """Sampling and quorum settings shared by every strategy.

    Each round trains on ``clients_per_round`` clients if set, else on
    ``ceil(fraction_fit * available)``, never fewer than ``min_fit_clients``; a round
    needs ``min_results`` valid results to be aggregated (else it fails and is retried).
    Federated evaluation runs on ``fraction_evaluate`` of the clients (0 disables it).
    """

    asynchronous: ClassVar[bool] = False
    """Aggregates in asynchronous rounds (`fedge.asynchronous`), not through `aggregator`
    in synchronous ones; server-side wrappers cannot wrap it."""

    fraction_fit: float = 1.0
    clients_per_round: int | None = None
    min_fit_clients: int = 1
    fraction_evaluate: float = 0.0
    min_evaluate_clients: int = 1
    min_available_clients: int = 1
    min_results: int = 1
    accept_partial_work: bool = False
    """Keep the partial work of stragglers (FedProx) rather than dropping them (FedAvg)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.fraction_fit <= 1.0, "fraction_fit", self.fraction_fit, "in (0, 1]")
        _check(
            0.0 <= self.fraction_evaluate <= 1.0,
            "fraction_evaluate",
            self.fraction_evaluate,
            "in [0, 1]",
        )
        for key in (
            "min_fit_clients",
            "min_evaluate_clients",
            "min_available_clients",
            "min_results",
        ):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
        if self.clients_per_round is not None:
            _check(
                self.clients_per_round >= 1,
                "clients_per_round",
                self.clients_per_round,
                "an integer >= 1",
            )

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_fit_clients(self, available: int) -> int:
        """How many of `available` clients train this round."""
        wanted = self.clients_per_round or _ceil(self.fraction_fit * available)
        return min(available, max(wanted, self.min_fit_clients))

    def num_evaluate_clients(self, available: int) -> int:
        if self.fraction_evaluate == 0.0:
            return 0
        wanted = _ceil(self.fraction_evaluate * available)
        return min(available, max(wanted, self.min_evaluate_clients))

    def fit_config(self, server_round: int) -> dict[str, Any]:
        """Settings the strategy sends to every client that trains this round."""
        return {}

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return WeightedMean()

    def init_state(self, weights: Weights) -> State:
        return {}

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        """Next global weights from the current ones and this round's aggregate."""
        return aggregate, state

    def report(self, state: State) -> dict[str, float]:
        """Numbers about the strategy itself after a round (privacy spent, clipping norm),
        recorded with the round."""
        return {}

    def stop_reason(self, state: State) -> str:
        """Why the run must end before its next round (a privacy budget spent), or ""."""
        return ""


class StrategyWrapper(Strategy):
    """Wraps `inner` and delegates everything to it; a subclass overrides the steps it
    changes. Settings (``fraction_fit``, ``min_results``, ...) read and write the inner
    strategy's, so a wrapped strategy is sampled exactly as the bare one."""

    def __init__(self, inner: Strategy) -> None:  # no dataclass fields of its own
        if inner.asynchronous:
            raise ConfigError(
                f"strategy.wrap: {type(self).__name__} cannot wrap {inner.name}: a server-side "
                f"wrapper changes the synchronous aggregation, which {inner.name} does not use "
                "(node-side wrappers such as ClipClient do apply)"
            )
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.inner.name})"

    def num_fit_clients(self, available: int) -> int:
        return self.inner.num_fit_clients(available)

    def num_evaluate_clients(self, available: int) -> int:
        return self.inner.num_evaluate_clients(available)

    def fit_config(self, server_round: int) -> dict[str, Any]:
        return self.inner.fit_config(server_round)

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return self.inner.aggregator(ctx)

    def init_state(self, weights: Weights) -> State:
        return self.inner.init_state(weights)

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        return self.inner.apply(weights, aggregate, state, ctx)

    def report(self, state: State) -> dict[str, float]:
        return self.inner.report(state)

    def stop_reason(self, state: State) -> str:
        return self.inner.stop_reason(state)


def _delegated(name: str) -> property:
    return property(
        lambda self: getattr(self.inner, name), lambda self, value: setattr(self.inner, name, value)
    )


for _field in dataclasses.fields(Strategy):  # settings live in the inner strategy
    setattr(StrategyWrapper, _field.name, _delegated(_field.name))


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise: 0.07 * 100 is 7, not 8."""
    return math.ceil(round(x, 9))


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"strategy.{key} must be {expected}, got {value!r}")
