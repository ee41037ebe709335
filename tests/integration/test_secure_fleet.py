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
    config = write_config(
        tmp_path / "app", num_clients=5, rounds=2, fraction_evaluate=0.0, extra=SECURE
    )
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


# Node-side code an attacker controls: it answers the SecAgg+ stages itself (its config
# leaves [secure_aggregation] off so fedge does not wrap it again), and misbehaves.
EVIL_APP = """
import numpy as np

import fedge
from app import create_app as digits
from fedge.client import ClientWrapper, Reply
from fedge.secure_aggregation import MASKED, UNMASK, Settings, secured


class Evil(ClientWrapper):
    def __init__(self, inner, cid):
        super().__init__(inner)
        self.cid = cid

    def handle(self, message):
        reply = self.inner.handle(message)
        if message.kind == MASKED and self.cid == 4:  # a masked vector one short
            return Reply({"masked": reply.arrays["masked"][:-1]})
        if message.kind == UNMASK and self.cid == 3:  # gone before unmasking
            raise ConnectionError("link lost")
        return reply


def create_app(num_clients, seed, **options):
    app = secured(digits(num_clients, seed, **options), Settings(), None)
    return fedge.App(lambda cid: Evil(app.client_fn(cid), cid), app.initial_weights)
"""


def test_a_short_masked_vector_and_a_dropout_mid_protocol_are_named_and_the_round_completes(
    tmp_path: Path,
) -> None:
    wide = SECURE.replace("neighbours = 4", "neighbours = 6")  # a secret needs 4 shares of 6
    config = write_config(
        tmp_path / "app", num_clients=7, rounds=1, fraction_evaluate=0.0, extra=wide
    )
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "app.py").write_text((tmp_path / "app" / "app.py").read_text())
    (evil / "evil.py").write_text(EVIL_APP)
    (evil / "fedge.toml").write_text(
        config.read_text().replace(wide, "").replace("app:create_app", "evil:create_app")
    )
    with Launcher(tmp_path, config) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "7", "--out", out)
        for cid in (0, 1, 2, 5, 6):
            fleet.node(cid)
        fleet.node(3, config=evil / "fedge.toml", name="node-3")
        fleet.node(4, config=evil / "fedge.toml", name="node-4")
        finished(server, fleet)
    (record,) = json.loads(out.read_text())["rounds"]
    assert record["status"] == "ok"
    assert record["participants"] == [0, 1, 2, 3, 5, 6]  # 3 sent its input, then left
    assert "tensor 'masked' has shape" in record["failures"]["4"], record["failures"]
    assert "link lost" in record["failures"]["3"], record["failures"]
