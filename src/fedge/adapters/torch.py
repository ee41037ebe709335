"""PyTorch: ``nn.Module`` state_dict ⇄ Weights, and a ready `TorchClient`.

`TorchClient` trains with the loop most users would write, and applies the FedProx
proximal term ``mu/2 * ||w - w_global||^2`` when ``config["proximal_mu"] > 0``.
With ``dp_sgd`` it trains with local DP-SGD (`fedge.privacy.dp_sgd`, Opacus). Override
`train_step` / `eval_step` for a custom loss or model output. `to_onnx` is the module's
inference graph for `fedge export`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedge.adapters import ONNX_INPUT, ONNX_OPSET
from fedge.client import Client, Config, EvaluateResult, FitResult
from fedge.errors import WeightsError
from fedge.privacy.dp_sgd import DPSGD
from fedge.weights import Weights

if TYPE_CHECKING:
    from onnx import ModelProto

Batch = Any
Data = Any
"""Sized and iterable over ``(inputs, targets)`` batches: a DataLoader or a list."""
OptimizerFn = Callable[[Iterable[nn.Parameter], Config], torch.optim.Optimizer]


def get_weights(module: nn.Module) -> Weights:
    """A copy of the module's state_dict (parameters and buffers) as NumPy arrays."""
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def set_weights(module: nn.Module, weights: Weights) -> None:
    """Load Weights into the module; names and shapes must match exactly."""
    state = {name: torch.from_numpy(np.array(a, copy=True)) for name, a in weights.items()}
    module.load_state_dict(state, strict=True)


def to_onnx(
    module: nn.Module,
    weights: Weights,
    input_shape: Sequence[int],
    *,
    input_dtype: torch.dtype = torch.float32,
    probabilities: bool = True,
) -> ModelProto:
    """`module` with `weights` loaded, in eval mode, as an ONNX graph.

    Input ``input`` [batch, *input_shape] (`input_shape` is one example's shape; the batch
    dimension is dynamic); outputs ``logits`` — what the module returns — and, with
    `probabilities`, their softmax over the last dimension.

    Exported with torch's own exporter, `torch.export`-based (``dynamo=True``, which
    needs onnxscript): the TorchScript one is deprecated and warns that it will be
    removed. Its first export in a process takes ~7 s (the operator registry), later
    ones ~2 s for the MNIST-1D CNN.
    """
    try:
        set_weights(module, weights)
    except RuntimeError as exc:  # load_state_dict names missing, unexpected, mis-shaped keys
        reason = " ".join(str(exc).split())  # one line: it is printed as the CLI's error
        raise WeightsError(f"weights do not fit {type(module).__name__}: {reason}") from None
    wrapped = (_WithProbabilities(module) if probabilities else module).eval()
    outputs = ["logits", "probabilities"] if probabilities else ["logits"]
    # a batch of 2: torch.export specialises a dimension it sees as 1 to a constant
    example = torch.zeros(2, *input_shape, dtype=input_dtype)
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)  # "torchvision is not installed", for each of its ops
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=[ONNX_INPUT],
                output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=ONNX_OPSET,
                verbose=False,
            )
    finally:
        registry.setLevel(level)
    assert program is not None  # the dynamo exporter always returns its program
    model: ModelProto = program.model_proto
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        # the exporter's notes: module names and stack frames with this machine's paths;
        # without them the same weights export to the same bytes anywhere
        del node.metadata_props[:]
    return model


class _WithProbabilities(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(x)
        return logits, torch.softmax(logits, dim=-1)


def sgd(params: Iterable[nn.Parameter], config: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=float(config.get("lr", 0.01)), momentum=float(config.get("momentum", 0.0))
    )


class TorchClient(Client):
    """Trains `model` on `train_data` batches and tests on `test_data` batches.

    Each batch is ``(inputs, targets)``; `epochs` may be overridden per round by
    ``config["local_epochs"]``; a simulated straggler's ``config["work_fraction"]`` trains
    that fraction of the steps, and a real node stops at ``config["deadline"]`` (Unix time)
    when the strategy keeps partial work.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Data,
        test_data: Data | None = None,
        *,
        epochs: int = 1,
        loss_fn: nn.Module | None = None,
        optimizer: OptimizerFn = sgd,
        dp_sgd: DPSGD | None = None,
    ) -> None:
        self.model, self.train_data, self.test_data = model, train_data, test_data
        self.epochs, self.optimizer, self.dp_sgd = epochs, optimizer, dp_sgd
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def get_weights(self, config: Config) -> Weights:
        return get_weights(self.model)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Loss of one batch (before the proximal term) and its number of examples."""
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets), len(targets)

    def eval_step(self, batch: Batch) -> tuple[float, int, int]:
        """Summed loss, correct predictions and examples of one batch."""
        inputs, targets = batch
        outputs = self.model(inputs)
        loss = self.loss_fn(outputs, targets).item() * len(targets)
        correct = int((outputs.argmax(dim=1) == targets).sum().item())
        return loss, correct, len(targets)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        set_weights(self.model, weights)
        seed = int(config["seed"])
        torch.manual_seed(seed)
        mu = float(config.get("proximal_mu", 0.0))
        optimizer = self.optimizer(self.model.parameters(), config)
        data, cleanup = self.train_data, None
        if self.dp_sgd is not None:
            if mu > 0:
                raise ValueError(
                    f"DP-SGD clips per-example gradients and the FedProx term is not per "
                    f"example: proximal_mu must be 0 with dp_sgd, got {mu}"
                )
            data, optimizer, cleanup = self.dp_sgd.attach(self.model, optimizer, data, seed)
        try:
            total_loss, seen, steps = self._train(data, optimizer, config, mu)
        finally:
            if cleanup is not None:
                cleanup()
        metrics = {"train_loss": total_loss / max(seen, 1)}
        if self.dp_sgd is not None:
            metrics["dp_sgd_epsilon"] = self.dp_sgd.epsilon(data.sample_rate, steps)
        return FitResult(get_weights(self.model), _num_examples(self.train_data), metrics)

    def _train(
        self, data: Data, optimizer: torch.optim.Optimizer, config: Config, mu: float
    ) -> tuple[float, int, int]:
        """The local epochs: (summed loss, examples seen, steps taken)."""
        anchor = [p.detach().clone() for p in self.model.parameters()] if mu > 0 else []
        epochs = int(config.get("local_epochs", self.epochs))
        fraction = float(config.get("work_fraction", 1.0))
        budget = max(1, math.ceil(epochs * len(data) * fraction))
        deadline = float(config.get("deadline", math.inf))
        self.model.train()
        total_loss, seen, steps = 0.0, 0, 0
        for _ in range(epochs):
            for batch in data:
                if steps == budget or time.time() >= deadline:
                    return total_loss, seen, steps
                steps += 1
                optimizer.zero_grad()
                loss, n = self.train_step(batch)
                total_loss, seen = total_loss + loss.item() * n, seen + n
                if mu > 0:
                    loss = loss + mu / 2 * _distance2(self.model.parameters(), anchor)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        return total_loss, seen, steps

    @torch.no_grad()
    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        if self.test_data is None:
            raise NotImplementedError("TorchClient was built without test_data")
        set_weights(self.model, weights)
        self.model.eval()
        loss, correct, seen = 0.0, 0, 0
        for batch in self.test_data:
            b_loss, b_correct, n = self.eval_step(batch)
            loss, correct, seen = loss + b_loss, correct + b_correct, seen + n
        return EvaluateResult(loss / max(seen, 1), seen, {"accuracy": correct / max(seen, 1)})


def _distance2(params: Iterable[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)]).sum()


def _num_examples(data: Sized) -> int:
    dataset = getattr(data, "dataset", None)  # a DataLoader knows its dataset's size
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(len(batch[1]) for batch in data)  # type: ignore[attr-defined,misc]
