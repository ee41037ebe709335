"""The Client API users implement: train (`fit`) and test (`evaluate`) on local data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedge.weights import Array, Weights

Config = dict[str, Any]
Metrics = dict[str, float]


@dataclass
class FitResult:
    weights: Mapping[str, Array]
    """Usually a `Weights` dict; the server passes a file-backed mapping."""
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass
class EvaluateResult:
    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


class Client(ABC):
    """One participant's data and training code.

    `config` always holds ``round`` (1-based) and ``seed`` (derived from the run seed, the
    round and the client id), plus the strategy's and the user's per-round settings.
    """

    @abstractmethod
    def fit(self, weights: Weights, config: Config) -> FitResult:
        """Train from the global `weights`; return the new local weights."""

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate()")

    def get_weights(self, config: Config) -> Weights:
        """Initial weights, used when the server was given none."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement get_weights(); pass initial_weights"
        )
