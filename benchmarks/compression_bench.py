"""Update compression: upload bytes and accuracy of none / fp16 / q8 / topk (1%).

Digits (examples/digits: softmax regression, 650 parameters) and MNIST-1D
(examples/mnist1d_torch: a small 1-D CNN, 5,898 parameters), simulated with each app's
own config and the same rounds for every encoding. Upload bytes are the payloads the
node would send (as `fedge node` encodes them: safetensors for plain weights, packed
arrays for an encoded update), summed over every fit result; the ratio is plain bytes
over encoded bytes. Targets (issue 9): q8 >= 3.9x, top-1% >= 30x, each within 1
accuracy point of uncompressed.

With --seeds K each run is repeated with run seeds 0..K-1 (the data split, the model's
initialization and the clients' draws all follow it): accuracy and its delta are then
means over the seeds, with the worst delta of any seed beside them.

Usage: python benchmarks/compression_bench.py [--rounds-scale 1] [--seeds 1] [--only digits]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

import fedge
from fedge.app import load_app
from fedge.client import Client, ClientWrapper, Config, FitResult
from fedge.compression import CompressClient, pack
from fedge.config import CompressionSection, load_config
from fedge.weights import Weights, to_bytes

sys.path.insert(0, str(Path(__file__).parent))
from common import report

ROOT = Path(__file__).resolve().parents[1]
APPS = {
    "digits": ROOT / "examples/digits/fedge.toml",
    "mnist1d": ROOT / "examples/mnist1d_torch/fedge.toml",
}
MODES = {
    "none": {},
    "fp16": {},
    "q8": {},
    "topk 1%": {"topk_fraction": 0.01},
    "stc 10%": {"stc_fraction": 0.1},
    "stc 20%": {"stc_fraction": 0.2},
}


class Measured(ClientWrapper):
    """Counts the bytes of every fit result as the node would upload them."""

    def __init__(self, inner: Client, sizes: list[int]) -> None:
        super().__init__(inner)
        self.sizes = sizes

    def fit(self, weights: Weights, config: Config) -> FitResult:
        result = self.inner.fit(weights, config)
        payload = pack(result.weights) if result.encoding else to_bytes(result.weights)
        self.sizes.append(len(payload))
        return result


def run(
    config_path: Path, mode: str, options: dict[str, float], scale: int, seed: int | None = None
) -> dict[str, Any]:
    cfg = load_config(config_path)
    if seed is not None:
        cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, seed=seed))
    sys.modules.pop("app", None)  # both examples name their module app.py
    app = load_app(cfg.app.target, cfg.base_dir, num_clients=cfg.run.num_clients,
                   seed=cfg.run.seed, **cfg.app.options)  # fmt: skip
    settings = CompressionSection(mode=mode.split()[0], **options)  # type: ignore[arg-type]
    sizes: list[int] = []
    clients: dict[int, Client] = {}  # one per client for the run: its residual lives on

    def client_fn(cid: int) -> Client:
        if cid not in clients:
            inner = app.client_fn(cid)
            wrapped = inner if settings.mode == "none" else CompressClient(inner, settings)
            clients[cid] = Measured(wrapped, sizes)
        return clients[cid]

    rounds = cfg.run.rounds * scale
    started = time.perf_counter()
    history = fedge.simulate(
        client_fn, cfg.run.num_clients, rounds, strategy=cfg.build_strategy(),
        initial_weights=app.initial_weights, evaluate_fn=app.evaluate_fn, seed=cfg.run.seed,
        fit_config=cfg.fit, backend="inprocess",
    )  # fmt: skip
    last = history.rounds[-1]
    return {
        "rounds": rounds,
        "uploads": len(sizes),
        "upload_bytes": sum(sizes),
        "accuracy": float(last.metrics["accuracy"]),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-scale", type=int, default=1, help="x the configs' rounds")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds 0..K-1 (1: the config's)")
    parser.add_argument("--only", choices=list(APPS), help="one data set")
    args = parser.parse_args()
    seeds: list[int | None] = [None] if args.seeds == 1 else list(range(args.seeds))
    rows = []
    for data, config in APPS.items():
        if args.only and data != args.only:
            continue
        baselines = [run(config, "none", {}, args.rounds_scale, seed) for seed in seeds]
        for mode, options in MODES.items():
            runs = [run(config, mode, options, args.rounds_scale, seed) for seed in seeds]
            deltas = [
                100 * (r["accuracy"] - b["accuracy"]) for r, b in zip(runs, baselines, strict=True)
            ]
            sent = sum(r["upload_bytes"] for r in runs)
            rows.append({
                "data": data, "encoding": mode, "rounds": runs[0]["rounds"],
                "seeds": len(seeds), "upload_bytes": sent,
                "bytes_per_upload": round(sent / sum(r["uploads"] for r in runs)),
                "ratio": sum(b["upload_bytes"] for b in baselines) / sent,
                "accuracy": sum(r["accuracy"] for r in runs) / len(runs),
                "accuracy_delta_points": sum(deltas) / len(deltas),
                "worst_delta_points": min(deltas),
                "seconds": sum(r["seconds"] for r in runs),
            })  # fmt: skip
            print(rows[-1], flush=True)
    name = "compression" + (f"_x{args.rounds_scale}" if args.rounds_scale > 1 else "")
    name += (f"_{args.seeds}seeds" if args.seeds > 1 else "") + (
        f"_{args.only}" if args.only else ""
    )
    report(
        name,
        f"Update compression: upload bytes and accuracy (rounds x{args.rounds_scale}, "
        f"{len(seeds)} seed(s))",
        rows,
    )


if __name__ == "__main__":
    main()
