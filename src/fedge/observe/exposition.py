"""A registry of fedge's metrics with the process's own (CPU, memory, open files), served
as ``/metrics`` over HTTP by prometheus-client's threaded server."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import start_http_server

from fedge import __version__
from fedge.errors import FedgeError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Metrics show the fleet's shape: loopback unless the operator opens them up."""


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
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise FedgeError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
