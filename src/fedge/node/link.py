"""What a transport gives the node runtime: the fleet's calls, from the node's side.

A link is used from several threads (the task stream, heartbeats, the worker); every
call may raise `LinkError`, whose code says whether to retry. `close` drops the
connection; the next `join` opens a new one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from fedge.messages import (
    Capabilities,
    Code,
    FleetError,
    Joined,
    Keepalive,
    TaskHeader,
    UploadAck,
    UploadHeader,
)


class LinkError(FleetError):
    """A call over the link failed."""


RETRYABLE = frozenset(
    {
        Code.UNAVAILABLE,  # server down or restarting, network gone, or its disk full
        Code.CANCELLED,
        Code.DEADLINE_EXCEEDED,
        Code.FAILED_PRECONDITION,  # a stale session: join again
        Code.UNKNOWN,
        Code.INTERNAL,
    }
)
"""Codes after which a call is tried again; the others are final answers."""
FATAL_AT_JOIN = frozenset(
    {Code.PERMISSION_DENIED, Code.OUT_OF_RANGE, Code.INVALID_ARGUMENT, Code.ABORTED}
)
"""A join refused with these will be refused again: the node stops and says why."""


class Link(Protocol):
    def join(self, cid: int, capabilities: Capabilities, protocol: int) -> Joined: ...

    def tasks(self, joined: Joined) -> Iterator[TaskHeader | Keepalive]:
        """The task stream; it blocks until the next item, and ends (or raises) when the
        session ends. `cancel` ends it from another thread."""
        ...

    def cancel(self) -> None: ...

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]: ...

    def query_upload(self, token: str, task_id: str) -> tuple[int, bool]: ...

    def upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> UploadAck: ...

    def heartbeat(self, token: str, serving: str = "") -> None:
        """I am alive; `serving` says what this device's inference server serves."""

    def leave(self, token: str, reason: str) -> None: ...

    def renew(self, token: str) -> None:
        """Replace this node's key and certificate with new ones the server signs; the
        next connection uses them."""
        ...

    def close(self) -> None: ...


@dataclass
class Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep."""

    initial: float = 0.2
    maximum: float = 10.0
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
