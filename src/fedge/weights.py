"""Model weights: an ordered ``name -> ndarray`` dict, its safetensors wire form, and checks.

Nothing from the network is unpickled: weights travel as safetensors bytes, and every
decoded update is checked against the global model's names, dtypes and shapes (and for
finite values) before it can touch an aggregate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save
from safetensors.numpy import save_file as _st_save_file

from fedge.errors import WeightsError
from fedge.limits import few

Array = npt.NDArray[np.generic]
Weights = dict[str, Array]
"""Ordered mapping of tensor name to array. ``fedge.Weights({...})`` builds one."""
State = dict[str, Array]
"""A strategy's server state (e.g. optimizer moments): flat, so checkpoints store it as-is."""


class CheckedWeights(dict[str, Array]):
    """Weights that already passed `validate` against `checked`, so they are not read twice;
    `magnitude` is their largest absolute float value, measured on the way."""

    checked: Spec | None = None
    magnitude: float | None = None


_ORDER_KEY = "fedge.order"
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


Spec = dict[str, TensorSpec]


def spec_of(weights: Mapping[str, Array]) -> Spec:
    """The names, dtypes and shapes every update of this model must have."""
    return {name: TensorSpec(a.dtype, tuple(a.shape)) for name, a in weights.items()}


def validate(weights: Mapping[str, object], spec: Spec, *, source: str) -> None:
    """Raise `WeightsError` unless `weights` matches `spec` exactly and is finite.

    `source` names the sender (e.g. ``client 3``) so the message tells who sent what.
    """
    if getattr(weights, "checked", None) == spec:
        return  # already passed (the server checks uploads before acknowledging them)
    if not isinstance(weights, Mapping):
        raise WeightsError(
            f"{source}: weights must map tensor names to arrays, got {type(weights).__name__}"
        )
    missing = [n for n in spec if n not in weights]
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {few(missing)}; expected {few(spec)}")
    unexpected = [n for n in weights if n not in spec]
    if unexpected:
        raise WeightsError(
            f"{source}: unexpected tensor(s) {few(unexpected)}; expected {few(spec)}"
        )
    magnitude = 0.0
    for name, want in spec.items():
        if isinstance(weights, FileWeights):
            dtype, shape = weights.layout(name)
            parts: Iterable[Array] = weights.blocks(name)
        else:
            got = weights[name]
            if not isinstance(got, np.ndarray):
                raise WeightsError(
                    f"{source}: tensor {name!r} is a {type(got).__name__}, expected a numpy array"
                )
            dtype, shape, parts = got.dtype, tuple(got.shape), (got,)
        if dtype != want.dtype:
            raise WeightsError(
                f"{source}: tensor {name!r} has dtype {dtype}, expected {want.dtype}"
            )
        if shape != want.shape:
            raise WeightsError(
                f"{source}: tensor {name!r} has shape {list(shape)}, expected {list(want.shape)}"
            )
        if np.issubdtype(dtype, np.inexact):
            bad = 0
            for part in parts:  # one pass: the largest magnitude is NaN or Inf if any value is
                peak = float(np.max(np.abs(part), initial=0))
                if math.isfinite(peak):
                    magnitude = max(magnitude, peak)
                else:
                    bad += part.size - int(np.count_nonzero(np.isfinite(part)))
            if bad:
                raise WeightsError(f"{source}: tensor {name!r} has {bad} NaN or Inf value(s)")
    if isinstance(weights, FileWeights | CheckedWeights):
        weights.checked, weights.magnitude = dict(spec), magnitude


def is_norm_bound(value: object) -> bool:
    """A usable clipping bound: a finite number > 0 (not a bool: TOML's `true` is no 1.0)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def magnitude(weights: Mapping[str, Array]) -> float:
    """The largest absolute value of the float tensors (measured by `validate` if it ran)."""
    known: float | None = getattr(weights, "magnitude", None)
    if known is not None:
        return known
    peak = 0.0
    for name in weights:
        for part in blocks(weights, name):
            if np.issubdtype(part.dtype, np.inexact) and part.size:  # no temporary array
                peak = max(peak, float(part.max()), -float(part.min()))
    return peak


def nonfinite(weights: Mapping[str, Array]) -> str | None:
    """Which tensor holds NaN or Inf values (and how many), or None if all are finite."""
    for name, a in weights.items():
        if np.issubdtype(a.dtype, np.inexact):
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            if bad:
                return f"tensor {name!r} has {bad} NaN or Inf value(s)"
    return None


def to_bytes(weights: Mapping[str, Array]) -> bytes:
    """Serialize to safetensors; the tensor order is kept in the header metadata."""
    # not np.ascontiguousarray: it turns 0-d arrays (e.g. BatchNorm's counter) into 1-d
    arrays = {name: np.asarray(a, order="C") for name, a in weights.items()}
    return bytes(_st_save(arrays, metadata=_order(arrays)))


def _order(arrays: Mapping[str, Array]) -> dict[str, str]:
    return {_ORDER_KEY: json.dumps(list(arrays))}


def to_file(weights: Mapping[str, Array], path: Path) -> None:
    """Write safetensors straight to a file: one transient copy of the model, not two.
    The file is 0600 (a model holds what it learned from private data); the library
    keeps the mode of the file it overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    arrays = {name: np.asarray(a, order="C") for name, a in weights.items()}
    _st_save_file(arrays, str(path), metadata=_order(arrays))


def from_bytes(data: bytes | bytearray | memoryview, *, source: str = "payload") -> Weights:
    """Decode safetensors bytes into Weights, in the order they were written."""
    try:
        arrays = _st_load(bytes(data))
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise WeightsError(f"{source}: not a valid safetensors payload ({exc})") from exc
    return _ordered(arrays, _order_from_header(data, source), source)


MAX_HEADER = 1 << 20
"""Bytes a safetensors header may take in a payload decoded by `view_bytes`."""


def view_bytes(data: bytes, *, source: str = "payload") -> CheckedWeights:
    """Decode safetensors bytes into read-only arrays that are views of `data`: no copy.

    For payloads received whole in memory (a copy into fresh memory costs more than the
    rest of receiving a 400 KB update). The safetensors library decodes bytes only by
    copying, so the header is checked here as it checks it: a JSON object of tensors
    whose dtypes are known, shapes are lists of non-negative integers, and byte ranges
    match dtype and shape and tile the data exactly (no gaps, no overlaps).
    """
    if len(data) < 8:
        raise WeightsError(f"{source}: not a valid safetensors payload (shorter than 8 bytes)")
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= min(MAX_HEADER, len(data) - 8):
        raise WeightsError(f"{source}: not a valid safetensors payload (header length {size})")
    header = _json(data[8 : 8 + size], f"{source}: not a valid safetensors payload")
    if not isinstance(header, dict):
        raise WeightsError(f"{source}: not a valid safetensors payload (header is not an object)")
    header.pop("__metadata__", None)
    start, layout = 8 + size, []
    for name, entry in header.items():
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{source}: tensor {name!r} has an invalid header entry") from None
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise WeightsError(
                f"{source}: tensor {name!r} spans {end - begin} bytes; "
                f"{dtype} {list(shape)} needs {count * dtype.itemsize}"
            )
        layout.append((begin, end, name, dtype, shape, count))
    layout.sort()
    position = 0
    for begin, end, name, *_ in layout:
        if begin != position:
            raise WeightsError(f"{source}: tensor {name!r} does not start where the last ended")
        position = end
    if start + position != len(data):
        raise WeightsError(
            f"{source}: the tensors take {position} bytes but the payload holds {len(data) - start}"
        )
    arrays = {
        name: np.frombuffer(data, dtype, count, start + begin).reshape(shape)
        for begin, _, name, dtype, shape, count in layout
    }
    return CheckedWeights(_ordered(arrays, _order_from_header(data, source), source))


def _order_from_header(data: bytes | bytearray | memoryview, source: str) -> list[str] | None:
    header_len = int.from_bytes(bytes(data[:8]), "little")
    header = _json(bytes(data[8 : 8 + header_len]), f"{source}: not a valid safetensors payload")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise WeightsError(f"{source}: __metadata__ must be an object of strings")
    order = metadata.get(_ORDER_KEY)
    if order is None:
        return None
    names = _json(order, f"{source}: metadata {_ORDER_KEY!r} is not JSON")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{source}: metadata {_ORDER_KEY!r} must be a list of tensor names")
    return names


def _json(text: str | bytes, what: str) -> Any:
    """JSON from a node: any failure — bad syntax or encoding, a non-string, nesting
    deep enough to exhaust the recursion limit — is a `WeightsError` saying `what`."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise WeightsError(f"{what} ({reason})") from None


def _ordered(arrays: dict[str, Array], order: list[str] | None, source: str) -> Weights:
    if order is None:
        return dict(sorted(arrays.items()))
    if sorted(order) != sorted(arrays):
        raise WeightsError(
            f"{source}: metadata names {few(sorted(order))} do not match tensors "
            f"{few(sorted(arrays))}"
        )
    return {name: arrays[name] for name in order}


def read_file(path: Path, *, source: str = "payload") -> Weights:
    """Decode a safetensors file into Weights, in order, with one copy and no mapping."""
    stored = FileWeights(path, source=source)
    return {name: stored[name] for name in stored}


def num_bytes(weights: Mapping[str, Array]) -> int:
    return sum(a.nbytes for a in weights.values())


class FileWeights(Mapping[str, Array]):
    """The tensors of a safetensors file, read from disk when accessed, never memory-mapped.

    A received update is validated and folded block by block, so it never has to sit
    whole in server memory. Plain reads instead of a mapping matter: mapped pages that
    were touched count in the process's RSS until unmapped; page-cache pages do not.
    """

    BLOCK_BYTES = 4 << 20

    def __init__(self, path: Path, *, source: str = "payload", max_header: int = 0) -> None:
        """`max_header` (bytes; 0: any) bounds the header of a file a node sent before it
        is parsed: a header of a million empty tensors costs a gigabyte to parse."""
        if max_header:
            with path.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
            if header_len > max_header:
                raise WeightsError(
                    f"{source}: not a valid safetensors payload (a {header_len}-byte header; "
                    f"the expected tensors need at most {max_header})"
                )
        try:  # the library checks the header: offsets in bounds, sizes match dtypes and shapes
            with safe_open(str(path), framework="numpy") as checked:
                names: list[str] = list(checked.keys())
                metadata: dict[str, str] = checked.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{source}: not a valid safetensors payload ({exc})") from exc
        order = metadata.get(_ORDER_KEY)
        self._names = names if order is None else _parse_order(order, names, source)
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            self._header: dict[str, Any] = json.loads(f.read(header_len))
        self._data_start = 8 + header_len
        self.path = path
        self.source = source
        self.checked: Spec | None = None
        """The spec this file was validated against, so it is read once, not twice."""
        self.magnitude: float | None = None
        """Its largest absolute float value, measured by `validate`."""

    def layout(self, name: str) -> tuple[np.dtype[np.generic], tuple[int, ...]]:
        """dtype and shape from the header, without reading the data."""
        entry = self._header[name]
        code = entry["dtype"]
        if code not in _DTYPES:
            raise WeightsError(f"{self.source}: tensor {name!r} has unsupported dtype {code}")
        return np.dtype(_DTYPES[code]).newbyteorder("<"), tuple(entry["shape"])

    def blocks(self, name: str) -> Iterator[Array]:
        """The tensor flattened, in consecutive blocks of at most `BLOCK_BYTES`.

        Each block is a view of one reused buffer: use it before asking for the next.
        """
        dtype, shape = self.layout(name)
        count = int(np.prod(shape, dtype=np.int64))
        buffer = np.empty(max(1, min(count, self.BLOCK_BYTES // dtype.itemsize)), dtype)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self._data_start + self._header[name]["data_offsets"][0])
            for start in range(0, count, buffer.size):
                block = buffer[: min(buffer.size, count - start)]
                self._read_into(f, block, name)
                yield block

    def __getitem__(self, name: str) -> Array:
        if name not in self._names:
            raise KeyError(name)
        dtype, shape = self.layout(name)
        tensor: Array = np.empty(shape, dtype)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self._data_start + self._header[name]["data_offsets"][0])
            self._read_into(f, tensor.reshape(-1), name)
        return tensor

    def _read_into(self, f: Any, flat: Array, name: str) -> None:
        view = flat.data.cast("B")
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise WeightsError(f"{self.source}: tensor {name!r} is cut short in {self.path}")
            done += n

    def __contains__(self, name: object) -> bool:
        return name in self._header and name != "__metadata__"  # Mapping's would read it

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def blocks(weights: Mapping[str, Array], name: str) -> Iterator[Array]:
    """One tensor flattened, in blocks. A mapping with its own ``blocks(name)`` method (an
    update on disk, or one computed lazily) is streamed and never sits whole in memory."""
    own: Callable[[str], Iterator[Array]] | None = getattr(weights, "blocks", None)
    if own is not None:
        yield from own(name)
    else:
        yield np.asarray(weights[name]).reshape(-1)


def _parse_order(order: str, names: list[str], source: str) -> list[str]:
    parsed = _json(order, f"{source}: metadata {_ORDER_KEY!r} is not JSON")
    if not isinstance(parsed, list) or sorted(map(str, parsed)) != sorted(names):
        shown = few(parsed) if isinstance(parsed, list) else type(parsed).__name__
        raise WeightsError(
            f"{source}: metadata names {shown} do not match tensors {few(sorted(names))}"
        )
    return [str(n) for n in parsed]
