"""Streaming FedAvg vs a plain NumPy in-place weighted sum: 100 updates × 1M float32.

Both fold the same updates in the same order; time is the median of repeated runs,
extra peak memory is what tracemalloc sees allocated during aggregation (inputs
excluded). fedge folds updates as the coordinator hands them over: validated, which
also measured their largest magnitude (the overflow guard's input). Target: time <= 1.1x
NumPy, extra peak <= 2x one update.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from fedge.aggregate import WeightedMean
from fedge.weights import CheckedWeights, spec_of, validate

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import report

NUM_UPDATES, NUM_PARAMS, REPEATS = 100, 1_000_000, 7
POOL = 10  # distinct update arrays, cycled, so inputs cost 10 updates of memory, not 100


def make_updates() -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(NUM_PARAMS, dtype=np.float32) for _ in range(POOL)]
    counts = rng.integers(10, 1000, size=NUM_UPDATES).tolist()
    return pool, counts


def numpy_inplace(pool: list[np.ndarray], counts: list[int]) -> np.ndarray:
    acc = np.zeros(NUM_PARAMS, dtype=np.float32)
    for i, n in enumerate(counts):
        acc += pool[i % POOL] * np.float32(n)
    acc /= np.float32(sum(counts))
    return acc


def validated(pool: list[np.ndarray]) -> list[CheckedWeights]:
    updates = [CheckedWeights(w=u) for u in pool]
    for update in updates:
        validate(update, spec_of(update), source="bench")
    return updates


def fedge_streaming(pool: list[CheckedWeights], counts: list[int]) -> np.ndarray:
    mean = WeightedMean()
    for i, n in enumerate(counts):
        mean.add(pool[i % POOL], n)
    return mean.result()["w"]


def measure(
    fn: Callable[..., np.ndarray], pool: list[np.ndarray], counts: list[int]
) -> tuple[float, int]:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn(pool, counts)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return 0.0, peak


def main() -> None:
    pool, counts = make_updates()
    inputs: dict[str, list[Any]] = {"numpy in-place": pool, "fedge WeightedMean": validated(pool)}
    np.testing.assert_allclose(
        numpy_inplace(pool, counts),
        fedge_streaming(inputs["fedge WeightedMean"], counts),
        rtol=1e-5,
        atol=1e-6,
    )
    candidates = {"numpy in-place": numpy_inplace, "fedge WeightedMean": fedge_streaming}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(REPEATS):  # interleaved, so machine noise hits both alike
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn(inputs[name], counts)
            times[name].append(time.perf_counter() - started)
    update_bytes = NUM_PARAMS * 4
    baseline = statistics.median(times["numpy in-place"])
    rows = []
    for name, fn in candidates.items():
        median = statistics.median(times[name])
        _, peak = measure(fn, inputs[name], counts)
        rows.append(
            {
                "method": name,
                "median_s": median,
                "time_vs_numpy": median / baseline,
                "extra_peak_MB": peak / 1e6,
                "peak_vs_update": peak / update_bytes,
            }
        )
    report(
        "aggregate",
        f"FedAvg of {NUM_UPDATES} updates × {NUM_PARAMS:,} float32",
        rows,
        targets={"time_vs_numpy": 1.1, "peak_vs_update": 2.0},
    )


if __name__ == "__main__":
    main()
