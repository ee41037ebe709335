"""Compressed updates through a real fleet: the simulation and the fleet give the same
model bit for bit, and a node that lies in an encoded payload is refused precisely
while the run goes on with the honest nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import attacker, finished, simulate_config, wait_for, without_timings, write_config
from test_attacks import Hostile

from fedge import rice
from fedge.compression import PLAIN, pack
from fedge.launch import Launcher
from fedge.messages import Code
from fedge.weights import to_bytes

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["q8", "topk", "stc"])
def test_a_compressed_simulation_and_fleet_give_byte_identical_models(
    tmp_path: Path, transport: str, mode: str
) -> None:
    work = tmp_path
    extra = f'\n[compression]\nmode = "{mode}"\ntopk_fraction = 0.05\nstc_fraction = 0.1\n'
    config = write_config(work / "app", rounds=3, fraction_evaluate=0.0, extra=extra)
    sim, sim_model = simulate_config(config, work / "sim.json")
    with Launcher(work / "fleet", config, transport=transport) as fleet:
        out, model = work / "fleet.json", work / "fleet.safetensors"
        server = fleet.server("--wait-for", "4", "--out", out, "--model-out", model)
        for cid in range(4):
            fleet.node(cid)
        finished(server, fleet)
    assert model.read_bytes() == sim_model
    assert without_timings(json.loads(out.read_text())) == without_timings(sim)
    assert all(r["status"] == "ok" and r["participants"] == [0, 1, 2, 3] for r in sim["rounds"])


def test_malformed_encoded_uploads_are_refused_and_the_round_completes(
    fleet: Launcher, transport: str
) -> None:
    extra = (
        '\n[compression]\nmode = "auto"\ntopk_fraction = 0.01\n'
        "auto_thresholds = { stc = 0.5, topk = 1.0, q8 = 10.0, fp16 = 100.0 }\n"
    )
    config = write_config(
        fleet.work / "two", num_clients=2, rounds=2, fraction_evaluate=0.0, extra=extra
    )
    out = fleet.work / "out.json"
    server = fleet.server("--wait-for", "2", "--out", out, config=config)
    fleet.node(0, config=config)
    wait_for(fleet.status, "the server")
    rogue = Hostile(attacker(fleet, transport, "rogue"), 1)
    task = rogue.task()
    weights = rogue.model(task)  # digits: weight [64, 10], bias [10], float32
    total = 650

    def q8(values: np.ndarray | None = None, ranges: np.ndarray | None = None) -> bytes:
        return pack({  # packed: (low, step) per tensor, then one code per entry
            "q8.ranges": np.ones((2, 2), np.float32) if ranges is None else ranges,
            "q8.values": np.zeros(total, np.uint8) if values is None else values,
        })  # fmt: skip

    def topk(indices: list[int], values: np.ndarray | None = None) -> bytes:
        count = len(indices)
        return pack({  # packed: the values, then their uint16 indices (650 entries < 2**16)
            "topk.values": np.ones(count, np.float32) if values is None else values,
            "topk.indices": np.array(indices, np.uint16),
        })  # fmt: skip

    def stc(positions: list[int], scales: tuple[float, float] = (0.5, 0.25)) -> bytes:
        fixed, unary = rice.encode(np.array(positions), np.zeros(len(positions), bool), total)
        return pack({
            "stc.count": np.array([len(positions)], np.uint32),
            "stc.scales": np.array(scales, np.float32), "stc.fixed": fixed, "stc.unary": unary,
        })  # fmt: skip

    nan_scale = np.ones((2, 2), np.float32)
    nan_scale[0, 1] = np.nan
    zero_step = np.ones((2, 2), np.float32)
    zero_step[1, 1] = 0.0
    cases = [
        (q8(ranges=nan_scale), "q8", "tensor 'q8.ranges' has 1 NaN or Inf value(s)"),
        (q8(ranges=zero_step), "q8", "the q8 step of tensor 'bias' is 0.0; expected > 0"),
        (q8(values=np.zeros(total - 1, np.uint8)), "q8",
         "a q8 payload of this model is exactly 666 bytes (2 float tensors of 650 entries, "
         "0 bytes of integer tensors); got 665"),
        (topk([3, 650]), "topk", "topk index 650 is out of range; the float tensors have 650"),
        (topk([5, 5]), "topk", "strictly increasing (unique, in order); entry 1 is 5 after 5"),
        (topk(list(range(9))), "topk", "for each of at most 8 entries (topk_fraction 0.01"),
        (topk([1, 2])[:-1], "topk", "plus 6 bytes (a float32 value and a uint16 index)"),
        (topk([640, 641]), "topk", "2 topk entries in tensor 'bias'; at most 1"),
        (topk([1], np.array([np.inf], np.float32)), "topk", "'topk.values' has 1 NaN or Inf"),
        (stc([640, 641]), "stc", "2 stc entries in tensor 'bias'; at most 1 (stc_fraction 0.1"),
        (stc([3], (0.5, -1.0)), "stc", "the stc scale of tensor 'bias' is -1.0; expected >= 0"),
        (stc([3, 650]), "stc", "position 650 is out of range; the float tensors have 650"),
        (stc([3])[:-1], "stc", "an stc payload of 1 entries of this model takes"),
        (to_bytes({k: v.astype(np.float16) for k, v in weights.items()}), "gzip",
         "encoding 'gzip' is not accepted for this task"),
    ]  # fmt: skip
    for payload, encoding, fragment in cases:
        rogue.refused(Code.INVALID_ARGUMENT, fragment, task, payload, encoding=encoding)
    # a payload larger than the encoding could ever take: refused before it is received
    rogue.refused(Code.INVALID_ARGUMENT, "at most 8 entries", task, b"", encoding="topk", size=480)
    assert fleet.status() is not None  # the server is up
    # the honest node's round completes with the rogue's honest, compressed, second try
    good = topk([0, 640], np.array([0.5, -0.25], np.float32))
    assert rogue.upload(task, good, encoding="topk").accepted
    second = rogue.task()
    assert rogue.upload(second, to_bytes(rogue.model(second)), encoding=PLAIN).accepted
    finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["status"], r["participants"]) for r in rounds] == [("ok", [0, 1])] * 2
