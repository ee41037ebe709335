"""Accumulators that fold client updates into an aggregate.

`WeightedMean` is streaming: each update is added when it arrives and can be dropped at
once, so memory stays O(model) however many clients answer (as FedJAX's `fed_avg` does
"to avoid loading all the client outputs into memory"). It accumulates in the update's
own dtype through a small cache-sized scratch block, so it needs no temporary the size of
the model. Robust rules need every update at once; `Buffered` keeps them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np

from fedge.weights import Array, Weights

_BLOCK = 1 << 16  # elements per scratch block: 256 KiB of float32 stays in L2 cache


class Aggregator(ABC):
    """Receives validated updates one at a time; `result()` gives the aggregate."""

    def __init__(self) -> None:
        self.count = 0
        self.total_examples = 0

    def add(self, weights: Mapping[str, Array], num_examples: int) -> None:
        self._add(weights, num_examples)
        self.count += 1
        self.total_examples += num_examples

    @abstractmethod
    def _add(self, weights: Mapping[str, Array], num_examples: int) -> None: ...

    @abstractmethod
    def result(self) -> Weights: ...


class WeightedMean(Aggregator):
    """Streaming mean weighted by `num_examples` (or unweighted with ``weighted=False``)."""

    def __init__(self, *, weighted: bool = True) -> None:
        super().__init__()
        self.weighted = weighted
        self._sum: Weights = {}
        self._dtypes: dict[str, np.dtype[np.generic]] = {}
        self._weight = 0.0
        self._scratch: dict[np.dtype[np.generic], Array] = {}

    def _add(self, weights: Mapping[str, Array], num_examples: int) -> None:
        w = float(num_examples) if self.weighted else 1.0
        if not self._sum:
            self._dtypes = {name: a.dtype for name, a in weights.items()}
            self._sum = {
                name: np.multiply(a, w, dtype=_acc_dtype(a)) for name, a in weights.items()
            }
        else:
            for name, a in weights.items():
                self._fold(self._sum[name], a, w)
        self._weight += w

    def _fold(self, acc: Array, update: Array, w: float) -> None:
        flat_acc, flat_up = acc.reshape(-1), np.asarray(update).reshape(-1)
        scratch = self._scratch.get(acc.dtype)
        if scratch is None:
            scratch = self._scratch[acc.dtype] = np.empty(_BLOCK, dtype=acc.dtype)
        for start in range(0, flat_acc.size, _BLOCK):
            stop = min(start + _BLOCK, flat_acc.size)
            tmp = scratch[: stop - start]
            np.multiply(flat_up[start:stop], w, out=tmp, casting="unsafe")
            np.add(flat_acc[start:stop], tmp, out=flat_acc[start:stop])

    def result(self) -> Weights:
        if self._weight <= 0:
            raise ValueError("no updates with a positive weight were aggregated")
        self._scratch.clear()
        out = self._sum
        for name, acc in out.items():
            acc /= self._weight
            dtype = self._dtypes[name]
            if acc.dtype != dtype:  # integer tensors (e.g. counters) round back to their dtype
                out[name] = np.rint(acc).astype(dtype)
        self._sum, self._weight = {}, 0.0
        return out


def _acc_dtype(a: Array) -> np.dtype[np.generic]:
    """Floats accumulate in their own dtype; integer tensors average in float64."""
    return a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)


Reducer = Callable[[list[tuple[Weights, int]]], Weights]


class Buffered(Aggregator):
    """Keeps every update (robust rules need them all), then applies `reduce`."""

    def __init__(self, reduce: Reducer) -> None:
        super().__init__()
        self._reduce = reduce
        self._updates: list[tuple[Weights, int]] = []

    def _add(self, weights: Mapping[str, Array], num_examples: int) -> None:
        self._updates.append((dict(weights), num_examples))

    def result(self) -> Weights:
        if not self._updates:
            raise ValueError("no updates were aggregated")
        updates, self._updates = self._updates, []
        return self._reduce(updates)


def stacked(updates: list[tuple[Weights, int]], name: str) -> Array:
    """One tensor of every update, stacked on a new leading axis."""
    return np.stack([w[name] for w, _ in updates])
