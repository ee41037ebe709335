"""The gRPC transport's server side: a grpc.aio server with mutual TLS (plaintext only on
loopback), the Fleet, Control and standard health services."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedge.chunks import CHUNK_SIZE
from fedge.errors import FedgeError
from fedge.fleet.server import Aggregator
from fedge.fleet.service import FleetService
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.control import ControlServicer
from fedge.transport.grpc.servicer import FleetServicer
from fedge.transport.grpc.tls import require_loopback, server_credentials

SERVICE = "fedge.v1.Fleet"
RECEIVE_WINDOW = 4 << 20
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
]


class GrpcTransport:
    def __init__(self, address: str, certs: Path | None, insecure: bool = False) -> None:
        if insecure:
            require_loopback(address)
        elif certs is None:
            raise FedgeError("--certs is required (or --insecure on loopback)")
        self.address, self.certs, self.insecure = address, certs, insecure
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()

    async def start(self, service: FleetService, control: Aggregator) -> None:
        server = grpc.aio.server(options=OPTIONS)
        _add_fleet(FleetServicer(service, self.insecure, CHUNK_SIZE), server)
        pb_grpc.add_ControlServicer_to_server(ControlServicer(control, self.insecure), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.insecure:
            self.port = server.add_insecure_port(self.address)
        else:
            assert self.certs is not None
            self.port = server.add_secure_port(self.address, server_credentials(self.certs))
        if not self.port:
            raise FedgeError(f"cannot listen on {self.address}")
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace=grace)


class _Handlers:
    """Catches the method handlers the generated code registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def _add_fleet(servicer: FleetServicer, server: grpc.aio.Server) -> None:
    """The generated handlers, with a serializer that also passes bytes encoded by hand
    through (`convert.encode`: messages that carry payloads)."""
    caught = _Handlers()
    pb_grpc.add_FleetServicer_to_server(servicer, caught)
    handlers = {
        name: handler._replace(response_serializer=convert.encode)
        for name, handler in caught.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
