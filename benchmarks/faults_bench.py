"""Fault drills on both transports at once (`fedge.drill`, issue 9 §2): 4 nodes in
network namespaces, each fit 0.5 s, through a clean phase, 20% packet loss for 60 s, a
30 s partition and one node offline for 120 s, each followed by its recovery (every
node live again and two more rounds). Per phase: rounds done, seconds per round, and
the time lost against the clean phase's rate; whether every update counted once.

Needs root (network namespaces). About 5 minutes.

    python benchmarks/faults_bench.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fedge.drill import DrillResult, Schedule, run_drill

sys.path.insert(0, str(Path(__file__).parent))
from common import report

NODES, ROUNDS = 4, 400


def rows_of(result: DrillResult) -> list[dict[str, Any]]:
    clean = next(p for p in result.phases if p.name == "clean")
    per_round = (clean.end - clean.start) / clean.rounds
    counted_once = bool(
        np.allclose(result.weights, result.expected_weights(NODES), rtol=1e-12, atol=0)
    )
    rows = []
    for phase in result.phases:
        seconds = phase.end - phase.start
        rows.append(
            {
                "transport": result.transport,
                "phase": phase.name,
                "seconds": seconds,
                "rounds": phase.rounds,
                "s_per_round": seconds / phase.rounds if phase.rounds else float("inf"),
                "lost_s_vs_clean": seconds - phase.rounds * per_round,
                "counted_once": counted_once,
            }
        )
    faulted = rows[1:]
    seconds, rounds = sum(r["seconds"] for r in faulted), sum(r["rounds"] for r in faulted)
    rows.append(
        {
            "transport": result.transport,
            "phase": "all faults and recoveries",
            "seconds": seconds,
            "rounds": rounds,
            "s_per_round": seconds / rounds,
            "lost_s_vs_clean": sum(r["lost_s_vs_clean"] for r in faulted),
            "counted_once": counted_once,
        }
    )
    return rows


def main() -> None:
    results: dict[str, DrillResult] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-faults-") as tmp:

        def drill(transport: str) -> None:
            work = Path(tmp, transport)
            work.mkdir()
            results[transport] = run_drill(work, transport, nodes=NODES, rounds=ROUNDS)

        threads = [threading.Thread(target=drill, args=(t,)) for t in ("grpc", "mqtt")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    missing = {"grpc", "mqtt"} - set(results)
    if missing:
        raise SystemExit(f"the drill failed on {', '.join(sorted(missing))} (see above)")
    schedule = Schedule()
    report(
        "faults",
        f"Fault drills, {NODES} nodes, fit {schedule.pace} s: time lost per phase",
        [row for t in ("grpc", "mqtt") for row in rows_of(results[t])],
        schedule=vars(schedule),
        wall_time={t: r.wall_time for t, r in results.items()},
    )


if __name__ == "__main__":
    main()
