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


class DiskFullError(FedgeError):
    """A write failed because the disk (or the filesystem's quota) is full."""


def is_disk_full(exc: BaseException) -> bool:
    """True for the errors a full disk raises: ENOSPC/EDQUOT, and SQLite's SQLITE_FULL."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(exc)
        )
    if "No space left on device" in str(exc):  # e.g. safetensors' own error type
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_disk_full(cause)
