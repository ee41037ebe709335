"""deploy/healthcheck.py, the containers' HEALTHCHECK: it asks what the command it finds
serves (a real gRPC health service, a real HTTP server), and says why when unhealthy."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedge.launch import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def grpc_health() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


class _Live(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v2/health/live" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Live)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_server_is_asked_on_its_health_address(
    healthcheck: ModuleType, grpc_health: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = grpc_health
    args = [
        "/opt/fedge/bin/fedge",
        "--log-level=info",
        "server",
        f"--health-address=0.0.0.0:{port}",
    ]
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.check(args) == ""
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.check(args) == f"grpc health at 127.0.0.1:{port}: NOT_SERVING"
    # no --health-address: nothing to ask, healthy while it runs
    assert healthcheck.check(["fedge", "server", "--address", "0.0.0.0:9091"]) == ""


def test_serve_and_a_serving_node_are_asked_over_http(
    healthcheck: ModuleType, http_port: int
) -> None:
    assert healthcheck.check(["fedge", "serve", "--model", "m", "--port", str(http_port)]) == ""
    node = ["fedge", "node", "--cid", "3", "--serve", f"0.0.0.0:{http_port}"]
    assert healthcheck.check(node) == ""
    assert healthcheck.check(["fedge", "node", "--cid", "3"]) == ""  # no port: running is healthy
    closed = free_port()
    with pytest.raises(OSError):  # main() turns this into "unhealthy" and exit 1
        healthcheck.check(["fedge", "serve", f"--port={closed}"])
