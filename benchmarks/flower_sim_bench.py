"""The digits job on fedge's simulation backends and on Flower's Ray simulation, side by side.

The job is `examples/digits/fedge.toml` (10 clients × 5 rounds of FedAvg, NumPy softmax
regression on scikit-learn's digits, every client training, half evaluating, the server
evaluating on a held-out 20%). fedge: the whole `fedge sim` command per backend. Flower
1.42: the same job as a Flower app (`benchmarks/flower/digits.py`: same split, partition,
per-client seeds and SGD steps), the whole command with the Flower venv's python, its
simulation engine on the Ray backend — with Flower's default 2 CPUs per client actor (one
actor on this machine) and with 1 (two actors). End to end = the command's wall time
(interpreter start, imports, Ray's start, the rounds), median of --repeats. The final
accuracy and loss are the server's evaluation after round 5: the same model on both
sides gives the same numbers.

Backends: --backends inprocess,process (default); a backend may name the fedge sources to
run it from, e.g. `ray:/work/wt-ray/src` (put first on PYTHONPATH).

Usage: python benchmarks/flower_sim_bench.py [--repeats 3] [--backends inprocess,process]
[--flower-cpus default,1] [--flower-python /work/flower-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, flower_python, report, run_flower

CONFIG = "examples/digits/fedge.toml"


def fedge_sim(backend: str, src: str | None, repeats: int) -> dict[str, Any]:
    """`fedge sim` on the digits job with this backend: median wall time, final metrics."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    times, final = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        for _ in range(repeats):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "fedge", "sim", "--config", CONFIG, "--backend", backend,
                 "-q", "--out", str(out)],
                cwd=ROOT, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"fedge sim --backend {backend} failed:\n{done.stderr[-3000:]}")
            final = json.loads(out.read_text())["rounds"][-1]["metrics"]
    return {"seconds": statistics.median(times), "accuracy": final["accuracy"],
            "loss": final["loss"]}  # fmt: skip


def flower_sim(python: Path, cpus: str, repeats: int) -> dict[str, Any]:
    """Flower's run of the digits job: median end-to-end time (and of `run_simulation`
    alone), final metrics."""
    args = [] if cpus == "default" else ["--num-cpus", cpus]
    times, inner, final = [], [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_flower(python, "digits.py", args)
        times.append(time.perf_counter() - started)
        inner.append(result["simulation_seconds"])
        final = result["final"]
    return {"seconds": statistics.median(times), "simulation": statistics.median(inner),
            "accuracy": final["accuracy"], "loss": final["loss"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backends", default="inprocess,process", help="fedge backends: NAME or NAME:SRC, ..."
    )
    parser.add_argument(
        "--flower-cpus", default="default,1", help="CPUs per Flower client actor, a run each"
    )
    parser.add_argument("--flower-python", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for spec in filter(None, args.backends.split(",")):
        backend, _, src = spec.partition(":")
        got = fedge_sim(backend, src or None, args.repeats)
        rows.append({"system": "fedge sim", "backend": backend + (" (" + src + ")" if src else ""),
                     "end to end s": got["seconds"], "run s": "-",
                     "final accuracy": got["accuracy"], "final loss": got["loss"]})  # fmt: skip
    python = flower_python(args.flower_python)
    for cpus in filter(None, args.flower_cpus.split(",")) if python else []:
        assert python is not None
        got = flower_sim(python, cpus, args.repeats)
        actors = "default: 2 CPUs" if cpus == "default" else f"{cpus} CPU" + "s" * (cpus != "1")
        rows.append({"system": "Flower 1.42", "backend": f"ray ({actors} per client)",
                     "end to end s": got["seconds"], "run s": got["simulation"],
                     "final accuracy": got["accuracy"], "final loss": got["loss"]})  # fmt: skip
    first = rows[0]
    for row in rows:
        row["vs first"] = row["end to end s"] / first["end to end s"]
        row["|Δ loss| vs first"] = abs(row["final loss"] - first["final loss"])
    report(
        "flower_sim" if python else "flower_sim_fedge_only",  # keep Flower's numbers
        f"Digits job (10 clients × 5 rounds) end to end: fedge vs Flower "
        f"(median of {args.repeats})",
        rows,
    )


if __name__ == "__main__":
    main()
