"""Accumulators that fold client updates into an aggregate.

`WeightedMean` is streaming: each update is added when it arrives and can be dropped at
once, so memory stays O(model) however many clients answer (as FedJAX's `fed_avg` does
"to avoid loading all the client outputs into memory"). It accumulates in the update's
own dtype, in place. Robust rules need every update at once; `Buffered` keeps them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np

from fedge.weights import Array, FileWeights, Weights, blocks


class Aggregator(ABC):
    """Receives validated updates one at a time; `result()` gives the aggregate."""

    def __init__(self) -> None:
        self.count = 0
        self.total_examples = 0

    def add(self, weights: Mapping[str, Array], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self._add(weights, num_examples)
        self.count += 1
        self.total_examples += num_examples

    @abstractmethod
    def _add(self, weights: Mapping[str, Array], num_examples: int) -> None: ...

    @abstractmethod
    def result(self) -> Weights: ...


class WeightedMean(Aggregator):
    """Streaming mean weighted by `num_examples` (or unweighted with ``weighted=False``).

    The running sum ``sum_i n_i u_i`` is kept as ``c * v``: adding ``n u`` becomes
    ``v = v * (c / n) + u; c = n``, two in-place passes and no temporary array, so
    folding costs less than NumPy's ``acc += n * u`` and needs no memory beyond `v`.
    """

    def __init__(self, *, weighted: bool = True) -> None:
        super().__init__()
        self.weighted = weighted
        self._v: Weights = {}
        self._dtypes: dict[str, np.dtype[np.generic]] = {}
        self._c = 0.0
        self._weight = 0.0

    def _add(self, weights: Mapping[str, Array], num_examples: int) -> None:
        n = float(num_examples) if self.weighted else 1.0
        if not self._v:
            owned = isinstance(weights, FileWeights)  # freshly read from disk: ours to keep
            for name, a in weights.items():
                self._dtypes[name] = a.dtype
                self._v[name] = np.array(a, dtype=_acc_dtype(a), copy=None if owned else True)
        else:
            ratio = self._c / n
            for name, v in self._v.items():
                if ratio != 1.0:
                    np.multiply(v, ratio, out=v)
                flat, start = v.reshape(-1), 0  # a view: `v` is contiguous, made here
                for block in blocks(weights, name):  # a file-backed update never sits whole
                    part = flat[start : start + block.size]
                    np.add(part, block, out=part, casting="unsafe")
                    start += block.size
        self._c = n
        self._weight += n

    def result(self) -> Weights:
        if self._weight <= 0:
            raise ValueError("no updates with a positive weight were aggregated")
        out, scale = self._v, self._c / self._weight
        for name, v in out.items():
            np.multiply(v, scale, out=v)
            dtype = self._dtypes[name]
            if v.dtype != dtype:  # integer tensors (e.g. counters) round back to their dtype
                out[name] = np.rint(v).astype(dtype)
        self._v, self._c, self._weight = {}, 0.0, 0.0
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
