"""FedAvgM: FedAvg with server momentum, which damps client drift on non-IID data.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv 2019. https://arxiv.org/abs/1909.06335

The round's pseudo-gradient is ``delta = weights - aggregate``; the server keeps a momentum
buffer ``m = server_momentum * m + delta`` per tensor and steps
``weights - server_learning_rate * m``. With momentum 0 and learning rate 1 this is FedAvg.
Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are not optimised:
they take the aggregate as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.strategy.base import RoundContext, State, Strategy, _check
from fedge.weights import Array, Weights


@dataclass(kw_only=True)
class FedAvgM(Strategy):
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.server_learning_rate > 0, "server_learning_rate", self.server_learning_rate, "> 0"
        )
        _check(
            0.0 <= self.server_momentum < 1.0, "server_momentum", self.server_momentum, "in [0, 1)"
        )

    def init_state(self, weights: Weights) -> State:
        return {
            f"momentum/{name}": np.zeros(a.shape, dtype=a.dtype)
            for name, a in weights.items()
            if np.issubdtype(a.dtype, np.floating)
        }

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        new_weights: Weights = {}
        new_state: State = dict(state)
        for name, w in weights.items():
            if not np.issubdtype(w.dtype, np.floating):  # counters: nothing to optimise
                new_weights[name] = aggregate[name]
                continue
            key = f"momentum/{name}"
            m: Array = np.subtract(w, aggregate[name], dtype=w.dtype)  # pseudo-gradient
            if key in state:
                m = np.add(np.multiply(self.server_momentum, state[key]), m, dtype=w.dtype)
            new_state[key] = m
            step = np.multiply(self.server_learning_rate, m)
            new_weights[name] = np.subtract(w, step, dtype=w.dtype)
        return new_weights, new_state
