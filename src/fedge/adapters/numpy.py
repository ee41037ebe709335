"""NumPy: Weights are NumPy arrays already; this adds a ready softmax-regression client.

`SoftmaxRegressionClient` is the multinomial logistic regression of the FedAvg and
FedProx papers' convex experiments, trained with minibatch SGD. It follows the same
config conventions as the PyTorch adapter: ``local_epochs``, ``lr``, ``batch_size``,
``proximal_mu`` (FedProx), and partial work — ``work_fraction`` (a simulated straggler's
share of the steps) and ``deadline`` (a real node's: Unix time to stop training by).
`softmax_onnx` is its inference graph for `fedge export`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedge.adapters import ONNX_INPUT, ONNX_OPSET
from fedge.client import Client, Config, EvaluateResult, FitResult
from fedge.errors import WeightsError
from fedge.weights import Array, Weights

if TYPE_CHECKING:
    from onnx import ModelProto

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]


def softmax_weights(num_features: int, num_classes: int) -> Weights:
    """Zero-initialised parameters: ``weight`` [features, classes] and ``bias``."""
    return {
        "weight": np.zeros((num_features, num_classes), dtype=np.float32),
        "bias": np.zeros(num_classes, dtype=np.float32),
    }


def softmax_logits(weights: Mapping[str, Array], x: FloatArray) -> FloatArray:
    """The model's forward pass: class scores [batch, classes] of the examples `x`."""
    w: FloatArray = np.asarray(weights["weight"], dtype=np.float32)
    return x @ w + np.asarray(weights["bias"], dtype=np.float32)  # type: ignore[no-any-return]


def softmax_loss(weights: Mapping[str, Array], x: FloatArray, y: IntArray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on ``(x, y)``."""
    logits = softmax_logits(weights, x)
    logp = _log_softmax(logits)
    loss = float(-logp[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def softmax_onnx(weights: Mapping[str, Array]) -> ModelProto:
    """The model as an ONNX graph: ``logits = input @ weight + bias`` and their softmax.

    Input ``input`` float32 [batch, features]; outputs ``logits`` (what `softmax_loss`
    computes, so the two can be compared) and ``probabilities`` (what a service answers
    with). Built node by node with `onnx.helper`: three operators need no exporter.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = _softmax_parameters(weights)
    features, classes = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [ONNX_INPUT, "weight"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "softmax_regression",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes])
            for name in ("logits", "probabilities")
        ],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="fedge")
    model.ir_version = helper.find_min_ir_version_for(opsets)  # older runtimes load it too
    onnx.checker.check_model(model, full_check=True)
    return model


def _softmax_parameters(weights: Mapping[str, Array]) -> tuple[FloatArray, FloatArray]:
    """``weight`` [features, classes] and ``bias`` [classes] as float32, or a
    `WeightsError` naming the tensor that is missing or has the wrong shape."""
    for name in ("weight", "bias"):
        if name not in weights:
            raise WeightsError(
                f"softmax regression: missing tensor {name!r}; got {sorted(weights)}"
            )
    weight, bias = np.asarray(weights["weight"]), np.asarray(weights["bias"])
    for name, a in (("weight", weight), ("bias", bias)):
        if not np.issubdtype(a.dtype, np.floating):
            raise WeightsError(f"softmax regression: tensor {name!r} has dtype {a.dtype}")
    if weight.ndim != 2 or 0 in weight.shape:
        raise WeightsError(
            "softmax regression: tensor 'weight' must be [features, classes], "
            f"got shape {list(weight.shape)}"
        )
    if bias.shape != (weight.shape[1],):
        raise WeightsError(
            f"softmax regression: tensor 'bias' has shape {list(bias.shape)}, expected "
            f"{[weight.shape[1]]} (one per class of 'weight' {list(weight.shape)})"
        )
    return weight.astype(np.float32), bias.astype(np.float32)


def _log_softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]


class SoftmaxRegressionClient(Client):
    def __init__(
        self,
        x_train: FloatArray,
        y_train: IntArray,
        x_test: FloatArray | None = None,
        y_test: IntArray | None = None,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.1,
    ) -> None:
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def fit(self, weights: Weights, config: Config) -> FitResult:
        anchor_w: FloatArray = np.asarray(weights["weight"], dtype=np.float32)
        anchor_b: FloatArray = np.asarray(weights["bias"], dtype=np.float32)
        w, b = anchor_w.copy(), anchor_b.copy()
        mu = float(config.get("proximal_mu", 0.0))
        lr = float(config.get("lr", self.lr))
        batch = int(config.get("batch_size", self.batch_size))
        epochs = int(config.get("local_epochs", self.epochs))
        n = len(self.y_train)
        per_epoch = math.ceil(n / batch)
        steps_left = max(1, math.ceil(epochs * per_epoch * float(config.get("work_fraction", 1))))
        deadline = float(config.get("deadline", math.inf))
        rng = np.random.default_rng(int(config["seed"]))
        onehot = np.eye(w.shape[1], dtype=w.dtype)
        for _ in range(epochs):
            if steps_left == 0:
                break
            order = rng.permutation(n)
            for start in range(0, n, batch):
                if steps_left == 0 or time.time() >= deadline:
                    steps_left = 0
                    break
                steps_left -= 1
                idx = order[start : start + batch]
                x, y = self.x_train[idx], self.y_train[idx]
                logits = x @ w + b
                probs = np.exp(_log_softmax(logits))
                grad = (probs - onehot[y]) / len(idx)
                grad_w, grad_b = x.T @ grad, grad.sum(axis=0)
                if mu > 0:
                    grad_w += mu * (w - anchor_w)
                    grad_b += mu * (b - anchor_b)
                w -= lr * grad_w
                b -= lr * grad_b
        new = {"weight": w, "bias": b}
        loss, accuracy = softmax_loss(new, self.x_train, self.y_train)
        return FitResult(new, n, {"train_loss": loss, "train_accuracy": accuracy})

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        if self.x_test is None or self.y_test is None:
            raise NotImplementedError("SoftmaxRegressionClient was built without test data")
        loss, accuracy = softmax_loss(weights, self.x_test, self.y_test)
        return EvaluateResult(loss, len(self.y_test), {"accuracy": accuracy})

    def get_weights(self, config: Config) -> Weights:
        return softmax_weights(self.x_train.shape[1], int(self.y_train.max()) + 1)
