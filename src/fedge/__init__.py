"""fedge: federated learning for Linux edge fleets.

The public API is imported on first use, so ``import fedge`` costs almost nothing and a
node process — which needs the client API only — never loads the simulator, the
coordinator or the strategies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "App": "fedge.app",
    "Client": "fedge.client",
    "ClientWrapper": "fedge.client",
    "Config": "fedge.client",
    "EvaluateResult": "fedge.client",
    "FitResult": "fedge.client",
    "Message": "fedge.client",
    "Reply": "fedge.client",
    "Metrics": "fedge.metrics",
    "Coordinator": "fedge.coordinator",
    "Observer": "fedge.coordinator",
    "Round": "fedge.coordinator",
    "ConfigError": "fedge.errors",
    "FedgeError": "fedge.errors",
    "QuorumError": "fedge.errors",
    "WeightsError": "fedge.errors",
    "History": "fedge.history",
    "RoundRecord": "fedge.history",
    "simulate": "fedge.sim",
    "Weights": "fedge.weights",
}
_MODULES = {"strategy", "adapters", "datasets"}

__all__ = [
    "App",
    "Client",
    "ClientWrapper",
    "Config",
    "ConfigError",
    "Coordinator",
    "EvaluateResult",
    "FedgeError",
    "FitResult",
    "History",
    "Message",
    "Metrics",
    "Observer",
    "QuorumError",
    "Reply",
    "Round",
    "RoundRecord",
    "Weights",
    "WeightsError",
    "adapters",
    "datasets",
    "simulate",
    "strategy",
]
assert set(__all__) == {*_EXPORTS, *_MODULES}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value: Any = importlib.import_module(f"fedge.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'fedge' has no attribute {name!r}")
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from fedge import adapters, datasets, strategy
    from fedge.app import App
    from fedge.client import (
        Client,
        ClientWrapper,
        Config,
        EvaluateResult,
        FitResult,
        Message,
        Reply,
    )
    from fedge.coordinator import Coordinator, Observer, Round
    from fedge.errors import ConfigError, FedgeError, QuorumError, WeightsError
    from fedge.history import History, RoundRecord
    from fedge.metrics import Metrics
    from fedge.sim import simulate
    from fedge.weights import Weights
