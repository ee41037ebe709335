"""Reproduce FedProx's straggler experiment on Synthetic(1,1) (Li et al., MLSys 2020, Fig. 1).

30 devices, 10 per round, E=20 local epochs, lr 0.01, batch 10, 200 rounds; multinomial
logistic regression. With s% stragglers, FedAvg drops them, while FedProx keeps their
partial work (a random fraction of the E epochs) — with mu=0 and with mu=1. The paper's
finding: mu=1 stays stable and beats FedAvg most at 90% stragglers.

Usage: python benchmarks/fedprox_bench.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import fedge
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_loss, softmax_weights
from fedge.datasets import synthetic, train_test_split_devices
from fedge.strategy import FedAvg, FedProx

sys.path.insert(0, str(Path(__file__).parent))
from common import report

DEVICES, PER_ROUND, EPOCHS, LR, BATCH = 30, 10, 20, 0.01, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, test = train_test_split_devices(
        synthetic(1.0, 1.0, DEVICES, seed=args.seed), seed=args.seed
    )
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    x_test = np.concatenate([x for x, _ in test])
    y_test = np.concatenate([y for _, y in test])

    def client_fn(cid: int) -> fedge.Client:
        (xt, yt), (xe, ye) = train[cid], test[cid]
        return SoftmaxRegressionClient(xt, yt, xe, ye, epochs=EPOCHS, batch_size=BATCH, lr=LR)

    def evaluate_fn(weights: fedge.Weights) -> dict[str, float]:
        train_loss, _ = softmax_loss(weights, x_train, y_train)
        _, test_accuracy = softmax_loss(weights, x_test, y_test)
        return {"train_loss": train_loss, "test_accuracy": test_accuracy}

    methods = {
        "FedAvg": lambda: FedAvg(clients_per_round=PER_ROUND),
        "FedProx mu=0": lambda: FedProx(clients_per_round=PER_ROUND, proximal_mu=0.0),
        "FedProx mu=1": lambda: FedProx(clients_per_round=PER_ROUND, proximal_mu=1.0),
    }
    rows, curves = [], {}
    for stragglers in (0.0, 0.5, 0.9):
        for name, make in methods.items():
            started = time.perf_counter()
            history = fedge.simulate(
                client_fn,
                DEVICES,
                args.rounds,
                strategy=make(),
                initial_weights=softmax_weights(60, 10),
                evaluate_fn=evaluate_fn,
                seed=args.seed,
                stragglers=stragglers,
                backend="process",
                max_round_retries=100,
            )
            done = history.completed
            losses = np.array([r.metrics["train_loss"] for r in done])
            tail = losses[-max(1, len(losses) // 10) :]  # last 10% of rounds: stability
            rows.append(
                {
                    "stragglers": f"{stragglers:.0%}",
                    "method": name,
                    "train_loss": float(losses[-1]),
                    "test_accuracy": done[-1].metrics["test_accuracy"],
                    "loss_tail_max": float(tail.max()),
                    "loss_tail_std": float(tail.std()),
                    "seconds": time.perf_counter() - started,
                }
            )
            curves[f"{name} @ {stragglers:.0%}"] = losses.tolist()
            print(rows[-1], flush=True)
    report(
        "fedprox",
        f"FedProx reproduction: Synthetic(1,1), {args.rounds} rounds",
        rows,
        curves=curves,
    )


if __name__ == "__main__":
    main()
