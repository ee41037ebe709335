"""Accumulators that fold client updates into an aggregate.

`WeightedMean` is streaming: each update is added when its turn comes and can be dropped
at once, so memory stays O(model) however many clients answer (as FedJAX's `fed_avg`
does "to avoid loading all the client outputs into memory"). Robust rules need every
update at once; `Buffered` keeps them. Both see updates in client-id order when the
coordinator folds them, and `Buffered` sorts by client id itself, so ties in robust rules
are broken the same way however the updates arrived.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np

from fedge.weights import Array, Weights, blocks, magnitude

SAFE_MAGNITUDE = float(np.finfo(np.float32).max) / 4
"""Above this bound on the running sum, an update is folded as a running mean instead."""


class Aggregator(ABC):
    """Receives validated updates one at a time; `result()` gives the aggregate."""

    def __init__(self) -> None:
        self.count = 0
        self.total_examples = 0

    def add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None = None) -> None:
        """Fold one client's update; `cid` orders updates where order matters."""
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self._add(weights, num_examples, cid)
        self.count += 1
        self.total_examples += num_examples

    @abstractmethod
    def _add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None) -> None: ...

    @abstractmethod
    def result(self) -> Weights: ...


class WeightedMean(Aggregator):
    """Streaming mean weighted by `num_examples` (or unweighted with ``weighted=False``).

    The running sum ``sum_i n_i u_i`` is kept as ``c * v``: adding ``n u`` becomes
    ``v = v * (c / n) + u; c = n``, two in-place passes and no temporary, so folding costs
    less than NumPy's ``acc += n * u`` and needs no memory beyond `v`. A sum can overflow:
    one node sending finite float32 values near 3e38 would turn the model into Inf. So a
    bound on ``|v|`` is kept from each update's largest magnitude (which `validate`
    measures on its pass anyway), and when the fast step could overflow the update is
    folded as a running mean instead (``v`` becomes the mean so far, a convex combination
    of finite values). The path depends on the values only, so a model is the same
    bit for bit whether updates come from memory or from files.

    Floats accumulate in their own type but never narrower than float32 (in float16, 3,000
    clients sending ones averaged to 0.68 and 200 sending 1000 to Inf), integer tensors
    in float64; the mean is cast back once, at the end.
    """

    def __init__(self, *, weighted: bool = True) -> None:
        super().__init__()
        self.weighted = weighted
        self._v: Weights = {}
        self._dtypes: dict[str, np.dtype[np.generic]] = {}
        self._c = 0.0
        self._weight = 0.0
        self._bound = 0.0

    def _add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None) -> None:
        n = float(num_examples) if self.weighted else 1.0
        peak = magnitude(weights)
        total = self._weight + n
        if not self._v:
            for name in weights:
                self._start(name, weights)
            self._c, self._bound = n, peak
        elif self._bound * (self._c / n) + peak <= SAFE_MAGNITUDE:
            self._fold(weights, self._c / n, 1.0)
            self._c, self._bound = n, self._bound * (self._c / n) + peak
        else:  # the fast step could overflow: fold as a running mean
            self._fold(weights, self._c / total, n / total)
            self._c, self._bound = total, max(self._bound, peak)
        self._weight = total

    def _fold(self, weights: Mapping[str, Array], keep: float, scale: float) -> None:
        """``v = v * keep + u * scale``, block by block: a file-backed update never sits whole."""
        for name, v in self._v.items():
            np.multiply(v, keep, out=v)
            flat, start = v.reshape(-1), 0  # a view: `v` is contiguous, made here
            for block in blocks(weights, name):
                part = flat[start : start + block.size]
                if scale == 1.0:
                    np.add(part, block, out=part, casting="unsafe")
                else:
                    np.add(part, np.multiply(block, scale, dtype=part.dtype), out=part)
                start += block.size

    def _start(self, name: str, weights: Mapping[str, Array]) -> None:
        """The first update is the sum so far (with c = n): copied in the accumulator's dtype."""
        dtype, shape = _layout(weights, name)
        v = np.empty(int(np.prod(shape, dtype=np.int64)), _acc_dtype(dtype))
        start = 0
        for block in blocks(weights, name):
            v[start : start + block.size] = block
            start += block.size
        self._dtypes[name] = dtype
        self._v[name] = v.reshape(shape)

    def result(self) -> Weights:
        if self._weight <= 0:
            raise ValueError("no updates with a positive weight were aggregated")
        out, scale = self._v, self._c / self._weight
        for name, v in out.items():
            np.multiply(v, scale, out=v)
            dtype = self._dtypes[name]
            if v.dtype != dtype:  # float16 back from float32; counters round back to integers
                out[name] = (v if dtype.kind == "f" else np.rint(v)).astype(dtype)
        self._v, self._c, self._weight, self._bound = {}, 0.0, 0.0, 0.0
        return out


def _acc_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """float32 or wider for floats; integer tensors average in float64."""
    if np.issubdtype(dtype, np.floating):
        return np.promote_types(dtype, np.float32)
    return np.dtype(np.float64)


def _layout(
    weights: Mapping[str, Array], name: str
) -> tuple[np.dtype[np.generic], tuple[int, ...]]:
    layout = getattr(weights, "layout", None)
    if layout is not None:  # a file-backed update: read the header, not the tensor
        found: tuple[np.dtype[np.generic], tuple[int, ...]] = layout(name)
        return found
    a = np.asarray(weights[name])
    return a.dtype, tuple(a.shape)


Updates = list[tuple[Weights, int]]
Reducer = Callable[[Updates], Weights]


class Buffered(Aggregator):
    """Keeps every update (robust rules need them all), then applies `reduce` to them in
    client-id order, so ties are broken the same way whatever order they arrived in."""

    def __init__(self, reduce: Reducer) -> None:
        super().__init__()
        self._reduce = reduce
        self._updates: list[tuple[float, int, Weights, int]] = []

    def _add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None) -> None:
        key = float("inf") if cid is None else float(cid)  # without ids: arrival order
        self._updates.append((key, len(self._updates), dict(weights), num_examples))

    def result(self) -> Weights:
        if not self._updates:
            raise ValueError("no updates were aggregated")
        updates, self._updates = sorted(self._updates, key=lambda u: u[:2]), []
        return self._reduce([(w, n) for _, _, w, n in updates])


def stacked(updates: Updates, name: str) -> Array:
    """One tensor of every update, stacked on a new leading axis."""
    return np.stack([w[name] for w, _ in updates])
