"""FedTrimmedAvg: the coordinate-wise mean after dropping the most extreme values.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

For each coordinate, the ``int(beta * n)`` largest and smallest of the n client values are
removed and the rest averaged (unweighted), so up to that many bad clients per side cannot
move the result far. It sits between the mean (beta = 0) and the median.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from fedge.aggregate import Aggregator, Buffered
from fedge.strategy.base import RoundContext, Strategy, _check
from fedge.strategy.median import Stack, Updates, coordinate_wise
from fedge.weights import Array, Weights


@dataclass(kw_only=True)
class FedTrimmedAvg(Strategy):
    beta: float = 0.2
    """Fraction of the updates removed from each end, per coordinate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.beta < 0.5, "beta", self.beta, "in [0, 0.5)")

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return Buffered(partial(trimmed_mean, beta=self.beta))


def trimmed_mean(updates: Updates, beta: float) -> Weights:
    n = len(updates)
    cut = int(beta * n)
    if n - 2 * cut < 1:
        raise ValueError(
            f"trimmed mean with beta={beta} removes {cut} of {n} updates from each end, "
            "leaving none; lower beta or collect more results"
        )

    def reduce(x: Stack) -> Array:
        kept = np.sort(x, axis=0)[cut : n - cut]
        out: Array = np.mean(kept, axis=0)
        return out

    return coordinate_wise(updates, reduce)
