"""A registry of fedge's metrics with the process's own (CPU, memory, open files), served
as ``/metrics`` over HTTP by prometheus-client's WSGI app in a threaded server with
bounded connections and read timeouts."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from fedge import __version__
from fedge.errors import FedgeError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Metrics show the fleet's shape: loopback unless the operator opens them up."""
MAX_CONNECTIONS = 16
"""Connections served at once (a thread each); one more is closed unanswered."""
READ_TIMEOUT = 10.0
"""Seconds a connection may send nothing: prometheus-client's own server has no bound
on either, so idle sockets would each hold a thread for ever."""


def new_registry(role: str) -> CollectorRegistry:
    """A registry with ``process_*`` (CPU seconds, resident memory, file descriptors),
    ``python_info`` and ``fedge_build_info{version, role}``."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` beside each
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    build = Info("fedge_build", "The fedge release; the role of this process.", registry=registry)
    build.info({"version": __version__, "role": role})
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, host: str = DEFAULT_HOST) -> Any:
    """Serve ``http://HOST:PORT/metrics`` in a daemon thread; returns the HTTP server
    (``server_port`` is the port bound, `shutdown()` stops it)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class: type[_BoundedServer] = type(
            "_Server", (_BoundedServer,), {"address_family": family}
        )
        server = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_Handler
        )
    except OSError as exc:
        raise FedgeError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


class _BoundedServer(ThreadingWSGIServer):
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(READ_TIMEOUT)

    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
        pass
