"""A real fleet: server and node processes on 127.0.0.1, mutual TLS, real ports."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    Processes,
    assert_metrics_close,
    assert_weights_close,
    checkpoint_rounds,
    finished,
    free_port,
    simulate_config,
    start_node,
    start_server,
    status_or_none,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


# --- 1 ---------------------------------------------------------------------------------


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


# --- 2 ---------------------------------------------------------------------------------


def test_simulation_and_fleet_agree(tmp_path: Path, procs: Processes, pki: Path) -> None:
    from fedge.checkpoint import latest_checkpoint
    from fedge.state import StateStore

    config = write_config(tmp_path / "run", num_clients=4, rounds=3)
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "fleet.json"
    server = start_server(procs, config, address, state, out, certs=pki, wait=4)
    for cid in range(4):
        start_node(procs, config, address, cid, pki)
    sim, sim_weights = simulate_config(config, tmp_path / "sim")
    finished(server, procs)

    fleet = json.loads(out.read_text())
    for record in fleet["rounds"]:
        assert sorted(record["participants"]) == [0, 1, 2, 3]
    assert_metrics_close(fleet, sim)
    ckpt = latest_checkpoint(state / "checkpoints")
    assert ckpt is not None and ckpt.round == 3
    assert_weights_close(ckpt.weights, sim_weights)
    with StateStore(state / "state.db") as store:  # what the server recorded of its nodes
        nodes = [(n["node_id"], n["cid"], n["tasks_done"]) for n in store.nodes()]
    assert nodes == [(f"node-{cid}", cid, 3) for cid in range(4)]


# --- 3 ---------------------------------------------------------------------------------


class RogueNode:
    """Speaks the Fleet protocol by hand (plaintext, loopback) as a given node."""

    def __init__(self, address: str, name: str) -> None:
        from fedge.proto.fedge.v1 import fleet_pb2 as pb
        from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.FleetStub(self.channel)
        self.md = (("fedge-node-name", name),)

    def upload(self, payload: bytes, chunk_offset: int = 0, **header: Any) -> Any:
        pb = self.pb
        messages = [pb.UploadMessage(header=pb.UploadHeader(**header))]
        if payload:
            messages.append(pb.UploadMessage(chunk=pb.Chunk(data=payload, offset=chunk_offset)))
        return self.stub.Upload(iter(messages), metadata=self.md, timeout=30)

    def rejected(self, code: grpc.StatusCode, fragment: str, payload: bytes, **header: Any) -> str:
        with pytest.raises(grpc.RpcError) as info:
            self.upload(payload, **header)
        err = info.value
        assert err.code() == code, (err.code(), err.details())
        assert fragment in (err.details() or ""), err.details()
        return str(err.details())


def fit_header(task: Any, payload: bytes, **overrides: Any) -> dict[str, Any]:
    header = {
        "task_id": task.task_id,
        "num_examples": 10,
        "encoding": "safetensors",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).digest(),
    }
    return {**header, **overrides}


def test_bad_uploads_are_rejected_and_the_run_continues(tmp_path: Path, procs: Processes) -> None:
    from fedge.weights import from_bytes, to_bytes

    config = write_config(
        tmp_path / "run", num_clients=2, rounds=1, round_timeout=60.0, fraction_evaluate=0.0
    )
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "out.json"
    server = start_server(
        procs, config, address, state, out, certs=None, wait=2, options=("--max-upload-mb", "1")
    )
    procs.start(
        "node-0", "node", "--server", address, "--config", config, "--cid", "0",
        "--insecure", "--name", "node-0",
    )  # fmt: skip

    rogue = RogueNode(address, "rogue")
    pb, stub, md = rogue.pb, rogue.stub, rogue.md
    join = wait_for(
        lambda: _try(lambda: stub.Join(pb.JoinRequest(cid=1), metadata=md, timeout=2)),
        "the server to accept Join",
    )
    assert join.node_id == "rogue"
    stream = stub.Tasks(
        pb.TasksRequest(node_id=join.node_id, session_token=join.session_token),
        metadata=md,
        timeout=TIMEOUT,
    )
    task = next(m.task for m in stream if m.HasField("task"))
    assert task.kind == pb.TASK_KIND_FIT and task.round == 1
    model = b"".join(
        c.data
        for c in stub.Download(
            pb.DownloadRequest(model_version=task.model_version), metadata=md, timeout=30
        )
    )
    assert len(model) == task.model_size
    assert hashlib.sha256(model).digest() == task.model_sha256
    weights = dict(from_bytes(model))
    good = to_bytes(weights)
    name = next(iter(weights))
    Code = grpc.StatusCode

    # wrong sha256
    rogue.rejected(
        Code.DATA_LOSS, "sha256 mismatch", good,
        **fit_header(task, good, sha256=hashlib.sha256(b"other").digest()),
    )  # fmt: skip
    # fewer bytes than declared: not accepted, the server keeps what it got
    half = len(good) // 2
    reply = rogue.upload(good[:half], **fit_header(task, good))
    assert not reply.accepted and reply.received_bytes == half and "incomplete" in reply.message
    query = stub.QueryUpload(pb.QueryUploadRequest(task_id=task.task_id), metadata=md, timeout=10)
    assert query.received_bytes == half and not query.complete
    # ... then more bytes than declared
    rogue.rejected(
        Code.INVALID_ARGUMENT, "exceeds its declared size", good[half:] + b"extra",
        chunk_offset=half, **fit_header(task, good, offset=half),
    )  # fmt: skip
    query = stub.QueryUpload(pb.QueryUploadRequest(task_id=task.task_id), metadata=md, timeout=10)
    assert query.received_bytes == 0  # the bad spool was discarded
    # garbage with the right hash
    garbage = os.urandom(len(good))
    rogue.rejected(Code.INVALID_ARGUMENT, "safetensors", garbage, **fit_header(task, garbage))
    # wrong tensor name, dtype, shape, and a NaN
    renamed = {("renamed" if k == name else k): v for k, v in weights.items()}
    widened = {k: (v.astype(np.float64) if k == name else v) for k, v in weights.items()}
    cut = {k: (v[:-1] if k == name else v) for k, v in weights.items()}
    nan = {k: v.copy() for k, v in weights.items()}
    nan[name].flat[0] = np.nan
    for bad, fragment in [
        (renamed, f"missing tensor(s) [{name!r}]"),
        (widened, f"tensor {name!r} has dtype float64"),
        (cut, f"tensor {name!r} has shape"),
        (nan, f"tensor {name!r} has 1 NaN"),
    ]:
        data = to_bytes(bad)
        rogue.rejected(Code.INVALID_ARGUMENT, fragment, data, **fit_header(task, data))
    # an unknown task id
    rogue.rejected(
        Code.NOT_FOUND, "unknown task id", good,
        **fit_header(task, good, task_id="no-such-task"),
    )  # fmt: skip
    # a declared size over the maximum (--max-upload-mb 1)
    rogue.rejected(
        Code.RESOURCE_EXHAUSTED, "outside 1..1048576 (the configured maximum)", b"",
        **fit_header(task, good, size=(1 << 20) + 1),
    )  # fmt: skip
    # finally a good upload: accepted, and the run finishes
    reply = rogue.upload(good, **fit_header(task, good))
    assert reply.accepted and not reply.duplicate
    finished(server, procs)
    result = json.loads(out.read_text())
    [record] = result["rounds"]
    assert record["status"] == "ok"
    assert sorted(record["participants"]) == [0, 1]
    stream.cancel()
    rogue.channel.close()


def _try(call: Any) -> Any:
    try:
        return call()
    except grpc.RpcError:
        return None


def test_tls_rejects_clients_without_a_project_certificate(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    from fedge.proto.fedge.v1 import fleet_pb2 as pb
    from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
    from fedge.security import init_ca, issue, load_credentials
    from fedge.transport.grpc.tls import channel_credentials

    config = write_config(tmp_path / "run", num_clients=4, rounds=1)
    address = f"127.0.0.1:{free_port()}"
    start_server(procs, config, address, tmp_path / "state", tmp_path / "o.json", certs=pki, wait=4)
    wait_for(lambda: status_or_none(address, pki), "the server's Control service")

    def join(creds: grpc.ChannelCredentials) -> grpc.RpcError | Any:
        with grpc.secure_channel(address, creds) as channel:
            try:
                return pb_grpc.FleetStub(channel).Join(pb.JoinRequest(cid=0), timeout=10)
            except grpc.RpcError as exc:
                return exc

    ca_pem = (pki / "ca.crt").read_bytes()
    no_cert = join(grpc.ssl_channel_credentials(root_certificates=ca_pem))
    assert isinstance(no_cert, grpc.RpcError) and no_cert.code() == grpc.StatusCode.UNAVAILABLE

    other = tmp_path / "other-ca"
    init_ca(other)
    issue(other, "node-0")
    foreign = load_credentials(other, "node-0")
    wrong_ca = join(grpc.ssl_channel_credentials(ca_pem, foreign.key_pem, foreign.cert_pem))
    assert isinstance(wrong_ca, grpc.RpcError) and wrong_ca.code() == grpc.StatusCode.UNAVAILABLE

    ok = join(channel_credentials(pki, "node-0"))  # control: a project cert can Join
    assert not isinstance(ok, grpc.RpcError), ok
    assert ok.node_id == "node-0"


# --- 4 ---------------------------------------------------------------------------------


def test_nodes_started_before_the_server_join_when_it_comes_up(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    config = write_config(tmp_path / "run", num_clients=3, rounds=2)
    address = f"127.0.0.1:{free_port()}"
    nodes = [start_node(procs, config, address, cid, pki) for cid in range(3)]
    time.sleep(2.0)  # nodes are up and failing to connect
    assert all(n.poll() is None for n in nodes), "nodes must keep retrying, not exit"
    out = tmp_path / "out.json"
    server = start_server(procs, config, address, tmp_path / "state", out, certs=pki, wait=3)
    finished(server, procs)
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["rounds"]] == ["ok", "ok"]
    assert all(sorted(r["participants"]) == [0, 1, 2] for r in result["rounds"])


# --- 5 ---------------------------------------------------------------------------------


def test_server_killed_mid_run_resumes(tmp_path: Path, procs: Processes, pki: Path) -> None:
    from fedge.checkpoint import latest_checkpoint

    config = write_config(
        tmp_path / "run", num_clients=4, rounds=4, round_timeout=5.0, fit_delay=0.5
    )
    plain = write_config(tmp_path / "sim", num_clients=4, rounds=4)
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "out.json"
    server = start_server(procs, config, address, state, out, certs=pki, wait=4, name="server-1")
    nodes = [start_node(procs, config, address, cid, pki) for cid in range(4)]
    # killed twice: right after round 1 is checkpointed, then while nodes fit round 3
    for after, pause in ((1, 0.0), (2, 0.3)):
        wait_for(lambda a=after: a in checkpoint_rounds(state), f"round {after}", interval=0.02)
        time.sleep(pause)
        assert server.poll() is None, procs.log(f"server-{after}")
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert max(checkpoint_rounds(state)) < 4
        server = start_server(
            procs, config, address, state, out, certs=pki, wait=4, name=f"server-{after + 1}"
        )

    sim, sim_weights = simulate_config(plain, tmp_path / "simout")
    finished(server, procs, "server-3")
    assert all(n.poll() is None for n in nodes), "nodes were not restarted"
    fleet = json.loads(out.read_text())
    assert_metrics_close(fleet, sim)
    ckpt = latest_checkpoint(state / "checkpoints")
    assert ckpt is not None and ckpt.round == 4
    assert_weights_close(ckpt.weights, sim_weights)


# --- 6 ---------------------------------------------------------------------------------


def test_node_killed_during_fit(tmp_path: Path, procs: Processes, pki: Path) -> None:
    config = write_config(
        tmp_path / "run",
        num_clients=3,
        rounds=4,
        round_timeout=3.0,
        fit_delay=0.5,
        fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "out.json"
    server = start_server(procs, config, address, state, out, certs=pki, wait=3)
    nodes = [start_node(procs, config, address, cid, pki) for cid in range(3)]
    wait_for(lambda: checkpoint_rounds(state), "the checkpoint of round 1", interval=0.02)
    nodes[2].send_signal(signal.SIGKILL)  # in the middle of round 2's fit
    nodes[2].wait()
    # round 2 closes at its timeout with the two survivors
    wait_for(lambda: 2 in checkpoint_rounds(state), "round 2 to close without node 2")
    start_node(procs, config, address, 2, pki, name="node-2-again")
    finished(server, procs)
    result = json.loads(out.read_text())
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["status"] == "ok" for r in rounds)
    assert sorted(rounds[0]["participants"]) == [0, 1, 2]
    assert sorted(rounds[1]["participants"]) == [0, 1]
    # the restarted node rejoined and trained again (rounds wait for 3 nodes)
    assert sorted(rounds[2]["participants"]) == [0, 1, 2]
    assert sorted(rounds[3]["participants"]) == [0, 1, 2]


def test_a_straggler_takes_part_in_the_next_round(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    config = write_config(
        tmp_path / "run",
        num_clients=3,
        rounds=3,
        round_timeout=3.0,
        fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )
    # node 2 is the same app, but its round-1 fit outlasts the round
    slow = write_config(
        tmp_path / "slow",
        num_clients=3,
        rounds=3,
        fit_delay=4.0,
        slow_round=1,
        fraction_evaluate=0.0,
        strategy_extra="min_results = 2",
    )
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "out.json"
    server = start_server(procs, config, address, state, out, certs=pki, wait=3)
    for cid in range(2):
        start_node(procs, config, address, cid, pki)
    start_node(procs, slow, address, 2, pki)
    finished(server, procs)
    rounds = json.loads(out.read_text())["rounds"]
    assert all(r["status"] == "ok" for r in rounds)
    assert sorted(rounds[0]["participants"]) == [0, 1]
    assert sorted(rounds[2]["participants"]) == [0, 1, 2], procs.log("node-2")
