"""`fedge export`, run as a user runs it: train with `fedge sim --model-out`, export with
the installed console script, and run the file in ONNX Runtime against the framework."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedge.adapters.numpy import softmax_logits
from fedge.checkpoint import Checkpoint, save_checkpoint
from fedge.weights import read_file, to_file

pytestmark = pytest.mark.integration
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
MNIST1D = ROOT / "examples" / "mnist1d_torch"
FEDGE = Path(sys.executable).parent / "fedge"
TOLERANCE = 1e-5


def fedge(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert FEDGE.exists(), f"the fedge console script should be installed at {FEDGE}"
    return subprocess.run(
        [str(FEDGE), *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )


def ok(run: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return run


def refused(run: subprocess.CompletedProcess[str]) -> str:
    """The one-line error of a command that failed as it should."""
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), run.stderr
    return lines[-1]


def example(directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"cli_{directory.name}", directory / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example trained by `fedge sim` for two rounds."""
    out = tmp_path_factory.mktemp("digits") / "model.safetensors"
    ok(
        fedge(
            "sim",
            "-c",
            DIGITS / "fedge.toml",
            "--rounds",
            "2",
            "-q",
            "--model-out",
            out,
            cwd=out.parent,
        )
    )
    return out


def test_exported_digits_model_matches_numpy_on_the_test_split(
    digits_model: Path, tmp_path: Path
) -> None:
    run = ok(
        fedge(
            "export",
            "--weights",
            digits_model,
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "m.onnx",
            cwd=tmp_path,
        )
    )
    assert "inputs: input float32[batch, 64]" in run.stderr
    assert "outputs: logits float32[batch, 10], probabilities float32[batch, 10]" in run.stderr

    _, _, x_test, y_test = example(DIGITS)._split(0)  # seed 0, as run.seed in the config
    weights = read_file(digits_model)
    got = outputs(tmp_path / "m.onnx", x_test)
    logits = softmax_logits(weights, x_test)
    assert np.abs(got["logits"] - logits).max() <= TOLERANCE
    assert np.abs(got["probabilities"] - softmax(logits)).max() <= TOLERANCE
    assert float((got["logits"].argmax(axis=1) == y_test).mean()) > 0.85


def test_a_checkpoint_exports_like_its_weights(digits_model: Path, tmp_path: Path) -> None:
    weights = read_file(digits_model)
    path = save_checkpoint(tmp_path, Checkpoint(2, weights, {"velocity": np.ones(3)}))
    ok(
        fedge(
            "export",
            "--weights",
            path,
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "c.onnx",
            cwd=tmp_path,
        )
    )
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    logits = outputs(tmp_path / "c.onnx", x)["logits"]
    assert np.abs(logits - softmax_logits(weights, x)).max() <= TOLERANCE


def test_a_signed_version_in_a_store_exports_like_its_weights(
    digits_model: Path, tmp_path: Path
) -> None:
    from fedge.security import init_ca
    from fedge.store import open_registry

    init_ca(tmp_path / "pki")
    store = f"file://{tmp_path / 'store'}"
    registry = open_registry(store, sign_key=tmp_path / "pki" / "release.key")
    registry.publish("digits", digits_model, "v1")
    ok(
        fedge(
            "export",
            "--store",
            store,
            "--model",
            "digits",
            "--version",
            "latest",
            "--release-key",
            tmp_path / "pki" / "release.pub",
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "s.onnx",
            cwd=tmp_path,
        )
    )
    x = np.random.default_rng(1).random((4, 64), dtype=np.float32)
    logits = outputs(tmp_path / "s.onnx", x)["logits"]
    assert np.abs(logits - softmax_logits(read_file(digits_model), x)).max() <= TOLERANCE
    # a tampered blob is refused before anything is exported
    (manifest,) = registry.versions("digits")
    registry.backend.put_bytes(manifest.blob, b"not the model")
    error = refused(
        fedge(
            "export",
            "--store",
            store,
            "--model",
            "digits",
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "t.onnx",
            cwd=tmp_path,
        )
    )
    assert "digits/v1 is 13 bytes, its manifest says" in error
    assert not (tmp_path / "t.onnx").exists()


def test_weights_that_do_not_fit_the_app_are_refused_naming_the_tensor(
    digits_model: Path, tmp_path: Path
) -> None:
    weights = read_file(digits_model)
    to_file({**weights, "weight": weights["weight"][:32]}, tmp_path / "short.safetensors")
    error = refused(
        fedge(
            "export",
            "--weights",
            "short.safetensors",
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "m.onnx",
            cwd=tmp_path,
        )
    )
    assert "short.safetensors: tensor 'weight' has shape [32, 10], expected [64, 10]" in error

    to_file({"weight": weights["weight"]}, tmp_path / "half.safetensors")
    error = refused(
        fedge(
            "export",
            "--weights",
            "half.safetensors",
            "-c",
            DIGITS / "fedge.toml",
            "--out",
            "m.onnx",
            cwd=tmp_path,
        )
    )
    assert "half.safetensors: missing tensor(s) ['bias']" in error
    assert not (tmp_path / "m.onnx").exists()


def test_an_app_without_an_export_and_a_missing_model_are_precise_errors(
    digits_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "plain.py").write_text(
        textwrap.dedent(
            """
            import fedge
            from fedge.adapters.numpy import softmax_weights

            def create_app(num_clients, seed):
                return fedge.App(lambda cid: None, softmax_weights(64, 10))
            """
        )
    )
    (tmp_path / "fedge.toml").write_text('[app]\ntarget = "plain:create_app"\n')
    error = refused(fedge("export", "--weights", digits_model, "--out", "m.onnx", cwd=tmp_path))
    assert "the app has no ONNX export: give it one with fedge.App(..., onnx_model=FN)" in error

    error = refused(fedge("export", "--out", "m.onnx", cwd=tmp_path))
    assert "fedge export needs the model: --weights FILE.safetensors" in error
    error = refused(
        fedge("export", "--weights", "gone.safetensors", "--out", "m.onnx", cwd=tmp_path)
    )
    assert "gone.safetensors: no such weights file" in error
    assert not (tmp_path / "m.onnx").exists()


def test_exported_mnist1d_cnn_matches_torch_on_the_test_split(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    pytest.importorskip("mnist1d")
    config = MNIST1D / "fedge.toml"
    sim = ["sim", "-c", config, "--rounds", "1", "--backend", "inprocess", "-q"]
    ok(fedge(*sim, "--model-out", "model.safetensors", cwd=tmp_path))
    run = ok(
        fedge(
            "export",
            "--weights",
            "model.safetensors",
            "-c",
            config,
            "--out",
            "m.onnx",
            cwd=tmp_path,
        )
    )
    assert "inputs: input float32[batch, 40]" in run.stderr
    assert "Warning" not in run.stderr, "the exporter's own noise is kept out of the output"

    app = example(MNIST1D)
    _, _, x_test, y_test = app._data()
    net = app.Net()
    from fedge.adapters.torch import set_weights

    set_weights(net, read_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        logits = net.eval()(x_test).numpy()
    got = outputs(tmp_path / "m.onnx", x_test.numpy())
    assert np.abs(got["logits"] - logits).max() <= TOLERANCE
    assert np.abs(got["probabilities"] - softmax(logits)).max() <= TOLERANCE
    assert float((got["logits"].argmax(axis=1) == y_test.numpy()).mean()) > 0.2
