"""Bulyan: Krum to pick a trusted set, then a trimmed mean around the median per coordinate.

El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018. https://arxiv.org/abs/1802.07927

Krum alone can be fooled on a few coordinates by an attacker hiding in the high dimension;
Bulyan bounds every coordinate. With n >= 4f + 3 updates it selects theta = n - 2f of them
by repeated Krum (each round removing the winner), then for each coordinate averages the
beta = theta - 2f selected values closest to their median.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from fedge.aggregate import Aggregator, Buffered
from fedge.strategy.base import RoundContext, Strategy, _check
from fedge.strategy.krum import _is_count, krum_scores, pairwise_sq_distances
from fedge.strategy.median import Stack, Updates, coordinate_wise
from fedge.weights import Array, Weights

_COLUMNS = 1 << 14  # coordinates per block


@dataclass(kw_only=True)
class Bulyan(Strategy):
    num_malicious: int = 0
    """f, the number of Byzantine clients to tolerate; each round needs n >= 4f + 3."""
    min_results: int = 3  # 4f + 3 with f = 0; checked against f so no round is doomed

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            _is_count(self.num_malicious, 0), "num_malicious", self.num_malicious, "an integer >= 0"
        )
        need = 4 * self.num_malicious + 3
        _check(
            self.min_results >= need,
            "min_results",
            self.min_results,
            f">= 4 * num_malicious + 3 = {need} (Bulyan needs that many updates)",
        )

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return Buffered(partial(bulyan, num_malicious=self.num_malicious))


def bulyan(updates: Updates, num_malicious: int) -> Weights:
    n, f = len(updates), num_malicious
    if n < 4 * f + 3:
        raise ValueError(
            f"Bulyan tolerating num_malicious={f} needs at least 4f + 3 = {4 * f + 3} updates, "
            f"got {n}; raise strategy.min_results or lower num_malicious"
        )
    chosen = [updates[i] for i in select_by_krum(updates, f, n - 2 * f)]
    return coordinate_wise(chosen, partial(mean_around_median, beta=n - 4 * f))  # theta - 2f


def mean_around_median(x: Stack, beta: int) -> Array:
    """Per coordinate (axis 0 stacks the updates), the mean of the `beta` values closest to
    the median; on a tie the smaller value is kept.

    Those values are a window of the sorted column, so it sorts once and drops the farther
    end ``theta - beta`` times; column blocks keep the work in cache and the memory small.
    """
    theta = x.shape[0]
    flat = x.reshape(theta, -1)
    out = np.empty(
        flat.shape[1], dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    )
    rows = np.arange(theta)[:, None]
    for start in range(0, flat.shape[1], _COLUMNS):
        block = np.sort(flat[:, start : start + _COLUMNS], axis=0)
        cols = np.arange(block.shape[1])
        mid = theta // 2
        median = (block[mid] + block[(theta - 1) // 2].astype(out.dtype)) / 2
        lo, hi = np.zeros_like(cols), np.full_like(cols, theta - 1)
        for _ in range(theta - beta):
            drop_lo = median - block[lo, cols] > block[hi, cols] - median
            lo += drop_lo
            hi -= ~drop_lo
        kept = np.where((rows >= lo) & (rows <= hi), block, 0)
        out[start : start + block.shape[1]] = kept.sum(axis=0, dtype=out.dtype) / beta
    return out.reshape(x.shape[1:])


def select_by_krum(updates: Updates, f: int, count: int) -> list[int]:
    """Indices of `count` updates, each the Krum winner among those not yet chosen.

    Distances are computed once. Krum's ``r - f - 2`` neighbours shrink with the remaining
    set ``r``; they are kept between 1 and ``r - 1`` for the last, smallest sets.
    """
    dist = pairwise_sq_distances(updates)
    remaining = list(range(len(updates)))
    chosen: list[int] = []
    while len(chosen) < count:
        r = len(remaining)
        neighbours = min(max(r - f - 2, 1), r - 1)
        scores = krum_scores(dist[np.ix_(remaining, remaining)], neighbours)
        chosen.append(remaining.pop(int(np.argmin(scores))))
    return chosen
