"""ONNX export of the two examples: export time, file size, and inference in ONNX Runtime
against the framework that trained the model (NumPy, PyTorch), one thread each.

The models are the examples' trained by one client's local epochs (the weights' values
do not change the timings). Latency is the median of 300 single-example calls; throughput
runs the whole test split as one batch (median of 20). A framework row's file is the
safetensors weights; its model is built once, as a service would hold it.

Usage: python benchmarks/export_bench.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import fedge
from fedge.adapters.numpy import softmax_logits
from fedge.adapters.torch import set_weights
from fedge.serve.export import export_onnx
from fedge.weights import to_bytes

sys.path.insert(0, str(Path(__file__).parent))
from common import example, report


def median_s(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(
    name: str,
    app: fedge.App,
    config: dict[str, Any],
    x_test: np.ndarray,
    forward: Callable[[fedge.Weights, np.ndarray], np.ndarray],
    directory: Path,
) -> list[dict[str, Any]]:
    assert app.initial_weights is not None
    weights = app.client_fn(0).fit(app.initial_weights, {"round": 1, "seed": 0, **config}).weights
    exports = []
    for _ in range(2):  # the first export in a process pays for the exporter's set-up
        started = time.perf_counter()
        info = export_onnx(app, weights, directory / f"{name}.onnx")
        exports.append(time.perf_counter() - started)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(info.path), options, providers=["CPUExecutionProvider"])
    one = x_test[:1]
    onnx_run = lambda x: session.run(["logits"], {"input": x})[0]  # noqa: E731
    diff = float(np.abs(onnx_run(x_test) - forward(weights, x_test)).max())
    rows = []
    for runtime, run in (("ONNX Runtime", onnx_run), ("framework", lambda x: forward(weights, x))):
        run(x_test)  # warm up
        latency = median_s(lambda run=run: run(one), 300)
        batch = median_s(lambda run=run: run(x_test), 20)
        exported = runtime == "ONNX Runtime"
        rows.append(
            {
                "model": name,
                "runtime": runtime,
                "export 1st s": exports[0] if exported else "-",
                "export 2nd s": exports[1] if exported else "-",
                "file KB": info.size / 1e3 if exported else len(to_bytes(weights)) / 1e3,
                "1 example µs": latency * 1e6,
                "batch examples/s": len(x_test) / batch,
                "max abs diff": diff,
            }
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    digits, mnist1d = example("digits"), example("mnist1d_torch")
    _, _, x_digits, _ = digits._split(0)
    _, _, x_mnist1d, _ = mnist1d._data()

    net_cache: dict[int, Any] = {}

    def torch_forward(weights: fedge.Weights, x: np.ndarray) -> np.ndarray:
        """Inference with the module built once, as a service would hold it."""
        key = id(weights)
        if key not in net_cache:
            net_cache[key] = mnist1d.Net()
            set_weights(net_cache[key], weights)
            net_cache[key].eval()
        with torch.no_grad():
            return net_cache[key](torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]

    with tempfile.TemporaryDirectory(prefix="fedge-export-bench-") as tmp:
        rows = bench(
            "digits softmax (NumPy)",
            digits.create_app(num_clients=4, seed=0),
            {"lr": 0.5},
            x_digits,
            softmax_logits,
            Path(tmp),
        )
        rows += bench(
            "MNIST-1D CNN (PyTorch)",
            mnist1d.create_app(num_clients=4, seed=0),
            {"lr": 0.05, "momentum": 0.9},
            x_mnist1d.numpy(),
            torch_forward,
            Path(tmp),
        )
    report("export", "ONNX export and inference, one thread", rows)


if __name__ == "__main__":
    main()
