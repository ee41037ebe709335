"""The digits job on fedge's simulation backends and on Flower's Ray simulation, side by side.

The job is `examples/digits/fedge.toml` (10 clients × 5 rounds of FedAvg, NumPy softmax
regression on scikit-learn's digits, every client training, half evaluating, the server
evaluating on a held-out 20%). fedge: the whole `fedge sim` command per backend. Flower
1.42: the same job as a Flower app (`benchmarks/flower/digits.py`: same split, partition,
per-client seeds and SGD steps), the whole command with the Flower venv's python, its
simulation engine on the Ray backend — with Flower's default 2 CPUs per client actor (one
actor on this machine) and with 1 (two actors). End to end = the command's wall time
(interpreter start, imports, Ray's start, the rounds), median of --repeats; `run s` is
the run inside it: `fedge.simulate` (the backend's start, the rounds, its stop) and
Flower's `run_simulation` (the same, its apps' loading too). The final accuracy and loss
are the server's evaluation after round 5: the same model on both sides gives the same
numbers.

Backends: --backends inprocess,process,ray (default); a backend may name the fedge sources to
run it from, e.g. `ray:/work/wt-ray/src` (put first on PYTHONPATH).

Usage: python benchmarks/flower_sim_bench.py [--repeats 3] [--backends inprocess,process,ray]
[--flower-cpus default,1] [--flower-python /work/flower-venv/bin/python]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, flower_python, report, run_flower

CONFIG = "examples/digits/fedge.toml"


Run = tuple[float, float, float, float]
"""One run: end-to-end seconds, the run's own seconds, final accuracy, final loss."""


def fedge_sim(backend: str, src: str | None) -> Run:
    """One `fedge sim` of the digits job with this backend."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "fedge", "sim", "--config", CONFIG, "--backend", backend,
             "-q", "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"fedge sim --backend {backend} failed:\n{done.stderr[-3000:]}")
        history = json.loads(out.read_text())
    final = history["rounds"][-1]["metrics"]
    return seconds, history["wall_time"], final["accuracy"], final["loss"]


def flower_sim(python: Path, cpus: str) -> Run:
    """One Flower run of the digits job (`cpus` per client actor, or Flower's default)."""
    started = time.perf_counter()
    result = run_flower(python, "digits.py", [] if cpus == "default" else ["--num-cpus", cpus])
    seconds = time.perf_counter() - started
    final = result["final"]
    return seconds, result["simulation_seconds"], final["accuracy"], final["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backends", default="inprocess,process,ray", help="fedge backends: NAME or NAME:SRC, ..."
    )
    parser.add_argument(
        "--flower-cpus", default="default,1", help="CPUs per Flower client actor, a run each"
    )
    parser.add_argument("--flower-python", type=Path, default=None)
    args = parser.parse_args()
    jobs: dict[tuple[str, str], Callable[[], Run]] = {}
    for spec in filter(None, args.backends.split(",")):
        backend, _, src = spec.partition(":")
        name = backend + (f" ({src})" if src else "")
        jobs["fedge sim", name] = functools.partial(fedge_sim, backend, src or None)
    python = flower_python(args.flower_python)
    for cpus in filter(None, args.flower_cpus.split(",")) if python else []:
        assert python is not None
        actors = "default: 2 CPUs" if cpus == "default" else f"{cpus} CPU" + "s" * (cpus != "1")
        jobs["Flower 1.42", f"ray ({actors} per client)"] = functools.partial(
            flower_sim, python, cpus
        )
    runs: dict[tuple[str, str], list[Run]] = {key: [] for key in jobs}
    for _ in range(args.repeats):  # interleaved: the machine's noise hits every job alike
        for key, job in jobs.items():
            runs[key].append(job())
    rows: list[dict[str, Any]] = []
    for (system, backend), done in runs.items():
        rows.append({
            "system": system, "backend": backend,
            "end to end s": statistics.median(r[0] for r in done),
            "run s": statistics.median(r[1] for r in done),
            "final accuracy": done[-1][2], "final loss": done[-1][3],
        })  # fmt: skip
    first = rows[0]
    for row in rows:
        row["vs first"] = row["end to end s"] / first["end to end s"]
        row["|Δ loss| vs first"] = abs(row["final loss"] - first["final loss"])
    report(
        # a run without Flower keeps the last one with it
        "flower_sim" if any(r["system"] != "fedge sim" for r in rows) else "flower_sim_fedge_only",
        f"Digits job (10 clients × 5 rounds) end to end: fedge vs Flower "
        f"(median of {args.repeats}, interleaved)",
        rows,
        load_average=os.getloadavg(),
    )


if __name__ == "__main__":
    main()
