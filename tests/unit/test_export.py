"""ONNX export: the two examples' trained models, run by ONNX Runtime on their real test
data, give what NumPy and PyTorch give; weights that do not fit the app, and an app
without an export, are refused with errors that name the cause."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import fedge
from fedge.adapters.numpy import softmax_logits, softmax_onnx
from fedge.checkpoint import Checkpoint, save_checkpoint
from fedge.errors import FedgeError, WeightsError
from fedge.serve.export import ExportError, TensorInfo, export_onnx, read_weights
from fedge.weights import Weights, to_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5


def example(name: str) -> ModuleType:
    """An example's app module, under a name of its own (both are ``app``)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / name / "app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained(app: fedge.App, **config: Any) -> Weights:
    """Weights after one client's local training: not the zeros or the random start."""
    assert app.initial_weights is not None
    return app.client_fn(0).fit(app.initial_weights, {"round": 1, "seed": 0, **config}).weights


def run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    return example("digits")


@pytest.fixture(scope="module")
def digits_app(digits: ModuleType) -> fedge.App:
    return digits.create_app(num_clients=4, seed=0)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def digits_weights(digits_app: fedge.App) -> Weights:
    return trained(digits_app, lr=0.5)


# --- NumPy softmax regression (examples/digits) -------------------------------------------


def test_digits_model_in_onnx_runtime_matches_numpy_on_the_test_split(
    digits: ModuleType, digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    _, _, x_test, y_test = digits._split(0)
    info = export_onnx(digits_app, digits_weights, tmp_path / "digits.onnx")

    got = run(info.path, x_test)
    logits = softmax_logits(digits_weights, x_test)
    assert np.abs(got["logits"] - logits).max() <= TOLERANCE
    assert np.abs(got["probabilities"] - softmax(logits)).max() <= TOLERANCE
    accuracy = float((got["probabilities"].argmax(axis=1) == y_test).mean())
    assert accuracy > 0.8, "trained weights, so the comparison is not of zeros"


def test_export_reports_the_graphs_interface_and_writes_a_private_file(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    info = export_onnx(digits_app, digits_weights, tmp_path / "digits.onnx")

    assert info.inputs == (TensorInfo("input", "float32", ("batch", 64)),)
    assert info.outputs == (
        TensorInfo("logits", "float32", ("batch", 10)),
        TensorInfo("probabilities", "float32", ("batch", 10)),
    )
    assert info.opset == 18
    data = info.path.read_bytes()
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert info.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["digits.onnx"], "no temporary file left"
    assert str(info.inputs[0]) == "input float32[batch, 64]"


def test_the_batch_dimension_is_dynamic(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    info = export_onnx(digits_app, digits_weights, tmp_path / "digits.onnx")
    rng = np.random.default_rng(0)
    for batch in (1, 3, 500):
        x = rng.random((batch, 64), dtype=np.float32)
        logits = run(info.path, x)["logits"]
        assert logits.shape == (batch, 10)
        assert np.abs(logits - softmax_logits(digits_weights, x)).max() <= TOLERANCE


def test_weights_missing_a_tensor_are_refused_naming_it(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    out = tmp_path / "digits.onnx"
    with pytest.raises(WeightsError, match=r"model.safetensors: missing tensor\(s\) \['bias'\]"):
        export_onnx(
            digits_app, {"weight": digits_weights["weight"]}, out, source="model.safetensors"
        )
    assert not out.exists()


def test_weights_of_the_wrong_shape_are_refused_naming_the_tensor(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    bad = {**digits_weights, "weight": digits_weights["weight"][:, :9]}
    with pytest.raises(
        WeightsError, match=r"tensor 'weight' has shape \[64, 9\], expected \[64, 10\]"
    ):
        export_onnx(digits_app, bad, tmp_path / "digits.onnx")


def test_softmax_onnx_checks_its_tensors_when_the_app_has_no_initial_weights(
    digits_weights: Weights, tmp_path: Path
) -> None:
    app = fedge.App(lambda cid: None, onnx_model=softmax_onnx)  # type: ignore[arg-type,return-value]
    bad = {**digits_weights, "bias": digits_weights["bias"][:9]}
    with pytest.raises(WeightsError, match=r"tensor 'bias' has shape \[9\], expected \[10\]"):
        export_onnx(app, bad, tmp_path / "m.onnx")
    with pytest.raises(WeightsError, match=r"missing tensor 'weight'"):
        export_onnx(app, {"bias": digits_weights["bias"]}, tmp_path / "m.onnx")
    with pytest.raises(WeightsError, match=r"'weight' must be \[features, classes\], got"):
        export_onnx(app, {**digits_weights, "weight": np.zeros(3, np.float32)}, tmp_path / "m")


def test_an_app_without_an_export_is_refused_precisely(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    app = fedge.App(digits_app.client_fn, digits_app.initial_weights)
    with pytest.raises(ExportError, match=r"the app has no ONNX export: .*onnx_model="):
        export_onnx(app, digits_weights, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_hook_that_builds_no_valid_model_is_refused(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path
) -> None:
    not_a_model = fedge.App(digits_app.client_fn, onnx_model=lambda w: b"onnx")  # type: ignore[arg-type,return-value]
    with pytest.raises(ExportError, match=r"returned bytes, expected an onnx\.ModelProto"):
        export_onnx(not_a_model, digits_weights, tmp_path / "m.onnx")

    def unknown_operator(weights: Weights) -> Any:
        model = softmax_onnx(weights)
        model.graph.node[1].op_type = "Frobnicate"
        return model

    invalid = fedge.App(digits_app.client_fn, onnx_model=unknown_operator)
    with pytest.raises(ExportError, match=r"invalid ONNX model: .*Frobnicate"):
        export_onnx(invalid, digits_weights, tmp_path / "m.onnx")

    def misdeclared(weights: Weights) -> Any:
        model = softmax_onnx(weights)
        model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 11
        return model

    wrong = fedge.App(digits_app.client_fn, onnx_model=misdeclared)
    with pytest.raises(ExportError, match=r"invalid ONNX model: .*dimension 1: \(10\) vs \(11\)"):
        export_onnx(wrong, digits_weights, tmp_path / "m.onnx")

    def custom_domain(weights: Weights) -> Any:  # the checker skips domains it does not know
        model = softmax_onnx(weights)
        model.graph.node[2].domain = "com.example"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        return model

    unrunnable = fedge.App(digits_app.client_fn, onnx_model=custom_domain)
    with pytest.raises(ExportError, match=r"ONNX Runtime cannot run the model: .*com\.example"):
        export_onnx(unrunnable, digits_weights, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_without_the_serve_extra_the_error_says_what_to_install(
    digits_app: fedge.App, digits_weights: Weights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(
        ExportError, match=r"onnxruntime is missing\): pip install 'fedge\[serve\]'"
    ):
        export_onnx(digits_app, digits_weights, tmp_path / "m.onnx")


def test_an_app_with_an_export_hook_loads_no_onnx_where_it_trains() -> None:
    """A node loads the app, hook included: onnx must not come with it."""
    code = (
        "import sys; from pathlib import Path; from fedge.app import load_app; "
        "import fedge.adapters.torch; "
        f"app = load_app('app:create_app', Path({str(ROOT / 'examples' / 'digits')!r}), "
        "num_clients=2, seed=0); app.client_fn(0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('onnx', 'onnxruntime', 'onnxscript')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_read_weights_takes_plain_weights_or_a_checkpoint(
    digits_weights: Weights, tmp_path: Path
) -> None:
    to_file(digits_weights, tmp_path / "model.safetensors")
    path = save_checkpoint(tmp_path / "ckpt", Checkpoint(3, digits_weights, {"m": np.ones(2)}))
    for source in (tmp_path / "model.safetensors", path):
        weights = read_weights(source)
        assert list(weights) == ["weight", "bias"]  # the strategy state is not the model
        for name in weights:
            np.testing.assert_array_equal(weights[name], digits_weights[name])
    with pytest.raises(FedgeError, match=r"nothing\.safetensors: no such weights file"):
        read_weights(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + bytes(20))
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a valid safetensors payload"):
        read_weights(tmp_path / "junk.safetensors")


# --- PyTorch CNN (examples/mnist1d_torch) -------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d() -> ModuleType:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    pytest.importorskip("mnist1d")
    return example("mnist1d_torch")


def test_mnist1d_cnn_in_onnx_runtime_matches_torch_on_the_test_split(
    mnist1d: ModuleType, tmp_path: Path
) -> None:
    import torch

    app = mnist1d.create_app(num_clients=4, seed=0)
    weights = trained(app, lr=0.05, momentum=0.9)
    _, _, x_test, y_test = mnist1d._data()
    info = export_onnx(app, weights, tmp_path / "mnist1d.onnx")

    net = mnist1d.Net()
    fedge.adapters.torch.set_weights(net, weights)
    with torch.no_grad():
        logits = net.eval()(x_test).numpy()
    for batch in (x_test[:1], x_test):  # one example, and the whole test split
        got = run(info.path, batch.numpy())
        expected = logits[: len(batch)]
        assert np.abs(got["logits"] - expected).max() <= TOLERANCE
        assert np.abs(got["probabilities"] - softmax(expected)).max() <= TOLERANCE
    assert info.inputs == (TensorInfo("input", "float32", ("batch", 40)),)
    assert [o.name for o in info.outputs] == ["logits", "probabilities"]
    accuracy = float((got["logits"].argmax(axis=1) == y_test.numpy()).mean())
    assert accuracy > 0.2, "trained weights: better than chance (0.1)"

    bad = {**weights, "head.weight": weights["head.weight"][:, :100]}
    with pytest.raises(WeightsError, match=r"tensor 'head.weight' has shape \[10, 100\]"):
        export_onnx(app, bad, tmp_path / "bad.onnx")


def test_to_onnx_names_tensors_that_do_not_fit_the_module(mnist1d: ModuleType) -> None:
    from fedge.adapters.torch import get_weights, to_onnx

    weights = get_weights(mnist1d.Net())
    del weights["head.bias"]
    with pytest.raises(WeightsError, match=r"weights do not fit Net: .*head\.bias"):
        to_onnx(mnist1d.Net(), weights, input_shape=(40,))


def test_the_same_weights_export_to_the_same_bytes_without_this_machines_paths(
    mnist1d: ModuleType, tmp_path: Path
) -> None:
    from fedge.adapters.torch import get_weights

    app = mnist1d.create_app(num_clients=4, seed=0)
    weights = get_weights(mnist1d.Net())
    first = export_onnx(app, weights, tmp_path / "a.onnx")
    again = export_onnx(app, weights, tmp_path / "b.onnx")
    assert first.sha256 == again.sha256
    assert str(ROOT).encode() not in first.path.read_bytes(), "no stack frames from the exporter"
