"""fedge's SecAgg+ against Flower's SecAgg+ on the same workload, side by side.

The workload of `secagg_bench.py`: 100 clients × 100k float32 parameters, each update a
fixed random step (the same draws on both sides), 10% of the clients dropping after they
shared their secrets (they never send their masked input; Flower's `secaggplus_mod`
calls `fit` in that stage, so a `fit` that raises is exactly that dropout there too).
Same protocol settings as far as the two APIs allow: fedge's default graph of k ≈ 2 log2 n
neighbours and floor(k/2) + 1 shares to rebuild a secret, Flower with num_shares = k + 1
(its count includes the client itself) and the same threshold; both clip to [-1, 1] and
quantize to 16 bits in a 2^32 ring. Plain FedAvg rounds (the survivors only) on both
sides give each its own baseline.

fedge runs in process (`fedge.simulate`, in-process backend); Flower in its simulation
engine (Ray backend, one CPU per client actor, so two actors on this machine), started as
a subprocess with the Flower venv's python. Seconds per round: the median over
--repeats rounds after a warm-up round; Flower's is its fit workflow alone (the four
SecAgg+ stages, or the plain fit), not Ray's start-up. `max error` is the largest
difference between the final model and the exact mean of the survivors' updates.

Usage: python benchmarks/secagg_flower_bench.py [--clients 100] [--params 100000]
[--dropout 0.1] [--repeats 3] [--flower-python /work/flower-venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedge.secure_aggregation import Settings

sys.path.insert(0, str(Path(__file__).parent))
from common import flower_python, report, run_flower
from secagg_bench import Step, one_round


def expected_mean(clients: list[int], params: int) -> np.ndarray:
    """The exact mean of these clients' updates (the model starts at zero)."""
    return np.mean([Step(cid, params, 0.0).delta for cid in clients], axis=0)


def fedge_side(
    clients: int, params: int, dropped: set[int], repeats: int
) -> dict[str, tuple[float, float]]:
    """Seconds per round (median after a warm-up) and max error, plain and secure."""
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    errors: dict[str, float] = {}
    survivors = {
        "plain": list(range(clients - len(dropped))),  # as secagg_bench: ids 0..n-d-1
        "secure": [c for c in range(clients) if c not in dropped],
    }
    for _ in range(repeats + 1):
        for kind in times:
            seconds, weights = one_round(clients, params, dropped, kind == "secure", 0.0)
            times[kind].append(seconds)
            want = expected_mean(survivors[kind], params)
            errors[kind] = float(np.abs(np.asarray(weights["w"]) - want).max())
    return {kind: (statistics.median(t[1:]), errors[kind]) for kind, t in times.items()}


def flower_side(
    python: Path, clients: int, params: int, dropped: set[int], repeats: int
) -> dict[str, tuple[float, float, float]]:
    """Seconds per round (median after a warm-up), max error and the whole run's
    seconds (Ray start-up included), plain and secure."""
    settings = Settings()
    k = settings.degree(clients)
    common = ["--params", str(params), "--rounds", str(repeats + 1)]
    secure = run_flower(
        python,
        "secagg.py",
        [*common, "--clients", str(clients), "--secure",
         "--dropped", ",".join(map(str, sorted(dropped))),
         "--num-shares", str(k + 1), "--threshold", str(settings.shares_needed(k)),
         "--clipping-range", str(settings.clipping_range), "--bits", str(settings.bits)],
    )  # fmt: skip
    plain = run_flower(python, "secagg.py", [*common, "--clients", str(clients - len(dropped))])
    out = {}
    for kind, result in (("plain", plain), ("secure", secure)):
        rounds = result["round_seconds"]
        if len(rounds) != repeats + 1:
            raise RuntimeError(f"Flower {kind}: {len(rounds)} of {repeats + 1} rounds ran")
        out[kind] = (statistics.median(rounds[1:]), result["max_error"], result["total_seconds"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flower-python", type=Path, default=None)
    args = parser.parse_args()
    dropped = set(range(0, args.clients, round(1 / args.dropout))) if args.dropout else set()
    ours = fedge_side(args.clients, args.params, dropped, args.repeats)
    python = flower_python(args.flower_python)
    theirs = flower_side(python, args.clients, args.params, dropped, args.repeats) if python else {}
    names = {"plain": "plain FedAvg", "secure": f"SecAgg+ ({len(dropped)} dropped after sharing)"}
    clients = {"plain": args.clients - len(dropped), "secure": args.clients}
    rows: list[dict[str, Any]] = []
    for system, side in (("fedge", ours), ("Flower 1.42", theirs)):
        for kind in side:
            seconds, error = side[kind][0], side[kind][1]
            rows.append({
                "system": system, "round": names[kind], "clients": clients[kind],
                "s per round": seconds, "vs own plain": seconds / side["plain"][0],
                "vs fedge": seconds / ours[kind][0], "max error": error,
            })  # fmt: skip
    report(
        "secagg_flower" if theirs else "secagg_flower_fedge_only",  # keep Flower's numbers
        f"SecAgg+ fedge vs Flower: {args.clients} clients × {args.params:,} params "
        f"(simulation, median of {args.repeats} rounds after a warm-up)",
        rows,
        flower_whole_run_seconds={k: v[2] for k, v in theirs.items()},
        settings={
            "neighbours": Settings().degree(args.clients),
            "shares_needed": Settings().shares_needed(Settings().degree(args.clients)),
            "bits": Settings().bits,
            "clipping_range": Settings().clipping_range,
            "dropped": sorted(dropped),
        },
        load_average=os.getloadavg(),
    )


if __name__ == "__main__":
    main()
