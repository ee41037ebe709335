"""Checkpoints: the global weights, strategy state and metadata after a finished round.

A server killed at any instant must resume from the last finished round, so a
checkpoint is one safetensors file, ``round-000005.safetensors``, that either exists
complete or not at all: it is written to a temporary file in the same directory,
fsynced, renamed over its final name with `os.replace` (atomic on POSIX), and the
directory is fsynced so the rename itself survives a power cut. A SHA-256 over every
tensor is kept in the header, so a file damaged later (bad disk, partial copy) is
refused instead of silently resuming from garbage; `latest_checkpoint` then falls back
to the previous one.

Layout of the file: tensors ``weights/<name>`` and ``state/<name>``; the header
metadata (strings only) holds the format version, the round, the tensor name orders
(safetensors sorts tensors by name, and the order of a model's tensors matters), the
caller's ``meta`` as JSON, and the checksum. Nothing is pickled.

One writer per directory: `save_checkpoint` removes temporary files left by a writer
that was killed mid-write, so two processes must not write to the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedge.errors import FedgeError
from fedge.weights import Array, State, Weights

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WEIGHTS = "weights/"
_STATE = "state/"
_KEY_FORMAT = "fedge.checkpoint.format"
_KEY_ROUND = "fedge.checkpoint.round"
_KEY_WEIGHTS = "fedge.checkpoint.weights"
_KEY_STATE = "fedge.checkpoint.state"
_KEY_META = "fedge.checkpoint.meta"
_KEY_SHA256 = "fedge.checkpoint.sha256"
_REQUIRED_KEYS = (_KEY_FORMAT, _KEY_ROUND, _KEY_WEIGHTS, _KEY_STATE, _KEY_META, _KEY_SHA256)
_NAME = re.compile(r"round-(\d+)\.safetensors")
_TEMP = re.compile(r"\.round-\d+\.safetensors\.[0-9a-f]+\.tmp")


class CheckpointError(FedgeError):
    """A checkpoint could not be written, or a file is not a valid fedge checkpoint."""


@dataclass(eq=False)
class Checkpoint:
    """Everything needed to resume after `round`: compare fields with numpy, not ``==``."""

    round: int
    weights: Weights
    state: State = field(default_factory=dict)
    """The strategy's server state (e.g. FedOpt moments)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serializable extras: the run id and the round's record. Never the history,
    which grows with the run and lives in the state database."""


def checkpoint_name(round: int) -> str:
    """File name of the checkpoint of `round`; zero-padded so names sort like rounds."""
    return f"round-{round:06d}.safetensors"


def save_checkpoint(directory: Path, ckpt: Checkpoint, *, keep: int = 3) -> Path:
    """Write `ckpt` atomically and durably into `directory`; return its path.

    Afterwards only the `keep` newest checkpoints up to ``ckpt.round`` remain.
    Checkpoints of later rounds are removed (with a warning): saving round N means the
    run was resumed from before them, so they belong to an abandoned timeline and must
    not be picked up by `latest_checkpoint` after the next restart.
    """
    if not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"keep must be an integer >= 1, got {keep!r}")
    if not isinstance(ckpt.round, int) or ckpt.round < 0:
        raise CheckpointError(f"checkpoint round must be an integer >= 0, got {ckpt.round!r}")
    directory = Path(directory)
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    if created:
        directory.mkdir(parents=True, exist_ok=True)
        for new_dir in created:  # each new directory entry must reach the disk too
            _fsync_dir(new_dir.parent)

    tensors = _tensors(ckpt)
    try:
        meta_json = json.dumps(ckpt.meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta of round {ckpt.round} is not JSON-serializable ({exc})"
        ) from exc
    metadata = {
        _KEY_FORMAT: str(FORMAT_VERSION),
        _KEY_ROUND: str(ckpt.round),
        _KEY_WEIGHTS: json.dumps(list(ckpt.weights)),
        _KEY_STATE: json.dumps(list(ckpt.state)),
        _KEY_META: meta_json,
        _KEY_SHA256: _digest(tensors),
    }

    final = directory / checkpoint_name(ckpt.round)
    temp = directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
    try:
        # Create it ourselves (exclusive, private), then let safetensors fill it.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        save_file(tensors, temp, metadata=metadata)
        fd = os.open(temp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise CheckpointError(f"{final}: could not write checkpoint ({exc})") from exc
    _fsync_dir(directory)
    _prune(directory, ckpt.round, keep)
    log.info(
        "round %d: checkpoint saved to %s",
        ckpt.round,
        final,
        extra={"round": ckpt.round, "path": str(final)},
    )
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; `CheckpointError` says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata: dict[str, str] = f.metadata() or {}
            tensors: dict[str, Array] = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from exc

    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(
            f"{path}: header metadata lacks {missing}; not written by fedge.save_checkpoint"
        )
    if metadata[_KEY_FORMAT] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format {metadata[_KEY_FORMAT]!r} is not supported "
            f"(expected {FORMAT_VERSION}); was it written by a newer fedge?"
        )
    try:
        round_ = int(metadata[_KEY_ROUND])
    except ValueError:
        raise CheckpointError(
            f"{path}: metadata round {metadata[_KEY_ROUND]!r} is not an integer"
        ) from None
    named = _NAME.fullmatch(path.name)
    if named and int(named.group(1)) != round_:
        raise CheckpointError(
            f"{path}: file name says round {int(named.group(1))} but its metadata says {round_}"
        )
    digest = _digest(tensors)
    if digest != metadata[_KEY_SHA256]:
        raise CheckpointError(
            f"{path}: tensor data does not match its SHA-256 (stored "
            f"{metadata[_KEY_SHA256][:16]}…, computed {digest[:16]}…); the file is corrupt"
        )
    weights = _section(path, tensors, metadata, _KEY_WEIGHTS, _WEIGHTS)
    state = _section(path, tensors, metadata, _KEY_STATE, _STATE)
    stray = sorted(n for n in tensors if not n.startswith((_WEIGHTS, _STATE)))
    if stray:
        raise CheckpointError(f"{path}: unexpected tensor(s) {stray}")
    try:
        meta = json.loads(metadata[_KEY_META])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata {_KEY_META!r} is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: metadata {_KEY_META!r} must be a JSON object, got {type(meta).__name__}"
        )
    return Checkpoint(round=round_, weights=weights, state=state, meta=meta)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a safetensors file whose header says it is a fedge checkpoint
    (rather than plain weights, which share the format)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return _KEY_FORMAT in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file in `directory`, oldest first.

    Temporary files of an interrupted write never match, so they are never listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        named = _NAME.fullmatch(entry.name)
        if named and entry.is_file():
            found.append((int(named.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in `directory` that loads, or None if there is none.

    A newest file that is unreadable is logged and skipped in favour of the one before.
    If there are checkpoint files but none of them loads, that is an error, not a fresh
    start: silently restarting a long run from round 0 would lose all of its work.
    """
    found = list_checkpoints(directory)
    errors: list[str] = []
    for round_, path in reversed(found):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning(
                "skipping unreadable checkpoint of round %d, falling back to an older one: %s",
                round_,
                exc,
                extra={"round": round_, "path": str(path)},
            )
    if errors:
        raise CheckpointError(
            f"{directory}: none of the {len(found)} checkpoint(s) is readable: " + "; ".join(errors)
        )
    return None


def _tensors(ckpt: Checkpoint) -> dict[str, Array]:
    tensors: dict[str, Array] = {}
    for prefix, section, label in (
        (_WEIGHTS, ckpt.weights, "weights"),
        (_STATE, ckpt.state, "state"),
    ):
        for name, value in section.items():
            if isinstance(value, np.generic):
                # arithmetic on a 0-d array yields a numpy scalar; store it as 0-d again
                value = np.asarray(value)
            if not isinstance(value, np.ndarray):
                raise CheckpointError(
                    f"checkpoint of round {ckpt.round}: {label} tensor {name!r} is a "
                    f"{type(value).__name__}, expected a numpy array"
                )
            if value.dtype.hasobject:
                raise CheckpointError(
                    f"checkpoint of round {ckpt.round}: {label} tensor {name!r} has dtype "
                    f"{value.dtype}, which cannot be stored without pickle"
                )
            # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
            tensors[prefix + name] = np.asarray(value, order="C")
    return tensors


def _digest(tensors: Mapping[str, Array]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of all tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _section(
    path: Path, tensors: Mapping[str, Array], metadata: Mapping[str, str], key: str, prefix: str
) -> dict[str, Array]:
    try:
        order = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not JSON ({exc})") from exc
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise CheckpointError(f"{path}: metadata {key!r} must be a JSON list of tensor names")
    stored = sorted(n[len(prefix) :] for n in tensors if n.startswith(prefix))
    if sorted(order) != stored:
        raise CheckpointError(
            f"{path}: metadata {key!r} lists {sorted(order)} but the file holds "
            f"{prefix}* tensors {stored}"
        )
    return {name: tensors[prefix + name] for name in order}


def _prune(directory: Path, saved: int, keep: int) -> None:
    found = list_checkpoints(directory)
    older = [path for round_, path in found if round_ < saved]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for round_, path in found:
        if round_ > saved:
            log.warning(
                "removing checkpoint of round %d: round %d was saved after it, so the run "
                "was resumed from an earlier round",
                round_,
                saved,
                extra={"round": round_, "path": str(path)},
            )
            doomed.append(path)
    doomed += [p for p in directory.iterdir() if _TEMP.fullmatch(p.name)]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if doomed:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make a rename/create/unlink in `directory` durable (POSIX needs the directory fsynced)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
