"""Published global models, served to nodes by version and offset.

A version is the SHA-256 of the encoded model, so the same weights published twice (a
retried round) are one version and nodes that hold it skip the download. Small models
are kept encoded in memory (reading a file per download costs more than serving 400 KB);
large ones are written straight to a file and streamed from it. The newest `keep`
versions stay available, so a node still fetching the previous model can finish.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from fedge.chunks import bytes_chunks, read_chunks, sha256_file
from fedge.messages import Code, FleetError, ModelRef
from fedge.weights import Weights, num_bytes, to_bytes, to_file

IN_MEMORY = 16 << 20
"""Models up to this size are served from memory."""


class ModelStore:
    """Published by the coordinator's thread, read by the event loop: a lock guards it."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory, self.keep = directory, keep
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():  # models of an earlier process
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._models: OrderedDict[str, tuple[ModelRef, bytes | Path]] = OrderedDict()

    def publish(self, weights: Weights) -> ModelRef:
        """Encode `weights` and make them downloadable; blocks while encoding."""
        if num_bytes(weights) <= IN_MEMORY:
            data = to_bytes(weights)
            digest = hashlib.sha256(data).digest()
            ref, body = ModelRef(digest.hex()[:16], digest, len(data)), data
            source: bytes | Path = body
        else:
            tmp = self.directory / "publishing.tmp"
            to_file(weights, tmp)
            digest = sha256_file(tmp).digest()
            ref = ModelRef(digest.hex()[:16], digest, tmp.stat().st_size)
            source = self.directory / f"{ref.version}.safetensors"
            os.replace(tmp, source)
        with self._lock:
            self._models[ref.version] = (ref, source)
            self._models.move_to_end(ref.version)
            while len(self._models) > self.keep:
                _, (_, old) = self._models.popitem(last=False)
                if isinstance(old, Path) and old != source:
                    old.unlink(missing_ok=True)
        return ref

    @property
    def latest(self) -> ModelRef | None:
        """The newest published version."""
        with self._lock:
            return next(reversed(self._models.values()))[0] if self._models else None

    def inline(self, version: str, limit: int) -> bytes | None:
        """The encoded model when it is kept in memory and at most `limit` bytes, so a
        transport can send it with the task instead of a download."""
        with self._lock:
            found = self._models.get(version)
        if found is None or not isinstance(found[1], bytes) or found[0].size > limit:
            return None
        return found[1]

    def read(self, version: str, offset: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
        """The model's bytes from `offset`, in chunks."""
        with self._lock:
            found = self._models.get(version)
        if found is None:
            raise FleetError(
                Code.NOT_FOUND,
                f"model version {version!r} is not served; current: {list(self._models)}",
            )
        ref, source = found
        if not 0 <= offset <= ref.size:
            raise FleetError(Code.OUT_OF_RANGE, f"offset {offset} outside 0..{ref.size}")
        if isinstance(source, bytes):
            return bytes_chunks(source, offset, chunk_size)
        return read_chunks(source, offset, chunk_size)
