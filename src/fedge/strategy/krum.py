"""Krum and Multi-Krum: keep the updates that sit closest to many others.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017.
https://papers.nips.cc/paper/6617-machine-learning-with-adversaries-byzantine-tolerant-gradient-descent

Each update's score is the sum of squared distances to its ``n - f - 2`` nearest neighbours
(over all tensors); with ``n >= 2f + 3`` at most ``f`` Byzantine updates cannot make an
outlier win. Krum returns the best-scored update; Multi-Krum returns the unweighted mean of
the ``m`` best, as in El Mhamdi et al. (https://arxiv.org/abs/1802.07927), which keeps
Krum's robustness while averaging away more noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from fedge.aggregate import Aggregator, Buffered
from fedge.strategy.base import RoundContext, Strategy, _check
from fedge.strategy.median import Updates, coordinate_wise
from fedge.weights import Weights

Matrix = npt.NDArray[np.float64]

_BLOCK_ELEMENTS = 1 << 20  # float64 elements per distance block: 8 MiB however many clients


@dataclass(kw_only=True)
class Krum(Strategy):
    num_malicious: int = 0
    """f, the number of Byzantine clients to tolerate; each round needs n >= 2f + 3."""
    min_results: int = 3  # 2f + 3 with f = 0; checked against f so no round is doomed

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            _is_count(self.num_malicious, 0), "num_malicious", self.num_malicious, "an integer >= 0"
        )
        need = 2 * self.num_malicious + 3
        _check(
            self.min_results >= need,
            "min_results",
            self.min_results,
            f">= 2 * num_malicious + 3 = {need} ({self.name} needs that many updates)",
        )

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return Buffered(partial(krum, num_malicious=self.num_malicious))


@dataclass(kw_only=True)
class MultiKrum(Krum):
    num_selected: int | None = None
    """m, how many of the best-scored updates to average; None means n - f."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_selected is not None:
            _check(
                _is_count(self.num_selected, 1),
                "num_selected",
                self.num_selected,
                "an integer >= 1 (or unset for n - f)",
            )

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        return Buffered(
            partial(multi_krum, num_malicious=self.num_malicious, num_selected=self.num_selected)
        )


def krum(updates: Updates, num_malicious: int) -> Weights:
    """The single update with the lowest Krum score (first one on a tie)."""
    scores = _scores(updates, num_malicious, "Krum")
    return dict(updates[int(np.argmin(scores))][0])


def multi_krum(updates: Updates, num_malicious: int, num_selected: int | None) -> Weights:
    """Unweighted mean of the `num_selected` updates with the lowest Krum scores."""
    n, f = len(updates), num_malicious
    scores = _scores(updates, f, "MultiKrum")
    m = n - f if num_selected is None else num_selected
    if m > n - f:
        raise ValueError(
            f"MultiKrum: num_selected={m} exceeds n - f = {n} - {f} = {n - f}; "
            "averaging more than n - f updates could include Byzantine ones"
        )
    best = np.argsort(scores, kind="stable")[:m]
    return coordinate_wise([updates[i] for i in best], lambda x: np.mean(x, axis=0))


def krum_scores(distances: Matrix, num_neighbours: int) -> Matrix:
    """Per row, the sum of the `num_neighbours` smallest distances to the *other* rows."""
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.sort(others, axis=1)[:, :num_neighbours]
    scores: Matrix = nearest.sum(axis=1)
    return scores


def pairwise_sq_distances(updates: Updates) -> Matrix:
    """Squared Euclidean distances between updates, flattened across all their tensors.

    Summed tensor by tensor over column blocks, so no concatenated copy of the model is made
    and memory stays at one ``n x block`` float64 slab. Each block is centred before the
    Gram product: client models are close together and far from 0, and ``|x|^2 + |y|^2 -
    2 x.y`` would otherwise lose the small distances to cancellation.
    """
    n = len(updates)
    dist = np.zeros((n, n))
    cols = max(1, _BLOCK_ELEMENTS // n)
    for name in updates[0][0]:
        flats = [np.asarray(w[name]).reshape(-1) for w, _ in updates]
        for start in range(0, flats[0].size, cols):
            block = np.stack([f[start : start + cols] for f in flats], dtype=np.float64)
            block -= block.mean(axis=0)
            gram = block @ block.T
            sq = np.diag(gram)
            dist += sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _scores(updates: Updates, f: int, rule: str) -> Matrix:
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(
            f"{rule} tolerating num_malicious={f} needs at least 2f + 3 = {2 * f + 3} updates, "
            f"got {n}; raise strategy.min_results or lower num_malicious"
        )
    return krum_scores(pairwise_sq_distances(updates), n - f - 2)


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
