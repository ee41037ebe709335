"""Digits: NumPy softmax regression on scikit-learn's bundled 8x8 digits.

Each client holds one partition of 80% of the data; the server evaluates the global
model on the remaining 20%. ``fedge export`` writes the trained model as ONNX
(`softmax_onnx`: logits and probabilities for a float32 [batch, 64] input).
"""

from __future__ import annotations

import numpy as np

import fedge
from fedge.adapters.numpy import (
    SoftmaxRegressionClient,
    softmax_loss,
    softmax_onnx,
    softmax_weights,
)
from fedge.datasets import dirichlet, iid, load_digits

NUM_CLASSES = 10


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def create_app(
    num_clients: int,
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 0.1,
) -> fedge.App:
    x_train, y_train, x_test, y_test = _split(seed)
    if partition == "iid":
        parts = iid(len(y_train), num_clients, seed)
    elif partition == "dirichlet":
        parts = dirichlet(y_train, num_clients, alpha, seed)
    else:
        raise fedge.ConfigError(
            f"app.options.partition must be 'iid' or 'dirichlet', got {partition!r}"
        )

    def client_fn(cid: int) -> fedge.Client:
        idx = parts[cid]
        cut = max(1, len(idx) // 5)  # each client keeps 20% for federated evaluation
        return SoftmaxRegressionClient(
            x_train[idx[cut:]],
            y_train[idx[cut:]],
            x_train[idx[:cut]],
            y_train[idx[:cut]],
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
        )

    def evaluate_fn(weights: fedge.Weights) -> dict[str, float]:
        loss, accuracy = softmax_loss(weights, x_test, y_test)
        return {"loss": loss, "accuracy": accuracy}

    return fedge.App(
        client_fn,
        softmax_weights(x_train.shape[1], NUM_CLASSES),
        evaluate_fn,
        onnx_model=softmax_onnx,
    )
