"""Fault drills (issue 9 §2): real fleets in network namespaces go through 20% packet
loss for a minute, a 30 s partition and one node offline for 2 minutes.

The faults last minutes by design, so the two transports take the same drill at the
same time, each in a lab network of its own, rather than one after the other.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fedge import netlab
from fedge.drill import DrillResult, Schedule, run_drill

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(netlab.unavailable()), reason=netlab.unavailable() or "ok"),
]

NODES, ROUNDS = 4, 400


def test_both_transports_survive_loss_a_partition_and_a_node_offline(tmp_path: Path) -> None:
    results: dict[str, DrillResult] = {}
    errors: dict[str, BaseException] = {}

    def drill(transport: str) -> None:
        work = tmp_path / transport
        work.mkdir()
        try:
            results[transport] = run_drill(
                work, transport, nodes=NODES, rounds=ROUNDS, schedule=Schedule(clean=10)
            )
        except BaseException as exc:  # reported below, with the other transport's outcome
            errors[transport] = exc

    threads = [threading.Thread(target=drill, args=(t,)) for t in ("grpc", "mqtt")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    for transport, result in results.items():
        rounds = result.history["rounds"]
        done = [r for r in rounds if r["status"] == "ok"]
        # the run completed: every round once, in order, each client at most once in it
        assert [r["round"] for r in done] == list(range(1, ROUNDS + 1)), transport
        assert all(len(set(r["participants"])) == len(r["participants"]) for r in done)
        # nothing counted twice, nothing counted that the history does not show
        np.testing.assert_allclose(
            result.weights, result.expected_weights(NODES), rtol=1e-12, err_msg=transport
        )
        by_name = {p.name: p for p in result.phases}
        # rounds went on through the loss and without the offline node; not in a partition
        assert by_name["20% loss"].rounds > 0, (transport, result.phases)
        assert by_name["node 3 offline"].rounds > 0, (transport, result.phases)
        assert by_name["partition"].rounds <= 1, (transport, result.phases)
        # the node that was offline took part again after it came back
        assert NODES - 1 in done[-1]["participants"], (transport, done[-1])
        for name, log in result.logs.items():
            assert "Traceback" not in log, (transport, name, log)
