"""The gRPC transport's server side: a grpc.aio server with mutual TLS (plaintext only on
loopback), the Fleet, Control and standard health services; optionally a second,
plaintext listener with the health service alone, for probes that speak no TLS."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedge.chunks import CHUNK_SIZE
from fedge.errors import FedgeError
from fedge.fleet.enrollment import Enrollment
from fedge.fleet.server import Aggregator
from fedge.fleet.service import FleetService
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.control import ControlServicer
from fedge.transport.grpc.enrollment import MAX_CONNECTIONS as ENROLL_CONNECTIONS
from fedge.transport.grpc.enrollment import start_listener
from fedge.transport.grpc.guard import Guard
from fedge.transport.grpc.servicer import FleetServicer
from fedge.transport.grpc.tls import ReloadingCredentials, require_loopback

log = logging.getLogger(__name__)

SERVICE = "fedge.v1.Fleet"
RECEIVE_WINDOW = 4 << 20
HANDSHAKE_TIMEOUT_MS = 10_000
FDS_KEPT = 256
"""File descriptors kept for state, spools and checkpoints when connections are capped."""
HEALTH_STREAMS = 4
"""Streams at once on one health connection (a probe uses one; Watch holds one open)."""
HEALTH_MESSAGE = 1024
"""Bytes of a health request (a service name); the default would be 4 MiB."""
OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A fixed 4 MiB receive window per stream instead of one grown by BDP probing: grown,
    # it let each of ten 100 MB uploads pile ~24 MB up inside gRPC while the spool wrote
    # (server peak 4.5x the model, 2.3x fixed; docs/benchmarks.md). 4 MiB still carries
    # 40 MB/s per upload at 100 ms round-trip time.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
    # A connection that has not finished its TLS handshake in 10 s is closed (gRPC's
    # default, 120 s, let 1,100 idle sockets take every file descriptor of a 1,024 limit),
    # and connections are capped below the file-descriptor limit (`fd_limit`).
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
]


class GrpcTransport:
    def __init__(
        self,
        address: str,
        certs: Path | None,
        insecure: bool = False,
        *,
        enrollment: Enrollment | None = None,
        enroll_address: str = "",
        health_address: str = "",
    ) -> None:
        if insecure:
            require_loopback(address)
            if enroll_address:
                raise FedgeError("enrollment needs TLS: --enroll-address cannot go with --insecure")
        elif certs is None:
            raise FedgeError("--certs is required (or --insecure on loopback)")
        self.address, self.certs, self.insecure = address, certs, insecure
        self.enrollment, self.enroll_address = enrollment, enroll_address
        self.health_address = health_address
        self.port = 0
        self.health_port = 0
        self._server: grpc.aio.Server | None = None
        self._enroll_server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.tls: ReloadingCredentials | None = None
        self.enroll_tls: ReloadingCredentials | None = None
        self._health = health.aio.HealthServicer()

    async def start(self, service: FleetService, control: Aggregator) -> None:
        if self.health_address:  # bound first: a bad address fails before anything listens
            self._health_server = self._health_listener()
        limit = raise_fd_limit()
        kept = FDS_KEPT + (ENROLL_CONNECTIONS if self.enroll_address else 0)
        connections = ("grpc.max_allowed_incoming_connections", max(64, limit - kept))
        server = grpc.aio.server(options=[*OPTIONS, connections])
        guard = Guard(self.insecure, control.revocations.refusal)
        servicer = FleetServicer(service, self.insecure, CHUNK_SIZE, guard.peers, self.enrollment)
        fleet = _handlers(pb_grpc.add_FleetServicer_to_server, servicer)
        # payload messages are encoded by hand: the serializer passes bytes through
        fleet = {k: h._replace(response_serializer=convert.encode) for k, h in fleet.items()}
        _add(server, SERVICE, guard.wrap(fleet, "node"))
        control_handlers = _handlers(
            pb_grpc.add_ControlServicer_to_server,
            ControlServicer(control, self.insecure, guard, self.enrollment, self.enroll_address),
        )
        _add(server, "fedge.v1.Control", guard.wrap(control_handlers, "admin"))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.insecure:
            self.port = server.add_insecure_port(self.address)
        else:
            assert self.certs is not None
            self.tls = ReloadingCredentials(self.certs)
            self.port = server.add_secure_port(self.address, self.tls.credentials())
        if not self.port:
            raise FedgeError(f"cannot listen on {self.address}")
        await server.start()
        self._server = server
        if self.enroll_address and self.enrollment is not None:
            assert self.certs is not None
            self.enroll_tls = ReloadingCredentials(self.certs, enrollment=True)
            self._enroll_server = await start_listener(
                self.enroll_address, self.enroll_tls, self.enrollment
            )
        if self._health_server is not None:
            await self._health_server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _health_listener(self) -> grpc.aio.Server:
        """grpc.health.v1 alone, in plaintext: the kubelet's gRPC probe has no TLS, and
        the mTLS port asks every client for a certificate. It tells only SERVING or
        NOT_SERVING, so it may listen beyond loopback; nothing else is served there."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_allowed_incoming_connections", 16),
                # a request is a service name: a few streams each, small messages
                ("grpc.max_concurrent_streams", HEALTH_STREAMS),
                ("grpc.max_receive_message_length", HEALTH_MESSAGE),
                # a probe connects, asks and leaves: a connection held open is let go
                ("grpc.max_connection_idle_ms", 10_000),
                ("grpc.max_connection_age_ms", 60_000),
                ("grpc.max_connection_age_grace_ms", 5_000),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            self.health_port = server.add_insecure_port(self.health_address)
        except RuntimeError:  # grpcio raises on an address it cannot resolve or bind
            self.health_port = 0
        if not self.health_port:
            raise FedgeError(f"cannot listen on --health-address {self.health_address}")
        return server

    def reload_certificates(self) -> None:
        """Read the server's certificate files again before the next handshake (SIGHUP)."""
        for tls in (self.tls, self.enroll_tls):
            if tls is not None:
                tls.reload()

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace=grace)
        if self._enroll_server is not None:
            await self._enroll_server.stop(grace=grace)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)


class _Handlers:
    """Catches the method handlers the generated code registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def _handlers(add: Callable[[Any, Any], None], servicer: object) -> dict[str, Any]:
    """A servicer's method handlers, as its generated `add_…_to_server` makes them."""
    caught = _Handlers()
    add(servicer, caught)
    return caught.handlers


def _add(server: grpc.aio.Server, service: str, handlers: dict[str, Any]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (each node holds a connection);
    returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("open-file limit: %d", soft)
    return soft
