"""Differential privacy: final accuracy against ε on digits and MNIST-1D.

Central DP-FedAvg (the `differential_privacy` wrapper) over many small clients, as in
cross-device FL: digits split over 500 clients, 50 sampled per round (q = 0.1);
MNIST-1D over 200 clients (batches of 8), 40 per round (q = 0.2). For each target ε (δ = 1e-5, RDP
accountant, after all rounds) the noise multiplier is the smallest that stays within
it, found by bisection on the accountant. Rows: plain FedAvg (no clipping, no noise),
clipping only (ε = ∞), then ε ≈ 8, 3, 1, each with fixed clipping and with adaptive
clipping (Andrew et al. 2021, target quantile 0.5, starting at the same norm). The
fixed norm is the median update norm of the first plain round, measured on the data: a
tuning that itself costs privacy in a real deployment, which adaptive clipping avoids.

Usage: python benchmarks/privacy_bench.py [--only digits] [--rounds-scale 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedge
from fedge.app import load_app
from fedge.client import Client, ClientWrapper, Config, FitResult
from fedge.config import load_config
from fedge.privacy import accounting
from fedge.strategy import DifferentialPrivacy, FedAvg
from fedge.strategy.clip import delta_norm
from fedge.weights import Weights

sys.path.insert(0, str(Path(__file__).parent))
from common import report

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
TARGETS = (8.0, 3.0, 1.0)


@dataclass(frozen=True)
class Setup:
    config: Path
    clients: int
    per_round: int
    rounds: int
    options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the app's options (smaller batches for smaller clients)."""


SETUPS = {
    "digits": Setup(ROOT / "examples/digits/fedge.toml", 500, 50, 30),
    "mnist1d": Setup(ROOT / "examples/mnist1d_torch/fedge.toml", 200, 40, 30, {"batch_size": 8}),
}


class Norms(ClientWrapper):
    """Records the L2 norm of each update's delta."""

    def __init__(self, inner: Client, norms: list[float]) -> None:
        super().__init__(inner)
        self.norms = norms

    def fit(self, weights: Weights, config: Config) -> FitResult:
        result = self.inner.fit(weights, config)
        self.norms.append(delta_norm(result.weights, weights))
        return result


def noise_for(epsilon: float, rate: float, rounds: int) -> float:
    """The smallest noise multiplier whose ε after `rounds` at `rate` is <= `epsilon`."""
    low, high = 0.05, 100.0
    for _ in range(50):
        mid = (low + high) / 2
        spent = accounting.epsilon(mid, DELTA, "rdp", ((rate, rounds),))
        low, high = (mid, high) if spent > epsilon else (low, mid)
    return high


def run(setup: Setup, rounds: int, dp: dict[str, Any] | None, norms: list[float] | None = None,
        ) -> dict[str, Any]:  # fmt: skip
    cfg = load_config(setup.config)
    sys.modules.pop("app", None)  # both examples name their module app.py
    app = load_app(cfg.app.target, cfg.base_dir, num_clients=setup.clients,
                   seed=cfg.run.seed, **{**cfg.app.options, **setup.options})  # fmt: skip
    strategy: fedge.Strategy = FedAvg(clients_per_round=setup.per_round)
    if dp is not None:
        strategy = DifferentialPrivacy(strategy, delta=DELTA, **dp)

    def client_fn(cid: int) -> Client:
        client = app.client_fn(cid)
        return client if norms is None else Norms(client, norms)

    started = time.perf_counter()
    history = fedge.simulate(
        client_fn, setup.clients, rounds, strategy=strategy,
        initial_weights=app.initial_weights, evaluate_fn=app.evaluate_fn, seed=cfg.run.seed,
        fit_config=cfg.fit, backend="inprocess",
    )  # fmt: skip
    last = history.rounds[-1]
    return {
        "accuracy": float(last.metrics["accuracy"]),
        "epsilon": last.strategy_metrics.get("epsilon", float("inf")),
        "final_clip": last.strategy_metrics.get("clip_norm"),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SETUPS), help="one data set")
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="x each set's rounds")
    args = parser.parse_args()
    rows = []
    for data, setup in SETUPS.items():
        if args.only and data != args.only:
            continue
        rounds = max(1, round(setup.rounds * args.rounds_scale))
        rate = setup.per_round / setup.clients
        norms: list[float] = []
        run(setup, 1, None, norms)
        clip = statistics.median(norms)
        runs: list[tuple[str, float, float, bool]] = [("∞ (clipping only)", 0.0, clip, False)]
        for target in TARGETS:
            z = noise_for(target, rate, rounds)
            runs += [(f"{target:g}", z, clip, False), (f"{target:g}", z, clip, True)]
        plain = run(setup, rounds, None)
        rows.append(row(data, "∞ (no DP)", "-", 0.0, plain, plain))
        for target_name, z, c, adaptive in runs:
            dp = {"noise_multiplier": z, "clip_norm": c, "adaptive": adaptive}
            found = run(setup, rounds, dp)
            clipping = "adaptive" if adaptive else f"fixed {c:.3g}"
            rows.append(row(data, target_name, clipping, z, found, plain))
    report(
        "privacy" + (f"_{args.only}" if args.only else ""),
        f"Central DP-FedAvg: accuracy against ε (δ = {DELTA:g}, RDP)",
        rows,
    )


def row(data: str, target: str, clipping: str, z: float, found: dict[str, Any],
        plain: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    out = {"data": data, "target_epsilon": target, "clipping": clipping,
           "noise_multiplier": round(z, 4), "epsilon": found["epsilon"],
           "accuracy": found["accuracy"],
           "delta_points": 100 * (found["accuracy"] - plain["accuracy"]),
           "final_clip": found["final_clip"] or "-", "seconds": found["seconds"]}  # fmt: skip
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
