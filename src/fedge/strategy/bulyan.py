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
from fedge.strategy.base import Strategy, _check
from fedge.strategy.krum import _is_count, krum_scores, pairwise_sq_distances
from fedge.strategy.median import Stack, Updates, coordinate_wise
from fedge.weights import Array, Weights


@dataclass(kw_only=True)
class Bulyan(Strategy):
    num_malicious: int = 0
    """f, the number of Byzantine clients to tolerate; each round needs n >= 4f + 3."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(_is_count(self.num_malicious, 0), "num_malicious", self.num_malicious,
               "an integer >= 0")

    def aggregator(self) -> Aggregator:
        return Buffered(partial(bulyan, num_malicious=self.num_malicious))


def bulyan(updates: Updates, num_malicious: int) -> Weights:
    n, f = len(updates), num_malicious
    if n < 4 * f + 3:
        raise ValueError(
            f"Bulyan tolerating num_malicious={f} needs at least 4f + 3 = {4 * f + 3} updates, "
            f"got {n}; raise strategy.min_results or lower num_malicious"
        )
    chosen = [updates[i] for i in select_by_krum(updates, f, n - 2 * f)]
    beta = n - 4 * f  # theta - 2f

    def reduce(x: Stack) -> Array:
        spread = np.abs(np.subtract(x, np.median(x, axis=0), dtype=np.float64))
        closest = np.argsort(spread, axis=0, kind="stable")[:beta]
        out: Array = np.mean(np.take_along_axis(x, closest, axis=0), axis=0)
        return out

    return coordinate_wise(chosen, reduce)


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
