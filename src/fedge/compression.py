"""Update compression: a fit result travels as an encoded *update*, and is decoded back
to full weights (global + update) before any strategy sees it, so every strategy works
unchanged.

The update is the trained weights minus the weights the task sent, for the float
tensors; integer tensors (counters) travel as they are. q8 and topk lay the float
tensors end to end in the model's order, as one flat vector of N entries, so their
payload has two tensors rather than two per layer: a safetensors header entry costs
~70 bytes, as much as the q8 codes of 70 weights. Every encoding is a safetensors
payload, checked as strictly as plain weights:

- ``fp16``: each float tensor's update in float16, under its own name.
- ``q8``: ``q8.values`` uint8 [N] and ``q8.ranges`` float32 [tensors, 2], one (low,
  step) per float tensor: an entry is ``low + q * step``, where q rounds ``(x - low) /
  step`` down or up at random with the probabilities that make it unbiased (stochastic
  rounding, as in QSGD: Alistarh et al., NeurIPS 2017). The draws are seeded from the
  task's seed, so a simulation and a fleet send the same bytes.
- ``topk``: ``topk.indices`` uint32 [K], strictly increasing offsets into the flat
  vector, and ``topk.values`` float32 [K]: the largest entries of each tensor by
  magnitude (``topk_fraction`` of each, at least one). What is not sent stays with the
  client and is added to its next update (error feedback: Stich et al., "Sparsified SGD
  with Memory", NeurIPS 2018), so no part of an update is lost, only delayed.

`check` refuses a payload that is not exactly what the model allows — names, dtypes,
shapes, finite values, positive steps, index range and order, entry counts — saying
what was expected; the server runs it before it acknowledges an upload, and `decode`
(the coordinator's, for every fleet) runs it again before decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import numpy.typing as npt

from fedge.client import Client, ClientWrapper, Config, FitResult
from fedge.config import STRONGEST_FIRST, CompressionSection
from fedge.errors import WeightsError
from fedge.weights import Array, Spec, TensorSpec, Weights, spec_of, validate

PLAIN = "safetensors"
"""The `UploadHeader.encoding` of plain weights; the others are named after their mode."""
ENCODINGS = STRONGEST_FIRST
Q8_LEVELS = 255
"""The largest q8 code: 256 levels between a tensor's smallest and largest entry."""
_Q8_STREAM = 0x7138
"""Mixed into the task's seed, so the rounding draws are not the client's training draws."""
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_U32 = np.dtype(np.uint32)

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
    """Entries a topk update keeps of a tensor of `size`: the fraction, at least one."""
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
        held back by topk goes out with the next update of any encoding."""
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
        if not encoding:  # plain weights again, with what topk held back
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
            arrays, self.residual = _encode_topk(update, spec, self.settings.topk_fraction)
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
    return {"q8.values": values, "q8.ranges": ranges}


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


def _encode_topk(
    update: dict[str, Float64s], spec: Spec, fraction: float
) -> tuple[Weights, dict[str, Array]]:
    total = sum(flat.size for flat in update.values())
    if total >= 1 << 32:
        raise WeightsError(f"topk: {total} float entries; uint32 indices address fewer than 2**32")
    indices, values, residual, offset = [], [], {}, 0
    for name, flat in update.items():
        k = max_entries(flat.size, fraction)
        if k == flat.size:
            keep = np.arange(flat.size)
        else:
            keep = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        sent = flat[keep].astype(_F32)
        rest = flat.copy()
        rest[keep] -= sent  # what float32 rounding lost is held back too
        residual[name] = rest.reshape(spec[name].shape).astype(spec[name].dtype)
        indices.append((keep + offset).astype(_U32))
        values.append(sent)
        offset += flat.size
    arrays: Weights = {
        "topk.indices": np.concatenate(indices) if indices else np.empty(0, _U32),
        "topk.values": np.concatenate(values) if values else np.empty(0, _F32),
    }
    return arrays, residual


# --- the server side ---------------------------------------------------------------------


def encoded_bytes(spec: Spec, encoding: str, fraction: float = 1.0) -> int:
    """The most tensor bytes an update of `spec` takes in `encoding` (a payload's bound)."""
    floats = _floats(spec)
    ints = sum(s.dtype.itemsize * math.prod(s.shape) for s in spec.values() if not _is_float(s))
    sizes = [math.prod(s.shape) for _, s in floats]
    if encoding == "fp16":
        return ints + 2 * sum(sizes)
    if encoding == "q8":
        return ints + sum(sizes) + 2 * _F32.itemsize * len(sizes)
    if encoding == "topk":
        return ints + (_U32.itemsize + _F32.itemsize) * sum(max_entries(n, fraction) for n in sizes)
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
    `encoding` (with at most `fraction` of each tensor's entries, for topk)."""
    floats = _floats(spec)
    ints = {n: s for n, s in spec.items() if not _is_float(s)}
    if encoding == "fp16":
        validate(arrays, {n: TensorSpec(np.dtype(np.float16), s.shape) if _is_float(s) else s
                          for n, s in spec.items()}, source=source)  # fmt: skip
        return
    total = sum(math.prod(s.shape) for _, s in floats)
    if encoding == "q8":
        expected = {
            "q8.values": TensorSpec(_U8, (total,)),
            "q8.ranges": TensorSpec(_F32, (len(floats), 2)),
        }
        validate(arrays, _with_ints(expected, ints, encoding, source), source=source)
        steps = np.asarray(arrays["q8.ranges"])[:, 1]
        for (name, _), step in zip(floats, steps, strict=True):
            if not step > 0:
                raise WeightsError(
                    f"{source}: the q8 step of tensor {name!r} is {step}; expected > 0"
                )
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
        "topk.indices": TensorSpec(_U32, (count,)),
        "topk.values": TensorSpec(_F32, (count,)),
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
    ends = np.cumsum([math.prod(s.shape) for _, s in floats])
    counts = np.diff(np.searchsorted(index, ends), prepend=0)
    for (name, s), found in zip(floats, counts, strict=True):
        allowed = max_entries(math.prod(s.shape), fraction)
        if found > allowed:
            raise WeightsError(
                f"{source}: {found} topk entries in tensor {name!r}; at most {allowed} "
                f"(topk_fraction {fraction} of {math.prod(s.shape)})"
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
    "Throughput",
    "check",
    "choose",
    "decode",
    "encoded_bytes",
    "max_entries",
]
