"""FedBuff vs synchronous FedAvg with node speeds spread 10x: simulated time to a target.

20 clients whose task times are spread log-evenly from 1 to 10 simulated seconds
(`fedge.sim.spread_task_times`). A synchronous FedAvg round trains every client and waits
for the slowest (10 s); FedBuff (K = 5, concurrency 20, server lr 1, max staleness 10)
steps whenever 5 results arrived. Both run on the simulation's clock for the same
simulated budget (FedAvg's rounds x 10 s); reported: simulated seconds to reach the
target accuracy, the speed-up, and the accuracy at the end of the budget. Digits (NumPy
softmax regression, target 0.92) and MNIST-1D (the PyTorch CNN of examples/mnist1d_torch,
2 local epochs; target 0.28: this CNN learns slowly, and FedAvg reaches only about 0.30
in its 30 rounds). Also the cost of one buffer checkpoint write (the server writes one
after every fold).

Usage: python benchmarks/fedbuff_bench.py [--digits-rounds 15] [--mnist1d-rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedge
from fedge.checkpoint import Checkpoint, save_checkpoint
from fedge.history import History
from fedge.strategy import FedAvg, FedBuff
from fedge.weights import num_bytes

sys.path.insert(0, str(Path(__file__).parent))
from common import report

ROOT = Path(__file__).resolve().parents[1]

CLIENTS, SPREAD, SLOWEST = 20, 10.0, 10.0


def load(example: str, **options: Any) -> fedge.App:
    sys.path.insert(0, str(ROOT / "examples" / example))
    try:
        module = __import__("app")
        return module.create_app(CLIENTS, 0, **options)  # type: ignore[no-any-return]
    finally:
        sys.path.pop(0)
        sys.modules.pop("app", None)


def run(app: fedge.App, strategy: fedge.Strategy, rounds: int) -> tuple[History, float]:
    started = time.perf_counter()
    history = fedge.simulate(
        app.client_fn,
        CLIENTS,
        rounds,
        strategy=strategy,
        initial_weights=app.initial_weights,
        evaluate_fn=app.evaluate_fn,
        speed_spread=SPREAD,
    )
    return history, time.perf_counter() - started


def time_to(history: History, target: float, budget: float) -> float | None:
    for r in history.completed:
        if r.sim_time <= budget and r.metrics["accuracy"] >= target:
            return r.sim_time
    return None


def final(history: History, budget: float) -> float:
    return [r.metrics["accuracy"] for r in history.completed if r.sim_time <= budget][-1]


def buffer_write_ms(weights: fedge.Weights, repeats: int = 20) -> float:
    sums = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    meta = {"tasks": [f"run/1.0/fit/{c}.{c}" for c in range(5)], "outstanding": []}
    with tempfile.TemporaryDirectory(prefix="fedbuff-bench-") as tmp:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            save_checkpoint(Path(tmp), Checkpoint(1, sums, {}, meta), keep=1)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-rounds", type=int, default=15)
    parser.add_argument("--mnist1d-rounds", type=int, default=30)
    args = parser.parse_args()
    cases = [
        ("digits", 0.92, args.digits_rounds,
         lambda: load("digits", partition="iid", epochs=5, batch_size=16, lr=0.5)),
        ("mnist1d", 0.28, args.mnist1d_rounds, lambda: load("mnist1d_torch")),
    ]  # fmt: skip
    rows, curves = [], {}
    for dataset, target, rounds, make in cases:
        app = make()
        budget = rounds * SLOWEST
        # FedBuff's updates in the same budget: ~7.8 results/s from 20 clients, K = 5
        updates = int(budget * 1.7)
        sync, sync_s = run(app, FedAvg(), rounds)
        buff, buff_s = run(app, FedBuff(buffer_size=5, concurrency=20), updates)
        t_sync, t_buff = time_to(sync, target, budget), time_to(buff, target, budget)
        assert app.initial_weights is not None
        write_ms = buffer_write_ms(app.initial_weights)
        for name, history, to_target, seconds in (
            ("FedAvg", sync, t_sync, sync_s),
            ("FedBuff K=5", buff, t_buff, buff_s),
        ):
            curves[f"{dataset} {name}"] = [
                [r.sim_time, r.metrics["accuracy"]] for r in history.completed
            ]
            rows.append(
                {
                    "dataset": dataset,
                    "method": name,
                    "target": target,
                    "sim_s_to_target": to_target,
                    "speedup": (t_sync / to_target) if t_sync and to_target else None,
                    "final_accuracy": final(history, budget),
                    "budget_sim_s": budget,
                    "server_updates": len([r for r in history.completed if r.sim_time <= budget]),
                    "stale_dropped": sum(r.stale for r in history.completed),
                    "buffer_write_ms": write_ms if name != "FedAvg" else None,
                    "model_kb": num_bytes(app.initial_weights) / 1024,
                    "real_seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    report(
        "fedbuff",
        f"FedBuff vs FedAvg: {CLIENTS} clients, task times spread {SPREAD:g}x (simulated clock)",
        rows,
        curves=curves,
    )


if __name__ == "__main__":
    main()
