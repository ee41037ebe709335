"""The inference server's HTTP side: a Starlette app that answers the Open Inference
Protocol (KServe v2), the v1 predict call and Prometheus scrapes, for the one model its
source holds. Each request takes the source's current model once and uses only that, so
a hot swap never changes the model under a request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread
import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fedge import __version__
from fedge.observe.exposition import new_registry
from fedge.serve.model import BadInput, ServedModel
from fedge.serve.protocol import decode_v1, decode_v2, encode_v1, encode_v2

DEFAULT_MAX_BODY = 32 << 20
INLINE_SECONDS = 0.001
"""A run expected to take less is done on the event loop: handing it to a worker thread
and back costs the loop ~50 µs, more than a small model's whole run, and blocking the
loop that briefly delays no other request by much."""
INFER_PREFIX, INFER_SUFFIX = "/v2/models/", "/infer"


class Source(Protocol):
    """Where the served model comes from: a `ModelFollower`, or one fixed file."""

    current: ServedModel | None
    error: str
    checked_at: float
    swaps: int
    tag: str

    def check_now(self, timeout: float = 30.0) -> bool: ...


@dataclass
class FixedSource:
    """One ONNX file, loaded once (``fedge serve --onnx``)."""

    current: ServedModel | None
    error: str = ""
    checked_at: float = 0.0
    swaps: int = 1
    tag: str = ""

    def check_now(self, timeout: float = 30.0) -> bool:
        return True


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    source: Source,
    name: str,
    *,
    store: str = "",
    max_body: int = DEFAULT_MAX_BODY,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    """The ASGI app serving `source`'s model as `name`; its metrics go into `registry`
    (a node's, beside it), else into one of its own with the process's."""
    metrics = registry if registry is not None else new_registry("serve")
    requests = Counter(
        "fedge_serve_requests", "Requests by endpoint and status code.",
        ["endpoint", "code"], registry=metrics,
    )  # fmt: skip
    seconds = Histogram(
        "fedge_serve_request_duration_seconds", "Time to answer, by endpoint.", ["endpoint"],
        registry=metrics,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    )  # fmt: skip
    metrics.register(_SourceCollector(source, name))

    def endpoint(
        label: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def respond(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except BadInput as exc:
                response = _error(400, str(exc))
            except HttpError as exc:
                response = _error(exc.status, str(exc))
            requests.labels(label, str(response.status_code)).inc()
            seconds.labels(label).observe(time.perf_counter() - start)
            return response

        return respond

    def model_of(asked: str) -> ServedModel:
        if asked != name:
            raise HttpError(404, f"unknown model {asked!r}: this server serves {name!r}")
        model = source.current
        if model is None:
            raise HttpError(503, f"model {name!r} is not loaded yet: {source.error or 'loading'}")
        return model

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HttpError(413, f"the body is {declared} bytes, the limit is {max_body}")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > max_body:
                raise HttpError(413, f"the body is over the limit of {max_body} bytes")
            parts.append(part)
        return b"".join(parts)

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        if source.current is None:
            return _json({"ready": False, "reason": source.error or "loading"}, 503)
        return _json({"ready": True})

    async def server_metadata(request: Request) -> Response:
        return _json(
            {
                "name": "fedge",
                "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository"],
            }
        )

    async def model_metadata(request: Request) -> Response:
        return _json(_describe(model_of(request.path_params["name"]), source, store))

    async def model_ready(request: Request) -> Response:
        model_of(request.path_params["name"])
        return _json({"name": name, "ready": True})

    async def infer(request: Request) -> Response:
        model = model_of(request.path_params["name"])
        body = await body_of(request)
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise BadInput(f"Inference-Header-Content-Length must be a byte count, got {header!r}")
        decoded, feeds = decode_v2(body, None if header is None else int(header), model)
        results = await run(model, feeds)
        content, headers = encode_v2(model, decoded, results)
        return Response(content, headers=headers)

    async def predict(request: Request) -> Response:
        asked, _, verb = request.path_params["call"].rpartition(":")
        if verb != "predict":
            raise HttpError(404, f"unknown call {request.path_params['call']!r}: use NAME:predict")
        model = model_of(asked)
        feeds = decode_v1(await body_of(request), model)
        results = await run(model, feeds)
        return Response(encode_v1(model, results), media_type="application/json")

    async def v1_status(request: Request) -> Response:
        model = model_of(request.path_params["name"])
        return _json({"model_version_status": [{"version": model.version, "state": "AVAILABLE"}]})

    async def repository_index(request: Request) -> Response:
        model = source.current
        state = {"name": name, "version": model.version if model else "", "state": "READY"}
        if model is None:
            state["state"] = "UNAVAILABLE"
        if source.error:
            state["reason"] = source.error
        return _json([state])

    async def load(request: Request) -> Response:
        """Check the store now (a node on this device saw a new model); answers with
        what is served once that check is done."""
        asked = request.path_params["name"]
        if asked != name:
            raise HttpError(404, f"unknown model {asked!r}: this server serves {name!r}")
        done = await anyio.to_thread.run_sync(source.check_now)
        model = source.current
        return _json(
            {
                "name": name,
                "version": model.version if model else "",
                "checked": done,
                "error": source.error,
            }
        )

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics), media_type="text/plain; version=0.0.4")

    routes = [
        ("/v2/health/live", "live", live, "GET"),
        ("/v2/health/ready", "ready", ready, "GET"),
        ("/v2", "server", server_metadata, "GET"),
        ("/v2/models/{name}", "metadata", model_metadata, "GET"),
        ("/v2/models/{name}/ready", "ready", model_ready, "GET"),
        ("/v2/models/{name}/infer", "infer", infer, "POST"),
        ("/v2/repository/index", "repository", repository_index, "POST"),
        ("/v2/repository/models/{name}/load", "load", load, "POST"),
        ("/v1/models/{name}", "v1_status", v1_status, "GET"),
        ("/v1/models/{call}", "predict", predict, "POST"),
        ("/metrics", "metrics", scrape, "GET"),
    ]
    app = Starlette(
        routes=[
            Route(path, endpoint(label, handler), methods=[method])
            for path, label, handler, method in routes
        ]
    )
    fast_infer = endpoint("infer", infer)

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        """A POST to /v2/models/NAME/infer goes straight to its handler: Starlette's
        middleware and router cost ~35 µs a request, more than a small model's run."""
        path = scope.get("path", "")
        asked = path[len(INFER_PREFIX) : -len(INFER_SUFFIX)]
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and path.startswith(INFER_PREFIX)
            and path.endswith(INFER_SUFFIX)
            and asked
            and "/" not in asked
        ):
            scope["path_params"] = {"name": asked}
            response = await fast_infer(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await app(scope, receive, send)

    return serve


async def run(model: ServedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`model.run(feeds)`: inline when it is quick, else in a worker thread."""
    if model.expected_seconds(feeds) < INLINE_SECONDS:
        return model.run(feeds)
    return await asyncio.get_running_loop().run_in_executor(None, model.run, feeds)


def _describe(model: ServedModel, source: Source, store: str) -> dict[str, Any]:
    """KServe v2 model metadata, plus where the model came from and how the store is."""
    manifest = model.manifest
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [_tensor(s.name, s.datatype, s.shape) for s in model.inputs],
        "outputs": [_tensor(s.name, s.datatype, s.shape) for s in model.outputs],
        "parameters": {
            "providers": list(model.providers),
            "loaded_at": model.loaded_at,
            "store": store,
            "tag": source.tag,
            "store_checked_at": source.checked_at,
            "store_error": source.error,
            "swaps": source.swaps,
            "run": manifest.run if manifest else "",
            "round": manifest.round if manifest else 0,
            "metrics": dict(manifest.metrics) if manifest else {},
            "signed_by": manifest.key_id if manifest else "",
        },
    }


def _tensor(name: str, datatype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _json(content: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(content), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class _SourceCollector:
    """What the source knows, read at scrape time."""

    def __init__(self, source: Source, name: str) -> None:
        self.source, self.name = source, name

    def collect(self) -> Any:
        model = self.source.current
        info = InfoMetricFamily("fedge_serve_model", "The version served.", labels=["model"])
        info.add_metric([self.name], {"version": model.version if model else ""})
        yield info
        swaps = GaugeMetricFamily("fedge_serve_model_swaps", "Versions loaded since start.")
        swaps.add_metric([], self.source.swaps)
        yield swaps
        up = GaugeMetricFamily("fedge_serve_store_up", "1 if the last store check worked.")
        up.add_metric([], 0.0 if self.source.error else 1.0)
        yield up
        checked = GaugeMetricFamily(
            "fedge_serve_store_checked_timestamp_seconds", "When the store was last checked."
        )
        checked.add_metric([], self.source.checked_at)
        yield checked
