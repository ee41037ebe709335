"""A node that lies, against a real server over mutual TLS: every refusal names what was
wrong, nothing it sends reaches the model unchecked, and the run goes on."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import attacker, cli, finished, latest_weights, wait_exit, wait_for, write_config

from fedge.launch import Launcher
from fedge.messages import PROTOCOL, Capabilities, Code, TaskHeader, UploadAck, UploadHeader
from fedge.node.link import Link, LinkError
from fedge.weights import from_bytes, to_bytes

pytestmark = pytest.mark.integration


class Hostile:
    """A node speaking the protocol by hand through its transport's `Link`."""

    def __init__(self, link: Link, cid: int, *, stream: bool = True) -> None:
        self.link = link
        self.joined = link.join(cid, Capabilities(), PROTOCOL)
        self.token = self.joined.token
        self._tasks: queue.Queue[TaskHeader] = queue.Queue()
        if stream:
            threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for item in self.link.tasks(self.joined):
                if isinstance(item, TaskHeader):
                    self._tasks.put(item)
        except LinkError:
            pass

    def task(self, timeout: float = 30) -> TaskHeader:
        return self._tasks.get(timeout=timeout)

    def model(self, task: TaskHeader) -> dict[str, np.ndarray]:
        assert task.model is not None
        return from_bytes(b"".join(self.link.download(self.token, task.model.version, 0)))

    def upload(self, task: TaskHeader, payload: bytes, **header: Any) -> UploadAck:
        fields: dict[str, Any] = {
            "token": self.token,
            "num_examples": 10,
            "encoding": "safetensors",
            "size": len(payload),
            "sha256": hashlib.sha256(payload).digest(),
        }
        chunk_offset = header.pop("chunk_offset", 0)
        head = UploadHeader(task.task_id, **{**fields, **header})
        chunks = [(chunk_offset, payload)] if payload else []
        return self.link.upload(head, chunks)

    def refused(
        self, code: Code, fragment: str, task: TaskHeader, payload: bytes, **header: Any
    ) -> str:
        with pytest.raises(LinkError) as info:
            self.upload(task, payload, **header)
        assert info.value.code == code, (info.value.code, info.value.message)
        assert fragment in info.value.message, info.value.message
        return info.value.message


def test_bad_uploads_are_refused_precisely_and_the_run_goes_on(
    fleet: Launcher, transport: str
) -> None:
    config = write_config(fleet.work / "two", num_clients=2, rounds=2, fraction_evaluate=0.0)
    out = fleet.work / "out.json"
    server = fleet.server("--wait-for", "2", "--max-upload-mb", "1", "--out", out, config=config)
    fleet.node(0, config=config)
    wait_for(fleet.status, "the server")
    rogue = Hostile(attacker(fleet, transport, "rogue"), 1)
    task = rogue.task()
    weights = rogue.model(task)
    good = to_bytes(weights)
    name = next(iter(weights))

    rogue.refused(
        Code.DATA_LOSS, "sha256 mismatch", task, good, sha256=hashlib.sha256(b"x").digest()
    )
    short = rogue.upload(
        task, good[: len(good) // 2], size=len(good), sha256=hashlib.sha256(good).digest()
    )
    assert not short.accepted and "incomplete" in short.message
    rogue.refused(
        Code.INVALID_ARGUMENT, "exceeds its declared size", task, good + b"extra",
        size=len(good), sha256=hashlib.sha256(good).digest(),
    )  # fmt: skip
    if transport == "grpc":
        rogue.refused(
            Code.INVALID_ARGUMENT, "expected a chunk at offset 0", task, good, chunk_offset=7
        )
    else:  # a gap over MQTT may be the broker's doing: the upload ends, to be resumed
        gap = rogue.upload(task, good, chunk_offset=7)
        assert not gap.accepted and "incomplete: 0 of" in gap.message, gap
    rogue.refused(Code.OUT_OF_RANGE, "resume offset 5", task, good, offset=5)
    garbage = os.urandom(len(good))
    rogue.refused(Code.INVALID_ARGUMENT, "not a valid safetensors payload", task, garbage)
    renamed = {("renamed" if k == name else k): v for k, v in weights.items()}
    widened = {k: (v.astype(np.float64) if k == name else v) for k, v in weights.items()}
    cut = {k: (v[:-1] if k == name else v) for k, v in weights.items()}
    nan = {k: v.copy() for k, v in weights.items()}
    nan[name].flat[0] = np.nan
    for bad, fragment in [
        (renamed, f"missing tensor(s) [{name!r}]"),
        (widened, f"tensor {name!r} has dtype float64, expected float32"),
        (cut, f"tensor {name!r} has shape"),
        (nan, f"tensor {name!r} has 1 NaN"),
    ]:
        rogue.refused(Code.INVALID_ARGUMENT, fragment, task, to_bytes(bad))
    rogue.refused(
        Code.RESOURCE_EXHAUSTED, "the configured maximum is 1048576", task, b"", size=(1 << 20) + 1
    )
    # larger than the model could ever encode to: refused before a byte is received
    rogue.refused(Code.INVALID_ARGUMENT, "the expected tensors take", task, b"", size=3 * len(good))
    rogue.refused(
        Code.INVALID_ARGUMENT, "num_examples must be in 1..1000000", task, good, num_examples=10**15
    )
    rogue.refused(
        Code.INVALID_ARGUMENT, "num_examples must be in 1..1000000", task, good, num_examples=0
    )
    rogue.refused(
        Code.INVALID_ARGUMENT, "values finite", task, good, metrics={"loss": float("nan")}
    )
    many = {f"m{i}": 1.0 for i in range(65)}
    rogue.refused(Code.INVALID_ARGUMENT, "65 metrics; at most 64", task, good, metrics=many)
    rogue.refused(
        Code.FAILED_PRECONDITION, "no current session with this token", task, good, token=""
    )
    rogue.refused(
        Code.NOT_FOUND, "unknown task id", replace(task, task_id=task.task_id + "x"), good
    )
    other = replace(task, task_id=task.task_id.rsplit("/", 1)[0] + "/0")  # node 0's task
    rogue.refused(Code.PERMISSION_DENIED, "was assigned to client id 0", other, good)
    # after all that, an honest upload is accepted; the round closes as both answered, so
    # the same result sent again is refused, not counted twice
    # 64 metric names of its own (the most one upload may carry) do not add to the
    # round's: its record keeps at most 64 names, the honest node's first
    own = {f"rogue{i}": 1.0 for i in range(64)}
    assert rogue.upload(task, good, metrics=own).accepted
    second = rogue.task()
    rogue.refused(Code.ABORTED, f"belongs to round {task.round}, which is closed", task, good)
    assert rogue.upload(second, to_bytes(rogue.model(second))).accepted
    finished(server, fleet)
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["status"], r["participants"]) for r in rounds] == [("ok", [0, 1])] * 2
    honest = set(rounds[1]["fit_metrics"])
    assert honest and len(rounds[0]["fit_metrics"]) == 64 and honest < set(rounds[0]["fit_metrics"])


def test_no_node_can_take_another_nodes_client_id(fleet: Launcher, transport: str) -> None:
    server = fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server")
    honest = fleet.node(0)
    wait_for(lambda: len(fleet.status().nodes) == 1, "node 0 to join")
    honest.send_signal(signal.SIGTERM)  # offline: its client id must stay its own
    assert wait_exit(honest) == 0
    for attempt in ("while it is offline", "after a server restart"):
        with pytest.raises(LinkError) as info:
            Hostile(attacker(fleet, transport, "rogue"), 0)
        assert info.value.code == Code.PERMISSION_DENIED, attempt
        assert "client id 0 is bound to node 'node-0'" in info.value.message
        assert "fedge nodes assign" in info.value.message
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.wait()
            server = fleet.server("--wait-for", "4", name="server-again")
            wait_for(fleet.status, "the server again")
    with pytest.raises(LinkError) as info:
        Hostile(attacker(fleet, transport, "rogue"), 4)  # the run has client ids 0..3
    assert (
        info.value.code == Code.OUT_OF_RANGE
        and "outside this run's client ids 0..3" in info.value.message
    )


def test_a_shadow_session_that_never_opens_its_task_stream_expires(
    fleet: Launcher, transport: str
) -> None:
    fleet.server("--wait-for", "4", "--heartbeat-interval", "0.5")
    wait_for(fleet.status, "the server")
    shadow = Hostile(attacker(fleet, transport, "shadow"), 1, stream=False)
    time.sleep(3.0)  # silent for twice its window (3 heartbeats)
    with pytest.raises(LinkError) as info:
        shadow.link.heartbeat(shadow.token)
    assert info.value.code == Code.FAILED_PRECONDITION


OVERFLOW_APP = textwrap.dedent(
    """
    import numpy as np
    from fedge import App
    from fedge.client import Client, FitResult


    class Step(Client):
        def fit(self, weights, config):
            return FitResult({k: v + np.float32(0.001) for k, v in weights.items()}, 10)


    def create_app(num_clients, seed):
        return App(lambda cid: Step(), {"w": np.zeros(8, dtype=np.float32)})
    """
)


def test_huge_finite_values_cannot_overflow_the_aggregate(tmp_path: Path, transport: str) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "step.py").write_text(OVERFLOW_APP)
    config = tmp_path / "app" / "fedge.toml"
    config.write_text('[app]\ntarget = "step:create_app"\n[run]\nnum_clients = 3\nrounds = 2\n')
    with Launcher(tmp_path, config, transport=transport) as fleet:
        server = fleet.server("--wait-for", "3")
        fleet.node(0)
        fleet.node(1)
        wait_for(fleet.status, "the server")
        rogue = Hostile(attacker(fleet, transport, "rogue"), 2)
        for _ in range(2):  # near float32's maximum: finite, so valid, and summed it is Inf
            task = rogue.task()
            huge = to_bytes({"w": np.full(8, 3.0e38, dtype=np.float32)})
            assert rogue.upload(task, huge, num_examples=1_000_000).accepted
        finished(server, fleet)
        weights = latest_weights(fleet)["w"]
    assert np.all(np.isfinite(weights)) and np.all(weights > 2.9e38)  # dominated, not Inf


COUNTING_APP = textwrap.dedent(
    """
    import numpy as np
    from fedge import App
    from fedge.client import Client, FitResult


    class Step(Client):
        def fit(self, weights, config):
            return FitResult({"w": weights["w"] + np.float32(1.0)}, 10)


    def create_app(num_clients, seed):
        return App(lambda cid: Step(), {"w": np.zeros(4, dtype=np.float32)})
    """
)


def test_a_node_lying_about_its_example_count_buys_no_influence(tmp_path: Path) -> None:
    """Two honest nodes step +1 reporting 10 examples; a liar steps +4 claiming a
    million. Capped at 10, the liar weighs as an honest node: (1 + 1 + 4) / 3 = 2 (as
    reported, it would be 4 - 6e-5 x 3 = 3.9999)."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "counting.py").write_text(COUNTING_APP)
    config = tmp_path / "app" / "fedge.toml"
    config.write_text(
        '[app]\ntarget = "counting:create_app"\n[run]\nnum_clients = 3\nrounds = 1\n'
        '[limits]\nexample_weights = "capped"\nexample_cap = 10\n'
    )
    with Launcher(tmp_path, config) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "3", "--out", out)
        fleet.node(0)
        fleet.node(1)
        wait_for(fleet.status, "the server")
        liar = Hostile(attacker(fleet, "grpc", "liar"), 2)
        task = liar.task()
        lie = to_bytes({"w": liar.model(task)["w"] + np.float32(4.0)})
        assert liar.upload(task, lie, num_examples=1_000_000).accepted
        finished(server, fleet)
        weights = latest_weights(fleet)["w"]
    np.testing.assert_array_equal(weights, np.full(4, 2.0, np.float32))
    (record,) = json.loads(out.read_text())["rounds"]
    assert record["participants"] == [0, 1, 2] and record["num_examples"] == 1_000_020


def test_a_node_cannot_forge_lines_in_the_servers_log(fleet: Launcher, transport: str) -> None:
    fleet.server("--wait-for", "4", before=("--log-level", "info"))
    wait_for(fleet.status, "the server")
    rogue = Hostile(attacker(fleet, transport, "rogue"), 0, stream=False)
    forged = "ERROR fedge.fleet.server: round 7 failed: quorum lost"
    rogue.link.leave(rogue.token, f"bye\n{forged}")
    wait_for(lambda: "node rogue left" in fleet.log("server"), "the leave in the log")
    log = fleet.log("server")
    assert "bye\\nERROR fedge.fleet.server" in log
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_a_bad_node_name_is_refused_before_any_file_is_touched(fleet: Launcher) -> None:
    victim = fleet.work / "victim" / "results"  # where `--name ../../victim` would point
    victim.mkdir(parents=True)
    (victim / "precious").write_text("keep me")
    done = cli(
        fleet, "node", "--server", fleet.address, "--cid", "0", "--config", fleet.config,
        "--certs", fleet.issue(), "--name", "../../victim",
    )  # fmt: skip
    assert done.returncode == 1
    assert "may only contain letters, digits" in done.stderr
    assert (victim / "precious").read_text() == "keep me"


def test_deeply_nested_order_metadata_is_a_precise_refusal(fleet: Launcher, transport: str) -> None:
    from safetensors.numpy import save

    fleet.server("--wait-for", "1")
    wait_for(fleet.status, "the server")
    rogue = Hostile(attacker(fleet, transport, "rogue"), 0)
    task = rogue.task()
    weights = rogue.model(task)
    nested = save(weights, metadata={"fedge.order": "[" * 1500 + "]" * 1500})
    rogue.refused(Code.INVALID_ARGUMENT, "is not JSON (nested too deeply)", task, nested)
    assert rogue.upload(task, to_bytes(weights)).accepted  # the server is fine


BIG_APP = """
import numpy as np
import fedge

def create_app(num_clients, seed):
    return fedge.App(lambda cid: None, {"w": np.zeros(1_310_720, np.float32)})  # 5 MiB
"""


def chunked(payload: bytes, size: int = 1 << 20) -> list[tuple[int, bytes]]:
    return [(at, payload[at : at + size]) for at in range(0, len(payload), size)]


def test_large_uploads_that_lie_are_cut_and_leave_nothing_behind(tmp_path: Path) -> None:
    """Payloads over 4 MiB are spooled to a file: a header of 80,000 empty tensors is
    refused before it is parsed; an upload stalled mid-way for a round that closes is cut
    at once, without waiting for its next chunk, and its spool file is removed."""
    (tmp_path / "app.py").write_text(BIG_APP)
    config = tmp_path / "fedge.toml"
    config.write_text(
        '[app]\ntarget = "app:create_app"\n[run]\nnum_clients = 1\nrounds = 1\n'
        "round_timeout = 4.0\nmax_round_retries = 5\n"
    )
    with Launcher(tmp_path / "fleet", config) as fleet:
        fleet.server("--wait-for", "1")
        wait_for(fleet.status, "the server")
        rogue = Hostile(attacker(fleet, "grpc", "rogue"), 0)
        task = rogue.task()
        payload = to_bytes(rogue.model(task))
        rogue.refused(
            Code.INVALID_ARGUMENT, "the protocol's chunks are at most", task, payload[: 2 << 20],
            size=len(payload), sha256=hashlib.sha256(payload).digest(),
        )  # fmt: skip

        empty = {
            f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(80_000)
        }
        header_json = json.dumps(empty, separators=(",", ":")).encode()
        forged = len(header_json).to_bytes(8, "little") + header_json
        assert len(payload) > len(forged) > 4 << 20
        with pytest.raises(LinkError) as refused:
            rogue.link.upload(upload_header(rogue, task, forged), chunked(forged))
        assert refused.value.code == Code.INVALID_ARGUMENT
        assert f"a {len(header_json)}-byte header; the expected tensors need at most" in (
            refused.value.message
        )

        task = rogue.task()  # the round is tried again: the forged upload failed it
        sent_rest, resume = threading.Event(), threading.Event()

        def stall() -> Iterator[tuple[int, bytes]]:
            yield 0, payload[: 1 << 20]
            resume.wait(60)  # the round's deadline passes meanwhile: its task closes
            sent_rest.set()
            yield from chunked(payload)[1:]

        with pytest.raises(LinkError) as cut:
            rogue.link.upload(upload_header(rogue, task, payload), stall())
        assert not sent_rest.is_set(), "the server waited for the next chunk"
        resume.set()
        assert cut.value.code == Code.ABORTED
        assert "the round closed before the upload was complete" in cut.value.message
        assert not list(fleet.state_dir.glob("runs/*/uploads/*"))


def upload_header(node: Hostile, task: TaskHeader, payload: bytes) -> UploadHeader:
    return UploadHeader(
        task.task_id,
        token=node.token,
        num_examples=10,
        encoding="safetensors",
        size=len(payload),
        sha256=hashlib.sha256(payload).digest(),
    )
