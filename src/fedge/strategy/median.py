"""FedMedian: the coordinate-wise median of the client models, robust to Byzantine clients.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

Unlike the mean, a median cannot be dragged arbitrarily far by a minority of bad updates.
It needs every update at once, so it buffers them (`fedge.aggregate.Buffered`). The median
is unweighted: a client must not gain influence by claiming more examples. This module also
holds the coordinate-wise plumbing the other robust rules share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fedge.aggregate import Aggregator, Buffered, stacked
from fedge.strategy.base import RoundContext, Strategy
from fedge.weights import Array, Weights

Updates = list[tuple[Weights, int]]
Stack = npt.NDArray[np.number[Any]]
"""One tensor of every update on a leading axis; model tensors are numeric."""


@dataclass(kw_only=True)
class FedMedian(Strategy):
    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return Buffered(coordinate_median)


def coordinate_median(updates: Updates) -> Weights:
    """Per coordinate, the median of all updates (mean of the middle two if their count is even)."""
    return coordinate_wise(updates, lambda x: np.median(x, axis=0))


def coordinate_wise(updates: Updates, reduce: Callable[[Stack], Array]) -> Weights:
    """Apply `reduce` to each tensor stacked over updates (axis 0), keeping names and dtypes."""
    return {
        name: cast_like(reduce(cast(Stack, stacked(updates, name))), a.dtype)
        for name, a in updates[0][0].items()
    }


def cast_like(values: Array, dtype: np.dtype[np.generic]) -> Array:
    """`values` as an array of `dtype`; integer tensors (counters) round rather than truncate."""
    out = np.asarray(values)
    if not np.issubdtype(dtype, np.floating) and np.issubdtype(out.dtype, np.floating):
        out = np.rint(out)
    return out.astype(dtype, copy=False)
