"""A model being served: one ONNX Runtime session, what it expects, and runs whose inputs
are checked against that first, so a wrong request gets a 400 that names the expected
shape and dtype instead of an ONNX Runtime stack trace."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.errors import FedgeError

if TYPE_CHECKING:
    from fedge.store import Manifest

ORT_DTYPES = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("float", "float32"), ("double", "float64"), ("float16", "float16"),
        ("int64", "int64"), ("int32", "int32"), ("int16", "int16"), ("int8", "int8"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64"),
        ("bool", "bool"),
    ]
}  # fmt: skip
"""ONNX Runtime's tensor type names -> NumPy."""

DATATYPES = {
    np.dtype(dtype): name
    for dtype, name in [
        ("float32", "FP32"), ("float64", "FP64"), ("float16", "FP16"), ("int64", "INT64"),
        ("int32", "INT32"), ("int16", "INT16"), ("int8", "INT8"), ("uint8", "UINT8"),
        ("uint16", "UINT16"), ("uint32", "UINT32"), ("uint64", "UINT64"), ("bool", "BOOL"),
    ]
}  # fmt: skip
"""NumPy -> the Open Inference Protocol's datatype names."""
NUMPY_OF = {name: dtype for dtype, name in DATATYPES.items()}

MAX_DIMS = 8


class BadInput(FedgeError):
    """The request does not fit the model (HTTP 400)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output; -1 is a dynamic dimension (the batch, usually)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        return DATATYPES[self.dtype]

    def describe(self) -> str:
        dims = ", ".join("N" if d < 0 else str(d) for d in self.shape)
        return f"{self.datatype} [{dims}]"

    def check(self, array: np.ndarray, where: str) -> None:
        if array.dtype != self.dtype:
            raise BadInput(
                f"{where}: input {self.name!r} must be {self.describe()}, got "
                f"{DATATYPES.get(array.dtype, str(array.dtype))}"
            )
        fits = len(array.shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, array.shape, strict=True)
        )
        if not fits:
            raise BadInput(
                f"{where}: input {self.name!r} must be {self.describe()}, got shape "
                f"[{', '.join(map(str, array.shape))}]"
            )


@dataclass
class ServedModel:
    """An ONNX model ready to run. Immutable once built: a swap replaces the whole
    object, so a request that holds one finishes on it."""

    name: str
    version: str
    session: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    manifest: Manifest | None = None
    providers: tuple[str, ...] = ()
    loaded_at: float = 0.0
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    row_seconds: float = field(default=1.0, repr=False)
    """What one example took in the last run: the server runs cheap requests inline."""

    @classmethod
    def load(
        cls, path: Path, name: str, version: str, *, manifest: Manifest | None = None,
        threads: int = 0,
    ) -> ServedModel:  # fmt: skip
        """Open `path` with the best execution provider installed (OpenVINO, else CPU)
        and run it once on zeros, so the first request does not pay for the warm-up."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        wanted = [p for p in ("OpenVINOExecutionProvider",) if p in ort.get_available_providers()]
        try:
            session = ort.InferenceSession(
                str(path), options, providers=[*wanted, "CPUExecutionProvider"]
            )
            inputs = tuple(_spec(arg) for arg in session.get_inputs())
            outputs = tuple(_spec(arg) for arg in session.get_outputs())
        except KeyError as exc:
            raise FedgeError(f"{path}: the model has a non-tensor input or output {exc}") from None
        except Exception as exc:  # onnxruntime's exception types are not exported
            raise FedgeError(
                f"{path}: ONNX Runtime cannot load it: {' '.join(str(exc).split())}"
            ) from None
        model = cls(
            name, version, session, inputs, outputs, manifest,
            tuple(session.get_providers()), time.time(),
            {spec.name: spec for spec in inputs},
        )  # fmt: skip
        model.run({s.name: np.zeros([1 if d < 0 else d for d in s.shape], s.dtype) for s in inputs})
        return model

    def spec(self, name: str, where: str) -> TensorSpec:
        found = self._by_name.get(name)
        if found is None:
            raise BadInput(
                f"{where}: the model has no input {name!r}; its inputs are "
                + ", ".join(f"{s.name!r} {s.describe()}" for s in self.inputs)
            )
        return found

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in `outputs` order, for checked `feeds` (one per input)."""
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise BadInput(
                f"missing input(s) {', '.join(map(repr, missing))}; the model needs "
                + ", ".join(f"{s.name!r} {s.describe()}" for s in self.inputs)
            )
        for name, array in feeds.items():
            self.spec(name, "request").check(array, "request")
        started = time.perf_counter()
        results = list(self.session.run(None, feeds))
        self.row_seconds = (time.perf_counter() - started) / rows(feeds)
        return results

    def expected_seconds(self, feeds: dict[str, np.ndarray]) -> float:
        """How long running `feeds` should take, from the last run."""
        return self.row_seconds * rows(feeds)


def rows(feeds: dict[str, np.ndarray]) -> int:
    """The batch size: the longest first dimension among the inputs."""
    return max([len(array) for array in feeds.values() if array.ndim] + [1])


def as_array(data: Any, spec: TensorSpec, shape: list[int] | None, where: str) -> np.ndarray:
    """JSON numbers (flat or nested) as the array `spec` expects, with the request's
    `shape` when given; the element count must match the shape exactly."""
    try:
        array = np.asarray(data, dtype=spec.dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(
            f"{where}: {spec.name!r} must hold {spec.describe()} numbers: {exc}"
        ) from None
    if shape is not None:
        check_shape(shape, where)
        if array.size != prod(shape):
            raise BadInput(
                f"{where}: shape [{', '.join(map(str, shape))}] needs {prod(shape)} values, "
                f"got {array.size}"
            )
        array = array.reshape(shape)
    return array


def check_shape(shape: list[int], where: str) -> None:
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise BadInput(f"{where}: shape must be at most {MAX_DIMS} dimensions >= 0, got {shape}")


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, ORT_DTYPES[arg.type], shape)
