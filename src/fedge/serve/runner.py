"""Running the inference server: a model source (a tag followed in the registry, or one
ONNX file) behind the HTTP app on uvicorn — in the foreground (`fedge serve`) or in a
thread beside a training node (`fedge node --serve`)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.errors import FedgeError
from fedge.serve.app import DEFAULT_MAX_BODY, FixedSource, Source, create_app
from fedge.serve.follower import ModelFollower
from fedge.serve.model import ServedModel

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model: str
    host: str = "0.0.0.0"
    port: int = 8080
    store: str = ""
    tag: str = "latest"
    release_keys: list[Path] = field(default_factory=list)
    onnx: Path | None = None
    """Serve this file instead of following the store."""
    device: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    poll: float = 30.0
    cache_dir: Path | None = None
    endpoint: str = ""
    region: str = ""
    profile: str = ""
    credentials_file: str = ""
    max_body: int = DEFAULT_MAX_BODY
    threads: int = 0


def open_source(settings: ServeSettings) -> Source:
    """The model source `settings` describe, started (a follower loads in the background)."""
    if settings.onnx is not None:
        return FixedSource(
            ServedModel.load(settings.onnx, settings.model, "file", threads=settings.threads)
        )
    if not settings.store:
        raise FedgeError("serving needs --store URL (and --model), or --onnx FILE")
    if not settings.release_keys:
        raise FedgeError(
            "serving from a store needs --release-key (the CA's release.pub): only signed "
            "models are loaded"
        )
    from fedge.node.cache import default_cache_dir
    from fedge.store import open_registry

    registry = open_registry(
        settings.store,
        endpoint=settings.endpoint,
        region=settings.region,
        profile=settings.profile,
        credentials_file=settings.credentials_file,
        verify_keys=settings.release_keys,
    )
    follower = ModelFollower(
        registry,
        settings.model,
        settings.tag,
        settings.cache_dir or default_cache_dir("serve"),
        device=settings.device,
        labels=settings.labels,
        interval=settings.poll,
        threads=settings.threads,
    )
    follower.start()
    return follower


class InferenceServer:
    """uvicorn serving `source`; `start` runs it in a thread, `run` in the foreground."""

    def __init__(
        self, source: Source, settings: ServeSettings, registry: CollectorRegistry | None = None
    ) -> None:
        """`registry`: metrics served on /metrics besides the server's own (a node's)."""
        import uvicorn

        self.source = source
        app = create_app(
            source, settings.model, store=settings.store, max_body=settings.max_body,
            registry=registry,
        )  # fmt: skip
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            http="httptools",
            loop="auto",  # uvloop (the serve extra) when installed, else asyncio
            lifespan="off",
            access_log=False,
            proxy_headers=False,  # X-Forwarded-For would only name clients in access logs
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self._server.run()
        self._stop_source()
        if not self._server.started:
            raise FedgeError("the inference server could not start (is the port in use?)")

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="fedge-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise FedgeError("the inference server could not start (is the port in use?)")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._stop_source()

    def _stop_source(self) -> None:
        if isinstance(self.source, ModelFollower):
            self.source.stop()
