"""Long run: does the server stay flat over many rounds? (issue 7, defect 17)

A real fleet (digits, 10 node processes, mutual TLS) runs 1,500 rounds. The server's
VmRSS is sampled with the round it is in; round wall times come from its history. Flat
means: the last 100 rounds take as long as rounds 2-101, and RSS grows by less than
1 KiB per round between round 100 and the end (a checkpoint that re-serialised the
history, or closed task ids that piled up, grew ~9 KiB and +0.13 ms per round).

Run: .venv/bin/python benchmarks/longrun_bench.py [--rounds 1500] [--nodes 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import report

from fedge.launch import Launcher, wait_for

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits" / "fedge.toml"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(fleet: Launcher, pid: int, into: list[tuple[int, int]], halt: threading.Event) -> None:
    """(round, VmRSS KiB) about every half second, until `halt` or the server exits."""
    while not halt.wait(0.5):
        status = fleet.status(timeout=1.0)
        try:
            if status is not None and status.round:
                into.append((int(status.round), rss_kib(pid)))
        except OSError:
            return


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares KiB per round."""
    xs, ys = [float(r) for r, _ in points], [float(k) for _, k in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run(rounds: int, nodes: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="fedge-longrun-") as tmp,
        Launcher(Path(tmp), DIGITS) as fleet,
    ):
        out = fleet.work / "out.json"
        server = fleet.server("--rounds", str(rounds), "--wait-for", str(nodes), "--out", out)
        wait_for(fleet.status, "the server")
        for cid in range(nodes):
            fleet.node(cid)
        samples: list[tuple[int, int]] = []
        halt = threading.Event()
        sampler = threading.Thread(target=sample, args=(fleet, server.pid, samples, halt))
        sampler.start()
        try:
            rc = server.wait(timeout=rounds * 2.0 + 120)
        finally:
            halt.set()
            sampler.join()
        if rc != 0:
            raise RuntimeError(f"server exited with {rc}:\n{fleet.log('server')}")
        history = json.loads(out.read_text())
    walls = [r["wall_time"] for r in history["rounds"]]
    first, last = walls[1:101], walls[-100:]
    late = [(r, k) for r, k in samples if r >= 100]
    return {
        "rounds": rounds,
        "nodes": nodes,
        "round_ms_2_101": statistics.median(first) * 1e3,
        "round_ms_last_100": statistics.median(last) * 1e3,
        "time_ratio_last_first": statistics.median(last) / statistics.median(first),
        "rss_mib_round_100": late[0][1] / 1024 if late else 0.0,
        "rss_mib_end": late[-1][1] / 1024 if late else 0.0,
        "rss_kib_per_round": slope(late),
        "samples": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--nodes", type=int, default=10)
    args = parser.parse_args()
    row = run(args.rounds, args.nodes)
    row["flat"] = row["time_ratio_last_first"] <= 1.1 and row["rss_kib_per_round"] < 1.0
    report("longrun", f"Long run: digits, {args.nodes} nodes, {args.rounds} rounds, mTLS", [row])


if __name__ == "__main__":
    main()
