"""The upload pipeline: receive → size and hash check → validate → hand to the board.

Everything a node sends is bounded and checked before it is used: the example count,
the metrics (count, names, finiteness), the payload's declared size (against the arrays
the task expects, and the configured maximum), every chunk's offset, the SHA-256 of the
whole payload, and then every tensor's name, dtype, shape and finiteness.

Small payloads are received whole in memory (a file costs more than receiving 400 KB),
validated there as read-only views of the received bytes, and kept until the coordinator
has folded them — within a budget, beyond which they wait in a file. Larger ones are
spooled to a file as they arrive, resumable by offset across reconnects and server
restarts, and validated block by block so they never sit whole in memory. A full disk is reported as
such ("disk full"), with a status the node retries on.

A fit result may come as an encoded update (`fedge.compression`), if the run's
``[compression]`` allows that encoding: packed, with no header, so its size must be one
the model allows in that encoding (`compression.layout`, checked before a byte is
received); it is then checked as strictly as plain weights (`compression.check`), and
the coordinator decodes it when it folds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge import compression
from fedge.chunks import CHUNK_SIZE, Spool, open_private
from fedge.client import EVALUATE, FIT, EvaluateResult, FitResult, Reply, Result
from fedge.config import CompressionSection
from fedge.coordinator import Task
from fedge.errors import WeightsError, is_disk_full
from fedge.limits import MAX_ERROR, MAX_KEY_LENGTH, MAX_METRICS
from fedge.messages import Code, FleetError, UploadHeader
from fedge.weights import Array, CheckedWeights, FileWeights, Spec, validate, view_bytes

SMALL_PAYLOAD = 4 << 20
"""Payloads up to this size are received in memory."""
HELD_MEMORY = max(256 << 20, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
"""Memory for small results waiting for their turn to be folded (results are folded in
client-id order); beyond it they wait in files. An eighth of the machine's memory: with
256 MiB, a 1,000-node round of 400 KB results spent a third of its server CPU on files."""
HEADER_ALLOWANCE = 4096
"""Bytes a safetensors header may take beyond ~200 per tensor."""

Chunks = AsyncIterator[tuple[int, bytes]]


@dataclass
class Received:
    """What an upload delivered: a result, or the node's report of why the task failed."""

    result: Result | None
    error: str | None = None
    size: int = 0


class Uploads:
    """Touched only from the event loop; blocking work runs in threads."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        max_examples: int,
        compression: CompressionSection | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_examples = max_bytes, max_examples
        self.compression = compression or CompressionSection()
        self._spools: dict[str, Spool] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: dict[str, int] = {}
        self._held_total = 0
        self._validating = asyncio.Semaphore(1)  # one large upload read at a time

    def lock(self, task_id: str) -> asyncio.Lock:
        """One receiver per task: a re-sent upload waits until the cut one let go."""
        return self._locks.setdefault(task_id, asyncio.Lock())

    def path(self, task_id: str, suffix: str = ".part") -> Path:
        """Where a task's payload is spooled. Task ids are the server's own (an upload is
        looked up among open tasks first), so they can name files."""
        return self.directory / (task_id.replace("/", "_") + suffix)

    def keep_only(self, stage: str) -> None:
        """After a restart: keep the spools of the stage being resumed, drop the rest."""
        prefix = stage.replace("/", "_") + "_"
        for path in self.directory.iterdir():
            if not path.name.startswith(prefix):
                path.unlink(missing_ok=True)

    async def received(self, task_id: str) -> int:
        """Bytes of the task's payload held on disk, where an upload resumes."""
        spool = await self._spool(task_id)
        return spool.size

    def release(self, task_id: str) -> None:
        """The task closed: forget its payload, in memory or on disk. A spool being written
        is discarded by its receiver once the write in flight is done (discarded now, that
        write would create the file again)."""
        self._held_total -= self._held.pop(task_id, 0)
        lock = self._locks.pop(task_id, None)
        spool = self._spools.pop(task_id, None)
        if lock is None or not lock.locked():
            if spool is not None:
                spool.discard()
            else:
                self.path(task_id).unlink(missing_ok=True)
        self.path(task_id, ".safetensors").unlink(missing_ok=True)

    async def receive(
        self, task: Task, header: UploadHeader, chunks: Chunks, source: str
    ) -> Received | None:
        """Receive, check and decode one upload; None if the stream ended early (the
        received prefix of a large payload is kept for a resume)."""
        if header.error:
            return Received(None, f"{source}: {header.error[:MAX_ERROR]}")
        metrics = _checked_metrics(header.metrics, source)
        if task.kind in (FIT, EVALUATE) and not 0 < header.num_examples <= self.max_examples:
            raise FleetError(
                Code.INVALID_ARGUMENT,
                f"{source}: num_examples must be in 1..{self.max_examples} "
                f"(limits.max_examples), got {header.num_examples}",
            )
        if task.kind == EVALUATE:
            if header.loss is None or not math.isfinite(header.loss):
                raise FleetError(
                    Code.INVALID_ARGUMENT, f"{source}: an evaluate result needs a finite loss"
                )
            return Received(EvaluateResult(header.loss, header.num_examples, metrics))
        if task.expects is None:
            if header.size:
                raise FleetError(
                    Code.INVALID_ARGUMENT,
                    f"{source}: tasks of kind {task.kind!r} carry no arrays in their reply, "
                    f"got a {header.size}-byte payload",
                )
            return Received(Reply({}, metrics))
        encoding = self._check_payload(task, header, task.expects, source)
        weights: CheckedWeights | FileWeights | compression.PackedFile | None
        if header.size <= SMALL_PAYLOAD:
            weights = await self._receive_in_memory(task, header, chunks, source)
        else:
            weights = await self._receive_to_file(task, header, chunks, source)
        if weights is None:
            return None
        if task.kind == FIT:
            result = FitResult(weights, header.num_examples, metrics, encoding)
            return Received(result, size=header.size)
        return Received(Reply(weights, metrics), size=header.size)

    # --- the two ways in -------------------------------------------------------------

    async def _receive_in_memory(
        self, task: Task, header: UploadHeader, chunks: Chunks, source: str
    ) -> CheckedWeights | FileWeights | compression.PackedFile | None:
        if header.offset != 0:
            raise FleetError(
                Code.OUT_OF_RANGE,
                f"{source}: resume offset {header.offset}, but the server holds 0 bytes of "
                "a payload this small; send it whole",
            )
        parts, size, digest = [], 0, hashlib.sha256()
        async for offset, data in chunks:
            _check_chunk(offset, data, size, header.size, source)
            parts.append(data)
            digest.update(data)
            size += len(data)
        if size < header.size:
            return None
        _check_digest(digest.digest(), header.sha256, source)
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        assert task.expects is not None
        weights = self._decode(payload, header, task.expects, source)
        check = self._checker(header)
        if header.size > 1 << 20:  # validation reads every value: off the loop when large
            await asyncio.to_thread(check, weights, task.expects, source)
        else:
            check(weights, task.expects, source)
        if self._held_total + header.size > HELD_MEMORY:  # it waits on disk
            return await self._spill(task, header, payload, weights, source)
        self._held[task.task_id] = header.size
        self._held_total += header.size
        return weights

    async def _spill(
        self, task: Task, header: UploadHeader, payload: bytes, checked: CheckedWeights,
        source: str,
    ) -> FileWeights | compression.PackedFile:  # fmt: skip
        """A validated result that must wait for its turn, moved to a file (page cache)."""
        path = self.path(task.task_id, ".safetensors")
        try:
            await asyncio.to_thread(_write_private, path, payload)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _disk_error(exc, self.directory, source) from exc
        assert task.expects is not None
        weights = self._open(path, header, task.expects, source)
        weights.checked, weights.magnitude = checked.checked, checked.magnitude
        return weights

    async def _receive_to_file(
        self, task: Task, header: UploadHeader, chunks: Chunks, source: str
    ) -> FileWeights | compression.PackedFile | None:
        spool = await self._spool(task.task_id)
        if header.offset != spool.size:
            raise FleetError(
                Code.OUT_OF_RANGE,
                f"{source}: resume offset {header.offset}, but the server holds "
                f"{spool.size} bytes; ask QueryUpload",
            )
        writing: asyncio.Future[None] | None = None
        try:
            async for offset, data in chunks:
                try:
                    _check_chunk(offset, data, spool.size, header.size, source)
                except FleetError:
                    spool.discard()
                    raise
                # off the loop; shielded, so a cut stream never closes the file mid-write
                writing = asyncio.ensure_future(asyncio.to_thread(spool.write, data))
                await asyncio.shield(writing)
        except OSError as exc:
            raise _disk_error(exc, self.directory, source) from exc
        finally:  # shielded: even a receiver cut twice leaves no file open or behind
            await asyncio.shield(asyncio.ensure_future(self._settle(task.task_id, spool, writing)))
        if self._spools.get(task.task_id) is not spool:
            raise FleetError(
                Code.ABORTED, f"{source}: the task closed while its upload was received"
            )
        if spool.size < header.size:
            return None
        try:
            _check_digest(spool.digest.digest(), header.sha256, source)
        except FleetError:
            spool.discard()
            raise
        path = self.path(task.task_id, ".safetensors")
        os.replace(spool.path, path)
        self._spools.pop(task.task_id, None)
        assert task.expects is not None
        async with self._validating:
            try:
                return await asyncio.to_thread(self._check_file, path, header, task.expects, source)
            except FleetError:
                path.unlink(missing_ok=True)
                raise

    async def _settle(
        self, task_id: str, spool: Spool, writing: asyncio.Future[None] | None
    ) -> None:
        """After a receive: let the write in flight finish, then close the spool — or
        discard it, if its task was released meanwhile."""
        if writing is not None:
            await asyncio.wait([writing])
        if self._spools.get(task_id) is spool:
            spool.close()
        else:
            spool.discard()

    async def _spool(self, task_id: str) -> Spool:
        spool = self._spools.get(task_id)
        if spool is None:  # found on disk after a restart: hash its prefix off the loop
            spool = await asyncio.to_thread(Spool, self.path(task_id))
            self._spools[task_id] = spool
        return spool

    def _check_payload(self, task: Task, header: UploadHeader, expects: Spec, source: str) -> str:
        """The payload's encoding ("" for plain weights), if allowed and its size can be."""
        encoding = "" if header.encoding in ("", compression.PLAIN) else header.encoding
        allowed = self.compression.encodings() if task.kind == FIT else ()
        if encoding and encoding not in allowed:
            raise FleetError(
                Code.INVALID_ARGUMENT,
                f"{source}: encoding {header.encoding!r} is not accepted for this task; "
                f"expected one of {[compression.PLAIN, *allowed]} (compression.mode = "
                f"{self.compression.mode!r}, and only fit results are compressed)",
            )
        if encoding and 0 < header.size <= self.max_bytes:
            try:  # a packed update's size is one its model and encoding allow, or refused
                compression.check_size(encoding, expects, header.size, source=source,
                                       fraction=self.compression.fraction(encoding))  # fmt: skip
            except WeightsError as exc:
                raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if encoding:
            data = compression.encoded_bytes(expects, encoding, self.compression.fraction(encoding))
            bound = min(self.max_bytes, data)
        else:
            data = sum(s.dtype.itemsize * math.prod(s.shape) for s in expects.values())
            bound = min(self.max_bytes, 8 + data + _header_bound(expects))
        if not 0 < header.size <= bound:
            raise FleetError(
                Code.RESOURCE_EXHAUSTED if header.size > self.max_bytes else Code.INVALID_ARGUMENT,
                f"{source}: payload size {header.size} bytes is outside 1..{bound} (the "
                f"expected tensors take {data} bytes; the configured maximum is "
                f"{self.max_bytes})",
            )
        return encoding

    def _decode(self, data: bytes, header: UploadHeader, spec: Spec, source: str) -> CheckedWeights:
        """Read-only views of the received bytes: the update is read, never written."""
        encoding = "" if header.encoding in ("", compression.PLAIN) else header.encoding
        fraction = self.compression.fraction(encoding)
        try:
            if encoding:
                return compression.unpack(data, encoding, spec, fraction=fraction, source=source)
            return view_bytes(data, source=source)
        except WeightsError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from exc

    def _open(
        self, path: Path, header: UploadHeader, spec: Spec, source: str
    ) -> FileWeights | compression.PackedFile:
        """A received payload in a file, read when used: safetensors, or a packed update."""
        encoding = "" if header.encoding in ("", compression.PLAIN) else header.encoding
        fraction = self.compression.fraction(encoding)
        try:
            if encoding:
                return compression.PackedFile(
                    path, encoding, spec, fraction=fraction, source=source
                )
            return FileWeights(path, source=source, max_header=_header_bound(spec))
        except WeightsError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from exc

    def _check_file(
        self, path: Path, header: UploadHeader, spec: Spec, source: str
    ) -> FileWeights | compression.PackedFile:
        """Validate a received file block by block; the coordinator then folds it unread
        again."""
        weights = self._open(path, header, spec, source)
        self._checker(header)(weights, spec, source)
        return weights

    def _checker(self, header: UploadHeader) -> Checker:
        """How the payload is validated: as weights, or as an update in its encoding."""
        encoding = "" if header.encoding in ("", compression.PLAIN) else header.encoding
        if not encoding:
            return _validate
        fraction = self.compression.fraction(encoding)

        def check(weights: Mapping[str, Array], spec: Spec, source: str) -> None:
            try:
                compression.check(weights, encoding, spec, fraction=fraction, source=source)
            except WeightsError as exc:
                raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from exc

        return check


def _header_bound(expects: Spec) -> int:
    """The most header bytes the expected tensors need (names, dtypes, shapes, order)."""
    return HEADER_ALLOWANCE + 200 * len(expects)


def _write_private(path: Path, data: bytes) -> None:
    with open_private(path, append=False) as f:
        f.write(data)


def _checked_metrics(metrics: dict[str, float], source: str) -> dict[str, float]:
    if len(metrics) > MAX_METRICS:
        raise FleetError(
            Code.INVALID_ARGUMENT, f"{source}: {len(metrics)} metrics; at most {MAX_METRICS}"
        )
    for key, value in metrics.items():
        if not 0 < len(key) <= MAX_KEY_LENGTH or not math.isfinite(value):
            raise FleetError(
                Code.INVALID_ARGUMENT,
                f"{source}: metric {key[:MAX_KEY_LENGTH]!r} = {value!r}: names must be 1.."
                f"{MAX_KEY_LENGTH} characters and values finite",
            )
    return dict(metrics)


def _check_chunk(offset: int, data: bytes, held: int, size: int, source: str) -> None:
    if len(data) > CHUNK_SIZE:
        raise FleetError(
            Code.INVALID_ARGUMENT,
            f"{source}: a chunk of {len(data)} bytes; the protocol's chunks are at most "
            f"{CHUNK_SIZE} bytes",
        )
    if offset != held:
        raise FleetError(
            Code.INVALID_ARGUMENT, f"{source}: expected a chunk at offset {held}, got {offset}"
        )
    if held + len(data) > size:
        raise FleetError(
            Code.INVALID_ARGUMENT, f"{source}: payload exceeds its declared size {size} bytes"
        )


def _check_digest(digest: bytes, declared: bytes, source: str) -> None:
    if digest != declared:
        raise FleetError(
            Code.DATA_LOSS,
            f"{source}: sha256 mismatch: header says {declared.hex()}, payload is {digest.hex()}",
        )


Checker = Callable[[Mapping[str, Array], Spec, str], None]


def _validate(weights: Mapping[str, Array], spec: Spec, source: str) -> None:
    try:
        validate(weights, spec, source=source)
    except WeightsError as exc:
        raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from exc


def _disk_error(exc: OSError, directory: Path, source: str) -> FleetError:
    if is_disk_full(exc):
        return FleetError(
            Code.UNAVAILABLE,
            f"{source}: disk full: the server cannot store the upload under {directory} "
            f"({exc.strerror}); it will be accepted once space is freed",
        )
    return FleetError(Code.INTERNAL, f"{source}: cannot store the upload ({exc})")
