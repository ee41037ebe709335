"""Large simulations: 1,000 and 10,000 clients with the in-process, process and Ray backends.

FedProx's Synthetic(1,1) (Li et al. 2020: 60 features, 10 classes, lognormal device
sizes — 4.2 M examples, 0.95 GiB over 10,000 devices), multinomial logistic regression
(610 parameters), FedAvg over every client each round, 1 local epoch, batch 10, lr 0.01.
Each run is a fresh Python process; a sampler adds up the proportional set size (PSS) of
it and all its descendants (pool workers; Ray's GCS, raylet and actors, whose shared
object store PSS splits between them) every 0.25 s and keeps the peak.

Rows: `setup` is what comes before the first round (data generation excluded: the app
builds it once in the driver in every row), `round` the median round's wall time,
`total` the whole `simulate` call. Ray rows: `ray` ships `client_fn` through the object
store (its data arrays zero-copy in shared memory; what a local `fedge sim` does),
`ray-build` has each actor build the clients itself (what `fedge sim --ray-address` does
on a cluster: every actor generates the data again). A last
section times one round of fits without the coordinator: Ray tasks (one per batch of
clients, `client_fn` read from the object store by every task) against the actor pool.

Ray starts its actors with OMP_NUM_THREADS=1 (OpenBLAS then runs one thread), and the
process pool limits each worker to one thread; in-process runs OpenBLAS's default, a
thread per core, which on these tiny matmuls costs ~1.7x on 2 shared cores.
`--blas-threads 1` gives the driver one thread too (results/ray_blas1.json); without
it, the defaults a user gets (ray.json).

Usage: python benchmarks/ray_bench.py [--clients 1000 10000] [--rounds 3] [--repeat 2]
       [--blas-threads 1] [--no-fits]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fedge
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_weights
from fedge.datasets import synthetic

sys.path.insert(0, str(Path(__file__).parent))
from common import report

WORKERS = 2  # this machine's cores: pool processes, Ray CPUs and actors


class SyntheticClients:
    """Builds the clients of `num_devices` Synthetic(1,1) devices (callable: the client_fn)."""

    def __init__(self, num_devices: int) -> None:
        self.num_devices = num_devices
        self.devices = synthetic(1.0, 1.0, num_devices=num_devices, seed=0)

    def __call__(self, cid: int) -> fedge.Client:
        x, y = self.devices[cid]
        return SoftmaxRegressionClient(x, y, epochs=1, batch_size=10, lr=0.01)


class BuildInActor:
    """A client factory: each Ray actor generates the devices itself."""

    def __init__(self, num_devices: int) -> None:
        self.num_devices = num_devices

    def __call__(self) -> SyntheticClients:
        return SyntheticClients(self.num_devices)


def one(backend: str, clients: int, rounds: int) -> dict[str, Any]:
    """One run in this process (the child): what the table shows, as JSON on stdout."""
    started = time.perf_counter()
    client_fn = SyntheticClients(clients)
    data_s = time.perf_counter() - started
    setup: list[float] = []

    class FirstRound(fedge.Observer):
        def round_started(self, round: int, selected: int) -> None:
            setup.append(time.perf_counter())

    begun = time.perf_counter()
    history = fedge.simulate(
        client_fn,
        clients,
        rounds,
        initial_weights=softmax_weights(60, 10),
        backend="ray" if backend.startswith("ray") else backend,  # type: ignore[arg-type]
        workers=WORKERS,
        client_factory=BuildInActor(clients) if backend == "ray-build" else None,
        observer=FirstRound(),
    )
    total = time.perf_counter() - begun
    assert history.weights is not None and len(history.completed) == rounds
    digest = hashlib.sha256(b"".join(a.tobytes() for a in history.weights.values()))
    return {
        "backend": backend,
        "clients": clients,
        "rounds": rounds,
        "data_s": data_s,
        "setup_s": setup[0] - begun if setup else 0.0,
        "round_s": statistics.median(r.wall_time for r in history.rounds),
        "total_s": total,
        "model_sha256": digest.hexdigest()[:12],
    }


def ray_tasks_vs_actors(clients: int) -> list[dict[str, Any]]:
    """One round of fits outside the coordinator: Ray tasks against the actor pool."""
    import ray

    from fedge.sim_ray import MAX_BATCH, RayPool

    client_fn = SyntheticClients(clients)
    weights = softmax_weights(60, 10)
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="WARNING")
    try:
        started = time.perf_counter()
        fn_ref, model_ref = ray.put(client_fn), ray.put(weights)
        size = min(MAX_BATCH, max(1, clients // (4 * WORKERS)))

        @ray.remote(num_cpus=1)
        def fit_batch(fn: SyntheticClients, model: fedge.Weights, cids: range) -> int:
            for cid in cids:
                fn(cid).fit({k: v.copy() for k, v in model.items()}, {"round": 1, "seed": cid})
            return len(cids)

        batches = [range(i, min(i + size, clients)) for i in range(0, clients, size)]
        done = sum(ray.get([fit_batch.remote(fn_ref, model_ref, b) for b in batches]))
        tasks_s = time.perf_counter() - started
        assert done == clients

        started = time.perf_counter()
        pool = RayPool(client_fn, workers=WORKERS)
        ready = time.perf_counter()
        pool.publish("v1", weights, keep=["v1"])
        jobs = [("fit", cid, "v1", {"round": 1, "seed": cid}, {}) for cid in range(clients)]
        failed = [e for _, e in pool.imap(jobs) if e]  # type: ignore[arg-type]
        actors_s = time.perf_counter() - ready
        pool.close()
        assert not failed, failed[:3]
    finally:
        ray.shutdown()
    return [
        {
            "clients": clients,
            "how": f"Ray tasks, {size} clients each",
            "fits_s": tasks_s,
            "actor_start_s": 0.0,
        },
        {
            "clients": clients,
            "how": f"{WORKERS} actors, batches of {size}",
            "fits_s": actors_s,
            "actor_start_s": ready - started,
        },
    ]


class Sampler(threading.Thread):
    """Peak summed PSS (MiB) of a process and all its descendants, and their CPU time
    (user + system, as last seen for each process: the machine is shared, so CPU seconds
    say more about a backend's cost than wall time does)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.done = pid, 0.0, threading.Event()
        self.cpu: dict[int, float] = {}

    def run(self) -> None:
        while not self.done.wait(0.25):
            tree = _tree(self.pid)
            self.peak_mib = max(self.peak_mib, sum(_pss_kib(p) for p in tree) / 1024)
            for pid in tree:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_s(pid))

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measured(*args: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `args` of this script in a child process, sampling its memory."""
    child = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    sampler = Sampler(child.pid)
    sampler.start()
    out, _ = child.communicate()
    sampler.done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{args} failed with exit code {child.returncode}")
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    row["cpu_s"] = sampler.cpu_s
    row["peak_pss_mib"] = sampler.peak_mib
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved")
    parser.add_argument(
        "--backends", nargs="+", default=["inprocess", "process", "ray", "ray-build"]
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS_NUM_THREADS and OMP_NUM_THREADS for every run (Ray's actors get 1)",
    )
    parser.add_argument("--no-fits", action="store_true", help="skip tasks against actors")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "CLIENTS", "ROUNDS"))
    parser.add_argument("--fits", type=int, metavar="CLIENTS")
    args = parser.parse_args()
    if args.one:  # the child
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    if args.fits:
        print(json.dumps(ray_tasks_vs_actors(args.fits)))
        return
    env, name = dict(os.environ), "ray"
    if args.blas_threads:
        threads = str(args.blas_threads)
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        name = f"ray_blas{threads}"
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for clients in args.clients:
        for repeat in range(args.repeat):  # the other way round each time: load drifts
            for backend in args.backends[:: -1 if repeat % 2 else 1]:
                run = measured("--one", backend, str(clients), str(args.rounds), env=env)
                runs.setdefault((clients, backend), []).append(run)
                print(run, flush=True)
    rows = []
    for same in runs.values():  # the run of median round time, and the range of them all
        same.sort(key=lambda r: float(r["round_s"]))
        row = dict(same[(len(same) - 1) // 2])
        row["round_s_range"] = f"{same[0]['round_s']:.1f}–{same[-1]['round_s']:.1f}"
        rows.append(row)
    blas = f", {args.blas_threads} BLAS thread(s)" if args.blas_threads else ""
    title = f"Simulation backends at scale: Synthetic(1,1), FedAvg, 2 workers{blas}"
    report(name, title, rows)
    if args.no_fits:
        return
    fits = []
    for clients in args.clients:
        run = subprocess.run(
            [sys.executable, __file__, "--fits", str(clients)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        fits.extend(json.loads(run.stdout.strip().splitlines()[-1]))
    report("ray_fits", "One round of fits: Ray tasks vs actors", fits)


if __name__ == "__main__":
    main()
