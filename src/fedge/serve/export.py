"""`fedge export`: a model's weights and its app's inference graph as one ONNX file.

Weights alone do not say what computes with them, so the app does (`App.onnx_model`);
the adapters supply ready graphs (`fedge.adapters.numpy.softmax_onnx`,
`fedge.adapters.torch.to_onnx`). Before the file is written the weights are checked
against the app's own tensors, the graph by the ONNX checker, and one batch of zeros by
ONNX Runtime, so a file that exists is one a service can load and run.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.checkpoint import is_checkpoint, load_checkpoint
from fedge.errors import FedgeError
from fedge.serve.model import ORT_DTYPES
from fedge.weights import Array, Weights, read_file, spec_of, validate

if TYPE_CHECKING:
    from onnx import ModelProto, ValueInfoProto

    from fedge.app import App

MAX_BYTES = (2 << 30) - 1
"""A protobuf message holds at most 2 GiB; larger models need ONNX external data."""


class ExportError(FedgeError):
    """The app cannot be exported, or what it built is not a model ONNX Runtime runs."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of the graph; a `str` dimension is dynamic (e.g. ``batch``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class ExportInfo:
    """What was written: what a service must feed the model and what it gets back."""

    path: Path
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    size: int
    sha256: str


def read_weights(path: Path) -> Weights:
    """The model in a safetensors file: plain weights (``--model-out``) or a checkpoint."""
    if not path.is_file():
        raise FedgeError(f"{path}: no such weights file")
    if is_checkpoint(path):
        return load_checkpoint(path).weights
    return read_file(path, source=str(path))


def export_onnx(
    app: App, weights: Mapping[str, Array], out: Path, *, source: str = "weights"
) -> ExportInfo:
    """Build `app`'s graph with `weights`, check it, run it once, write it to `out`.

    `source` names where the weights came from in errors (e.g. the file). `out` is
    replaced atomically and is 0600, like every model fedge writes.
    """
    if app.onnx_model is None:
        raise ExportError(
            "the app has no ONNX export: give it one with fedge.App(..., onnx_model=FN), "
            "FN(weights) -> onnx.ModelProto, e.g. fedge.adapters.numpy.softmax_onnx or "
            "lambda w: fedge.adapters.torch.to_onnx(Net(), w, input_shape=(...))"
        )
    onnx, ort = _serve_modules()
    if app.initial_weights is not None:  # the app's own tensors: names, dtypes and shapes
        validate(weights, spec_of(app.initial_weights), source=source)
    model = app.onnx_model(dict(weights))
    if not isinstance(model, onnx.ModelProto):
        raise ExportError(
            f"the app's onnx_model returned {type(model).__name__}, expected an onnx.ModelProto"
        )
    if model.ByteSize() > MAX_BYTES:  # checked first: the checker refuses them in memory
        raise ExportError(
            f"the model takes {model.ByteSize()} bytes; above 2 GiB ONNX needs external "
            "data files, which fedge export does not write yet"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"the app's onnx_model built an invalid ONNX model: {_line(exc)}"
        ) from None
    data = model.SerializeToString()
    _run_once(ort, data)
    _write(data, out)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportInfo(
        out,
        opset,
        tuple(_info(v) for v in model.graph.input if not _is_initializer(model, v.name)),
        tuple(_info(v) for v in model.graph.output),
        len(data),
        hashlib.sha256(data).hexdigest(),
    )


def _serve_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"exporting needs onnx and onnxruntime ({exc.name} is missing): "
            "pip install 'fedge[serve]'"
        ) from None
    return onnx, onnxruntime


def _run_once(ort: Any, data: bytes) -> None:
    """Run a batch of two zero examples: the file loads and every output has its shape."""
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        feeds = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) else 2 for d in arg.shape]
            feeds[arg.name] = np.zeros(shape, ORT_DTYPES[arg.type])
        results = session.run(None, feeds)
    except KeyError as exc:
        raise ExportError(f"the model has an input of type {exc}, not a plain tensor") from None
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise ExportError(f"ONNX Runtime cannot run the model: {_line(exc)}") from None
    for arg, result in zip(session.get_outputs(), results, strict=True):
        want = [d if isinstance(d, int) else None for d in arg.shape]
        got = list(np.shape(result))
        if len(want) != len(got) or any(w not in (None, g) for w, g in zip(want, got, strict=True)):
            raise ExportError(
                f"output {arg.name!r} is declared {arg.shape} but ONNX Runtime computed {got}"
            )


def _line(exc: Exception) -> str:
    """The libraries' multi-line messages as one line: the CLI prints errors as one."""
    return " ".join(str(exc).split())


def _write(data: bytes, out: Path) -> None:
    temp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, out)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ExportError(f"{out}: cannot write the model ({exc.strerror or exc})") from None


def _is_initializer(model: ModelProto, name: str) -> bool:
    return any(init.name == name for init in model.graph.initializer)


def _info(value: ValueInfoProto) -> TensorInfo:
    from onnx import helper

    tensor = value.type.tensor_type
    dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
    return TensorInfo(value.name, str(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)
