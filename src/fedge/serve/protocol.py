"""The request formats users already speak, turned into checked model inputs and back:
the Open Inference Protocol (KServe v2, with its binary tensor extension, as Triton and
KServe clients send it) and the TF Serving / KServe v1 ``{"instances": …}`` predict."""

from __future__ import annotations

from math import prod
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np

from fedge.serve.model import NUMPY_OF, BadInput, ServedModel, as_array, check_shape

MAX_TENSORS = 64
T = TypeVar("T")
Text = Annotated[str, msgspec.Meta(max_length=256)]
Shape = Annotated[list[int], msgspec.Meta(max_length=8)]
Parameters = Annotated[dict[Text, Any], msgspec.Meta(max_length=32)]


class InferInput(msgspec.Struct, frozen=True):
    name: Text
    shape: Shape
    datatype: Text
    data: Any = None
    parameters: Parameters = {}


class RequestedOutput(msgspec.Struct, frozen=True):
    name: Text
    parameters: Parameters = {}


class InferRequest(msgspec.Struct, frozen=True):
    inputs: Annotated[list[InferInput], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]
    id: Text = ""
    parameters: Parameters = {}
    outputs: Annotated[list[RequestedOutput], msgspec.Meta(max_length=MAX_TENSORS)] = []


class PredictRequest(msgspec.Struct, frozen=True):
    instances: Any = None
    inputs: Any = None


def decode_v2(
    body: bytes, header_length: int | None, model: ServedModel
) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its inputs; with `header_length` (the binary extension's
    Inference-Header-Content-Length) the JSON is followed by raw tensor bytes."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadInput(
            f"Inference-Header-Content-Length is {header_length}, the body has {len(body)} bytes"
        )
    header = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(header) :]
    request = _decode(header, InferRequest)
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(request.inputs):
        where = f"inputs[{i}]"
        spec = model.spec(item.name, where)
        if item.name in feeds:
            raise BadInput(f"{where}: input {item.name!r} is given twice")
        if item.datatype != spec.datatype:
            raise BadInput(
                f"{where}: input {item.name!r} must be {spec.describe()}, got datatype "
                f"{item.datatype!r}"
            )
        size = item.parameters.get("binary_data_size")
        if size is not None:
            check_shape(item.shape, where)
            want = prod(item.shape) * spec.dtype.itemsize
            if not isinstance(size, int) or size != want or offset + size > len(binary):
                raise BadInput(
                    f"{where}: binary_data_size must be {want} bytes for shape {item.shape} "
                    f"of {item.datatype}, got {size!r} with {len(binary) - offset} bytes left"
                )
            array = np.frombuffer(binary[offset : offset + size], NUMPY_OF[item.datatype])
            array = array.reshape(item.shape)
            offset += size
        elif item.data is None:
            raise BadInput(f"{where}: input {item.name!r} has neither data nor binary_data_size")
        else:
            array = as_array(item.data, spec, item.shape, where)
        spec.check(array, where)
        feeds[item.name] = array
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data follow the last input")
    return request, feeds


def encode_v2(
    model: ServedModel, request: InferRequest, results: list[np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON plus raw bytes for the outputs
    the request asked to receive as binary data."""
    by_name = {spec.name: (spec, array) for spec, array in zip(model.outputs, results, strict=True)}
    wanted = request.outputs or [RequestedOutput(spec.name) for spec in model.outputs]
    binary_all = bool(request.parameters.get("binary_data_output"))
    outputs, blobs = [], []
    for i, item in enumerate(wanted):
        if item.name not in by_name:
            raise BadInput(
                f"outputs[{i}]: the model has no output {item.name!r}; its outputs are "
                + ", ".join(repr(name) for name in by_name)
            )
        spec, array = by_name[item.name]
        out: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if binary_all or item.parameters.get("binary_data"):
            data = np.ascontiguousarray(array).tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    header = msgspec.json.encode(
        {
            "model_name": model.name,
            "model_version": model.version,
            "id": request.id,
            "outputs": outputs,
        }
    )
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def decode_v1(body: bytes, model: ServedModel) -> dict[str, np.ndarray]:
    """``{"instances": [row, …]}`` (one input; or rows of {input: value}) or TF's
    columnar ``{"inputs": value | {input: value}}``."""
    request = _decode(body, PredictRequest)
    if (request.instances is None) == (request.inputs is None):
        raise BadInput('the body must have exactly one of "instances" and "inputs"')
    rows = request.instances if request.instances is not None else request.inputs
    where = "instances" if request.instances is not None else "inputs"
    if (
        request.instances is not None
        and isinstance(rows, list)
        and rows
        and all(isinstance(row, dict) for row in rows)
    ):
        columns = {name: [row.get(name) for row in rows] for name in rows[0]}
        return _columns(columns, model, where)
    if isinstance(rows, dict):
        return _columns(rows, model, where)
    if len(model.inputs) != 1:
        raise BadInput(
            f"{where}: the model has {len(model.inputs)} inputs; give each row as "
            "{name: value} for " + ", ".join(repr(s.name) for s in model.inputs)
        )
    spec = model.inputs[0]
    array = as_array(rows, spec, None, where)
    spec.check(array, where)
    return {spec.name: array}


def encode_v1(model: ServedModel, results: list[np.ndarray]) -> bytes:
    if len(results) == 1:
        return msgspec.json.encode({"predictions": results[0].tolist()})
    names = [spec.name for spec in model.outputs]
    if len({len(array) for array in results}) > 1:  # no common batch: TF's columnar form
        return msgspec.json.encode(
            {"outputs": dict(zip(names, (a.tolist() for a in results), strict=True))}
        )
    rows = zip(*(array.tolist() for array in results), strict=True)
    return msgspec.json.encode(
        {"predictions": [dict(zip(names, row, strict=True)) for row in rows]}
    )


def _columns(columns: dict[str, Any], model: ServedModel, where: str) -> dict[str, np.ndarray]:
    feeds = {}
    for name, value in columns.items():
        spec = model.spec(str(name), where)
        array = as_array(value, spec, None, f"{where}.{name}")
        spec.check(array, f"{where}.{name}")
        feeds[spec.name] = array
    return feeds


def _decode(data: bytes | memoryview, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise BadInput(f"the request does not fit the protocol: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadInput(f"the request is not valid JSON: {exc}") from None
