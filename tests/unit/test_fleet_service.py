"""The fleet service (sessions, task board, uploads, models) and the node runtime, talking
through the in-memory link: no sockets, no processes.

The service runs on an event loop in a thread of its own, as in the real server; the test
thread plays the coordinator (through `ServiceFleet`, as `fleet/server.py` does) and, with
`Hand`, nodes that speak the protocol by hand — honest or not. Client-id bindings live in
a real `StateStore` in tmp_path.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from fedge.client import EVALUATE, FIT, Client, Config, EvaluateResult, FitResult
from fedge.compression import CompressClient, Compressor, PackedFile, Throughput, decode, pack
from fedge.config import CompressionSection
from fedge.coordinator import Outcome, Task
from fedge.errors import QuorumError
from fedge.fleet import uploads
from fedge.fleet.bridge import ServiceFleet
from fedge.fleet.service import FleetService, FleetSettings
from fedge.messages import (
    PROTOCOL,
    Capabilities,
    Code,
    FleetError,
    TaskHeader,
    UploadAck,
    UploadHeader,
)
from fedge.node.link import LinkError
from fedge.node.runtime import Node, NodeSettings
from fedge.state import StateStore
from fedge.transport.memory import MemoryLink
from fedge.weights import Weights, spec_of, to_bytes

T = TypeVar("T")

RUN = "run-1"
MODEL: Weights = {"w": np.arange(8, dtype=np.float32), "b": np.full((), 0.5, np.float32)}
"""The global model: 36 bytes of tensor data."""
TRAINED: Weights = {k: v + 1 for k, v in MODEL.items()}
"""What every client here trains the model to."""
TIMEOUT = 5.0


def wait_until(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def task_for(cid: int, version: str | None, *, round: int = 1, kind: str = FIT) -> Task:
    return Task(
        task_id=f"{RUN}/{round}.0/{kind}/{cid}",
        round=round,
        attempt=0,
        kind=kind,
        cid=cid,
        config={"round": round, "lr": 0.5},
        model=version,
        expects=spec_of(MODEL) if kind == FIT else None,
    )


class Counting(Client):
    """Trains to `TRAINED` on 10 examples; evaluates to the sum of `w`; counts its calls."""

    def __init__(self) -> None:
        self.fits: list[Config] = []
        self.evaluates: list[Config] = []

    def fit(self, weights: Weights, config: Config) -> FitResult:
        self.fits.append(dict(config))
        return FitResult({k: v + 1 for k, v in weights.items()}, 10, {"loss": 0.25})

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        self.evaluates.append(dict(config))
        return EvaluateResult(float(weights["w"].sum()), 7, {"accuracy": 0.75})


@dataclass
class Running:
    """A `Node` serving in a thread of its own."""

    node: Node
    link: MemoryLink
    thread: threading.Thread
    client: Counting


class Hand:
    """A node speaking the protocol by hand through a `MemoryLink`."""

    def __init__(
        self, fleet: Harness, service: FleetService, identity: str, cid: int, *, stream: bool
    ) -> None:
        self.link = MemoryLink(service, fleet.loop, identity, chunk_size=64)
        self.joined = self.link.join(cid, Capabilities(), PROTOCOL)
        self.token = self.joined.token
        self.tasks: queue.Queue[TaskHeader] = queue.Queue()
        self.ended: LinkError | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if stream:
            self.thread = threading.Thread(target=self._pump, daemon=True)
            self.thread.start()

    def _pump(self) -> None:
        try:
            for item in self.link.tasks(self.joined):
                if isinstance(item, TaskHeader):
                    self.tasks.put(item)
        except LinkError as exc:
            self.ended = exc
        finally:
            self.done.set()

    def task(self) -> TaskHeader:
        return self.tasks.get(timeout=TIMEOUT)

    def upload(self, task_id: str, payload: bytes = b"", **fields: Any) -> UploadAck:
        header: dict[str, Any] = {
            "token": self.token,
            "num_examples": 10,
            "encoding": "safetensors",
            "size": len(payload),
            "sha256": hashlib.sha256(payload).digest(),
        }
        header.update(fields)
        return self.link.upload(UploadHeader(task_id, **header), [(0, payload)] if payload else [])

    def refused(
        self, code: Code, fragment: str, task_id: str, payload: bytes, **fields: Any
    ) -> str:
        with pytest.raises(LinkError) as info:
            self.upload(task_id, payload, **fields)
        assert info.value.code == code, (info.value.code, info.value.message)
        assert fragment in info.value.message, info.value.message
        return info.value.message

    def close(self) -> None:
        self.link.cancel()
        if self.thread is not None:
            self.thread.join(TIMEOUT)


class Harness:
    """An event loop in a thread, the services on it, and the nodes talking to them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store = StateStore(tmp_path / "state.db")
        self.services: list[FleetService] = []
        self.hands: list[Hand] = []
        self.running: list[Running] = []

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        async def run() -> T:
            return fn(*args)

        return self.call(run())

    def serve(self, **settings: Any) -> tuple[FleetService, ServiceFleet]:
        """A service as `fleet/server.py` builds it (bindings from the state database),
        and the coordinator's view of it."""
        options: dict[str, Any] = {
            "run_id": RUN,
            "num_clients": 4,
            "work_dir": self.tmp / "work",
            "keepalive_interval": 30.0,
        }
        options.update(settings)
        service = FleetService(FleetSettings(**options), self.store, self.store.bindings())
        self.services.append(service)
        return service, ServiceFleet(service, self.loop)

    def hand(self, service: FleetService, identity: str, cid: int, *, stream: bool = True) -> Hand:
        hand = Hand(self, service, identity, cid, stream=stream)
        self.hands.append(hand)
        if stream:
            wait_until(
                lambda: cid in self.on_loop(service.sessions.available),
                f"the task stream of {identity}",
            )
        return hand

    def node(
        self,
        service: FleetService,
        identity: str,
        cid: int,
        *,
        compression: CompressionSection | None = None,
        uplink: Throughput | None = None,
    ) -> Running:
        link = MemoryLink(service, self.loop, identity)
        client = Counting()
        served: Client = client
        if compression is not None:
            served = CompressClient(client, compression, uplink=uplink or Throughput())
        settings = NodeSettings(cid, identity, cache_dir=self.tmp / identity)
        node = Node(served, link, settings, uplink=uplink)
        thread = threading.Thread(target=node.run, name=identity, daemon=True)
        thread.start()
        running = Running(node, link, thread, client)
        self.running.append(running)
        return running

    def close(self) -> None:
        for running in self.running:
            running.node.stop()
        stuck = []
        for running in self.running:
            running.thread.join(TIMEOUT)
            if running.thread.is_alive():
                stuck.append(running.thread.name)
        for hand in self.hands:
            hand.close()
        for service in self.services:
            self.on_loop(service.stop)

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
        self.store.close()
        assert not stuck, f"nodes still running after stop(): {stuck}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def outcomes(bridge: ServiceFleet) -> list[Outcome]:
    """The outcomes of every task opened through `bridge`, as the coordinator gets them."""
    found = list(bridge.outcomes(time.time() + TIMEOUT))
    assert not bridge._waiting, f"no outcome for {sorted(bridge._waiting)}"
    return found


def assert_trained(outcome: Outcome, task: Task) -> None:
    assert outcome.task == task and outcome.error is None
    assert isinstance(outcome.result, FitResult)
    assert outcome.result.num_examples == 10
    assert outcome.result.metrics == {"loss": 0.25}
    assert set(outcome.result.weights) == set(TRAINED)
    for name, value in TRAINED.items():
        np.testing.assert_array_equal(np.asarray(outcome.result.weights[name]), value)


# --- results -------------------------------------------------------------------------


def test_a_result_is_accepted_once_and_a_resent_upload_is_a_counted_duplicate(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve()
    hand = fleet.hand(service, "node-2", 2)
    assert hand.joined.node_id == "node-2" and hand.joined.heartbeat_interval == 5.0
    assert fleet.store.bindings() == {"node-2": 2}
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [2]

    version = bridge.publish(MODEL)
    task = task_for(2, version)
    bridge.open([task])
    header = hand.task()
    assert (header.task_id, header.run_id, header.round, header.kind, header.config) == (
        task.task_id,
        RUN,
        1,
        FIT,
        {"round": 1, "lr": 0.5},
    )
    model = to_bytes(MODEL)
    assert header.model is not None and header.model.version == version
    assert (header.model.sha256, header.model.size) == (hashlib.sha256(model).digest(), len(model))
    chunks = list(hand.link.download(hand.token, version, 0))
    assert b"".join(chunks) == model and len(chunks) == math.ceil(len(model) / 64)
    assert b"".join(hand.link.download(hand.token, version, 100)) == model[100:]

    payload = to_bytes(TRAINED)
    ack = hand.upload(task.task_id, payload, metrics={"loss": 0.25})
    assert ack == UploadAck(True, received_bytes=len(payload))
    [outcome] = outcomes(bridge)
    assert_trained(outcome, task)

    again = hand.upload(task.task_id, payload, metrics={"loss": 0.25})
    assert again == UploadAck(True, True, "already counted", received_bytes=len(payload))
    assert hand.link.query_upload(hand.token, task.task_id) == (len(payload), True)
    assert service.board.results.empty(), "the duplicate reached the coordinator"
    assert service.events.counts["upload.accepted"] == 1
    assert (service.board.received, service.board.expected) == (1, 1)
    assert fleet.on_loop(lambda: service.sessions.by_node["node-2"].tasks_done) == 1


def test_a_node_runs_its_fit_and_evaluate_tasks_and_the_coordinator_gets_the_results(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve()
    running = fleet.node(service, "edge-1", 1)
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [1]
    version = bridge.publish(MODEL)
    fit, evaluate = task_for(1, version), task_for(1, version, kind=EVALUATE)
    bridge.open([fit, evaluate])
    found = {o.task.kind: o for o in outcomes(bridge)}
    assert_trained(found[FIT], fit)
    result = found[EVALUATE].result
    assert isinstance(result, EvaluateResult)
    assert (result.loss, result.num_examples, result.metrics) == (28.0, 7, {"accuracy": 0.75})
    assert running.client.fits == running.client.evaluates == [{"round": 1, "lr": 0.5}]
    wait_until(lambda: running.node.tasks_done == 2, "the node to count its tasks")
    assert fleet.store.bindings() == {"edge-1": 1}


def test_a_task_pushed_again_after_a_server_restart_gets_the_kept_result_not_a_retrain(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve()
    running = fleet.node(service, "edge-0", 0)
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [0]
    task = task_for(0, bridge.publish(MODEL))
    bridge.open([task])
    assert_trained(outcomes(bridge)[0], task)
    wait_until(lambda: running.node.tasks_done == 1, "the node to keep its delivered result")

    # the server restarts before the round is recorded: a new service (bindings from the
    # state database) opens the same task again, and the node reconnects to it
    again, bridge_again = fleet.serve()
    assert bridge_again.publish(MODEL) == task.model
    bridge_again.open([task])
    running.link.service = again
    fleet.on_loop(service.stop)
    [outcome] = outcomes(bridge_again)
    assert_trained(outcome, task)
    assert len(running.client.fits) == 1, "the node trained again instead of re-sending"
    assert running.node.tasks_done == 1
    assert fleet.on_loop(lambda: again.sessions.by_node["edge-0"].cid) == 0


# --- client ids and sessions ---------------------------------------------------------


def join_refused(link: MemoryLink, cid: int, code: Code, fragment: str, **join: Any) -> None:
    with pytest.raises(LinkError) as info:
        link.join(cid, join.get("capabilities", Capabilities()), join.get("protocol", PROTOCOL))
    assert info.value.code == code, (info.value.code, info.value.message)
    assert fragment in info.value.message, info.value.message


def test_a_client_id_belongs_to_one_identity_until_an_operator_assigns_it(
    fleet: Harness,
) -> None:
    service, _ = fleet.serve()
    owner = fleet.hand(service, "node-a", 0, stream=False)
    owner.link.leave(owner.token, "going offline")
    assert fleet.on_loop(lambda: dict(service.sessions.by_node)) == {}
    rogue = MemoryLink(service, fleet.loop, "rogue")
    join_refused(rogue, 0, Code.PERMISSION_DENIED, "client id 0 is bound to node 'node-a'")
    join_refused(rogue, 0, Code.PERMISSION_DENIED, "`fedge nodes assign rogue 0`")
    join_refused(owner.link, 1, Code.PERMISSION_DENIED, "node 'node-a' is bound to client id 0")

    # the binding outlives the server: a restarted one loads it from the state database
    restarted, _ = fleet.serve()
    rogue.service = restarted
    join_refused(rogue, 0, Code.PERMISSION_DENIED, "client id 0 is bound to node 'node-a'")
    # a node refused at join stops by itself, and says why
    running = fleet.node(restarted, "rogue", 0)
    running.thread.join(TIMEOUT)
    assert not running.thread.is_alive()
    assert "client id 0 is bound to node 'node-a'" in (running.node.stopped_because or "")
    assert running.client.fits == []

    assert fleet.call(restarted.assign("rogue", 0)) == "node-a"
    assert fleet.store.bindings() == {"rogue": 0}
    assert rogue.join(0, Capabilities(), PROTOCOL).node_id == "rogue"
    owner.link.service = restarted
    join_refused(owner.link, 0, Code.PERMISSION_DENIED, "client id 0 is bound to node 'rogue'")
    with pytest.raises(FleetError) as info:
        fleet.call(restarted.assign("rogue", 4))
    assert info.value.code == Code.OUT_OF_RANGE and "outside this run's 0..3" in info.value.message


def test_assigning_a_live_nodes_client_id_to_another_node_stops_it(fleet: Harness) -> None:
    service, bridge = fleet.serve()
    old = fleet.node(service, "old", 3)
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [3]
    assert fleet.call(service.assign("new", 3)) == "old"
    old.thread.join(TIMEOUT)
    assert not old.thread.is_alive(), "the node kept serving a client id it lost"
    assert old.node.stopped_because == "client id 3 was assigned to node 'new' by an operator"
    assert service.events.counts["node.replaced"] == 1
    fleet.node(service, "new", 3)
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [3]
    assert fleet.on_loop(lambda: service.sessions.current(3).node_id) == "new"  # type: ignore[union-attr]


def test_a_newer_connection_of_the_same_identity_ends_the_older_session(fleet: Harness) -> None:
    service, _ = fleet.serve()
    older = fleet.hand(service, "node-1", 1)
    newer = fleet.hand(service, "node-1", 1)
    assert older.done.wait(TIMEOUT), "the older task stream is still open"
    assert older.ended is not None and older.ended.code == Code.ABORTED
    assert "replaced by a newer connection: identity 'node-1'" in older.ended.message
    with pytest.raises(LinkError) as info:
        older.link.heartbeat(older.token)
    assert info.value.code == Code.FAILED_PRECONDITION
    newer.link.heartbeat(newer.token)
    assert fleet.on_loop(service.sessions.available) == [1]


def test_a_process_that_a_newer_one_replaced_may_not_join_again(fleet: Harness) -> None:
    """Over MQTT the broker closes the older connection without saying why, and the older
    process redials and joins: refused, or the two would take turns."""
    service, _ = fleet.serve()
    older, newer = (MemoryLink(service, fleet.loop, "node-1") for _ in range(2))
    first = older.join(1, Capabilities(instance="aa11"), PROTOCOL)
    newer.join(1, Capabilities(instance="bb22"), PROTOCOL)
    older.join(1, Capabilities(instance="bb22"), PROTOCOL)  # the newest rejoins: fine
    join_refused(
        older, 1, Code.ABORTED, "another process joined as 'node-1' after this one",
        capabilities=Capabilities(instance="aa11"),
    )  # fmt: skip
    with pytest.raises(LinkError):
        older.heartbeat(first.token)
    # a restart is a new process: it joins, and replaces the one before it
    older.join(1, Capabilities(instance="cc33"), PROTOCOL)
    join_refused(
        newer, 1, Code.ABORTED, "replaced by a newer connection",
        capabilities=Capabilities(instance="bb22"),
    )  # fmt: skip
    join_refused(
        newer, 1, Code.INVALID_ARGUMENT, "capabilities.instance is longer than",
        capabilities=Capabilities(instance="x" * 1000),
    )  # fmt: skip


def test_a_shadow_session_expires_and_cannot_upload_while_the_genuine_node_is_accepted(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve(heartbeat_interval=0.05)  # a window of 0.15 s
    asyncio.run_coroutine_threadsafe(service.housekeeping(), fleet.loop)
    genuine = fleet.node(service, "edge-0", 0)
    shadow = fleet.hand(service, "shadow", 1, stream=False)
    assert shadow.joined.heartbeat_interval == 0.05
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [0]  # a shadow never counts
    version = bridge.publish(MODEL)
    mine, theirs = task_for(0, version), task_for(1, version)
    bridge.open([mine, theirs])

    wait_until(lambda: service.events.counts["node.expired"] == 1, "the shadow to expire")
    with pytest.raises(LinkError) as info:
        shadow.link.heartbeat(shadow.token)
    assert info.value.code == Code.FAILED_PRECONDITION
    assert "node 'shadow' has no current session" in info.value.message
    shadow.refused(Code.FAILED_PRECONDITION, "call Join again", theirs.task_id, to_bytes(TRAINED))
    with pytest.raises(LinkError) as info:
        shadow.link.query_upload(shadow.token, theirs.task_id)
    assert info.value.code == Code.FAILED_PRECONDITION

    outcome = service.board.results.get(timeout=TIMEOUT)
    assert_trained(outcome, mine)
    assert service.board.results.empty()
    assert fleet.on_loop(lambda: sorted(service.sessions.by_node)) == ["edge-0"]
    assert len(genuine.client.fits) == 1 and service.events.counts["node.expired"] == 1


def test_concurrent_first_joins_of_one_client_id_bind_it_to_one_identity(
    fleet: Harness,
) -> None:
    service, _ = fleet.serve()

    async def both() -> tuple[object, object]:
        return await asyncio.gather(
            service.join("first", 2, "memory", Capabilities(), PROTOCOL),
            service.join("second", 2, "memory", Capabilities(), PROTOCOL),
            return_exceptions=True,
        )

    joined, refused = fleet.call(both())
    assert not isinstance(joined, BaseException), joined
    assert isinstance(refused, FleetError), refused
    assert refused.code == Code.PERMISSION_DENIED, (refused.code, refused.message)
    assert "client id 2 is bound to node 'first'" in refused.message
    assert fleet.store.bindings() == {"first": 2}
    assert fleet.on_loop(lambda: {n: s.cid for n, s in service.sessions.by_node.items()}) == {
        "first": 2
    }


# --- refusals ------------------------------------------------------------------------


def test_joins_and_uploads_a_node_may_not_make_are_refused_with_precise_codes(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve(max_examples=100, max_upload_bytes=8192)
    link = MemoryLink(service, fleet.loop, "node-1")
    join_refused(link, 4, Code.OUT_OF_RANGE, "outside this run's client ids 0..3")
    join_refused(link, -1, Code.OUT_OF_RANGE, "outside this run's client ids 0..3")
    join_refused(link, 1, Code.FAILED_PRECONDITION, "speaks protocol 1", protocol=PROTOCOL - 1)
    labels = Capabilities(labels={f"k{i}": "v" for i in range(33)})
    join_refused(link, 1, Code.INVALID_ARGUMENT, "33 labels; at most 32", capabilities=labels)
    anonymous = MemoryLink(service, fleet.loop, "")
    join_refused(anonymous, 1, Code.UNAUTHENTICATED, "no client identity")
    assert fleet.store.bindings() == {}, "a refused join bound a client id"

    honest = fleet.hand(service, "node-0", 0)
    rogue = fleet.hand(service, "node-1", 1)
    version = bridge.publish(MODEL)
    mine, theirs = task_for(1, version), task_for(0, version)
    bridge.open([mine, theirs])
    good = to_bytes(TRAINED)
    task_id = mine.task_id

    no_session = "node 'node-1' has no current session with this token: call Join again"
    rogue.refused(Code.FAILED_PRECONDITION, no_session, task_id, good, token="")
    rogue.refused(Code.FAILED_PRECONDITION, no_session, task_id, good, token=honest.token)
    rogue.refused(Code.PERMISSION_DENIED, "was assigned to client id 0", theirs.task_id, good)
    rogue.refused(Code.NOT_FOUND, "unknown task id", task_id + "x", good)
    rogue.refused(Code.INVALID_ARGUMENT, "task id must be 1..256", "t" * 257, good)
    cap = "num_examples must be in 1..100 (limits.max_examples), got"
    rogue.refused(Code.INVALID_ARGUMENT, f"{cap} 101", task_id, good, num_examples=101)
    rogue.refused(Code.INVALID_ARGUMENT, f"{cap} 0", task_id, good, num_examples=0)
    # over the configured maximum, or more than the expected tensors could encode to:
    # refused from the header, before a byte is received
    too_big = "the configured maximum is 8192"
    rogue.refused(Code.RESOURCE_EXHAUSTED, too_big, task_id, b"", size=8193)
    too_many = "the expected tensors take 36 bytes"
    rogue.refused(Code.INVALID_ARGUMENT, too_many, task_id, b"", size=5000)
    digest = hashlib.sha256(good).digest()
    longer = "payload exceeds its declared size"
    padded = good + b"x"
    rogue.refused(Code.INVALID_ARGUMENT, longer, task_id, padded, size=len(good), sha256=digest)
    other = hashlib.sha256(b"x").digest()
    rogue.refused(Code.DATA_LOSS, "sha256 mismatch", task_id, good, sha256=other)
    wide = to_bytes({k: v.astype(np.float64) for k, v in TRAINED.items()})
    rogue.refused(Code.INVALID_ARGUMENT, "has dtype float64, expected float32", task_id, wide)
    with pytest.raises(LinkError) as info:
        rogue.link.query_upload(rogue.token, theirs.task_id)
    assert info.value.code == Code.PERMISSION_DENIED

    assert service.board.results.empty() and service.events.counts["upload.accepted"] == 0
    assert service.events.counts["upload.refused:RESOURCE_EXHAUSTED"] == 1
    assert service.events.counts["upload.refused:DATA_LOSS"] == 1
    # refused attempts leave nothing behind: the honest uploads of both are accepted
    assert rogue.upload(task_id, good, metrics={"loss": 0.25}).accepted
    assert honest.upload(theirs.task_id, good, metrics={"loss": 0.25}).accepted
    found = {o.task.cid: o for o in outcomes(bridge)}
    assert_trained(found[1], mine)
    assert_trained(found[0], theirs)


def test_a_late_upload_for_a_closed_task_is_aborted_and_not_counted(fleet: Harness) -> None:
    service, bridge = fleet.serve()
    hand = fleet.hand(service, "node-0", 0, stream=False)
    version = bridge.publish(MODEL)
    good = to_bytes(TRAINED)
    late = task_for(0, version, round=3)
    bridge.open([late])
    bridge.close([late.task_id])
    closed = "belongs to round 3, which is closed; the result was not counted"
    hand.refused(Code.ABORTED, closed, late.task_id, good)
    with pytest.raises(LinkError) as info:
        hand.link.query_upload(hand.token, late.task_id)
    assert info.value.code == Code.ABORTED

    # the round closes while the upload is on its way
    cut = task_for(0, version, round=4)
    bridge.open([cut])

    async def closing() -> AsyncIterator[tuple[int, bytes]]:
        service.close_tasks([cut.task_id])
        yield 0, good

    header = UploadHeader(
        cut.task_id,
        token=hand.token,
        num_examples=10,
        encoding="safetensors",
        size=len(good),
        sha256=hashlib.sha256(good).digest(),
    )
    with pytest.raises(FleetError) as caught:
        fleet.call(service.upload("node-0", header, closing()))
    assert caught.value.code == Code.ABORTED
    assert "the round closed before the upload was complete" in caught.value.message
    assert service.board.results.empty() and service.events.counts["upload.accepted"] == 0
    assert not list((fleet.tmp / "work" / "uploads").iterdir())


# --- liveness ------------------------------------------------------------------------


def test_a_node_silent_past_its_heartbeat_window_is_not_counted_as_available(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve(heartbeat_interval=0.25)  # a window of 0.75 s
    silent = fleet.hand(service, "node-0", 0)  # streams, never heartbeats
    fleet.node(service, "edge-1", 1)  # heartbeats every 0.25 s
    assert bridge.wait_available(2, time.time() + TIMEOUT) == [0, 1]
    wait_until(lambda: fleet.on_loop(service.sessions.available) == [1], "node 0 to go silent")
    with pytest.raises(QuorumError, match=r"only 1 of the 2 clients .* missing: \[0, 2, 3\]"):
        bridge.wait_available(2, time.time() + 0.2)
    assert service.waiting is None
    assert fleet.on_loop(lambda: service.sessions.by_node["node-0"].streaming)  # still open
    silent.link.heartbeat(silent.token)  # heard from again: counted again
    assert bridge.wait_available(2, time.time() + TIMEOUT) == [0, 1]


def test_a_stopped_node_is_no_longer_available(fleet: Harness) -> None:
    service, bridge = fleet.serve()
    running = fleet.node(service, "edge-2", 2)
    assert bridge.wait_available(1, time.time() + TIMEOUT) == [2]
    running.node.stop()
    running.thread.join(TIMEOUT)
    assert not running.thread.is_alive() and running.node.stopped_because is None
    wait_until(lambda: fleet.on_loop(lambda: dict(service.sessions.by_node)) == {}, "no session")


# --- the in-memory link ---------------------------------------------------------------


def test_the_memory_links_cancel_ends_a_task_stream_not_yet_read(fleet: Harness) -> None:
    """`Node` cancels the stream right after `tasks()` returns when it was stopped while
    joining; a cancel that only took effect once the stream was read would be lost, and
    the node would serve on after `stop()`."""
    service, _ = fleet.serve()
    hand = fleet.hand(service, "node-3", 3, stream=False)
    stream = hand.link.tasks(hand.joined)
    hand.link.cancel()
    got: queue.Queue[object] = queue.Queue()

    def read() -> None:
        try:
            got.put(next(stream))
        except (LinkError, StopIteration) as exc:
            got.put(exc)

    threading.Thread(target=read, daemon=True).start()
    try:
        ended = got.get(timeout=TIMEOUT)
    except queue.Empty:
        raise AssertionError("the cancelled task stream is still open") from None
    assert isinstance(ended, LinkError) and ended.code == Code.CANCELLED, ended


class FailingOnce:
    """Bindings in memory whose first write fails, as with a full disk."""

    def __init__(self) -> None:
        self.bound: dict[str, int] = {}
        self.failed = False

    def bind(self, node_id: str, cid: int, address: str, capabilities: dict[str, object]) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        self.bound[node_id] = cid

    def assign(self, node_id: str, cid: int) -> str | None:
        raise AssertionError("not used")


def test_a_join_whose_binding_was_not_recorded_does_not_hold_the_client_id(
    fleet: Harness,
) -> None:
    bindings = FailingOnce()
    settings = FleetSettings(run_id=RUN, num_clients=4, work_dir=fleet.tmp / "work")
    service = FleetService(settings, bindings, {})
    fleet.services.append(service)
    with pytest.raises(OSError, match="No space left"):
        fleet.call(service.join("first", 1, "memory", Capabilities(), PROTOCOL))
    joined = fleet.call(service.join("second", 1, "memory", Capabilities(), PROTOCOL))
    assert joined.node_id == "second" and bindings.bound == {"second": 1}
    with pytest.raises(FleetError) as info:
        fleet.call(service.join("first", 1, "memory", Capabilities(), PROTOCOL))
    assert info.value.code == Code.PERMISSION_DENIED
    assert "client id 1 is bound to node 'second'" in info.value.message


def test_a_task_payload_over_the_inline_limit_is_refused_when_opened(fleet: Harness) -> None:
    """Payloads travel with their task on every push: large arrays belong in the model."""
    import dataclasses

    from fedge.limits import MAX_PAYLOAD_BYTES

    service, _ = fleet.serve()
    big = {"nonce": np.zeros(MAX_PAYLOAD_BYTES // 4 + 1, dtype=np.float32)}
    task = dataclasses.replace(task_for(0, None, kind="probe"), payload=big)
    with pytest.raises(
        ValueError, match=rf"payload of \d+ bytes, expected at most {MAX_PAYLOAD_BYTES}"
    ):
        fleet.on_loop(service.open_tasks, [task], {})
    small = dataclasses.replace(task, payload={"nonce": np.zeros(4, dtype=np.float32)})
    fleet.on_loop(service.open_tasks, [small], {})


# --- compressed updates ------------------------------------------------------------------


class Scripted(Throughput):
    """An uplink that measures each accepted upload as taking the next scripted seconds."""

    def __init__(self, seconds: list[float]) -> None:
        super().__init__()
        self.seconds, self.sizes = seconds, list[int]()

    def record(self, size: int, seconds: float) -> None:
        self.sizes.append(size)
        super().record(size, self.seconds.pop(0))


def test_a_node_in_auto_mode_switches_encoding_as_its_measured_uplink_changes(
    fleet: Harness,
) -> None:
    auto = CompressionSection(mode="auto", auto_thresholds={"q8": 1e-3, "fp16": 1.0})
    service, bridge = fleet.serve(compression=auto)
    # upload 1 (plain, 36 bytes + header) "takes" 1 s: < 0.001 MB/s, so q8; upload 2 is
    # measured at 0.001 s: fp16 (< 1 MB/s); upload 3 at 1e-9 s: plain again
    uplink = Scripted([1.0, 1e-3, 1e-9, 1.0])
    fleet.node(service, "edge-1", 1, compression=auto, uplink=uplink)
    version = bridge.publish(MODEL)
    encodings = []
    for round in (1, 2, 3, 4):
        task = task_for(1, version, round=round)
        bridge.open([task])
        (outcome,) = outcomes(bridge)
        bridge.close([task.task_id])
        result = outcome.result
        assert isinstance(result, FitResult), outcome.error
        encodings.append(result.encoding)
        weights = (
            decode(result.weights, result.encoding, MODEL, spec_of(MODEL))
            if result.encoding
            else result.weights
        )
        for name, value in TRAINED.items():  # each encoding is exact for +1 (q8: constant)
            np.testing.assert_array_equal(np.asarray(weights[name]), value)
    assert encodings == ["", "q8", "fp16", ""]
    assert max(uplink.sizes[1:3]) < uplink.sizes[0]  # q8 and fp16 send fewer bytes


@pytest.mark.parametrize("where", ["SMALL_PAYLOAD", "HELD_MEMORY"])
def test_a_packed_update_held_in_a_file_is_checked_and_decoded_from_it(
    fleet: Harness, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Received into a file (a large payload), or moved to one to wait (memory is full):
    the packed update is read from disk, checked there, and decodes as from memory."""
    monkeypatch.setattr(uploads, where, 0)
    service, bridge = fleet.serve(compression=CompressionSection(mode="topk", topk_fraction=0.5))
    hand = fleet.hand(service, "edge-2", 2)
    task = task_for(2, bridge.publish(MODEL))
    bridge.open([task])
    hand.task()
    trained = {"w": MODEL["w"] + np.arange(8, dtype=np.float32), "b": MODEL["b"] + 1}
    result = Compressor(CompressionSection(mode="topk", topk_fraction=0.5)).compress(
        MODEL, FitResult(trained, 10), {}
    )
    backwards = {**result.weights, "topk.indices": result.weights["topk.indices"][::-1].copy()}
    if where == "SMALL_PAYLOAD":  # checked in the file, as it arrived
        hand.refused(
            Code.INVALID_ARGUMENT, "topk.indices must be strictly increasing",
            task.task_id, pack(backwards), encoding="topk",
        )  # fmt: skip
    assert hand.upload(task.task_id, pack(result.weights), encoding="topk").accepted
    (outcome,) = outcomes(bridge)
    assert isinstance(outcome.result, FitResult) and outcome.result.encoding == "topk"
    held = outcome.result.weights
    assert isinstance(held, PackedFile) and held.path.exists()
    decoded = decode(held, "topk", MODEL, spec_of(MODEL))
    np.testing.assert_array_equal(decoded["w"], MODEL["w"] + [0, 0, 0, 0, 4, 5, 6, 7])
    assert decoded["b"] == MODEL["b"] + 1


def test_an_encoding_the_run_does_not_allow_is_refused_with_the_mode_named(
    fleet: Harness,
) -> None:
    service, bridge = fleet.serve(compression=CompressionSection(mode="q8"))
    hand = fleet.hand(service, "edge-2", 2)
    version = bridge.publish(MODEL)
    task = task_for(2, version)
    bridge.open([task])
    hand.task()
    update = {k: (v - MODEL[k]).astype(np.float16) for k, v in TRAINED.items()}
    hand.refused(
        Code.INVALID_ARGUMENT,
        "encoding 'fp16' is not accepted for this task; expected one of ['safetensors', 'q8'] "
        "(compression.mode = 'q8'",
        task.task_id, to_bytes(update), encoding="fp16",
    )  # fmt: skip
    codes = {"q8.ranges": np.ones((2, 2), np.float32), "q8.values": np.zeros(9, np.uint8)}
    wide = {**codes, "q8.values": np.zeros(9, np.float16)}  # 2 bytes a code: 9 too many
    hand.refused(
        Code.INVALID_ARGUMENT, "a q8 payload of this model is exactly 25 bytes (2 float "
        "tensors of 9 entries, 0 bytes of integer tensors); got 34",
        task.task_id, pack(wide), encoding="q8",
    )  # fmt: skip
    assert hand.upload(task.task_id, pack(codes), encoding="q8").accepted
    (outcome,) = outcomes(bridge)
    assert isinstance(outcome.result, FitResult) and outcome.result.encoding == "q8"
