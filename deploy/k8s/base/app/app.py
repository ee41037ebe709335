"""The app the deployment manifests and the container benchmark run: softmax regression
with NumPy on FedProx's Synthetic-IID data, one device per client id.

It needs nothing beyond fedge's core, so it runs in the node image (no scikit-learn, no
PyTorch). Replace this file and fedge.toml with your own app: the ConfigMap `fedge-app`
is made from this directory (`configMapGenerator` in ../kustomization.yaml).
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
from fedge.datasets import synthetic

NUM_CLASSES = 10
DIM = 60


def create_app(
    num_clients: int, seed: int, epochs: int = 2, batch_size: int = 32, lr: float = 0.1
) -> fedge.App:
    devices = synthetic(0.0, 0.0, num_devices=num_clients + 1, seed=seed, iid=True)
    x_test, y_test = devices[num_clients]  # one more device: the server's test set

    def client_fn(cid: int) -> fedge.Client:
        x, y = devices[cid]
        cut = max(1, len(y) // 5)  # 20% of each device for federated evaluation
        return SoftmaxRegressionClient(
            x[cut:], y[cut:], x[:cut], y[:cut], epochs=epochs, batch_size=batch_size, lr=lr
        )

    def evaluate_fn(weights: fedge.Weights) -> dict[str, float]:
        loss, accuracy = softmax_loss(weights, x_test, y_test)
        return {"loss": loss, "accuracy": accuracy}

    return fedge.App(
        client_fn, softmax_weights(DIM, NUM_CLASSES), evaluate_fn, onnx_model=softmax_onnx
    )


if __name__ == "__main__":  # a quick look at the data: python app.py
    x, y = synthetic(0.0, 0.0, num_devices=1, iid=True)[0]
    print(x.shape, np.bincount(y, minlength=NUM_CLASSES))
