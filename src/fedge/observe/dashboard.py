"""The dashboard: a read-only web page of the run, its rounds and its nodes, served by
`fedge server --dashboard HOST:PORT` and kept live with server-sent events.

It shows what `fedge status` and `fedge nodes list` show — `Aggregator.status()` and
`Aggregator.nodes()`, the same source — plus the round records of the state database,
and it runs on the server's event loop beside the transport. So that a thousand nodes
and a few open browsers cost the round engine next to nothing, one `Feed` builds each
part of the page at most once a tick, encodes it once and hands the same bytes to every
browser (at most `MAX_CLIENTS`); a part that did not change is not sent; new round
records are read from the database by key, not the whole history; a browser that falls
`QUEUE` messages behind is dropped and reconnects to a fresh copy; with no browser open
nothing is built at all.

Access needs the admin token (``Authorization: Bearer``, or the cookie the login form
sets: an HMAC of the token, never the token) or, when served over TLS with the
server's certificate, an admin certificate of the project CA. Anything else gets 401.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedge.errors import FedgeError
from fedge.fleet.events import Event
from fedge.history import RoundRecord
from fedge.messages import NodeInfo

if TYPE_CHECKING:
    from fedge.fleet.server import Aggregator

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TOKEN_FILE = "dashboard.token"
"""In the state directory: the token, made on first use when none is given."""
MIN_TOKEN = 16
MAX_CLIENTS = 16
"""Browsers watching at once; one more gets 503."""
MAX_CONNECTIONS = 64
"""Open connections; one more is closed at once."""
REQUEST_TIMEOUT = 10.0
"""Seconds a new connection has to send its first request's head, and a sign-in its
form (uvicorn times out only the idle time between requests, so sockets that never ask
would be held forever and, at MAX_CONNECTIONS, lock every browser out)."""
QUEUE = 8
"""Messages a browser may fall behind before it is dropped (it reconnects)."""
TICK = 1.0
NODES_EVERY = 2.0
"""Seconds between node lists: each one reads the nodes table (in a thread) and holds
the loop ~20 ms for 1,000 nodes (`benchmarks/dashboard_bench.py`), so above 1,000
nodes the interval grows with the fleet (`NODES_PER_SECOND`)."""
NODES_PER_SECOND = 500
EVENTS_KEPT = 50
SHOWN_BY_ROUNDS = frozenset({"upload.accepted", "round.finished"})
"""Events left out of the list: one per result, or per round, which the rounds show."""
FAILURES_SHOWN = 20
"""Failure reasons kept per round (all are counted)."""
MISSING_SHOWN = 50
TEXT = 300
"""Characters kept of any text a node may have written (reasons, labels)."""
COOKIE = "fedge_dashboard"
MAX_LOGIN_BODY = 4096
PEER_CERT = "fedge.peer_certificate"
STYLESHEET = '<link rel="stylesheet" href="/static/dashboard.css">'


def _pages() -> tuple[bytes, str, list[tuple[bytes, bytes]]]:
    """The page and the sign-in page with the stylesheet inlined (one request fewer
    before the first paint), and the headers of every response: no scripts but ours, no
    style but that one (by its hash), no framing, no caching, no referrer."""
    css = (STATIC / "dashboard.css").read_text()
    style = f"<style>{css}</style>"
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    index = (STATIC / "index.html").read_text().replace(STYLESHEET, style)
    login = (STATIC / "login.html").read_text().replace(STYLESHEET, style)
    policy = (
        f"default-src 'none'; script-src 'self'; style-src 'sha256-{digest}'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    )
    headers = [
        (b"content-security-policy", policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
    ]
    return index.encode(), login, headers


def load_token(path: Path) -> str:
    """The token in `path`, made there (random, mode 0600) if the file does not exist.
    A new file appears whole (written aside, then linked), so a reader never sees it
    half written."""
    if not path.exists():
        aside = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            os.link(aside, path)
            log.warning("dashboard: made a new admin token in %s", path)
        except FileExistsError:  # another process made it first: use that one
            pass
        except OSError as exc:
            raise FedgeError(f"cannot create the dashboard token file {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FedgeError(f"cannot read the dashboard token file {path}: {exc}") from exc
    return check_token(token, str(path))


def check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN or not token.isascii() or not token.isprintable():
        raise FedgeError(
            f"dashboard token from {where}: expected at least {MIN_TOKEN} printable ASCII "
            f"characters, found {len(token)} characters"
        )
    return token


# --- who may look ------------------------------------------------------------------


class Access:
    """The admin token (compared in constant time) or an admin certificate."""

    def __init__(
        self,
        token: str,
        admins: tuple[str, ...] = ("admin",),
        refusal: Callable[[str, int], str | None] | None = None,
    ) -> None:
        self._token = token.encode()
        self.session = hmac.new(self._token, b"fedge dashboard session", hashlib.sha256)
        self.admins, self.refusal = admins, refusal
        """`refusal(name, serial)`: why a certificate is revoked, or None."""

    def token_ok(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self._token)

    def cookie(self) -> str:
        return self.session.hexdigest()

    def allows(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return self.token_ok(value.strip())
        cookie = request.cookies.get(COOKIE, "")
        if cookie:
            return hmac.compare_digest(cookie.encode("utf-8", "replace"), self.cookie().encode())
        return self.admin_certificate(request.scope.get("state", {}).get(PEER_CERT))

    def admin_certificate(self, cert: dict[str, Any] | None) -> bool:
        """Whether the TLS peer's certificate (verified by the handshake against the
        project CA) names an admin, in the admin role, and is not revoked."""
        if not cert or self.refusal is None:
            return False
        subject = dict(item for rdn in cert.get("subject", ()) for item in rdn)
        name, role = subject.get("commonName"), subject.get("organizationalUnitName")
        if role != "admin" or name not in self.admins:
            return False
        try:
            serial = int(cert.get("serialNumber", ""), 16)
        except ValueError:
            return False
        return self.refusal(name, serial) is None


# --- what the page shows -------------------------------------------------------------


class Feed:
    """The page's parts, built on the event loop from the aggregator's own status, and
    fanned out to the browsers as server-sent events."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.clients: set[asyncio.Queue[bytes | None]] = set()
        self.settings = self._config()
        self.config = _event("config", self.settings)
        self.rounds: list[dict[str, Any]] = []
        self.failures: Counter[int] = Counter()
        self.last_failure: dict[int, str] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.run: dict[str, Any] = {}
        self.nodes: list[dict[str, Any]] = []
        self._nodes_body = b""
        self._nodes_at = -NODES_EVERY
        self._events_changed = True
        self._after = (0, -1)
        """(round, attempt) of the newest record read."""
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        self._closed = False
        aggregator.events.subscribe(self._on_event)

    def _config(self) -> dict[str, Any]:
        runs, strategy = self.aggregator.runs, self.aggregator.coordinator.strategy
        return {
            "run_id": runs.run_id,
            "strategy": strategy.name,
            "settings": runs.config.settings(),
        }

    # --- browsers ----------------------------------------------------------------------

    async def subscribe(self) -> asyncio.Queue[bytes | None] | None:
        """A queue that starts with the whole page, or None if too many watch already."""
        if len(self.clients) >= MAX_CLIENTS or self._closed:
            return None
        await self._fresh()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        queue.put_nowait(self.config)
        queue.put_nowait(_event("rounds", {"from": 0, "rounds": self.rounds}))
        queue.put_nowait(self._nodes_event())
        queue.put_nowait(_event("events", list(self.events)))
        queue.put_nowait(_event("run", self.run))
        self.clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.clients.discard(queue)

    def close(self) -> None:
        """Ends every browser's stream, after what was queued for it."""
        self._closed = True
        for queue in list(self.clients):
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                _drop(queue)
        self.clients.clear()

    def _broadcast(self, message: bytes) -> None:
        for queue in list(self.clients):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # it reads too slowly: it reconnects to a fresh copy
                self.clients.discard(queue)
                _drop(queue)

    # --- building ----------------------------------------------------------------------

    async def run_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(TICK)
            if self.clients:
                try:
                    await self.refresh(broadcast=True)
                except Exception:  # a bad read must not end the dashboard
                    log.exception("dashboard: could not refresh")

    async def snapshot(self) -> dict[str, Any]:
        """The whole page as one JSON-ready dict (``GET /api/snapshot``)."""
        await self._fresh()
        return {
            "config": self.settings,
            "run": self.run,
            "rounds": self.rounds,
            "nodes": self.nodes,
            "events": list(self.events),
        }

    async def _fresh(self) -> None:
        """Refresh if the parts are older than a tick; a failure keeps the last ones."""
        if time.monotonic() - self._refreshed > TICK:
            try:
                await self.refresh()
            except Exception:
                log.exception("dashboard: could not refresh")

    async def refresh(self, broadcast: bool = False) -> None:
        async with self._lock:
            await self._refresh(broadcast)

    async def _refresh(self, broadcast: bool) -> None:
        aggregator = self.aggregator
        runs, now = aggregator.runs, time.monotonic()
        records = await asyncio.to_thread(runs.store.rounds_after, runs.run_id, *self._after)
        if records:
            start = len(self.rounds)
            for record in records:
                self._add_round(record)
            if broadcast:
                self._broadcast(_event("rounds", {"from": start, "rounds": self.rounds[start:]}))
        every = max(NODES_EVERY, len(self.nodes) / NODES_PER_SECOND)
        if records or now - self._nodes_at >= every:
            self._nodes_at = now
            nodes = await aggregator.nodes()
            self.nodes = [self._node(n) for n in nodes]
            body = msgspec.json.encode(self.nodes)
            if body != self._nodes_body:
                self._nodes_body = body
                if broadcast:
                    self._broadcast(self._nodes_event())
        if self._events_changed:
            self._events_changed = False
            if broadcast:
                self._broadcast(_event("events", list(self.events)))
        self.run = self._run()
        if broadcast:  # every tick: the clock, progress, and a keepalive
            self._broadcast(_event("run", self.run))
        self._refreshed = now

    def _run(self) -> dict[str, Any]:
        aggregator = self.aggregator
        status = aggregator.status()
        privacy = _privacy(aggregator.coordinator.strategy)
        epsilon = status.metrics.get("epsilon")
        if epsilon is None and self.rounds:
            epsilon = self.rounds[-1]["strategy"].get("epsilon")
        return {
            "run_id": status.run_id,
            "state": status.state,
            "reason": status.reason[:TEXT],
            "round": status.round,
            "total_rounds": status.total_rounds,
            "rounds_done": sum(r["status"] == "ok" for r in self.rounds),
            "received": status.received,
            "expected": status.expected,
            "waiting_for": status.waiting_for,
            "missing": status.missing[:MISSING_SHOWN],
            "missing_count": len(status.missing),
            "metrics": status.metrics,
            "private": privacy is not None,
            "epsilon": epsilon,
            "epsilon_budget": None if privacy is None else privacy.epsilon_budget,
            "delta": None if privacy is None else privacy.delta,
            "sessions": len(status.nodes),
            "live": sum(n.live for n in status.nodes),
            "server_time": time.time(),
        }

    def _add_round(self, record: RoundRecord) -> None:
        for failures in (record.failures, record.evaluate_failures):
            for cid, reason in failures.items():
                self.failures[cid] += 1
                self.last_failure[cid] = reason[:TEXT]
        shown = list(record.failures.items())[:FAILURES_SHOWN]
        self.rounds.append(
            {
                "round": record.round,
                "attempt": record.attempt,
                "status": record.status,
                "reason": record.reason[:TEXT],
                "selected": len(record.selected),
                "participants": len(record.participants),
                "examples": record.num_examples,
                "failed": len(record.failures),
                "failures": [[cid, reason[:TEXT]] for cid, reason in shown],
                "evaluate_failed": len(record.evaluate_failures),
                "metrics": record.metrics,
                "evaluate": record.evaluate_metrics,
                "fit": record.fit_metrics,
                "strategy": record.strategy_metrics,
                "wall_time": record.wall_time,
                "fit_time": record.fit_time,
                "wait_time": record.wait_time,
                "evaluate_time": record.evaluate_time,
            }
        )
        self._after = (record.round, record.attempt)

    def _node(self, node: NodeInfo) -> dict[str, Any]:
        cid = node.cid
        return {
            "name": node.node_id,
            "cid": cid,
            "address": node.address,
            "connected": node.connected,
            "live": node.live,
            "last_seen": node.last_seen,
            "tasks_done": node.tasks_done,
            "failures": 0 if cid is None else self.failures[cid],
            "last_failure": "" if cid is None else self.last_failure.get(cid, ""),
            "version": node.version[:TEXT],
            "serving": node.serving[:TEXT],
            "state": node.state,
        }

    def _nodes_event(self) -> bytes:
        return b"".join(
            (b'event: nodes\ndata: {"server_time":', msgspec.json.encode(time.time()),
             b',"nodes":', self._nodes_body or b"[]", b"}\n\n")
        )  # fmt: skip

    def _on_event(self, event: Event) -> None:
        if event.name in SHOWN_BY_ROUNDS:
            return
        fields = {
            k: v if isinstance(v, int | float) else str(v)[:TEXT] for k, v in event.fields.items()
        }
        self.events.appendleft({"name": event.name, "time": event.time, "fields": fields})
        self._events_changed = True


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _drop(queue: asyncio.Queue[bytes | None]) -> None:
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(None)


def _privacy(strategy: Any) -> Any:
    """The differential-privacy wrapper in a chain of wrappers, if there is one."""
    while strategy is not None:
        if hasattr(strategy, "epsilon_budget"):
            return strategy
        strategy = getattr(strategy, "inner", None)
    return None


# --- the web app ----------------------------------------------------------------------


def create_app(feed: Feed, access: Access, *, secure: bool = False) -> ASGIApp:
    index, login, headers = _pages()

    def denied(request: Request, message: str = "") -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse(
                {"error": "the dashboard needs the admin token (Authorization: Bearer) "
                 "or an admin certificate"},
                401,
                headers={"www-authenticate": 'Bearer realm="fedge dashboard"'},
            )  # fmt: skip
        note = f'<p class="error">{message}</p>' if message else ""
        return HTMLResponse(login.replace("<!--message-->", note), 401)

    async def page(request: Request) -> Response:
        if not access.allows(request):
            return denied(request)
        return Response(index, media_type="text/html; charset=utf-8")

    async def read_form(request: Request) -> bytes | None:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return None
        return body

    async def sign_in(request: Request) -> Response:
        try:  # a form sent a byte at a time would hold one of the connections
            body = await asyncio.wait_for(read_form(request), REQUEST_TIMEOUT)
        except TimeoutError:
            return Response(f"login form not sent within {REQUEST_TIMEOUT:g} s", 408)
        if body is None:
            return Response("login form too large", 413)
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
        if not token or not access.token_ok(token):
            return denied(request, "That is not the admin token." if token else "")
        response = RedirectResponse("/", 303)
        response.set_cookie(
            COOKIE, access.cookie(), httponly=True, samesite="strict", secure=secure
        )
        return response

    async def snapshot(request: Request) -> Response:
        if not access.allows(request):
            return denied(request)
        return Response(msgspec.json.encode(await feed.snapshot()), media_type="application/json")

    async def events(request: Request) -> Response:
        if not access.allows(request):
            return denied(request)
        queue = await feed.subscribe()
        if queue is None:
            return JSONResponse(
                {"error": f"at most {MAX_CLIENTS} dashboards may watch at once"}, 503
            )

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                while (message := await queue.get()) is not None:
                    yield message
            finally:
                feed.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    def static(name: str, media_type: str) -> Route:
        async def serve(request: Request) -> Response:  # no data in them: no token needed
            return FileResponse(STATIC / name, media_type=media_type)

        return Route(f"/static/{name}", serve)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/login", sign_in, methods=["POST"]),
            Route("/api/snapshot", snapshot),
            Route("/api/events", events),
            static("dashboard.js", "text/javascript"),
        ]
    )
    return _SecurityHeaders(app, headers)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> None:
        self.app, self.headers = app, headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- serving --------------------------------------------------------------------------


class Dashboard:
    """The dashboard's HTTP server on the running event loop: HTTPS with the server's
    certificate (and admin client certificates) when `certs` is given, else HTTP."""

    def __init__(
        self, aggregator: Aggregator, address: str, token: str, certs: Path | None = None
    ) -> None:
        self.host, self.port = parse_address(address)
        self.feed = Feed(aggregator)
        refusal = aggregator.revocations.refusal if certs is not None else None
        self.access = Access(token, tuple(aggregator.settings.admins), refusal)
        tls: dict[str, Any] = {}
        if certs is not None:
            tls = {
                "ssl_certfile": str(certs / "server.crt"),
                "ssl_keyfile": str(certs / "server.key"),
                "ssl_ca_certs": str(certs / "ca.crt"),
                "ssl_cert_reqs": ssl.CERT_OPTIONAL,  # a browser without one uses the token
            }
        self.scheme = "https" if certs is not None else "http"
        self.config = uvicorn.Config(
            create_app(self.feed, self.access, secure=certs is not None),
            http=_PeerCertificates,
            lifespan="off",
            log_config=None,  # the server's logging stays as it is
            access_log=False,
            proxy_headers=False,
            server_header=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=1,
            ws="none",
            **tls,
        )
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Listen (errors say why), then serve in the background of the loop."""
        try:
            self.config.load()
        except (OSError, ssl.SSLError) as exc:
            raise FedgeError(f"dashboard: cannot use the server's certificate: {exc}") from exc
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise FedgeError(f"dashboard: cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.port = sock.getsockname()[1]
        self._server = _QuietServer(self.config)
        self._tasks = [
            asyncio.ensure_future(self._server.serve(sockets=[sock])),
            asyncio.ensure_future(self.feed.run_forever()),
        ]
        while not self._server.started:
            if self._tasks[0].done():
                self._tasks[0].result()
                raise FedgeError(f"dashboard: could not start on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        log.warning("dashboard on %s", self.url)

    async def stop(self) -> None:
        """Stop serving; open pages get the run's final state first (finished, failed or
        stopped, with every round), and keep showing it."""
        if self.feed.clients:
            try:
                await asyncio.wait_for(self.feed.refresh(broadcast=True), 5.0)
            except Exception:
                log.exception("dashboard: could not send the final state")
        self.feed.close()
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise FedgeError(f"--dashboard must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _PeerCertificates(H11Protocol):
    """uvicorn's h11 protocol, keeping the TLS peer's verified certificate in the
    request scope's state (uvicorn passes no TLS details to the app), with a bound on
    connections and on the wait for a first request."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()
            return
        self.loop.call_later(REQUEST_TIMEOUT, self._no_request)
        cert = transport.get_extra_info("peercert")
        if cert:  # this connection's own copy of the state each request's scope starts from
            self.app_state = {**self.app_state, PEER_CERT: cert}

    def _no_request(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


class _QuietServer(uvicorn.Server):
    """Leaves the signals to the fedge server, which stops the dashboard itself."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
