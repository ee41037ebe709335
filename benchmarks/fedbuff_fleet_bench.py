"""FedBuff vs synchronous FedAvg on a real fleet whose node speeds really differ 10x.

A real `fedge server` and 20 real `fedge node` processes over mutual TLS on 127.0.0.1.
Each node is held to a CPU share by a Linux cgroup (`fedge.cgroups`, CFS bandwidth
control). The CPU for tasks spreads log-evenly over 10x (digits: 5% of a CPU down to
0.5%; MNIST-1D: 10% down to 1%), plus 0.2% for what a node does besides tasks, and goes
to the clients in the order `[simulation] speed_spread` uses. Everything a node does is
slowed, as on a slow board, and the shares sum to under one CPU, so the 2-core machine
gives every node its quota while the server runs. Why cgroups, and not a sleep in
`fit` or a node-side `--max-cpu`: see docs/architecture.md, "Slow nodes on one machine".

The nodes start unthrottled and serve one warm-up round (imports and torch's first
training would take minutes at 1% of a CPU); then they are throttled. Each repeat runs a
FedAvg server, then a FedBuff server (K = 5, concurrency 20, server lr 1, max staleness
30), on the same address with fresh state; the same nodes reconnect to each. Times come
from the server's state: each round's commit time (``finished_at``), counted from when
round 1 had its clients (``wall_time - wait_time`` before its commit). Reported: wall
seconds to the first update whose centralized accuracy reaches the target; FedBuff runs
for FedAvg's total wall time and is then stopped; final accuracy is each method's last
update within that budget; and how many results the fastest and the slowest node
delivered, and the CPU they used (their shares hold?). Medians over the repeats end
the table. Without cgroup write access (not root, no CPU controller) it says why and
writes no numbers.

Usage: python benchmarks/fedbuff_fleet_bench.py [--dataset digits|mnist1d|all]
       [--repeats 3] [--rounds N] [--keep DIR]
(`make bench` runs digits, about 3 minutes; MNIST-1D takes about 20 minutes.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import report

from fedge.cgroups import CpuLimitError, CpuLimits
from fedge.launch import Launcher, wait_for
from fedge.sim import spread_task_times

ROOT = Path(__file__).resolve().parents[1]
CLIENTS, SPREAD = 20, 10.0
BACKGROUND = 0.002
"""CPU share added to every node for what it does besides tasks: a connected idle node
used 0.23% of a CPU (heartbeats, the gRPC task stream), and fitting CPU = background +
cost x tasks to the fastest and slowest nodes of an uncorrected run gave 0.2%. Without
it the slowest nodes' task times spread 16x, not 10x."""


@dataclasses.dataclass(frozen=True)
class Case:
    """A dataset as fedbuff_bench.py runs it in simulation: example, app options, target."""

    example: str
    options: str
    target: float
    rounds: int
    """FedAvg's rounds; FedBuff gets the same wall time."""
    fastest: float
    """The fastest node's CPU share; low enough that even the fastest node is held back
    by its share, not by the server (digits: a task costs a node ~8 ms of CPU, and the
    server takes ~60 results/s here)."""


CASES = {
    "digits": Case(
        "digits", 'partition = "iid", epochs = 5, batch_size = 16, lr = 0.5', 0.92, 10, 0.05
    ),
    "mnist1d": Case("mnist1d_torch", "alpha = 1.0, epochs = 2, batch_size = 32", 0.28, 20, 0.10),
}

CONFIG = """
[app]
target = "app:create_app"
options = {{ {options} }}

[run]
num_clients = {clients}
rounds = {rounds}
seed = 0
round_timeout = 300.0

[strategy]
{strategy}
fraction_evaluate = 0.0
"""
FEDAVG = 'name = "fedavg"'
FEDBUFF = textwrap.dedent(
    """\
    name = "fedbuff"
    buffer_size = 5
    concurrency = 20
    server_learning_rate = 1.0
    max_staleness = {max_staleness}"""
)


def write_config(work: Path, case: Case, name: str, rounds: int, strategy: str) -> Path:
    path = work / f"{name}.toml"
    text = CONFIG.format(options=case.options, clients=CLIENTS, rounds=rounds, strategy=strategy)
    path.write_text(text)
    return path


def shares(fastest: float) -> list[float]:
    """CPU share of each client: for tasks, from `fastest` down to SPREAD times less, in
    the order of the simulation's `speed_spread`; plus the BACKGROUND."""
    return [fastest / t + BACKGROUND for t in spread_task_times(CLIENTS, SPREAD, seed=0)]


def committed_rounds(state_dir: Path) -> list[dict[str, Any]]:
    """The ok rounds the server committed, each with ``finished_at`` (Unix seconds)."""
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT record_json, finished_at FROM rounds WHERE status = 'ok' ORDER BY finished_at"
        ).fetchall()
    finally:
        db.close()
    return [{**json.loads(record), "finished_at": at} for record, at in rows]


def connected(fleet: Launcher) -> bool:
    status = fleet.status(timeout=1.0)
    return status is not None and len([n for n in status.nodes if n.connected]) == CLIENTS


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Run:
    """One server's run: its committed rounds (with ``finished_at``), when its work
    began (Unix seconds) and the CPU each node used meanwhile (in CPUs)."""

    rounds: list[dict[str, Any]]
    started: float
    node_cpu: list[float]
    method: str = ""


def phase(fleet: Launcher, name: str, config: Path, budget: float | None, nodes: list[int]) -> Run:
    """One server on the fleet's address with fresh state; the nodes (`nodes`: their
    pids) reconnect. With a `budget` (s) it is stopped once that much work time has
    passed; without one it runs all its rounds."""
    fleet.state_dir = fleet.work / f"state-{name}"
    server = fleet.server("--wait-for", str(CLIENTS), name=name, config=config)
    wait_for(lambda: connected(fleet), f"{CLIENTS} nodes on the {name} server", timeout=120)
    cpu, began = [cpu_seconds(pid) for pid in nodes], time.monotonic()
    try:  # the nodes are there: the work starts now (to within a status poll)
        server.wait(timeout=900 if budget is None else budget + 2.0)
    except subprocess.TimeoutExpired:
        if budget is None:
            raise
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    if budget is None and server.returncode != 0:
        raise RuntimeError(f"{name} server exited with {server.returncode}:\n{fleet.log(name)}")
    seconds = time.monotonic() - began
    cpu = [(cpu_seconds(pid) - c) / seconds for pid, c in zip(nodes, cpu, strict=True)]
    rounds = committed_rounds(fleet.state_dir)
    return Run(rounds, work_started(rounds[0]), cpu)


def work_started(first: dict[str, Any]) -> float:
    """When round 1 had its clients: its commit time less the round's work (its wall
    time without the wait for nodes to connect)."""
    return float(first["finished_at"] - (first["wall_time"] - first["wait_time"]))


def summary(run: Run, target: float, budget: float) -> dict[str, Any]:
    within = [r for r in run.rounds if r["finished_at"] - run.started <= budget]
    reached = next((r for r in within if r["metrics"]["accuracy"] >= target), None)
    return {
        "method": run.method,
        "target": target,
        "wall_s_to_target": None if reached is None else reached["finished_at"] - run.started,
        "speedup": None,
        "final_accuracy": within[-1]["metrics"]["accuracy"] if within else None,
        "budget_s": budget,
        "server_updates": len(within),
        "client_results": sum(len(r["participants"]) for r in within),
        "stale_dropped": sum(r["stale"] for r in within),
    }


def compare(
    case: Case, sync: Run, asyn: Run, budget: float, node_shares: list[float]
) -> list[dict[str, Any]]:
    """The two runs' rows: time to the target, speed-up, accuracy at the end of the
    budget, and the CPU the fastest and the slowest node used (their shares hold?)."""
    rows = [summary(run, case.target, budget) for run in (sync, asyn)]
    t_sync, t_buff = (row["wall_s_to_target"] for row in rows)
    if t_sync and t_buff:
        rows[0]["speedup"], rows[1]["speedup"] = 1.0, t_sync / t_buff
    fast, slow = (node_shares.index(f(node_shares)) for f in (max, min))
    for row, run in zip(rows, (sync, asyn), strict=True):
        within = [r for r in run.rounds if r["finished_at"] - run.started <= budget]
        done = [sum(r["participants"].count(c) for r in within) for c in (fast, slow)]
        row["fastest_node_results"], row["slowest_node_results"] = done
        row["results_spread"] = done[0] / done[1] if done[1] else None
        row["fastest_node_cpu_pct"] = 100 * run.node_cpu[fast]
        row["slowest_node_cpu_pct"] = 100 * run.node_cpu[slow]
    return rows


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and method, the median of every number over the repeats."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["method"]) == key]
        row: dict[str, Any] = {"dataset": key[0], "repeat": f"median of {len(group)}"}
        for name, value in group[0].items():
            if name in row:
                continue
            values = [r[name] for r in group if isinstance(r[name], int | float)]
            row[name] = statistics.median(values) if values else value
        out.append(row)
    return out


def bench(
    case: Case, limits: CpuLimits, repeats: int, max_staleness: int, keep: Path | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`repeats` pairs of runs (FedAvg, then FedBuff for FedAvg's wall time) on one fleet
    of throttled nodes; rows per run and the curves (s, accuracy) of each."""
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="fedge-fedbuff-fleet-") as tmp:
        work = Path(tmp) if keep is None else keep / case.example
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "examples" / case.example / "app.py", work / "app.py")
        warmup = write_config(work, case, "warmup", 1, FEDAVG)
        fedavg = write_config(work, case, "fedavg", case.rounds, FEDAVG)
        buff = FEDBUFF.format(max_staleness=max_staleness)
        fedbuff = write_config(work, case, "fedbuff", 100_000, buff)
        with Launcher(work, warmup) as fleet:
            # one unthrottled round: imports and first-call set-up (torch's is ~2 s of
            # CPU) happen before the nodes are slowed
            fleet.state_dir = work / "state-warmup"
            warm = fleet.server("--wait-for", str(CLIENTS), name="warmup")
            nodes = [fleet.node(cid) for cid in range(CLIENTS)]
            if warm.wait(timeout=600) != 0:
                raise RuntimeError(f"the warm-up server failed:\n{fleet.log('warmup')}")
            node_shares = shares(case.fastest)
            for cid, (node, share) in enumerate(zip(nodes, node_shares, strict=True)):
                limits.limit(f"node-{cid}", node.pid, share)
            pids = [node.pid for node in nodes]
            for repeat in range(1, repeats + 1):
                sync = phase(fleet, f"fedavg-{repeat}", fedavg, None, pids)
                budget = sync.rounds[-1]["finished_at"] - sync.started
                asyn = phase(fleet, f"fedbuff-{repeat}", fedbuff, budget, pids)
                sync.method, asyn.method = "FedAvg", f"FedBuff K=5 s<={max_staleness}"
                for row in compare(case, sync, asyn, budget, node_shares):
                    rows.append({"dataset": case.example, "repeat": repeat, **row})
                    print(rows[-1], flush=True)
                for run in (sync, asyn):
                    curves[f"{case.example} {run.method} #{repeat}"] = [
                        [r["finished_at"] - run.started, r["metrics"]["accuracy"]]
                        for r in run.rounds
                    ]
    return rows, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*CASES, "all"], default="digits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-staleness", type=int, default=30)
    parser.add_argument("--rounds", type=int, help="FedAvg's rounds (default: per dataset)")
    parser.add_argument("--keep", type=Path, help="work here and keep logs and state")
    args = parser.parse_args()
    try:
        limits = CpuLimits.detect("fedge-bench")
    except CpuLimitError as exc:
        print(f"skipped: the nodes cannot be made slow here: {exc}", file=sys.stderr)
        return
    names = list(CASES) if args.dataset == "all" else [args.dataset]
    rows, curves = [], {}
    with limits:
        for name in names:
            case = CASES[name]
            if args.rounds:
                case = dataclasses.replace(case, rounds=args.rounds)
            found, lines = bench(case, limits, args.repeats, args.max_staleness, args.keep)
            rows += found
            curves.update(lines)
    rows += medians(rows)
    report(
        "fedbuff_fleet" if args.dataset == "digits" else f"fedbuff_fleet_{args.dataset}",
        f"FedBuff vs FedAvg on a fleet: {CLIENTS} node processes, CPU shares spread "
        f"{SPREAD:g}x by cgroups (wall clock)",
        rows,
        shares={name: shares(CASES[name].fastest) for name in names},
        curves=curves,
    )


if __name__ == "__main__":
    main()
