"""SecAgg+ over a real fleet, on both transports: four stages of the fleet's own task
kinds between real processes, the same model as the simulation of the same config, and
a node that dies after sending its masked input does not stop the round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finished, simulate_config, write_config

from fedge.launch import Launcher

pytestmark = pytest.mark.integration

SECURE = """
[secure_aggregation]
enabled = true
neighbours = 4
clipping_range = 2.0
"""


def test_secure_aggregation_runs_over_the_fleet_as_in_simulation(
    tmp_path: Path, transport: str
) -> None:
    config = write_config(tmp_path / "app", num_clients=5, rounds=2, fraction_evaluate=0.0,
                          extra=SECURE)  # fmt: skip
    sim, sim_model = simulate_config(config, tmp_path / "sim.json")
    assert [r["status"] for r in sim["rounds"]] == ["ok", "ok"]
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out, model = tmp_path / "out.json", tmp_path / "out.safetensors"
        server = fleet.server("--wait-for", "5", "--out", out, "--model-out", model)
        for cid in range(5):
            fleet.node(cid)
        finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["status"], r["participants"]) for r in rounds] == [("ok", [0, 1, 2, 3, 4])] * 2
    assert [r["metrics"] for r in rounds] == [r["metrics"] for r in sim["rounds"]]
    assert model.read_bytes() == sim_model
