"""The fleet service: everything a transport asks of the server, written once.

A transport (gRPC now, MQTT next) authenticates the caller, decodes its messages into
`fedge.messages` and calls these coroutines with the caller's identity; errors come back
as `FleetError` with a transport-neutral code. The coordinator's thread reaches the same
state through `ServiceFleet` (fleet/bridge.py). Everything here runs on one asyncio loop,
so the state needs no locks; blocking work (files, validation, the database) runs in
threads. Nodes may lie: every field of every call is bounded and checked here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedge.config import CompressionSection
from fedge.coordinator import Task
from fedge.errors import QuorumError
from fedge.fleet.board import OpenTask, TaskBoard
from fedge.fleet.events import Events, Traffic
from fedge.fleet.models import ModelStore
from fedge.fleet.sessions import Session, Sessions
from fedge.fleet.uploads import Chunks, Uploads
from fedge.limits import (
    MAX_EXAMPLES,
    MAX_KEY_LENGTH,
    MAX_LABELS,
    MAX_PAYLOAD_BYTES,
    MAX_STRING,
    MAX_TASK_ID,
    MAX_UPLOAD_BYTES,
)
from fedge.messages import (
    PROTOCOL,
    Capabilities,
    Code,
    FleetError,
    Joined,
    Keepalive,
    ModelRef,
    TaskHeader,
    UploadAck,
    UploadHeader,
)
from fedge.weights import to_bytes

log = logging.getLogger(__name__)

HEARTBEATS_PER_SECOND = 200
"""Heartbeat intervals grow with the fleet so the server hears at most this many a second."""


class Stopped(Exception):
    """The server is shutting down; the coordinator's thread unwinds with this."""


class Bindings(Protocol):
    """Where client-id bindings are kept (the state database)."""

    def bind(
        self, node_id: str, cid: int, address: str, capabilities: dict[str, object]
    ) -> None: ...

    def assign(self, node_id: str, cid: int) -> str | None: ...


@dataclass
class FleetSettings:
    run_id: str
    num_clients: int
    work_dir: Path
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_examples: int = MAX_EXAMPLES
    heartbeat_interval: float = 5.0
    keepalive_interval: float = 15.0
    """Seconds of quiet on a task stream before a keepalive is sent."""
    compression: CompressionSection = field(default_factory=CompressionSection)
    """Which encoded updates nodes may send (and how many topk entries)."""
    models_kept: int = 2
    """Published model versions kept downloadable."""


@dataclass
class Waiting:
    """A round waiting for clients: how many it needs and which are missing."""

    needed: int
    available: int
    missing: list[int]
    since: float = field(default_factory=time.time)


class FleetService:
    def __init__(
        self,
        settings: FleetSettings,
        bindings: Bindings,
        known: dict[str, int],
        events: Events | None = None,
    ) -> None:
        self.settings = settings
        self.bindings = bindings
        self.events = events or Events()
        self.sessions = Sessions(known, settings.num_clients, 3 * settings.heartbeat_interval)
        self.board = TaskBoard()
        self.uploads = Uploads(
            settings.work_dir / "uploads",
            max_bytes=settings.max_upload_bytes,
            max_examples=settings.max_examples,
            compression=settings.compression,
        )
        self.models = ModelStore(settings.work_dir / "models", keep=settings.models_kept)
        self.traffic = Traffic()
        """Payload bytes in (uploads) and out (models); a transport that sends a model
        some other way than `download` (inline with a task, to a broker) adds it."""
        self.stopping = False
        self.waiting: Waiting | None = None
        self.disk_full: str | None = None
        """The last "disk full" refusal, until an upload is stored again."""
        self._changed = asyncio.Event()
        self._closing: dict[str, asyncio.Future[None]] = {}
        """Set when the task of an upload being received closes (see `_while_open`)."""

    # --- nodes -----------------------------------------------------------------------

    async def join(
        self, identity: str, cid: int, address: str, capabilities: Capabilities, protocol: int
    ) -> Joined:
        node_id = _identity(identity)
        if protocol < PROTOCOL:  # such a node retries for ever: say it here too
            log.warning(
                "refused node %r: it speaks protocol %d, not %d", node_id, protocol, PROTOCOL
            )
            raise FleetError(
                Code.FAILED_PRECONDITION,
                f"node {node_id!r} speaks protocol {protocol}; this server needs {PROTOCOL} "
                "(uploads carry the session token): upgrade fedge on the node",
            )
        _check_capabilities(capabilities)
        first = self.sessions.check_join(node_id, cid, capabilities.instance)
        if first:
            # claimed before the binding is written, so that a concurrent join of another
            # identity with this client id is refused here rather than by the database
            sessions = self.sessions
            sessions.owner[cid], sessions.bound[node_id] = node_id, cid
            try:
                await asyncio.to_thread(
                    self.bindings.bind, node_id, cid, address[:MAX_STRING], capabilities.as_dict()
                )
            except Exception:
                if sessions.owner.get(cid) == node_id and sessions.bound.get(node_id) == cid:
                    del sessions.owner[cid], sessions.bound[node_id]
                raise
            log.info("client id %d is now bound to node %s", cid, node_id)
        session = self.sessions.open(node_id, cid, address[:MAX_STRING], capabilities)
        self.events.emit("node.joined", node=node_id, cid=cid, address=session.address)
        interval = self.heartbeat_interval()
        self.sessions.window = 3 * interval
        return Joined(node_id, session.token, interval)

    async def tasks(self, identity: str, token: str) -> AsyncIterator[TaskHeader | Keepalive]:
        """The session's task stream: tasks as they are assigned, keepalives between.
        It ends with ABORTED when the session was taken over (the node should stop)."""
        session = self.sessions.authenticate(_identity(identity), token)
        self.sessions.stream_opened(session)
        for header in self.board.pending(session.cid):  # work it may have lost
            session.queue.put_nowait(header)
        self._notify()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(
                        session.queue.get(), self.settings.keepalive_interval
                    )
                except TimeoutError:
                    yield Keepalive(time.time(), self.heartbeat_interval())
                    continue
                if item is None:
                    if session.ended is not None:
                        self.events.emit(
                            "node.replaced", node=session.node_id, reason=session.ended
                        )
                        raise FleetError(Code.ABORTED, session.ended)
                    return
                yield item
        finally:
            self.sessions.stream_closed(session)
            self._notify()

    def download(
        self, identity: str, token: str, version: str, offset: int, chunk_size: int
    ) -> Iterator[tuple[int, bytes]]:
        self.sessions.authenticate(_identity(identity), token)
        return self._counted(self.models.read(version, offset, chunk_size))

    def _counted(self, chunks: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        for offset, data in chunks:
            self.traffic.add_sent(len(data))
            yield offset, data

    async def query_upload(self, identity: str, token: str, task_id: str) -> tuple[int, bool]:
        """(bytes held, whether the result was accepted already) for a task's upload."""
        session = self.sessions.authenticate(_identity(identity), token)
        open_task = self._task_of(session, task_id)
        if open_task.done:
            return open_task.received_bytes, True
        return await self.uploads.received(task_id), False

    async def upload(self, identity: str, header: UploadHeader, chunks: Chunks) -> UploadAck:
        try:
            return await self._upload(identity, header, chunks)
        except FleetError as exc:  # refusals before the payload was looked at count too
            self.events.emit(
                "upload.refused", node=identity[:MAX_STRING], code=exc.code.value,
                reason=exc.message,
            )  # fmt: skip
            raise

    async def _upload(self, identity: str, header: UploadHeader, chunks: Chunks) -> UploadAck:
        session = self.sessions.authenticate(_identity(identity), header.token)
        open_task = self._task_of(session, header.task_id)
        source = f"node {session.node_id} (cid {session.cid}), task {header.task_id}"
        async with self.uploads.lock(header.task_id):
            if open_task.done:
                return UploadAck(
                    True, True, "already counted", received_bytes=open_task.received_bytes
                )
            try:
                received = await self.uploads.receive(
                    open_task.task, header, self._while_open(header.task_id, chunks, source), source
                )
            except FleetError as exc:
                self._refused(session, exc)
                raise
            if received is None:
                held = await self.uploads.received(header.task_id)
                return UploadAck(
                    False, message=f"incomplete: {held} of {header.size} bytes", received_bytes=held
                )
            if header.task_id not in self.board.open:  # the round closed while we checked
                self.uploads.release(header.task_id)
                raise FleetError(Code.ABORTED, _closed(source))
            self.disk_full = None
            self.board.accept(open_task, received.result, received.error, received.size)
            session.tasks_done += received.error is None
            self.events.emit(
                "upload.accepted", node=session.node_id, cid=session.cid, task=header.task_id,
                kind=open_task.task.kind, failed=received.error is not None,
            )  # fmt: skip
            log.info("accepted: %s", received.error or source)
        return UploadAck(True, received_bytes=received.size)

    async def heartbeat(self, identity: str, token: str, serving: str = "") -> None:
        session = self.sessions.authenticate(_identity(identity), token)
        session.serving = serving[:MAX_STRING]

    async def leave(self, identity: str, token: str, reason: str) -> None:
        session = self.sessions.authenticate(_identity(identity), token)
        self.sessions.end(session, None)
        self.events.emit("node.left", node=session.node_id, reason=reason[:MAX_STRING])
        log.info("node %s left: %s", session.node_id, reason[:MAX_STRING] or "no reason given")
        self._notify()

    def heartbeat_interval(self) -> float:
        return max(
            self.settings.heartbeat_interval, len(self.sessions.by_node) / HEARTBEATS_PER_SECOND
        )

    # --- the operator --------------------------------------------------------------

    async def check_session(self, identity: str, token: str) -> None:
        """Raise `FleetError` unless `token` is the caller's current session."""
        self.sessions.authenticate(_identity(identity), token)

    def end_session(self, node_id: str, reason: str) -> None:
        """End the node's session, if it has one: its task stream ends with `reason`."""
        session = self.sessions.by_node.get(node_id)
        if session is not None:
            self.sessions.end(session, reason)
            log.warning("ended the session of node %s: %s", node_id, reason)
            self._notify()

    async def assign(self, node_id: str, cid: int) -> str | None:
        """Bind `cid` to `node_id`; returns the node that held it. Sessions it invalidates
        end, and their nodes stop with the reason."""
        node_id = _identity(node_id)
        if not 0 <= cid < self.settings.num_clients:
            raise FleetError(
                Code.OUT_OF_RANGE,
                f"client id {cid} is outside this run's 0..{self.settings.num_clients - 1}",
            )
        previous = await asyncio.to_thread(self.bindings.assign, node_id, cid)
        for session in self.sessions.bind(node_id, cid):
            log.warning("ended the session of node %s: %s", session.node_id, session.ended)
        self._notify()
        return previous

    # --- the coordinator's side (on the loop; see ServiceFleet) --------------------------

    async def wait_available(self, count: int, deadline: float | None) -> list[int]:
        """At least `count` available client ids, waiting for them until the deadline."""
        warned = 0.0
        while not self.stopping:
            available = self.sessions.available()
            if len(available) >= count:
                self.waiting = None
                return available
            present = set(available)
            missing = [c for c in range(self.settings.num_clients) if c not in present]
            if self.waiting is None:
                self.waiting = Waiting(count, len(available), missing)
            self.waiting.available, self.waiting.missing = len(available), missing
            now = time.time()
            if now - warned >= 10:
                warned = now
                self.events.emit("round.waiting", needed=count, available=len(available))
                log.warning(
                    "waiting for clients: %d of the %d needed are available; missing: %s",
                    len(available),
                    count,
                    _ids(missing),
                )
            if deadline is not None and now >= deadline:
                waited = now - self.waiting.since
                self.waiting = None
                raise QuorumError(
                    f"only {len(available)} of the {count} clients needed were available "
                    f"after {waited:.0f} s; missing: {_ids(missing)}"
                )
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - now))
            changed = self._changed
            # liveness changes without events (a node going silent): look every second
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        raise Stopped("the server is stopping")

    def open_tasks(self, tasks: Sequence[Task], models: dict[str, ModelRef]) -> None:
        for task in tasks:
            payload = to_bytes(task.payload) if task.payload else b""
            if len(payload) > MAX_PAYLOAD_BYTES:  # it travels with the task, on every push
                raise ValueError(
                    f"task {task.task_id}: payload of {len(payload)} bytes, expected at most "
                    f"{MAX_PAYLOAD_BYTES}; send large arrays as the task's model"
                )
            header = TaskHeader(
                task_id=task.task_id,
                run_id=self.settings.run_id,
                round=task.round,
                kind=task.kind,
                config=task.config,
                model=models[task.model] if task.model else None,
                payload=payload,
                partial_work=task.partial_work,
                deadline=task.deadline or 0.0,
            )
            self.board.add(task, header)
            session = self.sessions.current(task.cid)
            if session is not None and session.streaming:
                session.queue.put_nowait(header)

    async def _while_open(self, task_id: str, chunks: Chunks, source: str) -> Chunks:
        """The upload's chunks while its task is open. When the task closes, the upload is
        cut at once, even in the middle of a chunk: a node trickling bytes for a closed
        round is not waited for. (Each wait races the close, rather than cancelling the
        receiver, so the refusal reaches the node with its reason.)"""
        closing = self._closing[task_id] = asyncio.get_running_loop().create_future()
        pending, step = aiter(chunks), None
        try:
            while task_id in self.board.open:
                step = asyncio.ensure_future(anext(pending))
                await asyncio.wait((step, closing), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    break
                if isinstance(step.exception(), StopAsyncIteration):
                    return
                offset, data = step.result()
                self.traffic.add_received(len(data))
                yield offset, data
        finally:
            if step is not None:
                step.cancel()
            if self._closing.get(task_id) is closing:
                del self._closing[task_id]
        raise FleetError(Code.ABORTED, _closed(source))

    def close_tasks(self, task_ids: list[str]) -> None:
        for open_task in self.board.close(task_ids):
            self.uploads.release(open_task.task.task_id)
            closing = self._closing.pop(open_task.task.task_id, None)
            if closing is not None:
                closing.set_result(None)

    def stop(self) -> None:
        """End every task stream; a coordinator waiting for clients unwinds."""
        self.stopping = True
        for session in list(self.sessions.by_node.values()):
            self.sessions.end(session, None)
        self._notify()

    async def housekeeping(self) -> None:
        """Expire sessions that never opened their task stream and went silent."""
        while not self.stopping:
            await asyncio.sleep(self.sessions.window / 2)
            for session in self.sessions.expire():
                self.events.emit("node.expired", node=session.node_id)
                log.info("session of node %s expired: no task stream, silent", session.node_id)

    # --- helpers ---------------------------------------------------------------------

    def _task_of(self, session: Session, task_id: str) -> OpenTask:
        if not task_id or len(task_id) > MAX_TASK_ID:
            raise FleetError(Code.INVALID_ARGUMENT, f"task id must be 1..{MAX_TASK_ID} characters")
        open_task = self.board.lookup(task_id)
        if open_task.task.cid != session.cid:
            raise FleetError(
                Code.PERMISSION_DENIED,
                f"task {task_id!r} was assigned to client id {open_task.task.cid}, "
                f"not to node {session.node_id!r} (client id {session.cid})",
            )
        return open_task

    def _refused(self, session: Session, exc: FleetError) -> None:
        if "disk full" in exc.message:
            if self.disk_full is None:
                log.warning("%s", exc.message)
            self.disk_full = exc.message
            self.events.emit("disk.full", reason=exc.message)
        else:
            log.warning("refused an upload of node %s: %s", session.node_id, exc.message)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def _closed(source: str) -> str:
    return f"{source}: the round closed before the upload was complete; it was not counted"


def _identity(identity: str) -> str:
    if not identity or len(identity) > MAX_STRING:
        raise FleetError(
            Code.UNAUTHENTICATED, "no client identity: present a certificate from the project CA"
        )
    return identity


def _check_capabilities(caps: Capabilities) -> None:
    for name in ("accelerator", "framework", "fedge_version", "instance"):
        if len(getattr(caps, name)) > MAX_STRING:
            raise FleetError(
                Code.INVALID_ARGUMENT, f"capabilities.{name} is longer than {MAX_STRING}"
            )
    if len(caps.labels) > MAX_LABELS:
        raise FleetError(Code.INVALID_ARGUMENT, f"{len(caps.labels)} labels; at most {MAX_LABELS}")
    for key, value in caps.labels.items():
        if not 0 < len(key) <= MAX_KEY_LENGTH or len(value) > MAX_STRING:
            raise FleetError(
                Code.INVALID_ARGUMENT,
                f"label {key[:MAX_KEY_LENGTH]!r}: keys must be 1..{MAX_KEY_LENGTH} characters, "
                f"values at most {MAX_STRING}",
            )
    if not (0 <= caps.cpu_count <= 1 << 20 and 0 <= caps.memory_bytes <= 1 << 60):
        raise FleetError(
            Code.INVALID_ARGUMENT, "capabilities.cpu_count or memory_bytes out of range"
        )


def _ids(cids: list[int], most: int = 20) -> str:
    shown = ", ".join(map(str, cids[:most]))
    return f"[{shown}{f', ... ({len(cids) - most} more)' if len(cids) > most else ''}]"


__all__ = ["Bindings", "FleetService", "FleetSettings", "Stopped", "Waiting"]
