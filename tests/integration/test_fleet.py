"""A real fleet: server and node processes on 127.0.0.1, real ports, every transport."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from conftest import (
    ROOT,
    checkpoint_rounds,
    finished,
    simulate_config,
    wait_exit,
    wait_for,
    without_timings,
    write_config,
)

from fedge.launch import Launcher

pytestmark = pytest.mark.integration


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo's temp dir lands in tmp_path
    run = subprocess.run(
        [sys.executable, "-m", "fedge", "demo", "--clients", "4", "--rounds", "3", "--out", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    for record in result["rounds"]:
        assert record["status"] == "ok"
        assert sorted(record["participants"]) == [0, 1, 2, 3]
    # every server and node process is gone, and so is the throwaway directory
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"leftover processes: {left.stdout}"
    assert not list(tmp_path.glob("fedge-demo-*"))


def test_simulation_fleet_and_resumed_fleet_give_byte_identical_models(
    tmp_path: Path, transport: str
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path / "app", rounds=4, fit_delay=0.2, marker_dir=markers)
    sim, sim_model = simulate_config(config, tmp_path / "sim.json")

    with Launcher(tmp_path / "plain", config, transport=transport) as fleet:
        out, model = tmp_path / "plain.json", tmp_path / "plain.safetensors"
        server = fleet.server("--wait-for", "4", "--out", out, "--model-out", model)
        for cid in range(4):
            fleet.node(cid)
        finished(server, fleet)
    assert model.read_bytes() == sim_model
    assert without_timings(json.loads(out.read_text())) == without_timings(sim)

    # node 3 sleeps 3 s in round 3 (a sleep: the model is the same), to hold that round open
    late = write_config(
        tmp_path / "late", rounds=4, fit_delay=3.0, slow_round=3, marker_dir=markers
    )
    with Launcher(tmp_path / "killed", config, transport=transport) as fleet:
        out, model = tmp_path / "killed.json", tmp_path / "killed.safetensors"
        options = ("--wait-for", "4", "--out", out, "--model-out", model)
        server = fleet.server(*options, name="server-1")
        for cid in range(4):
            fleet.node(cid, before=("--log-level", "info"), config=late if cid == 3 else None)
        # killed twice: right after round 1 is checkpointed, then after round 3's first
        # results were accepted (nodes must send what the dead server had taken)
        wait_for(lambda: 1 in checkpoint_rounds(fleet), "round 1", interval=0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = fleet.server(*options, name="server-2")
        wait_for(
            lambda: (s := fleet.status()) is not None and s.round == 3 and s.results_received == 3,
            "round 3 to have accepted the three fast results",
        )
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert max(checkpoint_rounds(fleet)) == 2
        server = fleet.server(*options, name="server-3")
        finished(server, fleet, "server-3")
        resent = [n for n in range(4) if "sending the kept result again" in fleet.log(f"node-{n}")]
    assert model.read_bytes() == sim_model
    assert without_timings(json.loads(out.read_text())) == without_timings(sim)
    assert resent, "no node re-sent a result the killed server had accepted"


def test_nodes_started_before_the_server_join_when_it_comes_up(fleet: Launcher) -> None:
    nodes = [fleet.node(cid) for cid in range(4)]
    time.sleep(2.0)  # nodes are up and failing to connect
    assert all(n.poll() is None for n in nodes), "nodes must keep retrying, not exit"
    out = fleet.work / "out.json"
    server = fleet.server("--wait-for", "4", "--out", out, "--rounds", "2")
    finished(server, fleet)
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["rounds"]] == ["ok", "ok"]
    assert all(r["participants"] == [0, 1, 2, 3] for r in result["rounds"])


def test_tls_refuses_clients_without_a_project_certificate(fleet: Launcher) -> None:
    from fedge.proto.fedge.v1 import fleet_pb2 as pb
    from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
    from fedge.security import init_ca, issue, load_credentials
    from fedge.transport.grpc.tls import channel_credentials

    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server's Control service")

    def join(creds: grpc.ChannelCredentials) -> object:
        with grpc.secure_channel(fleet.address, creds) as channel:
            try:
                return pb_grpc.FleetStub(channel).Join(
                    pb.JoinRequest(cid=0, protocol=2), timeout=10
                )
            except grpc.RpcError as exc:
                return exc

    ca_pem = (fleet.certs / "ca.crt").read_bytes()
    no_cert = join(grpc.ssl_channel_credentials(root_certificates=ca_pem))
    assert isinstance(no_cert, grpc.RpcError) and no_cert.code() == grpc.StatusCode.UNAVAILABLE

    other = fleet.work / "other-ca"
    init_ca(other)
    issue(other, "node-0")
    foreign = load_credentials(other, "node-0")
    wrong_ca = join(grpc.ssl_channel_credentials(ca_pem, foreign.key_pem, foreign.cert_pem))
    assert isinstance(wrong_ca, grpc.RpcError) and wrong_ca.code() == grpc.StatusCode.UNAVAILABLE

    fleet.issue("node-0")
    ok = join(channel_credentials(fleet.certs, "node-0"))  # control: a project cert can Join
    assert not isinstance(ok, grpc.RpcError), ok
    assert ok.node_id == "node-0"  # type: ignore[attr-defined]


def test_a_node_with_another_cas_certificate_stops_and_says_which(fleet: Launcher) -> None:
    """A node reads its PEM files without parsing them (it never loads `cryptography`);
    when the server refuses the handshake, it checks them and names what to fix."""
    import shutil

    from fedge.security import init_ca, issue

    other = fleet.work / "other-ca"
    init_ca(other)
    issue(other, "stranger")
    fleet.issue()
    for suffix in (".crt", ".key"):
        shutil.copy(other / f"stranger{suffix}", fleet.certs / f"stranger{suffix}")
    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server's Control service")
    node = fleet.node(0, identity="stranger")
    assert wait_exit(node, 30) == 1
    log = fleet.log("stranger")
    assert "stranger.crt was not issued by the CA in" in log, log
    assert "Traceback" not in log, log


def test_a_node_killed_during_fit_misses_that_round_and_rejoins(
    tmp_path: Path, transport: str
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(
        tmp_path / "app",
        num_clients=3,
        rounds=4,
        round_timeout=6.0,
        fit_delay=0.5,
        marker_dir=markers,
        fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "3", "--out", out)
        nodes = [fleet.node(cid) for cid in range(3)]
        wait_for(lambda: (markers / "fit-2-2").exists(), "node 2 to start fitting round 2")
        nodes[2].send_signal(signal.SIGKILL)  # it sleeps 0.5 s inside fit: mid-fit for sure
        nodes[2].wait()
        wait_for(lambda: 2 in checkpoint_rounds(fleet), "round 2 to close without node 2")
        fleet.node(2, name="node-2-again")
        finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["round"], r["status"]) for r in rounds] == [
        (1, "ok"),
        (2, "ok"),
        (3, "ok"),
        (4, "ok"),
    ]
    assert [r["participants"] for r in rounds] == [[0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2]]
    assert rounds[1]["failures"] == {"2": "no result before the round's deadline"}


def test_a_straggler_takes_part_in_the_next_round(tmp_path: Path, transport: str) -> None:
    config = write_config(
        tmp_path / "app", num_clients=3, round_timeout=3.0, fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )  # fmt: skip
    slow = write_config(  # node 2 runs the same app, but its round-1 fit outlasts the round
        tmp_path / "slow", num_clients=3, fit_delay=4.0, slow_round=1, fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )  # fmt: skip
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "3", "--out", out)
        fleet.node(0)
        fleet.node(1)
        fleet.node(2, config=slow)
        finished(server, fleet)
        rounds = json.loads(out.read_text())["rounds"]
        assert all(r["status"] == "ok" for r in rounds)
        assert rounds[0]["participants"] == [0, 1]
        assert rounds[2]["participants"] == [0, 1, 2], fleet.log("node-2")


def test_a_round_waiting_for_a_lost_node_says_which_and_gives_up_at_its_deadline(
    tmp_path: Path, transport: str
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(
        tmp_path / "app", num_clients=3, rounds=3, round_timeout=3.0, fit_delay=0.5,
        slow_round=2, marker_dir=markers, fraction_evaluate=0.0, run_extra="max_round_retries = 1",
    )  # fmt: skip
    with Launcher(tmp_path, config, transport=transport) as fleet:
        server = fleet.server("--wait-for", "3")
        nodes = [fleet.node(cid) for cid in range(3)]
        wait_for(lambda: (markers / "fit-2-2").exists(), "node 2 to start fitting round 2")
        nodes[2].send_signal(signal.SIGKILL)  # round 2 closes without it; round 3 waits
        waiting = wait_for(
            lambda: (s := fleet.status()) is not None and s.state == "waiting" and s,
            "the server to report it is waiting",
        )
        assert waiting.round == 2 and waiting.waiting_for == 3
        assert list(waiting.missing_cids) == [2]
        assert "2 of the 3 clients needed are available" in waiting.reason
        assert wait_exit(server, timeout=30) == 1  # 2 attempts x 3 s, then it gives up
        log = fleet.log("server")
    assert "WARNING" in log and "missing: [2]" in log
    assert "round 3 failed 2 time(s); last: only 2 of the 3 clients needed were available" in log
    assert "missing: [2]" in log.splitlines()[-1]  # the exit message names them too


def test_a_frozen_node_does_not_stretch_the_round_and_is_not_selected_while_silent(
    tmp_path: Path, transport: str
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    timeout = 4.0
    config = write_config(
        tmp_path / "app", num_clients=3, rounds=3, round_timeout=timeout, fit_delay=0.3,
        marker_dir=markers, fraction_evaluate=1.0, strategy_extra="min_results = 2",
    )  # fmt: skip
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "2", "--heartbeat-interval", "1", "--out", out)
        nodes = [fleet.node(cid) for cid in range(3)]
        wait_for(lambda: (markers / "fit-2-2").exists(), "node 2 to start fitting round 2")
        nodes[2].send_signal(signal.SIGSTOP)
        try:
            finished(server, fleet)
        finally:
            nodes[2].send_signal(signal.SIGCONT)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["ok", "ok", "ok"]
    second, third = rounds[1], rounds[2]
    assert second["participants"] == [0, 1]
    assert second["wall_time"] < 1.5 * timeout  # one deadline for the round, not one per stage
    assert 2 not in second["evaluate_failures"]  # it missed fit, so it was not asked to evaluate
    assert third["selected"] == [0, 1]  # silent past its heartbeat window: not selected


def test_partial_work_of_real_nodes_is_kept_under_fedprox(tmp_path: Path, transport: str) -> None:
    config = write_config(
        tmp_path / "app", num_clients=3, rounds=2, round_timeout=4.0, fraction_evaluate=0.0,
        strategy="fedprox",
    )  # fmt: skip
    endless = tmp_path / "endless"  # node 2: an epoch count no deadline allows
    endless.mkdir()
    (endless / "app.py").write_text((tmp_path / "app" / "app.py").read_text())
    (endless / "fedge.toml").write_text(
        config.read_text().replace("epochs = 5", "epochs = 10000000")
    )
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "3", "--out", out)
        fleet.node(0)
        fleet.node(1)
        fleet.node(2, config=endless / "fedge.toml")
        finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    assert all(r["participants"] == [0, 1, 2] for r in rounds)  # in time, with what it had
    assert all(r["wall_time"] < 4.0 for r in rounds)


TWO_STAGE_APP = textwrap.dedent(
    """
    import hashlib

    import numpy as np

    import fedge
    from app import create_app as digits
    from fedge.client import ClientWrapper, Reply
    from fedge.weights import TensorSpec

    PROOF = {"proof": TensorSpec(np.dtype(np.uint8), (32,))}


    def proof(nonce, cid):
        return np.frombuffer(hashlib.sha256(nonce.tobytes() + bytes([cid])).digest(), np.uint8)


    class Attesting(ClientWrapper):
        '''Answers "attest" tasks: proves it read the nonce sent to it alone.'''

        def __init__(self, inner, cid, liar):
            super().__init__(inner)
            self.cid, self.liar = cid, liar

        def handle(self, message):
            if message.kind == "attest":
                answer = proof(message.payload["nonce"], self.cid + (1 if self.liar else 0))
                return Reply({"proof": answer}, {"attested": 1.0})
            return super().handle(message)


    def attest_then_fit(rnd):
        '''Stage 1: a nonce to each available client; stage 2: fit those that answered right.'''
        available = rnd.wait_available(rnd.strategy.min_available_clients)
        nonces = {cid: rnd.rng.integers(0, 256, 16, dtype=np.uint8) for cid in available}
        tasks = rnd.tasks(
            "attest", available, payload=lambda cid: {"nonce": nonces[cid]},
            send_model=False, expects=PROOF,
        )
        honest = []
        with rnd.stage(tasks) as outcomes:
            for outcome in outcomes:
                cid, reply = outcome.task.cid, outcome.result
                expected = proof(nonces[cid], cid)
                if isinstance(reply, Reply) and np.array_equal(reply.arrays["proof"], expected):
                    honest.append(cid)
        return rnd.fit(sorted(honest))


    def create_app(num_clients, seed, liar=-1, **options):
        inner = digits(num_clients, seed, **options)
        return fedge.App(
            lambda cid: Attesting(inner.client_fn(cid), cid, cid == liar),
            inner.initial_weights,
            inner.evaluate_fn,
            workflow=attest_then_fit,
        )
    """
)


def test_a_two_stage_workflow_with_its_own_task_kind_runs_over_the_fleet(
    tmp_path: Path, transport: str
) -> None:
    config = write_config(tmp_path / "app", rounds=2, fraction_evaluate=0.0)
    (tmp_path / "app" / "twostage.py").write_text(TWO_STAGE_APP)
    config.write_text(
        config.read_text()
        .replace('target = "app:create_app"', 'target = "twostage:create_app"')
        .replace("options = { ", "options = { liar = 3, ")
    )
    sim, sim_model = simulate_config(config, tmp_path / "sim.json")
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out, model = tmp_path / "out.json", tmp_path / "out.safetensors"
        server = fleet.server("--wait-for", "4", "--out", out, "--model-out", model)
        for cid in range(4):
            fleet.node(cid)
        finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["selected"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]  # the liar never trains
    assert [r["participants"] for r in rounds] == [[0, 1, 2], [0, 1, 2]]
    assert model.read_bytes() == sim_model
    assert without_timings(json.loads(out.read_text())) == without_timings(sim)
