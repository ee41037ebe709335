"""fedge: federated learning for Linux edge fleets."""

from fedge import strategy
from fedge.app import App
from fedge.client import Client, Config, EvaluateResult, FitResult, Metrics
from fedge.coordinator import Coordinator, Observer
from fedge.errors import ConfigError, FedgeError, QuorumError, WeightsError
from fedge.history import History, RoundRecord
from fedge.sim import simulate
from fedge.weights import Weights

__version__ = "0.1.0"

__all__ = [
    "App",
    "Client",
    "Config",
    "ConfigError",
    "Coordinator",
    "EvaluateResult",
    "FedgeError",
    "FitResult",
    "History",
    "Metrics",
    "Observer",
    "QuorumError",
    "RoundRecord",
    "Weights",
    "WeightsError",
    "simulate",
    "strategy",
]
