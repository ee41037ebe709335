"""Project exceptions: each message says what was expected, what was found, and where."""

from __future__ import annotations


class FedgeError(Exception):
    """Base class of every error fedge raises on purpose."""


class ConfigError(FedgeError):
    """A configuration value is missing or invalid; the message names the key."""


class WeightsError(FedgeError):
    """Weights could not be decoded or do not match the expected tensors."""


class QuorumError(FedgeError):
    """A round could not collect `min_results` results, even after retries."""

    def __init__(self, message: str, history: object | None = None) -> None:
        super().__init__(message)
        self.history = history
