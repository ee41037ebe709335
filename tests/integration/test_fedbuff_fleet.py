"""FedBuff on a real fleet: slow nodes (sleeping, and CPU-throttled by cgroups), and a
server SIGKILLed mid-buffer."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import checkpoint_rounds, finished, wait_for, write_config

from fedge.cgroups import CpuLimitError, CpuLimits
from fedge.checkpoint import latest_checkpoint
from fedge.launch import Launcher

pytestmark = pytest.mark.integration

FEDBUFF = "buffer_size = 2\nconcurrency = 4\nmax_staleness = 20"


def _configs(tmp_path: Path, rounds: int) -> tuple[Path, Path]:
    """The run's config, and the one slow nodes use: the same app sleeping 1.5 s per fit."""
    common = dict(num_clients=4, rounds=rounds, fraction_evaluate=0.0, strategy="fedbuff")
    config = write_config(tmp_path / "app", strategy_extra=FEDBUFF, **common)  # type: ignore[arg-type]
    slow = write_config(tmp_path / "slow", fit_delay=1.5, strategy_extra=FEDBUFF, **common)  # type: ignore[arg-type]
    return config, slow


def _tasks(rounds: list[dict[str, object]]) -> list[str]:
    return [t for r in rounds for t in r["tasks"]]  # type: ignore[attr-defined]


def test_fast_nodes_do_not_wait_for_slow_ones(tmp_path: Path, transport: str) -> None:
    config, slow = _configs(tmp_path, rounds=6)
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "4", "--out", out)
        for cid in range(4):
            fleet.node(cid, config=slow if cid >= 2 else None)
        finished(server, fleet)
        history = json.loads(out.read_text())
    rounds = history["rounds"]
    assert [r["status"] for r in rounds] == ["ok"] * 6
    assert all(len(r["tasks"]) == 2 for r in rounds)
    tasks = _tasks(rounds)
    assert len(tasks) == len(set(tasks))
    done = [sum(r["participants"].count(c) for r in rounds) for c in range(4)]
    # the fast nodes trained again and again on newer models while the slow ones worked
    assert done[0] + done[1] > 2 * (done[2] + done[3]), done
    assert rounds[-1]["metrics"]["accuracy"] > 0.8


def test_nodes_throttled_by_cgroups_fall_behind_and_the_run_completes(
    tmp_path: Path,
) -> None:
    try:
        limits = CpuLimits.detect("fedge-test-fleet")
    except CpuLimitError as exc:
        pytest.skip(f"no cgroup CPU limits here: {exc}")
    config, _ = _configs(tmp_path, rounds=8)
    with limits, Launcher(tmp_path, config) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "4", "--out", out)
        nodes = {cid: fleet.node(cid) for cid in (2, 3)}  # the slow ones join first
        wait_for(lambda: (s := fleet.status(1.0)) is not None and len(s.nodes) == 2, "2 nodes")
        for cid in (2, 3):  # 0.5% of a CPU: every step they take is slow
            limits.limit(f"node-{cid}", nodes[cid].pid, 0.005)
        for cid in (0, 1):  # unthrottled; the run starts once these join
            nodes[cid] = fleet.node(cid)
        finished(server, fleet)
        history = json.loads(out.read_text())
        membership = Path(f"/proc/{nodes[2].pid}/cgroup").read_text()
        assert "/fedge-test-fleet-node-2\n" in membership, membership
    rounds = history["rounds"]
    assert [r["status"] for r in rounds] == ["ok"] * 8
    done = [sum(r["participants"].count(c) for r in rounds) for c in range(4)]
    assert done[0] + done[1] > 2 * (done[2] + done[3]), done
    assert rounds[-1]["metrics"]["accuracy"] > 0.8


def test_a_server_killed_mid_buffer_resumes_it_and_counts_no_result_twice(
    tmp_path: Path, transport: str
) -> None:
    config, _ = _configs(tmp_path, rounds=5)
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        options = ("--wait-for", "4", "--out", out)
        server = fleet.server(*options, name="server-1")
        for cid in range(4):  # fits of 1.0, 1.6, 2.2 and 2.8 s: results come one by one
            delayed = write_config(
                tmp_path / f"node{cid}", fit_delay=1.0 + 0.6 * cid, strategy_extra=FEDBUFF,
                num_clients=4, rounds=5, fraction_evaluate=0.0, strategy="fedbuff",
            )  # fmt: skip
            fleet.node(cid, config=delayed)

        def buffer_of_round_2() -> list[str] | None:
            found = list(fleet.state_dir.glob("runs/*/buffer"))
            ckpt = latest_checkpoint(found[0]) if found else None
            if ckpt is None or ckpt.round != 2 or len(ckpt.meta["tasks"]) != 1:
                return None
            return list(ckpt.meta["tasks"])

        wait_for(lambda: buffer_of_round_2() is not None, "round 2's buffer", interval=0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        kept = buffer_of_round_2()
        assert kept is not None and max(checkpoint_rounds(fleet)) == 1  # killed mid-buffer
        server = fleet.server(*options, name="server-2")
        finished(server, fleet, "server-2")
        assert "resumed a buffer of 1 result(s)" in fleet.log("server-2")
        rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds if r["status"] == "ok"] == [1, 2, 3, 4, 5]
    round2 = next(r for r in rounds if r["round"] == 2 and r["status"] == "ok")
    assert round2["tasks"][0] == kept[0] and len(round2["tasks"]) == 2
    tasks = _tasks([r for r in rounds if r["status"] == "ok"])
    assert len(tasks) == len(set(tasks)) == 10
