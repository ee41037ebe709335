"""The edge node: a long-lived process that dials out to the server and runs tasks.

It joins with its capabilities, keeps the server's task stream open, and runs each task
in a worker thread while heartbeats go on. After any failure — server down at start,
server restart, dropped stream — it reconnects with exponential backoff and jitter. A
result whose upload was not acknowledged is kept and re-sent (resuming from the offset
the server already holds); the server counts it once.

Large models and results pass through files in the node's cache directory, never whole
in memory as bytes: the model is streamed to disk (and kept there, by hash), decoded with
one copy, and a result is written straight from its arrays and uploaded from the file.
On a device with little memory that is the difference between 2× and 6× the model.
Small ones (up to `SPILL_BYTES`) stay in memory, where they cost less than a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedge.client import Client, EvaluateResult, FitResult
from fedge.errors import WeightsError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc.chunks import MemorySpool, Spool, bytes_chunks, read_chunks, sha256_file
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials
from fedge.weights import Array, Weights, from_bytes, num_bytes, read_file, to_bytes, to_file

log = logging.getLogger(__name__)

SPILL_BYTES = 16 << 20
"""Models and results larger than this go through files instead of memory."""

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class Replaced(Exception):
    """Another process connected with this node's identity; the newer one serves it."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep."""

    initial: float = 0.2
    maximum: float = 10.0
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class PendingUpload:
    header: pb.UploadHeader
    payload: bytes | Path | None = None
    """The encoded result of a fit task; a file is deleted once the server has answered."""


@dataclass
class NodeSettings:
    server: str
    cid: int
    name: str
    certs: Path | None = None
    insecure: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None
    """Models and results in transit; default ``$XDG_CACHE_HOME/fedge/NAME``."""


def default_cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedge" / name


class Node:
    def __init__(self, client: Client, settings: NodeSettings) -> None:
        self.client, self.settings = client, settings
        self.stop_event = threading.Event()
        self._stub: pb_grpc.FleetStub | None = None
        self._channel: grpc.Channel | None = None
        self._token = ""
        self._connected = threading.Event()
        self._tasks: queue.Queue[pb.TaskHeader] = queue.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict()  # task ids taken, bounded
        cache = settings.cache_dir or default_cache_dir(settings.name)
        self._models, self._results = cache / "models", cache / "results"
        for d in (self._models, self._results):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self._results.iterdir():  # results of an earlier process: not pending
            stale.unlink()
        self._model: tuple[bytes, bytes | Path] | None = None  # (sha256, model) last used
        self._metadata = ((NODE_NAME_METADATA, settings.name),) if settings.insecure else ()
        self.tasks_done = 0
        self.replaced: str | None = None
        self._stream: grpc.Future | None = None
        """Why the node stopped by itself: the server's message when it was replaced."""

    # --- lifecycle ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`; never gives up on the server."""
        worker = threading.Thread(target=self._work, name="fedge-worker", daemon=True)
        worker.start()
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                self._serve_session(backoff)
            except Replaced as exc:
                log.error("stopping: %s", exc)
                self.replaced = str(exc)
                self.stop_event.set()
            except grpc.RpcError as exc:
                log.info(
                    "connection to %s lost: %s %s", self.settings.server, exc.code(), exc.details()
                )
            finally:
                self._connected.clear()
            self.stop_event.wait(backoff.next())
        if self._stub is not None and self._token and self.replaced is None:
            with contextlib.suppress(grpc.RpcError):  # so the server stops selecting us now
                self._stub.Leave(
                    pb.LeaveRequest(session_token=self._token, reason="stopped"),
                    timeout=2,
                    metadata=self._metadata,
                )
        self._close_channel()

    def stop(self) -> None:
        """Make `run()` leave the fleet and return; safe to call from a signal handler."""
        self.stop_event.set()
        if self._stream is not None:
            self._stream.cancel()  # wakes the task stream now, not at the next keepalive

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def _serve_session(self, backoff: Backoff) -> None:
        self._close_channel()
        self._channel = self._make_channel()
        stub = pb_grpc.FleetStub(self._channel)
        reply = stub.Join(
            pb.JoinRequest(cid=self.settings.cid, capabilities=_capabilities(self.settings.labels)),
            timeout=10,
            metadata=self._metadata,
            wait_for_ready=False,
        )
        self._stub, self._token = stub, reply.session_token
        log.info("joined %s as %s (cid %d)", self.settings.server, reply.node_id, self.settings.cid)
        stream = stub.Tasks(
            pb.TasksRequest(node_id=reply.node_id, session_token=reply.session_token),
            metadata=self._metadata,
        )
        self._stream = stream
        if self.stop_event.is_set():  # stopped while joining
            stream.cancel()
        heartbeat = threading.Thread(
            target=self._heartbeat,
            daemon=True,
            args=(stub, reply.session_token, reply.heartbeat_interval_s or 5.0, stream),
        )
        heartbeat.start()
        self._connected.set()
        backoff.reset()
        try:
            for message in stream:
                if message.HasField("task") and message.task.task_id not in self._seen:
                    self._seen[message.task.task_id] = None
                    while len(self._seen) > 1000:
                        self._seen.popitem(last=False)
                    self._tasks.put(message.task)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:  # only sent to a replaced connection
                raise Replaced(exc.details()) from exc
            raise

    def _make_channel(self) -> grpc.Channel:
        options = [
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.settings.insecure:
            return grpc.insecure_channel(self.settings.server, options=options)
        if self.settings.certs is None:
            raise ValueError("certs are required unless insecure")
        creds = channel_credentials(self.settings.certs, self.settings.name)
        return grpc.secure_channel(self.settings.server, creds, options=options)

    def _heartbeat(
        self, stub: pb_grpc.FleetStub, token: str, interval: float, stream: grpc.Future
    ) -> None:
        while not self.stop_event.wait(interval) and self._token == token:
            try:
                stub.Heartbeat(
                    pb.HeartbeatRequest(session_token=token),
                    timeout=interval,
                    metadata=self._metadata,
                )
            except grpc.RpcError as exc:
                log.info("heartbeat failed (%s); reconnecting", exc.code())
                stream.cancel()
                return

    # --- work --------------------------------------------------------------------

    def _work(self) -> None:
        while not self.stop_event.is_set():
            try:
                task = self._tasks.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                upload = self._execute(task)
            except Exception as exc:  # a failed download: forget the task so a re-push runs it
                log.warning("task %s: model download failed (%s)", task.task_id, exc)
                self._seen.pop(task.task_id, None)
                continue
            try:
                self._deliver(upload)
            finally:
                if isinstance(upload.payload, Path):
                    upload.payload.unlink(missing_ok=True)
            self.tasks_done += 1

    def _execute(self, task: pb.TaskHeader) -> PendingUpload:
        weights = _decode(self._download(task), source=f"model {task.model_version}")
        config = json.loads(task.config_json)
        try:
            if task.kind == pb.TASK_KIND_FIT:
                result = self.client.fit(weights, config)
                if not isinstance(result, FitResult):
                    raise TypeError(f"fit() returned {type(result).__name__}, not FitResult")
                del weights  # the client may still hold them; we do not need to
                payload, size, digest = self._encode(result.weights, task.task_id)
                return PendingUpload(
                    pb.UploadHeader(
                        task_id=task.task_id,
                        num_examples=result.num_examples,
                        metrics=_floats(result.metrics),
                        encoding="safetensors",
                        size=size,
                        sha256=digest,
                    ),
                    payload,
                )
            evaluation = self.client.evaluate(weights, config)
            if not isinstance(evaluation, EvaluateResult):
                raise TypeError(f"evaluate() returned {type(evaluation).__name__}")
            return PendingUpload(
                pb.UploadHeader(
                    task_id=task.task_id,
                    num_examples=evaluation.num_examples,
                    metrics=_floats(evaluation.metrics),
                    loss=float(evaluation.loss),
                )
            )
        except Exception as exc:  # the user's code failed: tell the server, keep serving
            log.exception("task %s failed", task.task_id)
            return PendingUpload(
                pb.UploadHeader(task_id=task.task_id, error=f"{type(exc).__name__}: {exc}")
            )

    def _encode(
        self, weights: Mapping[str, Array], task_id: str
    ) -> tuple[bytes | Path, int, bytes]:
        """(payload, size, sha256) of a result: bytes when small, else a file in the cache."""
        if num_bytes(weights) <= SPILL_BYTES:
            data = to_bytes(weights)
            return data, len(data), hashlib.sha256(data).digest()
        path = self._results / hashlib.sha256(task_id.encode()).hexdigest()
        to_file(weights, path)
        return path, path.stat().st_size, sha256_file(path).digest()

    def _download(self, task: pb.TaskHeader) -> bytes | Path:
        """The task's model: cached, or streamed into memory or (when large) to disk."""
        sha = task.model_sha256
        if self._model is not None and self._model[0] == sha:
            return self._model[1]
        path = self._models / f"{sha.hex()}.safetensors"
        if path.exists():  # from an earlier process
            self._model = (sha, path)
            return path
        spool = Spool(self._models, sha.hex()) if task.model_size > SPILL_BYTES else MemorySpool()
        backoff = Backoff()
        try:
            while True:
                self._connected.wait()
                assert self._stub is not None
                try:
                    for chunk in self._stub.Download(
                        pb.DownloadRequest(model_version=task.model_version, offset=spool.size),
                        metadata=self._metadata,
                        timeout=600,
                    ):
                        spool.write(chunk.data)
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE or self.stop_event.is_set():
                        raise
                    self.stop_event.wait(backoff.next())
        finally:
            spool.close()
        if spool.size != task.model_size or spool.digest.digest() != sha:
            spool.discard()
            raise WeightsError(f"model {task.model_version}: size or sha256 mismatch; will retry")
        model: bytes | Path = path
        if isinstance(spool, MemorySpool):
            model = bytes(spool.data)
        else:
            os.replace(spool.path, path)
        for other in self._models.iterdir():  # keep one model file at most: the current one
            if other != path:
                other.unlink(missing_ok=True)
        self._model = (sha, model)
        return model

    def _deliver(self, upload: PendingUpload) -> None:
        """Upload until acknowledged, resuming after reconnects; counted once by the server."""
        backoff = Backoff()
        while not self.stop_event.is_set():
            self._connected.wait(timeout=1.0)
            if not self._connected.is_set() or self._stub is None:
                continue
            try:
                reply = self._upload_once(self._stub, upload)
            except grpc.RpcError as exc:
                # OUT_OF_RANGE: the server's spool moved since we asked; ask again
                if exc.code() in RETRYABLE or exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    log.info(
                        "upload of %s interrupted (%s); retrying", upload.header.task_id, exc.code()
                    )
                    self.stop_event.wait(backoff.next())
                    continue
                log.warning(
                    "upload of %s rejected: %s %s", upload.header.task_id, exc.code(), exc.details()
                )
                # the server may push this task again (e.g. a resumed round): run it anew
                self._seen.pop(upload.header.task_id, None)
                return
            if reply.accepted:
                return
            self.stop_event.wait(backoff.next())

    def _upload_once(self, stub: pb_grpc.FleetStub, upload: PendingUpload) -> pb.UploadReply:
        offset = 0
        if upload.payload is not None:  # a fit result: resume where the server stands
            status = stub.QueryUpload(
                pb.QueryUploadRequest(task_id=upload.header.task_id),
                timeout=30,
                metadata=self._metadata,
            )
            if status.complete:
                return pb.UploadReply(accepted=True, duplicate=True)
            offset = int(status.received_bytes)
            if offset:
                log.info(
                    "resuming upload of %s at byte %d of %d",
                    upload.header.task_id,
                    offset,
                    upload.header.size,
                )
        header = pb.UploadHeader()
        header.CopyFrom(upload.header)
        header.offset = offset
        chunks: Iterable[tuple[int, bytes]] = ()
        if isinstance(upload.payload, bytes):
            chunks = bytes_chunks(upload.payload, offset)
        elif upload.payload is not None:
            chunks = read_chunks(upload.payload, offset)
        reply: pb.UploadReply = stub.Upload(
            upload_messages(header, chunks), timeout=600, metadata=self._metadata
        )
        return reply


def _decode(model: bytes | Path, source: str) -> Weights:
    return (
        from_bytes(model, source=source)
        if isinstance(model, bytes)
        else read_file(model, source=source)
    )


def upload_messages(
    header: pb.UploadHeader, chunks: Iterable[tuple[int, bytes]]
) -> Iterator[pb.UploadMessage]:
    """An Upload stream: the header, then ``(offset, data)`` chunks."""
    yield pb.UploadMessage(header=header)
    for offset, data in chunks:
        yield pb.UploadMessage(chunk=pb.Chunk(data=data, offset=offset))


def _floats(metrics: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _capabilities(labels: dict[str, str]) -> pb.Capabilities:
    from fedge import __version__

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return pb.Capabilities(
        cpu_count=os.cpu_count() or 1,
        memory_bytes=memory,
        accelerator="none",
        framework="numpy",
        fedge_version=__version__,
        labels=labels,
    )
