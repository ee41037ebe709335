"""ClipUpdates: bound every client's influence by clipping the L2 norm of its update.

Server-side clipping as in DP-FedAvg: McMahan, Ramage, Talwar and Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018.
https://arxiv.org/abs/1710.06963

Each client's delta (its weights minus the round's reference weights, over the float
tensors) is scaled down to norm `max_norm` when it is longer, and the wrapped strategy's
aggregator receives ``reference + clipped delta``. Integer tensors (counters) pass as
they are. Nothing else changes: sampling, quorum and the server optimizer stay those of
the wrapped strategy. Norms are summed block by block, so an update on disk is never read
whole into memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from fedge.aggregate import Aggregator
from fedge.errors import ConfigError
from fedge.strategy.base import RoundContext, Strategy, StrategyWrapper
from fedge.weights import Array, Weights, blocks, is_norm_bound


class ClipUpdates(StrategyWrapper):
    def __init__(self, inner: Strategy, *, max_norm: float) -> None:
        super().__init__(inner)
        if not is_norm_bound(max_norm):
            raise ConfigError(f"clip_updates.max_norm must be a number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return ClippingAggregator(self.inner.aggregator(ctx), ctx.weights, self.max_norm)


class ClippingAggregator(Aggregator):
    """Clips each update's delta to `max_norm`, then hands it to `inner`."""

    def __init__(self, inner: Aggregator, reference: Weights, max_norm: float) -> None:
        super().__init__()
        self.inner, self.reference, self.max_norm = inner, reference, max_norm
        self.clipped = 0
        """How many updates of this round were scaled down."""
        floats = [a for a in reference.values() if _is_float(a) and a.size]
        self._reference_peak = max((float(np.max(np.abs(a))) for a in floats), default=0.0)

    def _add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None) -> None:
        norm = delta_norm(weights, self.reference)
        if norm > self.max_norm:
            weights = ScaledDelta(weights, self.reference, self.max_norm / norm)
            weights.magnitude = self._reference_peak + self.max_norm  # a bound is enough
            self.clipped += 1
        self.inner.add(weights, num_examples, cid)

    def result(self) -> Weights:
        return self.inner.result()


def delta_norm(weights: Mapping[str, Array], reference: Weights) -> float:
    """L2 norm of ``weights - reference`` over the float tensors, in float64."""
    total = 0.0
    for name, ref in reference.items():
        if not _is_float(ref):
            continue
        flat, start = ref.reshape(-1), 0
        for block in blocks(weights, name):
            diff = np.subtract(block, flat[start : start + block.size], dtype=np.float64)
            total += float(np.dot(diff, diff))
            start += block.size
    return math.sqrt(total)


class ScaledDelta(Mapping[str, Array]):
    """``reference + scale * (weights - reference)``, computed block by block on demand."""

    def __init__(self, weights: Mapping[str, Array], reference: Weights, scale: float) -> None:
        self._weights, self._reference, self._scale = weights, reference, scale
        self.magnitude: float | None = None

    def layout(self, name: str) -> tuple[np.dtype[np.generic], tuple[int, ...]]:
        ref = self._reference[name]
        return ref.dtype, tuple(ref.shape)

    def blocks(self, name: str) -> Iterator[Array]:
        ref = self._reference[name]
        flat, start = ref.reshape(-1), 0
        for block in blocks(self._weights, name):
            if _is_float(ref):  # in float64: a float16 delta of two finite values can be Inf
                base = flat[start : start + block.size]
                step = np.subtract(block, base, dtype=np.float64)
                step *= self._scale
                yield np.add(base, step).astype(ref.dtype, copy=False)
            else:
                yield block
            start += block.size

    def __getitem__(self, name: str) -> Array:
        ref = self._reference[name]
        out, start = np.empty(ref.size, ref.dtype), 0
        for block in self.blocks(name):  # a block may be a reused buffer: copy it at once
            out[start : start + block.size] = block
            start += block.size
        return out.reshape(ref.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reference)

    def __len__(self) -> int:
        return len(self._reference)


def _is_float(a: Array) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))
