"""The server side of the fleet: connected nodes, open tasks, and the `Fleet` the
coordinator drives.

The coordinator runs in its own thread; gRPC handlers run on the asyncio loop. They
meet here: `GrpcFleet` (coordinator thread) hands tasks to the loop, and accepted
results come back through a thread-safe queue, one at a time, so each update is
validated and folded while the next is still arriving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.client import EvaluateResult, FitResult
from fedge.coordinator import Outcome, Task
from fedge.errors import FedgeError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.transport.grpc.chunks import sha256_file
from fedge.weights import FileWeights, Spec, Weights, spec_of, to_file

log = logging.getLogger(__name__)


class Stopped(FedgeError):
    """The server is shutting down; the coordinator thread unwinds with this."""


@dataclass
class Session:
    """One live connection of a node; a newer connection with the same name replaces it."""

    node_id: str
    cid: int
    token: str
    address: str
    queue: asyncio.Queue[pb.TaskHeader | None] = field(default_factory=asyncio.Queue)
    connected_since: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    streaming: bool = False
    replaced_by: str | None = None
    """The address of the newer connection that took this identity over."""


@dataclass
class Model:
    version: str
    sha256: bytes
    size: int
    path: Path


@dataclass
class OpenTask:
    task: Task
    header: pb.TaskHeader
    done: bool = False
    received_bytes: int = 0


class FleetState:
    """Everything the gRPC handlers share. Touched only from the event loop thread."""

    def __init__(self, work_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.models_dir = work_dir / "models"
        self.uploads_dir = work_dir / "uploads"
        for d in (self.models_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.sessions: dict[str, Session] = {}
        self.models: OrderedDict[str, Model] = OrderedDict()
        self.open: dict[str, OpenTask] = {}
        self.closed: OrderedDict[str, int] = OrderedDict()  # task id -> round, bounded
        self.upload_locks: dict[str, asyncio.Lock] = {}  # one receiver per task's spool
        self.spec: Spec = {}
        self.results: queue.Queue[Outcome] = queue.Queue()
        self.changed = asyncio.Event()
        self.round = 0
        self.expected = 0
        self.received = 0
        self.stopping = False

    # --- nodes -----------------------------------------------------------------

    def join(self, node_id: str, cid: int, address: str) -> Session:
        for other in self.sessions.values():
            if other.cid == cid and other.node_id != node_id and other.streaming:
                raise ValueError(f"cid {cid} is already served by node {other.node_id!r}")
        old = self.sessions.get(node_id)
        if old is not None:
            old.replaced_by = address
            old.queue.put_nowait(None)  # ends the older Tasks stream
        session = Session(node_id, cid, secrets.token_hex(16), address)
        self.sessions[node_id] = session
        return session

    def available(self) -> list[int]:
        return sorted(s.cid for s in self.sessions.values() if s.streaming)

    def stream_opened(self, session: Session) -> None:
        session.streaming = True
        for open_task in self.open.values():  # re-push work it may have lost
            if open_task.task.cid == session.cid and not open_task.done:
                session.queue.put_nowait(open_task.header)
        self.notify()

    def stream_closed(self, session: Session) -> None:
        session.streaming = False
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
        self.notify()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_available(self, count: int) -> list[int]:
        while not self.stopping:
            available = self.available()
            if len(available) >= count:
                return available
            event = self.changed
            try:
                await asyncio.wait_for(event.wait(), timeout=10)
            except TimeoutError:
                log.info("waiting for nodes: %d of %d connected", len(available), count)
        raise Stopped("server is stopping")

    # --- tasks -----------------------------------------------------------------

    def open_tasks(self, tasks: Sequence[Task], model: Model, deadline: float) -> None:
        self.open = {}
        self.round, self.expected, self.received = tasks[0].round if tasks else 0, len(tasks), 0
        by_cid = {s.cid: s for s in self.sessions.values() if s.streaming}
        for task in tasks:
            header = pb.TaskHeader(
                task_id=task.task_id,
                run_id=self.run_id,
                round=task.round,
                kind=pb.TASK_KIND_FIT if task.kind == "fit" else pb.TASK_KIND_EVALUATE,
                config_json=_json(task.config),
                model_version=model.version,
                model_sha256=model.sha256,
                model_size=model.size,
                deadline_unix_ms=int(deadline * 1000),
            )
            self.open[task.task_id] = OpenTask(task, header)
            session = by_cid.get(task.cid)
            if session is not None:
                session.queue.put_nowait(header)

    def close_tasks(self) -> None:
        for task_id, open_task in self.open.items():
            self.closed[task_id] = open_task.task.round
        while len(self.closed) > 10_000:
            self.closed.popitem(last=False)
        self.open = {}
        self.upload_locks = {}

    def accept(
        self,
        task_id: str,
        result: FitResult | EvaluateResult | None,
        error: str | None = None,
        received_bytes: int = 0,
    ) -> None:
        open_task = self.open[task_id]
        open_task.done, open_task.received_bytes = True, received_bytes
        if open_task.task.kind == "fit" and error is None:
            self.received += 1
        self.results.put(Outcome(open_task.task, result=result, error=error))

    def publish(self, model: Model, spec: Spec) -> Model:
        if model.version not in self.models:
            self.models[model.version] = model
            while len(self.models) > 2:  # nodes may still read the previous version
                _, old = self.models.popitem(last=False)
                old.path.unlink(missing_ok=True)
        self.spec = spec
        return self.models[model.version]


def _json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=float)


class GrpcFleet:
    """The coordinator's view of the gRPC fleet (called from the coordinator thread)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, state: FleetState, default_timeout: float = 600.0
    ) -> None:
        self.loop, self.state, self.default_timeout = loop, state, default_timeout

    def _call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        future: Future[Any] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result()

    def _write_model(self, weights: Weights) -> Model:
        """Serialize the global model to a file the Download handler streams from."""
        tmp = self.state.models_dir / "publishing.tmp"
        to_file(weights, tmp)
        digest = sha256_file(tmp).digest()
        version = digest.hex()[:16]
        path = self.state.models_dir / f"{version}.safetensors"
        os.replace(tmp, path)
        return Model(version, digest, path.stat().st_size, path)

    def wait_available(self, count: int) -> list[int]:
        future = asyncio.run_coroutine_threadsafe(self.state.wait_available(count), self.loop)
        result: list[int] = future.result()
        return result

    def run(
        self, tasks: Sequence[Task], weights: Weights, timeout: float | None
    ) -> Iterator[Outcome]:
        model: Model = self._call(self.state.publish, self._write_model(weights), spec_of(weights))
        deadline = time.time() + (timeout or self.default_timeout)
        self._call(self.state.open_tasks, tasks, model, deadline)
        pending = len(tasks)
        try:
            while pending and not self.state.stopping:
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                try:
                    outcome = self.state.results.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                pending -= 1
                yield outcome
                _cleanup(outcome)
        finally:
            self._call(self.state.close_tasks)
            while not self.state.results.empty():  # results that raced the close
                _cleanup(self.state.results.get_nowait())
        if self.state.stopping:
            raise Stopped("server is stopping")


def _cleanup(outcome: Outcome) -> None:
    """Delete the spooled file of a consumed fit result."""
    result = outcome.result
    if isinstance(result, FitResult) and isinstance(result.weights, FileWeights):
        result.weights.path.unlink(missing_ok=True)
