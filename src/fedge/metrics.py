"""Metrics as every history records them: one normaliser for the simulator, the node and
the server, so a simulated and a deployed run of one config write the same history.

A metric is a finite number: integers and NumPy scalars become floats; anything else —
booleans, strings, arrays, NaN, Inf — is left out (a history must stay plain JSON, which
has no NaN, and averaging flags across clients means nothing). Counts and key lengths
are bounded: metrics come from nodes, and nodes may lie.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from fedge.limits import MAX_KEY_LENGTH, MAX_METRICS, few

log = logging.getLogger(__name__)

Metrics = dict[str, float]


def normalize(metrics: Mapping[str, object], *, source: str = "metrics") -> Metrics:
    """The finite numeric metrics of `metrics` as floats, in order, at most `MAX_METRICS`."""
    out: Metrics = {}
    for key, value in metrics.items():
        number = as_float(value)
        if number is None or not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            log.debug("%s: metric %r = %r left out (not a finite number)", source, key, value)
            continue
        if len(out) == MAX_METRICS:
            log.warning("%s: more than %d metrics; the rest are left out", source, MAX_METRICS)
            break
        out[key] = number
    return out


def as_float(value: object) -> float | None:
    """`value` as a finite float, or None if it is not a finite number."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class WeightedMetrics:
    """Example-weighted means of metrics, accumulated one client at a time.

    At most `MAX_METRICS` names, the first seen: each node may send that many, but nodes
    naming different ones must not grow the round's record (and every checkpoint and
    results file after it) with the number of nodes.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self.dropped: set[str] = set()
        """Names left out once `MAX_METRICS` were taken (bounded too: for the log)."""

    def add(self, metrics: Metrics, weight: int) -> None:
        for key, value in metrics.items():
            if key not in self._sums and len(self._sums) == MAX_METRICS:
                if len(self.dropped) < MAX_METRICS:
                    self.dropped.add(key)
                continue
            self._sums[key] = self._sums.get(key, 0.0) + value * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def mean(self) -> Metrics:
        if self.dropped:
            log.warning(
                "clients sent more than %d metric names in all; left out: %s",
                MAX_METRICS,
                few(sorted(self.dropped)),
            )
        return {k: self._sums[k] / self._weights[k] for k in self._sums}
