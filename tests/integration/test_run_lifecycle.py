"""The run lifecycle with real processes: a changed config is refused naming the change,
--new-run keeps the old run, `fedge stop` ends a server cleanly and a restart resumes the
run, and a full disk pauses the run (said plainly) until space is freed."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TIMEOUT, checkpoint_rounds, finished, wait_exit, wait_for, write_config

from fedge.launch import FEDGE, Launcher

pytestmark = pytest.mark.integration


def fedge(fleet: Launcher, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """A one-shot ``fedge`` command (status, stop, runs) in the fleet's environment."""
    return subprocess.run(
        [*FEDGE, *map(str, args)],
        cwd=fleet.work,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def admin(fleet: Launcher) -> tuple[str, ...]:
    return ("--server", fleet.address, "--certs", str(fleet.certs))


def db_runs(state_dir: Path) -> list[dict[str, object]]:
    """The runs table, read-only (no write, even to a full disk)."""
    with sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT run_id, status, reason, (SELECT max(round) FROM rounds WHERE"
            " rounds.run_id = runs.run_id AND status = 'ok') AS last_round FROM runs"
            " ORDER BY created_at, rowid"
        ).fetchall()
    return [dict(r) for r in rows]


def status_of(fleet: Launcher, server: subprocess.Popen[bytes], name: str = "server") -> Any:
    """The server's status (None while it does not answer); fails at once if it exited."""
    if server.poll() is not None:
        raise AssertionError(f"the server exited with {server.returncode}:\n{fleet.log(name)}")
    return fleet.status()


def tracebacks(log: str) -> list[str]:
    """The tracebacks in a server's log, but for grpc's own report of a Connect stream it
    cancelled while shutting down (a transport issue, not the run's)."""
    blocks = re.split(r"(?=Traceback \(most recent call last\):)", log)[1:]
    return [b for b in blocks if not ("_cygrpc/aio/server.pyx.pxi" in b and "CancelledError" in b)]


def test_a_changed_config_is_refused_and_a_new_run_keeps_the_old_one(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app", rounds=2, fraction_evaluate=0.0)
    with Launcher(tmp_path / "fleet", config) as fleet:
        first = fleet.server("--wait-for", "4", name="server-1")
        for cid in range(4):
            fleet.node(cid)
        finished(first, fleet, "server-1")
        (old_run,) = (fleet.state_dir / "runs").iterdir()
        old = {p.name: p.read_bytes() for p in (old_run / "checkpoints").iterdir()}
        assert sorted(old) == ["round-000001.safetensors", "round-000002.safetensors"]

        # comments are not settings: the same run, already finished
        config.write_text("# reviewed: nothing changed\n" + config.read_text())
        same = fleet.server(name="server-same")
        finished(same, fleet, "server-same")
        assert "already finished; --new-run starts another" in fleet.log("server-same")

        config.write_text(
            config.read_text()
            .replace("rounds = 2", "rounds = 3")
            .replace("fraction_evaluate = 0.0", "fraction_evaluate = 0.5")
        )
        refused = fleet.server(name="server-refused")
        assert wait_exit(refused) == 1
        said = fleet.log("server-refused")
        assert f"holds run {old_run.name} (finished) with other settings" in said
        assert "run.rounds: 2 -> 3" in said
        assert "strategy.fraction_evaluate: 0.0 -> 0.5" in said
        assert "--resume" in said and "--new-run" in said
        assert said.startswith("error: ") and len(said.strip().splitlines()) == 1, said

        new = fleet.server("--wait-for", "4", "--new-run", name="server-new")
        finished(new, fleet, "server-new")  # the nodes of the first run join the new one
        new_run = {p.name for p in (fleet.state_dir / "runs").iterdir()} - {old_run.name}
        assert len(new_run) == 1
        assert {p.name: p.read_bytes() for p in (old_run / "checkpoints").iterdir()} == old
        assert checkpoint_rounds(fleet) == [1, 1, 2, 2, 3]

        listed = fedge(fleet, "runs", "--state-dir", fleet.state_dir)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "finished" in line]
    assert len(lines) == 2, listed.stdout
    assert old_run.name in lines[0] and "2/2" in lines[0]
    assert new_run.pop() in lines[1] and "3/3" in lines[1]


def test_fedge_stop_ends_the_server_cleanly_and_a_restart_resumes_the_run(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path / "app", num_clients=2, rounds=10, fit_delay=0.5, fraction_evaluate=0.0
    )
    with Launcher(tmp_path, config) as fleet:
        server = fleet.server("--wait-for", "2", name="server-1")
        for cid in range(2):
            fleet.node(cid)
        wait_for(lambda: checkpoint_rounds(fleet), "a first round to be checkpointed")
        status = fedge(fleet, "status", *admin(fleet))
        assert status.returncode == 0, status.stderr
        assert re.search(r": (running|waiting), round \d+/10", status.stderr), status.stderr

        stop = fedge(fleet, "stop", *admin(fleet), "--reason", "maintenance window")
        assert stop.returncode == 0, stop.stderr
        assert "server: stopping" in stop.stderr
        assert wait_exit(server) == 0
        log = fleet.log("server-1", tail=100_000)
        assert "stop requested: maintenance window" in log
        assert tracebacks(log) == [] and "ERROR fedge" not in log, log

        gone = fedge(fleet, "status", *admin(fleet))
        assert gone.returncode == 1
        assert f"error: cannot reach the server at {fleet.address}" in gone.stderr
        assert "Traceback" not in gone.stderr
        (run,) = db_runs(fleet.state_dir)
        assert (run["status"], run["reason"]) == (
            "stopped",
            "stopped by the operator: maintenance window",
        )
        done = run["last_round"]
        assert isinstance(done, int) and 1 <= done < 10
        listed = fedge(fleet, "runs", "--state-dir", fleet.state_dir)
        assert "stopped" in listed.stdout and f"{done}/10" in listed.stdout, listed.stdout

        again = fleet.server("--wait-for", "2", name="server-2")
        wait_for(lambda: status_of(fleet, again, "server-2"), "the restarted server to answer")
        (resumed,) = db_runs(fleet.state_dir)  # the same run, no longer "stopped"
        assert (resumed["run_id"], resumed["status"], resumed["reason"]) == (
            run["run_id"],
            "running",
            "",
        )
        finished(again, fleet, "server-2")
    (run,) = db_runs(fleet.state_dir)
    assert (run["status"], run["last_round"]) == ("finished", 10)


# --- a full disk ----------------------------------------------------------------------

# The digits app with a 1.5 MiB tensor more, carried through unchanged: big checkpoints.
PADDED_APP = """
import numpy as np

import fedge
from app import create_app as digits
from fedge.client import ClientWrapper, FitResult


class Padded(ClientWrapper):
    def fit(self, weights, config):
        result = self.inner.fit(weights, config)
        return FitResult({**result.weights, "pad": weights["pad"]}, result.num_examples,
                         result.metrics)


def create_app(num_clients, seed, pad_mib=1.5, **options):
    inner = digits(num_clients, seed, **options)
    pad = np.zeros(int(pad_mib * (1 << 20)) // 4, np.float32)
    return fedge.App(
        lambda cid: Padded(inner.client_fn(cid)),
        {**inner.initial_weights, "pad": pad},
        inner.evaluate_fn,
    )
"""


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """Mounts a tmpfs of a given size on a directory (``mount(dir, "4m")``; again to
    resize it); every mount is undone after the test, busy or not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    mounted: list[Path] = []

    def mount(directory: Path, size: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if directory in mounted:
            args = ["mount", "-o", f"remount,size={size}", str(directory)]
        else:
            args = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
        run = subprocess.run(args, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            if not mounted:
                pytest.skip(f"{' '.join(args)} is not permitted here: {run.stderr.strip()}")
            raise AssertionError(f"{' '.join(args)} failed: {run.stderr.strip()}")
        if directory not in mounted:
            mounted.append(directory)

    try:
        yield mount
    finally:
        for directory in reversed(mounted):
            if subprocess.run(["umount", str(directory)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_full_disk_pauses_the_run_plainly_until_space_is_freed(
    tmp_path: Path, tmpfs: Callable[[Path, str], None]
) -> None:
    config = write_config(tmp_path / "app", num_clients=2, rounds=4, fraction_evaluate=0.0)
    (tmp_path / "app" / "padded.py").write_text(PADDED_APP)
    config.write_text(config.read_text().replace('"app:create_app"', '"padded:create_app"'))
    with Launcher(tmp_path / "fleet", config) as fleet:
        # room for the database and two 1.5 MiB checkpoints, not for a third
        tmpfs(fleet.state_dir, "4m")
        server = fleet.server("--wait-for", "2")
        for cid in range(2):
            fleet.node(cid)
        paused = wait_for(
            lambda: (s := status_of(fleet, server)) is not None and s.state == "paused" and s,
            "the server to pause on the full disk",
            timeout=TIMEOUT,
        )
        assert paused.reason.startswith(f"disk full under {fleet.state_dir}: ")
        assert "No space left on device" in paused.reason
        assert (paused.round, paused.total_rounds) == (3, 4)
        shown = fedge(fleet, "status", *admin(fleet))
        assert shown.returncode == 0, shown.stderr
        assert ": paused, round 3/4" in shown.stderr
        assert "reason: disk full under" in shown.stderr

        # nothing is lost or half-written meanwhile
        assert server.poll() is None
        assert checkpoint_rounds(fleet) == [1, 2]
        (run,) = db_runs(fleet.state_dir)
        assert (run["status"], run["last_round"]) == ("running", 2)
        assert not list(fleet.state_dir.glob("runs/*/checkpoints/.*.tmp"))
        log = fleet.log("server", tail=100_000)
        assert "the run is paused until space is freed" in log
        assert tracebacks(log) == [], log

        tmpfs(fleet.state_dir, "64m")  # space is freed: the run continues by itself
        finished(server, fleet)
        log = fleet.log("server", tail=100_000)
        assert "space is available again; the run continues" in log
        assert tracebacks(log) == [], log
        (run,) = db_runs(fleet.state_dir)
        assert (run["status"], run["last_round"]) == ("finished", 4)
        assert checkpoint_rounds(fleet) == [2, 3, 4]
