"""Differential privacy on a real fleet: ε after every round in `fedge status` and the
results JSON, counted on across a server restart, and the run ends at its budget."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import dp_accounting
import pytest
from conftest import checkpoint_rounds, cli, finished, wait_exit, write_config
from dp_accounting import rdp

from fedge.launch import Launcher, wait_for

pytestmark = pytest.mark.integration

Z, RATE = 1.5, 0.5  # two of four clients each round


def epsilon_after(rounds: int) -> float:
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(RATE, dp_accounting.GaussianDpEvent(Z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(1e-5))


def status(fleet: Launcher, server: subprocess.Popen[bytes]) -> str:
    assert server.poll() is None, fleet.log("server")
    found = cli(fleet, "status", "--server", fleet.address, "--certs", fleet.certs)
    return found.stderr + found.stdout if found.returncode == 0 else ""


def test_epsilon_is_reported_counted_across_a_restart_and_the_budget_ends_the_run(
    tmp_path: Path,
) -> None:
    budget = (epsilon_after(3) + epsilon_after(4)) / 2  # three rounds fit, a fourth would not
    config = write_config(
        tmp_path / "app",
        num_clients=4,
        rounds=10,
        fit_delay=1.5,
        fraction_evaluate=0.0,
        strategy_extra=(
            "clients_per_round = 2\n"
            f'wrap = [{{ name = "differential_privacy", noise_multiplier = {Z}, '
            f"clip_norm = 1.0, epsilon_budget = {budget} }}]"
        ),
    )
    out = tmp_path / "results.json"
    with Launcher(tmp_path, config) as fleet:
        server = fleet.server("--wait-for", "4", name="server")
        for cid in range(4):
            fleet.node(cid)
        wait_for(lambda: checkpoint_rounds(fleet), "a first round to be checkpointed")
        shown = status(fleet, server)
        spent = re.search(r"epsilon=([0-9.]+)", shown)
        assert spent is not None, shown
        assert float(spent.group(1)) == pytest.approx(epsilon_after(1), abs=1e-4)
        stop = cli(fleet, "stop", "--server", fleet.address, "--certs", fleet.certs)
        assert stop.returncode == 0, stop.stderr
        assert wait_exit(server) == 0
        done = max(checkpoint_rounds(fleet))
        assert done < 3, "the run ended before the restart this test is about"

        again = fleet.server("--wait-for", "4", "--out", out, name="server-2")
        finished(again, fleet, "server-2")
        log = fleet.log("server-2", tail=100_000)
        assert "run ends before round 4: privacy budget" in log, log

    results = json.loads(out.read_text())
    rounds = [r for r in results["rounds"] if r["status"] == "ok"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["strategy_metrics"]["epsilon"] for r in rounds] == [
        epsilon_after(n) for n in (1, 2, 3)
    ]
    assert results["ended_early"].startswith("privacy budget: ε = ")
    listed = cli(fleet, "runs", "--state-dir", fleet.state_dir)
    assert "finished" in listed.stdout and "privacy budget" in listed.stdout, listed.stdout
