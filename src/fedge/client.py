"""The Client API users implement: train (`fit`) and test (`evaluate`) on local data.

Every task reaches a client through one entry point, `Client.handle(message)`: ``fit``
and ``evaluate`` go to the methods of those names, and a round workflow may define kinds
of its own (secure aggregation's key exchange, say), which a `ClientWrapper` handles.
Wrappers compose like middleware — ``ClipClient(MaskingClient(MyClient()))`` — each one
seeing every task and passing on what it does not change.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.metrics import Metrics
from fedge.weights import Array, Weights, is_norm_bound

Config = dict[str, Any]

FIT = "fit"
EVALUATE = "evaluate"


@dataclass
class FitResult:
    weights: Mapping[str, Array]
    """Usually a `Weights` dict; the server passes a file-backed mapping."""
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    encoding: str = ""
    """"": `weights` are the new local weights; else the name of the encoding of the update
    they carry (`fedge.compression`), which the coordinator decodes."""


@dataclass
class EvaluateResult:
    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass
class Reply:
    """The answer to a task of a workflow's own kind: named arrays and metrics."""

    arrays: Mapping[str, Array] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)


Result = FitResult | EvaluateResult | Reply


@dataclass
class Message:
    """One task as a client sees it."""

    kind: str
    config: Config
    weights: Weights | None = None
    """The global model, for tasks that start from it (fit, evaluate)."""
    payload: Weights = field(default_factory=dict)
    """Small arrays meant for this client only (e.g. other clients' public keys)."""


class UnsupportedTask(Exception):
    """A client was given a task kind it does not know."""


class Client(ABC):
    """One participant's data and training code.

    `config` always holds ``round`` (1-based) and ``seed`` (derived from the run seed, the
    round and the client id), plus the strategy's and the user's per-round settings. When
    the strategy keeps partial work (FedProx), it also holds ``deadline``: the Unix time by
    which `fit` should return what it has.
    """

    @abstractmethod
    def fit(self, weights: Weights, config: Config) -> FitResult:
        """Train from the global `weights`; return the new local weights."""

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate()")

    def get_weights(self, config: Config) -> Weights:
        """Initial weights, used when the server was given none."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement get_weights(); pass initial_weights"
        )

    def handle(self, message: Message) -> Result:
        """Run one task: ``fit`` and ``evaluate`` go to those methods."""
        if message.kind in (FIT, EVALUATE):
            if message.weights is None:
                raise UnsupportedTask(f"a {message.kind} task needs the global model")
            if message.kind == FIT:
                return self.fit(message.weights, message.config)
            return self.evaluate(message.weights, message.config)
        raise UnsupportedTask(f"{type(self).__name__} cannot run tasks of kind {message.kind!r}")


class ClientWrapper(Client):
    """Wraps `inner` and passes everything on to it; a subclass overrides what it changes
    (`fit`, `evaluate`, or `handle` for task kinds of its own)."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def fit(self, weights: Weights, config: Config) -> FitResult:
        return self.inner.fit(weights, config)

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        return self.inner.evaluate(weights, config)

    def get_weights(self, config: Config) -> Weights:
        return self.inner.get_weights(config)

    def handle(self, message: Message) -> Result:
        if message.kind in (FIT, EVALUATE):
            return super().handle(message)  # through this wrapper's fit / evaluate
        return self.inner.handle(message)  # other kinds: an inner wrapper may know them


class ClipClient(ClientWrapper):
    """Clips the update on the device, before it is sent: ``new - received`` is scaled
    down to L2 norm `max_norm` over the float tensors. The client-side half of DP-FedAvg
    (McMahan et al., ICLR 2018, https://arxiv.org/abs/1710.06963): with the noise added
    by the server it composes with secure aggregation, which never shows the server an
    individual update to clip."""

    def __init__(self, inner: Client, *, max_norm: float) -> None:
        super().__init__(inner)
        if not is_norm_bound(max_norm):
            raise ValueError(f"ClipClient: max_norm must be a number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        received = {
            k: a.copy() for k, a in weights.items() if _is_float(a)
        }  # fit may train in place
        result = self.inner.fit(weights, config)
        deltas = {
            k: np.subtract(result.weights[k], a, dtype=np.float64) for k, a in received.items()
        }
        norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in deltas.values()))
        if norm <= self.max_norm:
            return result
        scale = self.max_norm / norm
        clipped = dict(result.weights)
        for name, delta in deltas.items():
            clipped[name] = np.add(received[name], scale * delta).astype(received[name].dtype)
        return FitResult(clipped, result.num_examples, result.metrics)


def _is_float(a: Array) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))
