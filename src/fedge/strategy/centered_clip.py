"""CenteredClip: clip every update around the previous round's aggregate, then average.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021. https://arxiv.org/abs/2012.10333

The server keeps a center ``v``: the last aggregated delta (``aggregate - weights``), the
"history" of the title. Each round, starting from it, it iterates
``v <- v + mean_i (d_i - v) * min(1, tau / |d_i - v|)`` over the clients' deltas ``d_i``,
so an update can pull the result at most ``tau / n`` away from the center however far it
lies, and updates within ``tau`` count as in a plain mean. Attacks coupled over rounds
meet a center that moves only as fast as the honest majority. Clients count equally:
weighting by a reported example count would let one client multiply its pull.

``radius`` (tau) is an L2 norm over the float tensors, or None for the median distance
of the round's updates from the center (our choice, not the paper's: scale-free, and
honest while most clients are). With a fixed radius and one iteration (the setting of
the authors' code) each update is clipped as it arrives and folded into a streaming mean,
so the server holds O(model), as for FedAvg; otherwise the rule needs every update at
once and buffers them, as the median does. Integer tensors (counters) take the plain
mean. The center is the strategy state, ``centered_clip/<name>`` per float tensor, so
a checkpoint stores it and a resumed run clips around the same point.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from fedge.aggregate import Aggregator, Buffered, WeightedMean
from fedge.strategy.base import RoundContext, State, Strategy, _check
from fedge.strategy.clip import ClippingAggregator
from fedge.strategy.median import Updates, cast_like
from fedge.weights import Array, Weights, is_norm_bound

PREFIX = "centered_clip/"
F64 = npt.NDArray[np.float64]


@dataclass(kw_only=True)
class CenteredClip(Strategy):
    radius: float | None = None
    """tau, the clipping radius around the center (L2 over the float tensors); None: the
    median distance of the round's updates from the center."""
    iterations: int = 1
    """Clipping iterations per round (the paper's l); 1 suffices from a good center."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.radius is None or is_norm_bound(self.radius),
            "radius",
            self.radius,
            "a number > 0 (or unset for the median distance)",
        )
        ok = isinstance(self.iterations, int) and not isinstance(self.iterations, bool)
        _check(ok and self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")

    def init_state(self, weights: Weights) -> State:
        return {PREFIX + name: np.zeros_like(a) for name, a in weights.items() if _is_float(a)}

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        center = center_of(ctx.state, ctx.weights)
        if self.radius is not None and self.iterations == 1:
            start = {
                name: (np.add(w, center[name], dtype=np.float64).astype(w.dtype))
                if name in center
                else w
                for name, w in ctx.weights.items()
            }
            return ClippingAggregator(WeightedMean(weighted=False), start, self.radius)
        return Buffered(
            partial(
                centered_clip,
                reference=ctx.weights,
                center=center,
                radius=self.radius,
                iterations=self.iterations,
            )
        )

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        new_state = dict(state)
        for name, w in weights.items():
            if _is_float(w):
                new_state[PREFIX + name] = np.subtract(aggregate[name], w, dtype=w.dtype)
        return aggregate, new_state


def center_of(state: State, weights: Weights) -> dict[str, Array]:
    """The center per float tensor: the last aggregated delta, zero before the first."""
    return {
        name: np.asarray(state.get(PREFIX + name, np.zeros_like(w)), dtype=w.dtype)
        for name, w in weights.items()
        if _is_float(w)
    }


def centered_clip(
    updates: Updates,
    reference: Weights,
    center: dict[str, Array],
    radius: float | None,
    iterations: int,
) -> Weights:
    """``reference + v`` after `iterations` steps of centered clipping from `center`."""
    n = len(updates)
    v: dict[str, F64] = {name: np.asarray(c, dtype=np.float64) for name, c in center.items()}
    for _ in range(iterations):
        distances = [_distance(w, reference, v) for w, _ in updates]
        tau = statistics.median(distances) if radius is None else radius
        scales = [1.0 if d <= tau else tau / d for d in distances]
        for name in v:
            step = np.zeros_like(v[name])
            for (w, _), scale in zip(updates, scales, strict=True):
                diff = np.subtract(w[name], reference[name], dtype=np.float64) - v[name]
                step += scale * diff
            v[name] = v[name] + step / n
    out: Weights = {}
    for name, ref in reference.items():
        if name in v:
            out[name] = cast_like(np.add(ref, v[name], dtype=np.float64), ref.dtype)
        else:  # counters: the plain mean, rounded
            mean = np.mean([np.asarray(w[name], dtype=np.float64) for w, _ in updates], axis=0)
            out[name] = cast_like(mean, ref.dtype)
    return out


def _distance(weights: Weights, reference: Weights, v: Mapping[str, Array]) -> float:
    total = 0.0
    for name, c in v.items():
        diff = np.subtract(weights[name], reference[name], dtype=np.float64) - c
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _is_float(a: Array) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))
