"""The node's cache: the current model by hash, and encoded results until delivered.

Results are kept on disk until they are discarded (delivered and out of the node's
last few, or refused for good): a result finished before a crash or a power cut is
loaded when the node starts again, and delivered when the server asks for its task —
if its round is still open — without training again.

Large models and results pass through files in the node's cache directory, never whole
in memory as bytes: the model is streamed to disk (and kept there, by hash, across
restarts), decoded with one copy, and a result is written straight from its arrays and
uploaded from the file. On a device with little memory that is the difference between
2x and 6x the model. Small ones (up to `SPILL_BYTES`) stay in memory, where they cost
less than a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fedge.chunks import (
    MemorySpool,
    Spool,
    bytes_chunks,
    open_private,
    read_chunks,
    sha256_file,
)
from fedge.compression import pack, pack_to
from fedge.errors import WeightsError
from fedge.messages import ModelRef, UploadHeader
from fedge.weights import Array, Weights, from_bytes, num_bytes, read_file, to_bytes, to_file

log = logging.getLogger(__name__)

SPILL_BYTES = 16 << 20
"""Models and results larger than this go through files instead of memory."""


def default_cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedge" / name


@dataclass
class Pending:
    """A result waiting to be delivered (and kept a while after, in case the server
    lost it and asks again)."""

    header: UploadHeader
    payload: bytes | Path | None = None
    files: tuple[Path, ...] = ()
    """Where it is kept on disk (`Cache.save`)."""

    def chunks(self, offset: int, size: int) -> Iterable[tuple[int, bytes]]:
        if isinstance(self.payload, bytes):
            return bytes_chunks(self.payload, offset, size)
        if isinstance(self.payload, Path):
            return read_chunks(self.payload, offset, size)
        return ()

    def discard(self) -> None:
        if isinstance(self.payload, Path):
            self.payload.unlink(missing_ok=True)
        for path in self.files:
            path.unlink(missing_ok=True)


class Cache:
    def __init__(self, directory: Path) -> None:
        self.models, self.results = directory / "models", directory / "results"
        for d in (self.models, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self._model: tuple[bytes, bytes | Path] | None = None  # (sha256, model) last used

    def model(self, ref: ModelRef) -> bytes | Path | None:
        """The model if it is cached (from this process, or a file from an earlier one)."""
        if self._model is not None and self._model[0] == ref.sha256:
            return self._model[1]
        path = self.models / f"{ref.sha256.hex()}.safetensors"
        if path.exists():
            self._model = (ref.sha256, path)
            return path
        return None

    def spool(self, ref: ModelRef) -> Spool | MemorySpool:
        """Where to receive `ref` (a partial file from an earlier attempt is resumed)."""
        if ref.size > SPILL_BYTES:
            return Spool(self.models / f"{ref.sha256.hex()}.part")
        return MemorySpool()

    def keep(self, ref: ModelRef, spool: Spool | MemorySpool) -> bytes | Path:
        """Check a received model against its reference and make it the cached one."""
        if spool.size != ref.size or spool.digest.digest() != ref.sha256:
            spool.discard()
            raise WeightsError(f"model {ref.version}: size or sha256 mismatch; will retry")
        model: bytes | Path
        if isinstance(spool, MemorySpool):
            model = bytes(spool.data)
        else:
            model = self.models / f"{ref.sha256.hex()}.safetensors"
            os.replace(spool.path, model)
        for other in self.models.iterdir():  # one model file at most: the current one
            if other != model:
                other.unlink(missing_ok=True)
        self._model = (ref.sha256, model)
        return model

    def encode(
        self, weights: Mapping[str, Array], task_id: str, *, packed: bool = False
    ) -> tuple[bytes | Path, int, bytes]:
        """(payload, size, sha256) of a result: bytes when small, else a file. Weights are
        safetensors; an encoded update is `packed` (the server knows its layout)."""
        if num_bytes(weights) <= SPILL_BYTES:
            data = pack(weights) if packed else to_bytes(weights)
            return data, len(data), hashlib.sha256(data).digest()
        path = self._result_path(task_id)
        if packed:
            pack_to(weights, path)
        else:
            to_file(weights, path)
        return path, path.stat().st_size, sha256_file(path).digest()

    def save(self, pending: Pending) -> Pending:
        """Keep `pending` on disk until it is discarded. A disk that cannot take it costs
        only the restart-safety: the result is delivered from memory all the same."""
        payload_path = self._result_path(pending.header.task_id)
        header_path = payload_path.with_suffix(".json")
        header = pending.header
        record = {
            "task_id": header.task_id, "num_examples": header.num_examples,
            "metrics": header.metrics, "encoding": header.encoding, "size": header.size,
            "sha256": header.sha256.hex(), "loss": header.loss, "error": header.error,
        }  # fmt: skip
        try:
            if isinstance(pending.payload, bytes):
                with open_private(payload_path, append=False) as f:
                    f.write(pending.payload)
            temp = header_path.with_suffix(".tmp")
            with open_private(temp, append=False) as f:
                f.write(json.dumps(record).encode())
            os.replace(temp, header_path)  # the header last: a result is whole, or absent
        except OSError as exc:
            log.warning("cannot keep the result of %s on disk (%s)", header.task_id, exc)
            return pending
        return replace(pending, files=(header_path, payload_path))

    def saved(self) -> list[Pending]:
        """Results an earlier process kept and did not discard, oldest first; anything
        half-written or damaged is removed."""
        found = []
        for header_path in sorted(self.results.glob("*.json"), key=lambda p: p.stat().st_mtime):
            payload_path = header_path.with_suffix("")
            try:
                record = json.loads(header_path.read_bytes())
                header = UploadHeader(**{**record, "sha256": bytes.fromhex(record["sha256"])})
                payload = payload_path if header.size else None
                if payload is not None and sha256_file(payload).digest() != header.sha256:
                    raise ValueError("its payload does not match its sha256")
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("dropping a damaged kept result %s (%s)", header_path.name, exc)
                header_path.unlink(missing_ok=True)
                payload_path.unlink(missing_ok=True)
                continue
            found.append(Pending(header, payload, (header_path, payload_path)))
        kept = {p for pending in found for p in pending.files}
        for stray in self.results.iterdir():  # a result being written when the node died
            if stray not in kept:
                stray.unlink(missing_ok=True)
        return found

    def _result_path(self, task_id: str) -> Path:
        return self.results / hashlib.sha256(task_id.encode()).hexdigest()


def decode(model: bytes | Path, source: str) -> Weights:
    if isinstance(model, bytes):
        return from_bytes(model, source=source)
    return read_file(model, source=source)
