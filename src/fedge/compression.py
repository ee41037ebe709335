"""Update compression: a fit result travels as an encoded *update*, and is decoded back
to full weights (global + update) before any strategy sees it, so every strategy works
unchanged.

The update is the trained weights minus the weights the task sent, for the float
tensors; integer tensors (counters) travel as they are. q8, topk and stc lay the float
tensors end to end in the model's order, as one flat vector of N entries. On the wire an
update is *packed*: its arrays' bytes end to end, little-endian, with no header at all
(`pack`). The server knows the model, so it knows every array's name, dtype and shape
from the encoding and the payload's size alone (`layout`; stc adds its entry count,
its first four bytes); names and shapes need not travel. That matters for small
models: a safetensors header costs ~70 bytes a tensor, as much as the q8 codes of 70
weights, and was a fifth of a q8 update of a 650-weight model. The arrays, in their
order (the model's integer tensors follow them):

- ``fp16``: each float tensor's update in float16, in the model's order.
- ``q8``: ``q8.ranges`` float32 [tensors, 2], one (low, step) per float tensor, then
  ``q8.values`` uint8 [N]: an entry is ``low + q * step``, where q rounds ``(x - low) /
  step`` down or up at random with the probabilities that make it unbiased (stochastic
  rounding, as in QSGD: Alistarh et al., NeurIPS 2017). The draws are seeded from the
  task's seed, so a simulation and a fleet send the same bytes.
- ``topk``: ``topk.values`` float32 [K], then ``topk.indices`` [K], strictly increasing
  offsets into the flat vector — uint16 when N <= 65,536, else uint32 — so K is the
  payload's size over 6 (or 8) bytes: the largest entries of each tensor by magnitude
  (``topk_fraction`` of each, at least one). What is not sent stays with the client and
  is added to its next update (error feedback: Stich et al., "Sparsified SGD with
  Memory", NeurIPS 2018), so no part of an update is lost, only delayed.
- ``stc``: sparse ternary compression (Sattler et al., IEEE TNNLS 2019): the top
  ``stc_fraction`` of each tensor as topk picks them, each sent as +mu or -mu, mu the
  mean magnitude of the tensor's kept entries, and their positions Rice-coded
  (`fedge.rice`): ``stc.count`` uint32 [1] (K), ``stc.scales`` float32 [tensors] (mu),
  ``stc.fixed`` and ``stc.unary`` uint8, the two streams. An entry costs ~log2(1/p) +
  2.5 bits rather than 48, so the same bytes carry ~8x the entries; what ternarizing
  changes is held back by error feedback too.

`unpack` refuses a payload whose size is not one the model allows, and `check` one whose
arrays are not exactly what it allows — names, dtypes, shapes, finite values, positive
steps, index range and order, entry counts — saying what was expected; the server runs
both before it acknowledges an upload, and `decode` (the coordinator's, for every fleet)
runs `check` again before decoding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedge import rice
from fedge.client import Client, ClientWrapper, Config, FitResult
from fedge.config import STRONGEST_FIRST, CompressionSection
from fedge.errors import WeightsError
from fedge.weights import Array, CheckedWeights, Spec, TensorSpec, Weights, spec_of, validate

PLAIN = "safetensors"
"""The `UploadHeader.encoding` of plain weights; the others are named after their mode."""
ENCODINGS = STRONGEST_FIRST
Q8_LEVELS = 255
"""The largest q8 code: 256 levels between a tensor's smallest and largest entry."""
_Q8_STREAM = 0x7138
"""Mixed into the task's seed, so the rounding draws are not the client's training draws."""
_F32: np.dtype[np.generic] = np.dtype(np.float32)
_U8: np.dtype[np.generic] = np.dtype(np.uint8)
_U16: np.dtype[np.generic] = np.dtype(np.uint16)
_U32: np.dtype[np.generic] = np.dtype(np.uint32)

Float64s = npt.NDArray[np.float64]
Uplink = Callable[[], float | None]
"""The node's measured uplink in MB/s, or None before its first upload."""


def choose(settings: CompressionSection, uplink_mbps: float | None) -> str:
    """The encoding a node uses ("" for none). In mode "auto", the most compressing one
    whose threshold the measured uplink is below; none before any upload was measured:
    a full payload measures the link best, and costs a slow link one round."""
    if settings.mode != "auto":
        return "" if settings.mode == "none" else settings.mode
    if uplink_mbps is None:
        return ""
    for encoding in STRONGEST_FIRST:
        limit = settings.auto_thresholds.get(encoding)
        if limit is not None and uplink_mbps < limit:
            return encoding
    return ""


class Throughput:
    """A node's uplink as it measures it: payload bytes over seconds of its last upload.
    Small payloads read low (the round trip dominates): thresholds suit the model."""

    def __init__(self) -> None:
        self.mbps: float | None = None

    def record(self, size: int, seconds: float) -> None:
        if size > 0 and seconds > 0:
            self.mbps = size / seconds / 1e6

    def __call__(self) -> float | None:
        return self.mbps


def max_entries(size: int, fraction: float) -> int:
    """Entries a topk or stc update keeps of a tensor of `size`: the fraction, at least one."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


# --- the client side ---------------------------------------------------------------------


class Compressor:
    """Encodes one client's fit results. It holds that client's error-feedback residual,
    so there is one per client, kept across rounds — in memory: a node restarted starts
    again with none (what was held back is lost, the next updates are whole)."""

    def __init__(self, settings: CompressionSection, uplink: Uplink = lambda: None) -> None:
        self.settings, self.uplink = settings, uplink
        self.residual: dict[str, Array] = {}

    def compress(
        self, received: Mapping[str, Array], result: FitResult, config: Config
    ) -> FitResult:
        """`result` as the update from `received`, in the encoding chosen now. A residual
        held back by topk or stc goes out with the next update of any encoding."""
        encoding = choose(self.settings, self.uplink())
        if not encoding and not self.residual:
            return result
        spec = spec_of(received)
        trained = result.weights
        if isinstance(trained, Mapping):  # numpy scalars (0-d tensors) too, as plain ones go
            trained = {name: np.asarray(a) for name, a in trained.items()}
        validate(trained, spec, source="fit() result")
        update: dict[str, Float64s] = {}
        for name, _ in _floats(spec):
            delta = np.subtract(trained[name], received[name], dtype=np.float64)
            held = self.residual.get(name)
            update[name] = (delta if held is None else delta + held).reshape(-1)
        self.residual = {}
        ints = {n: trained[n] for n, s in spec.items() if not _is_float(s)}
        if not encoding:  # plain weights again, with what was held back
            plain = {
                n: np.add(received[n], update[n].reshape(s.shape)).astype(s.dtype)
                if n in update
                else ints[n]
                for n, s in spec.items()
            }
            return FitResult(plain, result.num_examples, result.metrics)
        if encoding == "fp16":
            arrays = _encode_fp16(update, spec)
        elif encoding == "q8":
            arrays = _encode_q8(update, int(config.get("seed", 0)))
        else:
            fraction = self.settings.fraction(encoding)
            arrays, self.residual = _encode_sparse(update, spec, fraction, encoding)
        return FitResult({**arrays, **ints}, result.num_examples, result.metrics, encoding)


class CompressClient(ClientWrapper):
    """Sends `inner`'s fit results compressed as `settings` say; the outermost wrapper
    (it compresses what the others made). `uplink` gives the node's measured uplink."""

    def __init__(
        self, inner: Client, settings: CompressionSection, *, uplink: Uplink = lambda: None
    ) -> None:
        super().__init__(inner)
        self.compressor = Compressor(settings, uplink)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        received = {name: a.copy() for name, a in weights.items()}  # fit may train in place
        return self.compressor.compress(received, self.inner.fit(weights, config), config)


def _encode_fp16(update: dict[str, Float64s], spec: Spec) -> Weights:
    arrays: Weights = {}
    for name, flat in update.items():
        with np.errstate(over="ignore"):  # refused below, with a message
            half = flat.astype(np.float16).reshape(spec[name].shape)
        if not np.all(np.isfinite(half)):
            raise WeightsError(
                f"fp16: the update of tensor {name!r} exceeds float16's range (±65504); "
                "use q8, which scales each tensor"
            )
        arrays[name] = half
    return arrays


def _encode_q8(update: dict[str, Float64s], seed: int) -> Weights:
    rng = np.random.default_rng([seed, _Q8_STREAM])
    total = sum(flat.size for flat in update.values())
    values = np.empty(total, _U8)
    ranges = np.empty((len(update), 2), _F32)
    offset = 0
    for i, (name, flat) in enumerate(update.items()):
        low, step = _q8_range(flat, name)
        codes = np.floor((flat - low) / step + rng.random(flat.size))
        values[offset : offset + flat.size] = np.clip(codes, 0, Q8_LEVELS)
        ranges[i] = low, step
        offset += flat.size
    return {"q8.ranges": ranges, "q8.values": values}


def _q8_range(flat: Float64s, name: str) -> tuple[np.float32, np.float32]:
    """(low, step) in float32 with low <= every entry <= low + 255 * step, so rounding
    never clips and stays unbiased; a constant tensor gets step 1 (every code 0)."""
    if flat.size == 0:
        return np.float32(0), np.float32(1)
    smallest, largest = float(flat.min()), float(flat.max())
    low = np.float32(smallest)
    if low > smallest:
        low = np.nextafter(low, np.float32(-np.inf))
    step = max(np.float32((largest - float(low)) / Q8_LEVELS), np.finfo(np.float32).tiny)
    while float(low) + Q8_LEVELS * float(step) < largest:
        step = np.nextafter(step, np.float32(np.inf))
    if not (math.isfinite(low) and math.isfinite(step)):
        raise WeightsError(f"q8: the update of tensor {name!r} exceeds float32's range")
    if largest == smallest:
        step = np.float32(1)
    return low, step


def _encode_sparse(
    update: dict[str, Float64s], spec: Spec, fraction: float, encoding: str
) -> tuple[Weights, dict[str, Array]]:
    """A topk or stc update, and the residual it holds back (error feedback)."""
    total = sum(flat.size for flat in update.values())
    if total > 1 << 32:
        raise WeightsError(f"{encoding}: {total} float entries; 2**32 at most can be indexed")
    kept, sent, residual, offset = [], [], {}, 0
    scales = np.empty(len(update), _F32)
    for i, (name, flat) in enumerate(update.items()):
        k = max_entries(flat.size, fraction)
        if k == flat.size:
            keep = np.arange(flat.size)
        else:
            keep = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        if encoding == "stc":
            scales[i] = np.mean(np.abs(flat[keep])) if k else 0
            values = np.where(flat[keep] < 0, -scales[i], scales[i])
        else:
            values = flat[keep].astype(_F32)
        rest = flat.copy()
        rest[keep] -= values  # what the encoding changed (rounding, ternarizing) is held too
        residual[name] = rest.reshape(spec[name].shape).astype(spec[name].dtype)
        kept.append(keep + offset)
        sent.append(values)
        offset += flat.size
    positions = np.concatenate(kept) if kept else np.empty(0, np.int64)
    values = np.concatenate(sent) if sent else np.empty(0, _F32)
    if encoding == "stc":
        fixed, unary = rice.encode(positions, values < 0, total)
        count = np.array([len(positions)], _U32)
        arrays = {"stc.count": count, "stc.scales": scales, "stc.fixed": fixed, "stc.unary": unary}
        return arrays, residual
    topk = {"topk.values": values, "topk.indices": positions.astype(_index_dtype(total))}
    return topk, residual


def _index_dtype(total: int) -> np.dtype[np.generic]:
    """topk's index type for a model of `total` float entries: the narrowest that does."""
    return _U16 if total <= 1 << 16 else _U32


def pack(arrays: Mapping[str, Array]) -> bytes:
    """The wire form of an encoded update: its arrays' bytes end to end, little-endian, in
    their order (the encoder's, which is `layout`'s). No header: the server knows it."""
    return b"".join(_little(a).tobytes() for a in arrays.values())


def pack_to(arrays: Mapping[str, Array], path: Path) -> None:
    """`pack` into a 0600 file (a large update), one array at a time."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        for a in arrays.values():
            f.write(_little(a).data)


def _little(a: Array) -> Array:
    a = np.asarray(a)
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).reshape(-1)


# --- the server side ---------------------------------------------------------------------


def check_size(
    encoding: str, spec: Spec, size: int, *, fraction: float = 1.0, source: str = "payload"
) -> None:
    """Refuse, before it is received, a payload size no `encoding` update of `spec` has."""
    if encoding != "stc":
        layout(encoding, spec, size, fraction=fraction, source=source)
        return
    floats = _floats(spec)
    least = _U32.itemsize + _F32.itemsize * len(floats)
    least += sum(_nbytes(s) for s in spec.values() if not _is_float(s))
    most = encoded_bytes(spec, encoding, fraction)
    if not least <= size <= most:
        raise WeightsError(
            f"{source}: an stc payload of this model (stc_fraction {fraction}) takes "
            f"{least}..{most} bytes; got {size}"
        )


def layout(
    encoding: str,
    spec: Spec,
    size: int,
    *,
    fraction: float = 1.0,
    source: str = "payload",
    count: int | None = None,
) -> Spec:
    """The arrays a packed `encoding` update of a model of `spec` holds, in order, if its
    payload is `size` bytes — else `WeightsError`, saying which sizes it could be. An stc
    payload's layout also depends on its entry `count`, its first four bytes."""
    floats = _floats(spec)
    ints = {n: s for n, s in spec.items() if not _is_float(s)}
    int_bytes = sum(_nbytes(s) for s in ints.values())
    total = sum(math.prod(s.shape) for _, s in floats)
    arrays: Spec
    if encoding == "fp16":
        arrays = {n: TensorSpec(np.dtype(np.float16), s.shape) for n, s in floats}
    elif encoding == "q8":
        arrays = {
            "q8.ranges": TensorSpec(_F32, (len(floats), 2)),
            "q8.values": TensorSpec(_U8, (total,)),
        }
    elif encoding == "topk":
        index = _index_dtype(total)
        entry = _F32.itemsize + index.itemsize
        most = sum(max_entries(math.prod(s.shape), fraction) for _, s in floats)
        count, extra = divmod(size - int_bytes, entry)
        if extra or not 0 <= count <= most:
            raise WeightsError(
                f"{source}: a topk payload of this model is {int_bytes} bytes of integer "
                f"tensors plus {entry} bytes (a float32 value and a {index} index) for each of "
                f"at most {most} entries (topk_fraction {fraction} of each of the "
                f"{len(floats)} float tensors, at least one each); got {size} bytes"
            )
        arrays = {
            "topk.values": TensorSpec(_F32, (count,)),
            "topk.indices": TensorSpec(index, (count,)),
        }
    elif encoding == "stc":
        most = sum(max_entries(math.prod(s.shape), fraction) for _, s in floats)
        if count is None or not 0 <= count <= most:
            raise WeightsError(
                f"{source}: {count} stc entries; at most {most} (stc_fraction {fraction} of "
                f"each of the {len(floats)} float tensors, at least one each)"
            )
        fixed = rice.fixed_bytes(total, count)
        low, high = rice.unary_bytes(total, count)
        head = _U32.itemsize + _F32.itemsize * len(floats) + fixed + int_bytes
        if not head + low <= size <= head + high:
            raise WeightsError(
                f"{source}: an stc payload of {count} entries of this model takes "
                f"{head + low}..{head + high} bytes; got {size}"
            )
        arrays = {
            "stc.count": TensorSpec(_U32, (1,)),
            "stc.scales": TensorSpec(_F32, (len(floats),)),
            "stc.fixed": TensorSpec(_U8, (fixed,)),
            "stc.unary": TensorSpec(_U8, (size - head,)),
        }
    else:
        raise WeightsError(f"{source}: encoding {encoding!r} is not one of {[PLAIN, *ENCODINGS]}")
    arrays = _with_ints(arrays, ints, encoding, source)
    expected = sum(_nbytes(s) for s in arrays.values())
    if size != expected:
        raise WeightsError(
            f"{source}: a {encoding} payload of this model is exactly {expected} bytes "
            f"({len(floats)} float tensors of {total} entries, {int_bytes} bytes of integer "
            f"tensors); got {size}"
        )
    return arrays


def unpack(
    data: bytes, encoding: str, spec: Spec, *, fraction: float = 1.0, source: str = "payload"
) -> CheckedWeights:
    """The arrays of a packed update, as read-only views of `data` (no copy); their
    values are `check`'s to judge."""
    arrays, offset = CheckedWeights(), 0
    count = _count(data[:4], encoding, source)
    found = layout(encoding, spec, len(data), fraction=fraction, source=source, count=count)
    for name, s in found.items():
        count = math.prod(s.shape)
        view = np.frombuffer(data, s.dtype.newbyteorder("<"), count, offset)
        arrays[name] = view.reshape(s.shape)
        offset += count * s.dtype.itemsize
    return arrays


class PackedFile(Mapping[str, Array]):
    """A packed update received into a file (a large one): each array is read from disk
    when asked for, so the update never sits whole in server memory while it waits."""

    def __init__(
        self, path: Path, encoding: str, spec: Spec, *, fraction: float = 1.0,
        source: str = "payload",
    ) -> None:  # fmt: skip
        self.path = path
        with path.open("rb") as f:
            count = _count(f.read(4), encoding, source)
        size = path.stat().st_size
        self._layout = layout(encoding, spec, size, fraction=fraction, source=source, count=count)
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, s in self._layout.items():
            self._offsets[name] = offset
            offset += _nbytes(s)
        self.checked: Spec | None = None
        self.magnitude: float | None = None

    def __getitem__(self, name: str) -> Array:
        s = self._layout[name]
        with self.path.open("rb") as f:
            f.seek(self._offsets[name])
            data = f.read(_nbytes(s))
        if len(data) != _nbytes(s):
            raise WeightsError(f"tensor {name!r} is cut short in {self.path}")
        return np.frombuffer(data, s.dtype.newbyteorder("<")).reshape(s.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)


def _count(head: bytes, encoding: str, source: str) -> int | None:
    """An stc payload's entry count: its first four bytes (None for other encodings)."""
    if encoding != "stc":
        return None
    if len(head) < 4:
        raise WeightsError(f"{source}: an stc payload starts with its 4-byte entry count")
    return int.from_bytes(head, "little")


def _nbytes(s: TensorSpec) -> int:
    return s.dtype.itemsize * math.prod(s.shape)


def encoded_bytes(spec: Spec, encoding: str, fraction: float = 1.0) -> int:
    """The most bytes a packed update of `spec` takes in `encoding` (a payload's bound)."""
    floats = _floats(spec)
    ints = sum(_nbytes(s) for s in spec.values() if not _is_float(s))
    sizes = [math.prod(s.shape) for _, s in floats]
    if encoding == "fp16":
        return ints + 2 * sum(sizes)
    if encoding == "q8":
        return ints + sum(sizes) + 2 * _F32.itemsize * len(sizes)
    if encoding == "topk":
        entry = _F32.itemsize + _index_dtype(sum(sizes)).itemsize
        return ints + entry * sum(max_entries(n, fraction) for n in sizes)
    if encoding == "stc":  # b shrinks as entries grow: b for one entry bounds them all
        most, total = sum(max_entries(n, fraction) for n in sizes), sum(sizes)
        fixed = -(-most * (rice.rice_bits(total, 1) + 1) // 8)
        head = _U32.itemsize + _F32.itemsize * len(sizes)
        return ints + head + fixed + -(-(most + total) // 8)
    raise WeightsError(f"encoding {encoding!r} is not one of {[PLAIN, *ENCODINGS]}")


def check(
    arrays: Mapping[str, Array],
    encoding: str,
    spec: Spec,
    *,
    fraction: float = 1.0,
    source: str = "payload",
) -> None:
    """Raise `WeightsError` unless `arrays` is an update of a model of `spec` in
    `encoding` (with at most `fraction` of each tensor's entries, for topk and stc)."""
    floats = _floats(spec)
    ints = {n: s for n, s in spec.items() if not _is_float(s)}
    if encoding == "fp16":
        validate(arrays, {n: TensorSpec(np.dtype(np.float16), s.shape) if _is_float(s) else s
                          for n, s in spec.items()}, source=source)  # fmt: skip
        return
    total = sum(math.prod(s.shape) for _, s in floats)
    if encoding == "q8":
        expected = {
            "q8.ranges": TensorSpec(_F32, (len(floats), 2)),
            "q8.values": TensorSpec(_U8, (total,)),
        }
        validate(arrays, _with_ints(expected, ints, encoding, source), source=source)
        steps = np.asarray(arrays["q8.ranges"])[:, 1]
        for (name, _), step in zip(floats, steps, strict=True):
            if not step > 0:
                raise WeightsError(
                    f"{source}: the q8 step of tensor {name!r} is {step}; expected > 0"
                )
        return
    if encoding == "stc":
        _check_stc(arrays, spec, fraction, source)
        return
    if encoding != "topk":
        raise WeightsError(f"{source}: encoding {encoding!r} is not one of {[PLAIN, *ENCODINGS]}")
    most = sum(max_entries(math.prod(s.shape), fraction) for _, s in floats)
    given = arrays.get("topk.indices") if isinstance(arrays, Mapping) else None
    count = 0
    if isinstance(given, np.ndarray):
        if given.ndim != 1:
            raise WeightsError(
                f"{source}: tensor 'topk.indices' has shape {list(given.shape)}, expected a "
                f"1-D array of at most {most} entries"
            )
        count = given.shape[0]
    if count > most:
        raise WeightsError(
            f"{source}: {count} topk entries; at most {most} (topk_fraction {fraction} of "
            f"each of the {len(floats)} float tensors, at least one each)"
        )
    expected = {
        "topk.values": TensorSpec(_F32, (count,)),
        "topk.indices": TensorSpec(_index_dtype(total), (count,)),
    }
    validate(arrays, _with_ints(expected, ints, encoding, source), source=source)
    if count == 0:
        return
    index: npt.NDArray[np.int64] = np.asarray(arrays["topk.indices"], dtype=np.int64)
    if count > 1:
        backwards = np.diff(index) <= 0
        if backwards.any():
            at = int(np.argmax(backwards)) + 1
            raise WeightsError(
                f"{source}: topk.indices must be strictly increasing (unique, in order); "
                f"entry {at} is {index[at]} after {index[at - 1]}"
            )
    if index[-1] >= total:
        raise WeightsError(
            f"{source}: topk index {index[-1]} is out of range; the float tensors have "
            f"{total} entries (0..{total - 1})"
        )
    _check_counts(index, floats, fraction, encoding, source)


def _check_stc(arrays: Mapping[str, Array], spec: Spec, fraction: float, source: str) -> None:
    floats = _floats(spec)
    given = arrays.get("stc.count") if isinstance(arrays, Mapping) else None
    if not (isinstance(given, np.ndarray) and given.dtype == _U32 and given.shape == (1,)):
        validate(arrays, {"stc.count": TensorSpec(_U32, (1,))}, source=source)  # says why
        raise WeightsError(f"{source}: tensor 'stc.count' is missing or malformed")
    size = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
    count = int(given[0])
    expected = layout("stc", spec, size, fraction=fraction, source=source, count=count)
    validate(arrays, expected, source=source)
    scales = np.asarray(arrays["stc.scales"])
    for (name, _), scale in zip(floats, scales, strict=True):
        if not scale >= 0:
            raise WeightsError(
                f"{source}: the stc scale of tensor {name!r} is {scale}; expected >= 0"
            )
    total = sum(math.prod(s.shape) for _, s in floats)
    positions, _ = rice.decode(
        np.asarray(arrays["stc.fixed"]), np.asarray(arrays["stc.unary"]), count, total,
        source=source,
    )  # fmt: skip
    _check_counts(positions, floats, fraction, "stc", source)


def _check_counts(
    positions: npt.NDArray[np.int64],
    floats: list[tuple[str, TensorSpec]],
    fraction: float,
    encoding: str,
    source: str,
) -> None:
    """No tensor has more entries than `fraction` of it allows."""
    ends = np.cumsum([math.prod(s.shape) for _, s in floats])
    counts = np.diff(np.searchsorted(positions, ends), prepend=0)
    for (name, s), found in zip(floats, counts, strict=True):
        allowed = max_entries(math.prod(s.shape), fraction)
        if found > allowed:
            raise WeightsError(
                f"{source}: {found} {encoding} entries in tensor {name!r}; at most {allowed} "
                f"({encoding}_fraction {fraction} of {math.prod(s.shape)})"
            )


def decode(
    arrays: Mapping[str, Array],
    encoding: str,
    base: Mapping[str, Array],
    spec: Spec,
    *,
    source: str = "payload",
) -> Weights:
    """The full weights an encoded update of `base` stands for (checked first)."""  # fmt: skip
    check(arrays, encoding, spec, source=source)
    weights: Weights = {}
    updates = _updates(arrays, encoding, spec)
    for name, s in spec.items():
        if _is_float(s):
            update = next(updates).reshape(s.shape)
            weights[name] = np.add(base[name], update, dtype=np.float64).astype(s.dtype)
        else:
            weights[name] = np.array(arrays[name])
    return weights


def _updates(arrays: Mapping[str, Array], encoding: str, spec: Spec) -> Iterator[Float64s]:
    """Each float tensor's update, flat, in the model's order."""
    floats = _floats(spec)
    if encoding == "fp16":
        for name, _ in floats:
            yield np.asarray(arrays[name], dtype=np.float64).reshape(-1)
        return
    total = sum(math.prod(s.shape) for _, s in floats)
    if encoding == "q8":
        codes, ranges = np.asarray(arrays["q8.values"]), np.asarray(arrays["q8.ranges"])
        flat = np.empty(total)
        offset = 0
        for (_, s), (low, step) in zip(floats, ranges.astype(np.float64), strict=True):
            size = math.prod(s.shape)
            flat[offset : offset + size] = low + codes[offset : offset + size] * step
            offset += size
    elif encoding == "stc":
        count, scales = int(arrays["stc.count"][0]), np.asarray(arrays["stc.scales"], np.float64)
        fixed, unary = np.asarray(arrays["stc.fixed"]), np.asarray(arrays["stc.unary"])
        positions, negative = rice.decode(fixed, unary, count, total, source="stc")
        ends = np.cumsum([math.prod(s.shape) for _, s in floats])
        magnitude = scales[np.searchsorted(ends, positions, side="right")]
        flat = np.zeros(total)
        flat[positions] = np.where(negative, -magnitude, magnitude)
    else:
        flat = np.zeros(total)
        flat[np.asarray(arrays["topk.indices"], dtype=np.int64)] = arrays["topk.values"]
    offset = 0
    for _, s in floats:
        size = math.prod(s.shape)
        yield flat[offset : offset + size]
        offset += size


def _with_ints(expected: Spec, ints: Spec, encoding: str, source: str) -> Spec:
    taken = sorted(set(expected) & set(ints))
    if taken:
        raise WeightsError(
            f"{source}: the model's tensor {taken[0]!r} has a name the {encoding} encoding "
            "uses; this model cannot be sent in it"
        )
    return {**expected, **ints}


def _floats(spec: Spec) -> list[tuple[str, TensorSpec]]:
    return [(name, s) for name, s in spec.items() if _is_float(s)]


def _is_float(s: TensorSpec) -> bool:
    return bool(np.issubdtype(s.dtype, np.floating))


__all__ = [
    "ENCODINGS",
    "PLAIN",
    "CompressClient",
    "Compressor",
    "PackedFile",
    "Throughput",
    "check",
    "check_size",
    "choose",
    "decode",
    "encoded_bytes",
    "layout",
    "max_entries",
    "pack",
    "pack_to",
    "unpack",
]
