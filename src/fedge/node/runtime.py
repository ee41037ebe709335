"""The edge node: a long-lived process that dials out to the server and runs tasks.

It joins with its capabilities, keeps the server's task stream open, and runs each task
in a worker thread while heartbeats go on. After any failure — server down at start,
server restart, a dropped stream — it reconnects with exponential backoff and jitter.

Results are delivered until acknowledged: a cut upload resumes from the byte the server
holds, and the server counts it once. A delivered result is kept for a while, because a
server killed at the wrong instant may have lost it: when the server pushes a task again
that this node already answered, the node sends the kept result again instead of
ignoring the task (or trains again, which gives the same result, if it no longer has it).
Results are kept on disk (`Cache.save`), so one finished before the node itself died is
sent after its restart, when the server pushes that task again — without training again.
A task that is still running or waiting when it is pushed again is not run twice.

A node stops by itself only when the server says it must: another process took over its
identity, or its client id is bound to another node. It then says why and exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, Queue

from fedge.client import EVALUATE, FIT, Client, EvaluateResult, FitResult, Message, Reply
from fedge.compression import PLAIN, Throughput
from fedge.errors import FedgeError, WeightsError
from fedge.messages import PROTOCOL, Capabilities, Code, Joined, Keepalive, TaskHeader, UploadHeader
from fedge.metrics import normalize
from fedge.node.cache import Cache, Pending, decode, default_cache_dir
from fedge.node.link import FATAL_AT_JOIN, RETRYABLE, Backoff, Link, LinkError
from fedge.node.observer import NodeObserver
from fedge.security.credentials import validate_name
from fedge.weights import Weights, from_bytes

log = logging.getLogger(__name__)

RENEWAL_GRACE = 3600.0
"""Seconds a due renewal may wait for the node to be between tasks."""
RENEWAL_RETRY = 60.0
"""Seconds between attempts after a failed renewal."""
KEEP_DELIVERED = 4
"""Delivered results kept in case the server lost them (a restart) and asks again."""
CHUNK = 1 << 20


@dataclass
class NodeSettings:
    cid: int
    name: str
    cache_dir: Path | None = None
    """Models and results in transit; default ``$XDG_CACHE_HOME/fedge/NAME``."""
    labels: dict[str, str] = field(default_factory=dict)
    chunk_size: int = CHUNK


class Node:
    def __init__(
        self,
        client: Client,
        link: Link,
        settings: NodeSettings,
        *,
        uplink: Throughput | None = None,
        observer: NodeObserver | None = None,
    ) -> None:
        self.client, self.link, self.settings = client, link, settings
        self.observer = observer or NodeObserver()
        self.uplink = uplink or Throughput()
        """Measured by every accepted upload; compression in mode "auto" reads it."""
        validate_name(settings.name)  # it names a directory whose stale files are removed
        self.cache = Cache(settings.cache_dir or default_cache_dir(settings.name))
        self.stop_event = threading.Event()
        self.stopped_because: str | None = None
        """Why the node stopped by itself (the server's word), if it did."""
        self.tasks_done = 0
        self.instance = secrets.token_hex(8)
        """This process, as the server tells it from another with the same identity."""
        self._joined: Joined | None = None
        self._connected = threading.Event()
        self._work: Queue[tuple[TaskHeader, Pending | None]] = Queue()
        self._busy: set[str] = set()  # task ids queued or running: not run twice
        self._delivered: OrderedDict[str, Pending] = OrderedDict()
        for kept in self.cache.saved():  # finished before a restart: sent when asked for
            self._remember(kept.header.task_id, kept)
        self._lock = threading.Lock()
        self._last_transfer = 0.0  # seconds the last model download took
        self._next_renewal = 0.0  # after a failed renewal: not before this time
        self.serving = ""
        """What the inference server beside this node serves; sent with each heartbeat."""
        self.on_new_model: Callable[[], None] | None = None
        """Called when a task brings a global model this node has not seen (``--serve``:
        the inference server checks the store at once rather than at its next poll)."""
        self._model_seen = ""

    # --- lifecycle ---------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`, or until the server says this node must stop."""
        worker = threading.Thread(target=self._worker, name="fedge-worker", daemon=True)
        worker.start()
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                self._session(backoff)
            except LinkError as exc:
                if self.stop_event.is_set():
                    break
                log.info("connection to the server lost: %s %s", exc.code, exc.message)
            finally:
                if self._connected.is_set():
                    self.observer.disconnected()
                self._connected.clear()
                self.link.close()
            self.stop_event.wait(backoff.next())
        self._leave()

    def stop(self) -> None:
        """Leave the fleet and make `run()` return; safe from a signal handler."""
        self.stop_event.set()
        self.link.cancel()  # wakes the task stream now, not at the next keepalive

    def _halt(self, reason: str) -> None:
        log.error("stopping: %s", reason)
        self.stopped_because = reason
        self.stop_event.set()

    def _leave(self) -> None:
        joined = self._joined
        if joined is None or self.stopped_because is not None:
            return
        with contextlib.suppress(Exception):  # the server may be gone: leave quietly
            self.link.leave(joined.token, "stopped")
        self.link.close()

    def _session(self, backoff: Backoff) -> None:
        try:
            joined = self.link.join(
                self.settings.cid, _capabilities(self.settings.labels, self.instance), PROTOCOL
            )
        except LinkError as exc:
            if exc.code in FATAL_AT_JOIN:
                self._halt(exc.message)
                return
            raise
        self._joined = joined
        log.info("joined as %s (client id %d)", joined.node_id, self.settings.cid)
        stream = self.link.tasks(joined)
        if self.stop_event.is_set():  # stopped while joining
            self.link.cancel()
        interval = [joined.heartbeat_interval or 5.0]
        beat = threading.Thread(target=self._heartbeat, args=(joined, interval), daemon=True)
        beat.start()
        self._connected.set()
        self.observer.joined()
        backoff.reset()
        try:
            for item in stream:
                if isinstance(item, Keepalive):
                    if item.heartbeat_interval:
                        interval[0] = item.heartbeat_interval
                    continue
                self._take(item)
        except LinkError as exc:
            if exc.code == Code.ABORTED:  # taken over by another process, or reassigned
                self._halt(exc.message)
                return
            raise

    def _heartbeat(self, joined: Joined, interval: list[float]) -> None:
        while not self.stop_event.wait(interval[0]) and self._joined is joined:
            if self._renewal_due(joined) and self._renew(joined):
                return  # the session ends; the next one uses the new certificate
            try:
                self.link.heartbeat(joined.token, self.serving)
            except LinkError as exc:
                log.info("heartbeat failed (%s); reconnecting", exc.code)
                self.link.cancel()
                return

    def _renewal_due(self, joined: Joined) -> bool:
        """Due, and between tasks (or an hour overdue): a renewal reconnects the node."""
        now = time.time()
        if not joined.renew_after or now < max(joined.renew_after, self._next_renewal):
            return False
        with self._lock:
            idle = not self._busy
        return idle or now > joined.renew_after + RENEWAL_GRACE

    def _renew(self, joined: Joined) -> bool:
        try:
            self.link.renew(joined.token)
        except (FedgeError, OSError) as exc:  # the link, the certificate, or the disk
            self._next_renewal = time.time() + RENEWAL_RETRY
            log.warning("certificate renewal failed (%s); trying again later", exc)
            return False
        log.info("certificate renewed; reconnecting with it")
        self.link.cancel()
        return True

    # --- work --------------------------------------------------------------------------

    def _take(self, task: TaskHeader) -> None:
        if task.model is not None and task.model.version != self._model_seen:
            self._model_seen = task.model.version
            if self.on_new_model is not None:
                self.on_new_model()
        with self._lock:
            if task.task_id in self._busy:
                return
            self._busy.add(task.task_id)
            kept = self._delivered.get(task.task_id)
        if kept is not None:
            log.info("task %s was pushed again; sending the kept result again", task.task_id)
        self._work.put((task, kept))

    def _worker(self) -> None:
        while not self.stop_event.is_set():
            try:
                task, kept = self._work.get(timeout=0.5)
            except Empty:
                continue
            try:
                pending = kept or self.cache.save(self._timed(task))
            except Exception as exc:  # the model could not be fetched: a re-push runs it again
                log.warning("task %s: model download failed (%s)", task.task_id, exc)
                with self._lock:
                    self._busy.discard(task.task_id)
                continue
            delivered = self._deliver(pending)
            with self._lock:
                self._busy.discard(task.task_id)
                if delivered:
                    self._remember(task.task_id, pending)
                elif kept is None and not self.stop_event.is_set():
                    pending.discard()  # refused for good; one cut by a stop stays on disk
            self.tasks_done += kept is None

    def _timed(self, task: TaskHeader) -> Pending:
        started = time.monotonic()
        pending = self._execute(task)
        ok = not pending.header.error
        self.observer.task_finished(task.kind, time.monotonic() - started, ok)
        return pending

    def _remember(self, task_id: str, pending: Pending) -> None:
        self._delivered[task_id] = pending
        self._delivered.move_to_end(task_id)
        while len(self._delivered) > KEEP_DELIVERED:
            _, old = self._delivered.popitem(last=False)
            old.discard()

    def _execute(self, task: TaskHeader) -> Pending:
        weights = None
        if task.model is not None:
            weights = decode(self._download(task), source=f"model {task.model.version}")
        config = dict(task.config)
        if task.partial_work and task.deadline:
            # leave time to upload: a result after the deadline is refused
            config["deadline"] = task.deadline - 1.0 - 2 * self._last_transfer
        try:
            payload: Weights = (
                from_bytes(task.payload, source="task payload") if task.payload else {}
            )
            result = self.client.handle(Message(task.kind, config, weights, payload))
            del weights  # the client may still hold them; we do not need to
            return self._encode(task, result)
        except Exception as exc:  # the user's code failed: tell the server, keep serving
            log.exception("task %s failed", task.task_id)
            return Pending(UploadHeader(task.task_id, error=f"{type(exc).__name__}: {exc}"))

    def _encode(self, task: TaskHeader, result: object) -> Pending:
        if task.kind == EVALUATE:
            if not isinstance(result, EvaluateResult):
                raise TypeError(f"evaluate() returned {type(result).__name__}, not EvaluateResult")
            metrics = normalize(result.metrics, source=task.task_id)
            return Pending(
                UploadHeader(
                    task.task_id,
                    num_examples=int(result.num_examples),
                    metrics=metrics,
                    loss=float(result.loss),
                )
            )
        if task.kind == FIT:
            if not isinstance(result, FitResult):
                raise TypeError(f"fit() returned {type(result).__name__}, not FitResult")
            arrays, examples, metrics = result.weights, int(result.num_examples), result.metrics
        elif isinstance(result, Reply):
            arrays, examples, metrics = result.arrays, 0, result.metrics
        else:
            raise TypeError(f"a {task.kind!r} task returned {type(result).__name__}, not Reply")
        header = UploadHeader(
            task.task_id, num_examples=examples, metrics=normalize(metrics, source=task.task_id)
        )
        if not arrays:
            return Pending(header)
        encoding = result.encoding if isinstance(result, FitResult) and result.encoding else PLAIN
        payload, size, digest = self.cache.encode(arrays, task.task_id, packed=encoding != PLAIN)
        return Pending(replace(header, encoding=encoding, size=size, sha256=digest), payload)

    def _download(self, task: TaskHeader) -> bytes | Path:
        """The task's model: cached, or streamed into memory (or, when large, a file)."""
        ref = task.model
        assert ref is not None
        cached = self.cache.model(ref)
        if cached is not None:
            return cached
        spool = self.cache.spool(ref)
        started, backoff, held = time.monotonic(), Backoff(), spool.size
        try:
            while True:
                joined = self._wait_connected()
                try:
                    for data in self.link.download(joined.token, ref.version, spool.size):
                        if spool.size + len(data) > ref.size:  # the server is not trusted
                            spool.discard()
                            raise WeightsError(
                                f"model {ref.version}: the server sent more than the "
                                f"{ref.size} bytes it announced; refused"
                            )
                        spool.write(data)
                    break
                except LinkError as exc:
                    if exc.code not in RETRYABLE or self.stop_event.is_set():
                        raise
                    self.stop_event.wait(backoff.next())
        finally:
            spool.close()
        self._last_transfer = time.monotonic() - started
        self.observer.downloaded(spool.size - held, self._last_transfer)
        return self.cache.keep(ref, spool)

    def _wait_connected(self) -> Joined:
        while not self._connected.wait(timeout=1.0) or self._joined is None:
            if self.stop_event.is_set():
                raise LinkError(Code.CANCELLED, "the node is stopping")
        return self._joined

    def _deliver(self, pending: Pending) -> bool:
        """Upload until acknowledged (True) or refused for good (False)."""
        backoff, resumed = Backoff(), False
        while not self.stop_event.is_set():
            try:
                joined = self._wait_connected()
                offset = 0
                if resumed and pending.payload is not None:  # ask where the server stands
                    offset, complete = self.link.query_upload(joined.token, pending.header.task_id)
                    if complete:
                        return True
                    if offset:
                        log.info(
                            "resuming upload of %s at byte %d of %d",
                            pending.header.task_id,
                            offset,
                            pending.header.size,
                        )
                header = replace(pending.header, token=joined.token, offset=offset)
                started = time.monotonic()
                ack = self.link.upload(header, pending.chunks(offset, self.settings.chunk_size))
                if ack.accepted:
                    seconds = time.monotonic() - started
                    self.uplink.record(header.size - offset, seconds)
                    self.observer.uploaded(header.size - offset, seconds)
            except LinkError as exc:
                retry = exc.code in RETRYABLE or exc.code == Code.OUT_OF_RANGE
                self.observer.upload_failed(exc.code.value, final=not retry)
                if retry:
                    log.info(
                        "upload of %s interrupted (%s); retrying", pending.header.task_id, exc.code
                    )
                    resumed = True
                    self.stop_event.wait(backoff.next())
                    continue
                log.warning(
                    "upload of %s refused: %s %s", pending.header.task_id, exc.code, exc.message
                )
                if exc.code == Code.INVALID_ARGUMENT and not pending.header.error:
                    # a final answer about this result: say so, and the server records the
                    # reason now rather than waiting for the round's deadline
                    reason = f"the server refused its result: {exc.message}"
                    self._deliver(Pending(UploadHeader(pending.header.task_id, error=reason)))
                return False
            if ack.accepted:
                return True
            resumed = True
            self.stop_event.wait(backoff.next())
        return False


def _capabilities(labels: dict[str, str], instance: str) -> Capabilities:
    from fedge import __version__

    return Capabilities(
        cpu_count=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        accelerator=_accelerator(),
        framework=_framework(),
        fedge_version=__version__,
        labels=labels,
        instance=instance,
    )


def _framework() -> str:
    """The training framework the app loaded (the most specific one), with its version."""
    for name in ("torch", "tensorflow", "jax", "sklearn"):
        module = sys.modules.get(name)
        if module is not None:
            return f"{name} {getattr(module, '__version__', '?')}"
    import numpy

    return f"numpy {numpy.__version__}"


def _accelerator() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return ""


__all__ = ["Node", "NodeSettings"]
