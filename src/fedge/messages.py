"""The fleet's messages, independent of any transport.

The server side (`fedge.fleet`) and the node side (`fedge.node`) speak these; a transport
(`fedge.transport.grpc`, later MQTT) only maps them to its wire and back. Errors carry a
transport-neutral `Code` that each transport maps to its own status (gRPC status codes
have the same names). Field meanings are documented once, in proto/fedge/v1/fleet.proto.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fedge.errors import FedgeError

PROTOCOL = 2
"""Protocol version a node announces at Join. 2: generic task kinds and payloads, and the
session token on every call after Join (protocol-1 nodes are refused with a note)."""


class Code(StrEnum):
    """Why a call failed, and so what the caller should do (docs/operations.md)."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    DATA_LOSS = "DATA_LOSS"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"
    UNKNOWN = "UNKNOWN"


class FleetError(FedgeError):
    """A call that failed with a `Code` and a message a human can act on."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Capabilities:
    cpu_count: int = 0
    memory_bytes: int = 0
    accelerator: str = ""
    framework: str = ""
    fedge_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    instance: str = ""
    """Random per node process: tells a returning replaced process from a restart."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_count": self.cpu_count,
            "memory_bytes": self.memory_bytes,
            "accelerator": self.accelerator,
            "framework": self.framework,
            "fedge_version": self.fedge_version,
            "labels": dict(self.labels),
        }


@dataclass(frozen=True)
class Joined:
    node_id: str
    token: str
    heartbeat_interval: float
    renew_after: float = 0.0
    """When to renew the node's certificate (Unix time); 0: the server does not renew."""


@dataclass(frozen=True)
class ModelRef:
    version: str
    sha256: bytes
    size: int


@dataclass(frozen=True)
class TaskHeader:
    """A task as it travels to a node; the model itself is fetched with Download."""

    task_id: str
    run_id: str
    round: int
    kind: str
    config: dict[str, Any]
    model: ModelRef | None = None
    payload: bytes = b""
    """Small arrays for this node only, as safetensors; empty if none."""
    partial_work: bool = False
    deadline: float = 0.0
    """Unix time after which the result is refused; 0: none."""


@dataclass(frozen=True)
class Keepalive:
    """Sent on the task stream while there is no task, so dead links are noticed."""

    unix_time: float
    heartbeat_interval: float = 0.0
    """A new heartbeat interval from the server (0: keep the current one)."""


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload: what the result is, and how large its payload."""

    task_id: str
    token: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    encoding: str = ""
    size: int = 0
    sha256: bytes = b""
    offset: int = 0
    loss: float | None = None
    error: str = ""


@dataclass(frozen=True)
class UploadAck:
    accepted: bool
    duplicate: bool = False
    message: str = ""
    received_bytes: int = 0


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    cid: int | None
    address: str = ""
    connected: bool = False
    live: bool = False
    """Connected and heard from within the heartbeat window: can be given work."""
    connected_since: float = 0.0
    last_seen: float = 0.0
    tasks_done: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    certificate_expires: float = 0.0
    """Of its newest certificate the server issued; 0: made by hand, not known."""
    state: str = "active"
    """"active", "revoked" or "expired"."""
    certificates: Sequence[CertificateInfo] = ()
    serving: str = ""
    """What its inference server serves ("MODEL/VERSION"), from its last heartbeat."""
    version: str = ""
    """The fedge version the node announced when it joined."""


@dataclass(frozen=True)
class CertificateInfo:
    serial: str
    issued: float
    expires: float
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Status:
    """What `fedge status` shows."""

    run_id: str
    state: str
    """starting, waiting, running, paused, finished, failed or stopped."""
    round: int
    total_rounds: int
    nodes: list[NodeInfo]
    metrics: dict[str, float]
    received: int
    expected: int
    waiting_for: int = 0
    missing: list[int] = field(default_factory=list)
    reason: str = ""
    """Why the run is waiting, paused or failed."""
