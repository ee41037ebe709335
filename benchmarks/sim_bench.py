"""Simulation speed: the digits job through the real CLI, and 1,000 clients × 1 round.

1. `fedge sim` on examples/digits (10 clients × 5 rounds, FedAvg): whole-command wall
   time (median of 3 runs) and final accuracy. Targets: <= 3 s, accuracy >= 0.92.
2. 1,000 clients of Synthetic(1,1) for one round (1 local epoch, batch 10): client
   updates per second for the in-process and process backends.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fedge
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_weights
from fedge.datasets import synthetic
from fedge.sim import Backend

sys.path.insert(0, str(Path(__file__).parent))
from common import report

ROOT = Path(__file__).resolve().parents[1]
FEDGE = Path(sys.executable).parent / "fedge"


def digits_cli() -> dict[str, object]:
    times, accuracy = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(
                [
                    str(FEDGE),
                    "sim",
                    "--config",
                    "examples/digits/fedge.toml",
                    "-q",
                    "--out",
                    str(out),
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - started)
            accuracy = json.loads(out.read_text())["rounds"][-1]["metrics"]["accuracy"]
    return {
        "job": "fedge sim digits 10 clients × 5 rounds",
        "backend": "inprocess",
        "wall_s": statistics.median(times),
        "final_accuracy": accuracy,
        "client_updates_per_s": 50 / statistics.median(times),
    }


def thousand_clients(backend: Backend) -> dict[str, object]:
    devices = synthetic(1.0, 1.0, num_devices=1000, seed=0)

    def client_fn(cid: int) -> fedge.Client:
        x, y = devices[cid]
        return SoftmaxRegressionClient(x, y, epochs=1, batch_size=10, lr=0.01)

    started = time.perf_counter()
    fedge.simulate(client_fn, 1000, 1, initial_weights=softmax_weights(60, 10), backend=backend)
    wall = time.perf_counter() - started
    return {
        "job": "Synthetic(1,1) 1,000 clients × 1 round",
        "backend": backend,
        "wall_s": wall,
        "final_accuracy": "-",
        "client_updates_per_s": 1000 / wall,
    }


def main() -> None:
    rows = [digits_cli(), thousand_clients("inprocess"), thousand_clients("process")]
    report("sim", "Simulation speed", rows)


if __name__ == "__main__":
    main()
