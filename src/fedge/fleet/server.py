"""One run served to a fleet: the coordinator in its own thread, the fleet service and a
transport on the asyncio loop, and the run's durable record.

`fedge server` builds an `Aggregator` from the config and a transport (gRPC, later MQTT),
and serves until the run finishes, fails or is stopped. The aggregator also answers the
operator — status, stop, assign, nodes — through whatever control channel the transport
offers. It never imports a transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedge.app import App
from fedge.asynchronous import workflow_for
from fedge.coordinator import Coordinator, Observer
from fedge.errors import FedgeError, QuorumError
from fedge.fleet.bridge import ServiceFleet
from fedge.fleet.events import Events
from fedge.fleet.revocation import CRL_FILE, Revocations
from fedge.fleet.runs import RunService
from fedge.fleet.service import FleetService, FleetSettings, Stopped
from fedge.history import RoundRecord
from fedge.malloc import limit_arenas
from fedge.messages import CertificateInfo, NodeInfo, Status
from fedge.metrics import Metrics
from fedge.strategy.fedbuff import FedBuff
from fedge.weights import State, Weights

if TYPE_CHECKING:  # imported when [store] is set: boto3 is loaded only then
    from fedge.store.publisher import Publisher

log = logging.getLogger(__name__)

PUBLISH_WAIT = 60.0
"""Seconds a finished run waits for its last models to reach the store before exiting."""


class Transport(Protocol):
    """Carries the fleet's messages (and the operator's) over one kind of link."""

    @property
    def port(self) -> int: ...

    async def start(self, service: FleetService, control: Aggregator) -> None: ...

    async def stop(self, grace: float) -> None: ...


@dataclass
class ServerSettings:
    state_dir: Path
    admins: tuple[str, ...] = ("admin",)
    """Identities allowed to use the control service."""
    wait_for: int | None = None
    """Clients needed before a round starts (overrides strategy.min_available_clients)."""
    heartbeat_interval: float = 5.0
    keepalive_interval: float = 15.0
    certs: Path | None = None
    """The server's PKI directory: with the issuing CA's key, revocations write a CRL."""


class Aggregator(Observer):
    def __init__(self, app: App, runs: RunService, settings: ServerSettings) -> None:
        self.runs, self.settings = runs, settings
        config = runs.config
        strategy = config.build_strategy()
        if settings.wait_for is not None:
            strategy.min_available_clients = settings.wait_for
        self.resume = runs.resume_point()
        initial = self.resume.weights or app.initial_weights
        if initial is None:
            raise FedgeError("the app has no initial_weights; the server needs them")
        self.coordinator = Coordinator(
            strategy=strategy,
            weights=dict(initial),
            rounds=config.run.rounds,
            seed=config.run.seed,
            evaluate_fn=app.evaluate_fn,
            fit_config=config.fit,
            evaluate_config=config.evaluate,
            round_timeout=config.run.round_timeout or 600.0,
            max_round_retries=config.run.max_round_retries,
            max_examples=config.limits.max_examples,
            example_weights=config.limits.weights(),
            run_id=runs.run_id,
            observer=self,
            state=dict(self.resume.state or {}),
            workflow=app.workflow or workflow_for(strategy, runs),
        )
        self.events = Events()
        self.service = FleetService(
            FleetSettings(
                run_id=runs.run_id,
                num_clients=config.run.num_clients,
                work_dir=settings.state_dir / "runs" / runs.run_id,
                max_upload_bytes=config.limits.max_upload_mb << 20,
                max_examples=config.limits.max_examples,
                heartbeat_interval=settings.heartbeat_interval,
                keepalive_interval=settings.keepalive_interval,
                compression=config.compression,
                # asynchronous tasks train from models up to max_staleness versions old
                models_kept=2 + (strategy.max_staleness if isinstance(strategy, FedBuff) else 0),
            ),
            runs.store,
            runs.store.bindings(),
            self.events,
        )
        self.service.uploads.keep_only(f"{runs.run_id}/{self.resume.round}.{self.resume.attempt}")
        self.revocations = Revocations(runs.store, settings.state_dir / CRL_FILE, settings.certs)
        self.publisher = _publisher(runs, settings, strategy.name, app)
        self.state = "starting"
        self.reason = ""
        self.round = self.resume.round - 1
        self.last_metrics: Metrics = {}
        self._stop: asyncio.Event | None = None
        self._stop_reason = "stopped by the operator"
        self._started = time.perf_counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, transport: Transport) -> None:
        """Serve until the run finishes (or fails, with `FedgeError`) or a stop is asked."""
        if self.runs.finished():
            self.state = "finished"
            log.warning("run %s already finished; --new-run starts another", self.runs.run_id)
            await self._close_publisher()  # models it could not publish before go now
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        limit_arenas()  # uploads pass through in 1 MiB chunks on several threads
        await self.revocations.publish()  # the CRL, fresh for this start
        await transport.start(self.service, self)
        log.info("serving run %s on port %d", self.runs.run_id, transport.port)
        housekeeping = asyncio.ensure_future(self.service.housekeeping())
        self.state = "running"
        run = asyncio.ensure_future(asyncio.to_thread(self._run_rounds))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
            self.service.stop()  # ends every task stream; a waiting coordinator unwinds
            self.runs.stop_requested.set()
            await run
        finally:
            stop.cancel()
            housekeeping.cancel()
            await transport.stop(grace=1.0)
            await self._close_publisher()

    async def _close_publisher(self) -> None:
        if self.publisher is not None:  # a stopped server waits less for the store
            wait = PUBLISH_WAIT if self.state == "finished" else 5.0
            await asyncio.to_thread(self.publisher.close, wait)

    def request_stop(self, reason: str = "") -> None:
        """Stop after the current write; safe to call from the loop (signal handlers)."""
        log.warning("stop requested: %s", reason or "no reason given")
        if reason:
            self._stop_reason = f"stopped by the operator: {reason}"
        self.runs.stop_requested.set()
        if self._stop is not None:
            self._stop.set()

    def _run_rounds(self) -> None:
        assert self._loop is not None
        fleet = ServiceFleet(self.service, self._loop)
        self._started = time.perf_counter()
        try:
            self.coordinator.run(
                fleet, self, start_round=self.resume.round, start_attempt=self.resume.attempt
            )
        except Stopped:
            self.state = "stopped"
            self._end("stopped", self._stop_reason)
            return
        except QuorumError as exc:
            self.state, self.reason = "failed", str(exc)
            self._end("failed", str(exc))
            raise FedgeError(f"run {self.runs.run_id} failed: {exc}") from None
        self.state, self.reason = "finished", self.coordinator.ended_early
        self._end("finished", self.reason)

    def _end(self, status: str, reason: str = "") -> None:
        try:
            self.runs.end(status, reason, time.perf_counter() - self._started)  # type: ignore[arg-type]
        except FedgeError as exc:  # e.g. the disk is still full: the state stays as it was
            log.error("could not record that run %s %s: %s", self.runs.run_id, status, exc)

    # --- the coordinator's recorder and observer --------------------------------------

    def on_start(self, initial_metrics: Metrics) -> None:
        self.runs.on_start(initial_metrics)

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        self.runs.last_checkpoint = None
        self.runs.on_round(record, weights, state)
        if self.runs.last_checkpoint is not None:
            seconds, size = self.runs.last_checkpoint
            self.events.emit("checkpoint.written", round=record.round, seconds=seconds, size=size)
        publisher = self.publisher
        if (
            publisher
            and record.status == "ok"
            and publisher.due(record.round, self.runs.config.run.rounds)
        ):
            publisher.submit(record, weights)
        assert self._loop is not None
        sessions = asyncio.run_coroutine_threadsafe(self._sessions(), self._loop).result()
        node_of = {cid: node for node, cid, _ in sessions}
        done = Counter(node_of[c] for c in record.participants if c in node_of)
        self.runs.record_activity({node: seen for node, _, seen in sessions}, done)
        if record.status == "ok":
            self.last_metrics = {**(record.metrics or record.evaluate_metrics)}
            self.last_metrics.update(record.strategy_metrics)  # e.g. epsilon spent

    async def _sessions(self) -> list[tuple[str, int, float]]:
        return [(s.node_id, s.cid, s.last_seen) for s in self.service.sessions.by_node.values()]

    def round_started(self, round: int, selected: int) -> None:
        self.round = round

    def round_finished(self, record: RoundRecord) -> None:
        """Recorded durably already; observers (metrics) hear of it now."""
        self.events.emit("round.finished", record=record)

    # --- the operator ------------------------------------------------------------------

    def authorized(self, identity: str | None) -> bool:
        return identity in self.settings.admins

    def run_state(self) -> tuple[str, str]:
        """(state, reason): starting, running, waiting (for clients), paused (disk full),
        finished, failed or stopped."""
        service, waiting = self.service, self.service.waiting
        state, reason = self.state, self.reason
        if self.runs.paused is not None:
            state, reason = "paused", self.runs.paused
        elif waiting is not None and state == "running":
            state = "waiting"
            reason = f"{waiting.available} of the {waiting.needed} clients needed are available"
        elif service.disk_full is not None:
            reason = service.disk_full
        return state, reason

    def status(self) -> Status:
        service, waiting = self.service, self.service.waiting
        state, reason = self.run_state()
        return Status(
            run_id=self.runs.run_id,
            state=state,
            round=self.round,
            total_rounds=self.coordinator.rounds,
            nodes=self._connected(),
            metrics=self.last_metrics,
            received=service.board.received,
            expected=service.board.expected,
            waiting_for=0 if waiting is None else waiting.needed,
            missing=[] if waiting is None else waiting.missing,
            reason=reason,
        )

    def _connected(self) -> list[NodeInfo]:
        live = {id(s) for s in self.service.sessions.live()}
        return [
            NodeInfo(
                s.node_id,
                s.cid,
                s.address,
                connected=s.streaming,
                live=id(s) in live,
                connected_since=s.connected_since,
                last_seen=s.last_seen,
                tasks_done=s.tasks_done,
                serving=s.serving,
                version=s.capabilities.fedge_version,
            )
            for s in sorted(self.service.sessions.by_node.values(), key=lambda s: s.cid)
        ]

    async def nodes(self, node_id: str = "") -> Sequence[NodeInfo]:
        """Every node the state knows (bound or not, or only enrolled), with its live
        session if any, its labels and its certificates' state; with `node_id`, that one
        with every certificate."""
        known, certificates = await asyncio.to_thread(
            lambda: (self.runs.store.nodes(), self.runs.store.certificates(node_id or None))
        )
        current = {n.node_id: n for n in self._connected()}
        newest: dict[str, dict[str, Any]] = {}
        for cert in certificates:  # newest first
            if cert["issued_at"]:
                newest.setdefault(cert["node_id"], cert)
        out = []
        for row in known:
            live = current.pop(row["node_id"], None)
            out.append(
                live
                or NodeInfo(
                    row["node_id"],
                    row["cid"],
                    row["address"],
                    last_seen=row["last_seen"],
                    tasks_done=row["tasks_done"],
                    labels=row["capabilities"].get("labels", {}),
                    version=str(row["capabilities"].get("fedge_version", "")),
                )
            )
        listed = {n.node_id for n in out} | set(current)
        enrolled = [NodeInfo(name, None) for name in newest if name not in listed]  # not seen yet
        now = time.time()
        nodes = [
            self._certified(n, newest.get(n.node_id), now)
            for n in (*out, *current.values(), *enrolled)
        ]
        if not node_id:
            return nodes
        mine = [_certificate(c, now) for c in certificates]
        return [replace(n, certificates=mine) for n in nodes if n.node_id == node_id]

    def _certified(self, node: NodeInfo, cert: dict[str, Any] | None, now: float) -> NodeInfo:
        labels = {**node.labels, **(cert["labels"] if cert else {})}
        expires = cert["not_after"] if cert else 0.0
        name_revoked = node.node_id in self.revocations.names and (
            cert is None or int(cert["serial"], 16) not in self.revocations.reissued
        )
        state = "revoked" if name_revoked else _state(cert, now) if cert else "active"
        # not dataclasses.replace: its per-field getattr loop was 60% of listing 1,000
        # nodes (which the dashboard does every 2 s on the loop); a dict copy is C
        fields = {**vars(node), "labels": labels, "certificate_expires": expires, "state": state}
        return NodeInfo(**fields)

    async def revoke(
        self, node_id: str, serial: int | None, reason: str, live_serials: Iterable[int] = ()
    ) -> None:
        """Revoke a node (with the serials its calls in progress use), or one certificate;
        end the node's session: it stops, with the reason."""
        if serial is None:
            await self.revocations.revoke_name(node_id, reason, live_serials)
        else:
            await self.revocations.revoke_serial(serial, reason, node_id)
        if node_id:
            self.service.end_session(node_id, f"certificate revoked: {reason}")

    async def assign(self, node_id: str, cid: int) -> str | None:
        return await self.service.assign(node_id, cid)


def _publisher(
    runs: RunService, settings: ServerSettings, strategy: str, app: App
) -> Publisher | None:
    """The run's model publisher, if ``[store] url`` is set. It signs with the CA's
    release key when the server has its PKI directory (made there on first use)."""
    section = runs.config.store
    if not section.url:
        return None
    from fedge.security.pki import release_key
    from fedge.store import open_registry
    from fedge.store.publisher import Publisher

    key = None
    if settings.certs is not None and (settings.certs / "ca.crt").exists():
        key = release_key(settings.certs)
    else:
        log.warning("model store %s: publishing unsigned models (no PKI directory)", section.url)
    registry = open_registry(
        section.url, endpoint=section.endpoint, region=section.region,
        profile=section.profile, credentials_file=section.credentials_file, sign_key=key,
    )  # fmt: skip
    spool = settings.state_dir / "runs" / runs.run_id / "publish"
    return Publisher(registry, section, runs.run_id, spool, strategy, app)


def _state(cert: dict[str, Any], now: float) -> str:
    if cert["revoked_at"]:
        return "revoked"
    return "expired" if cert["not_after"] < now else "active"


def _certificate(cert: dict[str, Any], now: float) -> CertificateInfo:
    return CertificateInfo(
        cert["serial"], cert["issued_at"], cert["not_after"], _state(cert, now), cert["reason"]
    )
