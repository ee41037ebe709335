"""The aggregator: an asyncio gRPC server (`Fleet` + `Control` services) around the
coordinator, with durable state and resume.

Every finished round is checkpointed (weights, strategy state, history) before it is
announced; restarted on the same state directory, the server resumes after the last
checkpoint, and nodes reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedge.app import App
from fedge.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from fedge.client import EvaluateResult, FitResult
from fedge.coordinator import Coordinator, Observer
from fedge.errors import FedgeError, WeightsError
from fedge.history import History, RoundRecord
from fedge.malloc import limit_arenas
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.state import StateStore
from fedge.strategy import Strategy
from fedge.transport.grpc.chunks import Spool, read_chunks
from fedge.transport.grpc.fleet import FleetState, GrpcFleet, OpenTask, Session, Stopped
from fedge.transport.grpc.tls import peer_identity, require_loopback, server_credentials
from fedge.weights import FileWeights, Spec, validate

log = logging.getLogger(__name__)

REPLACED = "replaced by a newer connection"
HEARTBEAT_INTERVAL = 5.0
KEEPALIVE_INTERVAL = 15.0
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class ServerSettings:
    address: str
    state_dir: Path
    certs: Path | None = None
    insecure: bool = False
    admins: tuple[str, ...] = ("admin",)
    max_upload_bytes: int = 2 << 30
    round_timeout: float = 600.0


class FleetServicer(pb_grpc.FleetServicer):
    def __init__(self, state: FleetState, settings: ServerSettings, store: StateStore) -> None:
        self.state, self.settings, self.store = state, settings, store
        self._validations = asyncio.Semaphore(1)  # one upload in memory at a time

    async def _identity(self, context: grpc.aio.ServicerContext) -> str:
        name = peer_identity(context, self.settings.insecure)
        if not name:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client identity: present a certificate from the project CA",
            )
        assert name is not None
        return name

    async def _session(self, context: grpc.aio.ServicerContext, token: str = "") -> Session:
        node_id = await self._identity(context)
        session = self.state.sessions.get(node_id)
        if session is None or (token and token != session.token):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node_id!r} has no current session: call Join first",
            )
        assert session is not None
        session.last_seen = time.time()
        return session

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        node_id = await self._identity(context)
        if request.cid < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cid must be >= 0, got {request.cid}"
            )
        try:
            session = self.state.join(node_id, int(request.cid), context.peer())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        caps = json.loads(
            json.dumps(
                {
                    "cpu_count": request.capabilities.cpu_count,
                    "memory_bytes": request.capabilities.memory_bytes,
                    "accelerator": request.capabilities.accelerator,
                    "framework": request.capabilities.framework,
                    "fedge_version": request.capabilities.fedge_version,
                    "labels": dict(request.capabilities.labels),
                }
            )
        )
        await asyncio.to_thread(
            self.store.upsert_node, node_id, int(request.cid), context.peer(), caps
        )
        log.info("node %s joined as cid %d from %s", node_id, request.cid, context.peer())
        return pb.JoinReply(
            node_id=node_id, heartbeat_interval_s=HEARTBEAT_INTERVAL, session_token=session.token
        )

    async def Tasks(
        self, request: pb.TasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskMessage]:
        session = await self._session(context, request.session_token)
        self.state.stream_opened(session)
        try:
            while True:
                try:
                    header = await asyncio.wait_for(session.queue.get(), KEEPALIVE_INTERVAL)
                except TimeoutError:
                    yield pb.TaskMessage(keepalive=pb.Keepalive(unix_ms=int(time.time() * 1000)))
                    continue
                if header is None and session.replaced_by is not None:
                    await context.abort(  # the node stops: two processes must not flap
                        grpc.StatusCode.ABORTED,
                        f"{REPLACED}: identity {session.node_id!r} connected again "
                        f"from {session.replaced_by}",
                    )
                if header is None:  # the node left, or the server is shutting down
                    return
                yield pb.TaskMessage(task=header)
        finally:
            self.state.stream_closed(session)

    async def Download(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        await self._identity(context)
        model = self.state.models.get(request.model_version)
        if model is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model version {request.model_version!r} is not served; "
                f"current: {list(self.state.models)}",
            )
        assert model is not None
        if not 0 <= request.offset <= model.size:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{model.size}"
            )
        for offset, data in read_chunks(model.path, request.offset):
            yield pb.Chunk(data=data, offset=offset)

    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryUploadReply:
        await self._identity(context)
        open_task = self.state.open.get(request.task_id)
        if open_task is not None and open_task.done:
            return pb.QueryUploadReply(received_bytes=open_task.received_bytes, complete=True)
        spool_path = Spool.path_for(self.state.uploads_dir, request.task_id)
        size = spool_path.stat().st_size if spool_path.exists() else 0
        return pb.QueryUploadReply(received_bytes=size, complete=False)

    async def Upload(
        self, request_iterator: AsyncIterator[pb.UploadMessage], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        session = await self._session(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first upload message must be an UploadHeader"
            )
        assert first is not None
        header = first.header
        open_task = await self._open_task(header.task_id, session, context)
        lock = self.state.upload_locks.setdefault(header.task_id, asyncio.Lock())
        async with lock:  # a re-sent upload waits until the cut one has let go of the spool
            return await self._receive(header, open_task, session, request_iterator, context)

    async def _receive(
        self,
        header: pb.UploadHeader,
        open_task: OpenTask,
        session: Session,
        request_iterator: AsyncIterator[pb.UploadMessage],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadReply:
        if open_task.done:
            return pb.UploadReply(
                accepted=True, duplicate=True, message="already counted", received_bytes=header.size
            )
        source = f"node {session.node_id} (cid {session.cid}), task {header.task_id}"
        if header.error:
            self.state.accept(header.task_id, None, f"{source}: {header.error}")
            return pb.UploadReply(accepted=True, message="failure recorded")
        if header.num_examples <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{source}: num_examples must be > 0, got {header.num_examples}",
            )
        metrics = dict(header.metrics)
        if open_task.task.kind == "evaluate":
            if not header.HasField("loss") or not math.isfinite(header.loss):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{source}: an evaluate result needs a finite loss",
                )
            self.state.accept(
                header.task_id, EvaluateResult(header.loss, int(header.num_examples), metrics)
            )
            return pb.UploadReply(accepted=True)
        return await self._receive_fit(header, request_iterator, source, metrics, context)

    async def _open_task(
        self, task_id: str, session: Session, context: grpc.aio.ServicerContext
    ) -> OpenTask:
        open_task = self.state.open.get(task_id)
        if open_task is None:
            closed_round = self.state.closed.get(task_id)
            if closed_round is not None:
                await context.abort(
                    grpc.StatusCode.ABORTED,
                    f"task {task_id!r} belongs to round {closed_round}, "
                    "which is closed; the result was not counted",
                )
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown task id {task_id!r}")
        assert open_task is not None
        if open_task.task.cid != session.cid:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"task {task_id!r} was assigned to cid {open_task.task.cid}, "
                f"not to node {session.node_id!r} (cid {session.cid})",
            )
        return open_task

    async def _receive_fit(
        self,
        header: pb.UploadHeader,
        request_iterator: AsyncIterator[pb.UploadMessage],
        source: str,
        metrics: dict[str, float],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadReply:
        limit = self.settings.max_upload_bytes
        if header.encoding not in ("", "safetensors"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{source}: encoding {header.encoding!r} is not supported; expected 'safetensors'",
            )
        if not 0 < header.size <= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if header.size > limit
                else grpc.StatusCode.INVALID_ARGUMENT,
                f"{source}: payload size {header.size} bytes is outside "
                f"1..{limit} (the configured maximum)",
            )
        spool = Spool(self.state.uploads_dir, header.task_id)
        writing: asyncio.Future[None] | None = None
        try:
            if header.offset != spool.size:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"{source}: resume offset {header.offset} but the server "
                    f"holds {spool.size} bytes; ask QueryUpload",
                )
            async for message in request_iterator:
                chunk = message.chunk
                if not message.HasField("chunk") or chunk.offset != spool.size:
                    spool.discard()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{source}: expected a chunk at offset {spool.size}",
                    )
                if spool.size + len(chunk.data) > header.size:
                    spool.discard()
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{source}: payload exceeds its declared size {header.size} bytes",
                    )
                # off the loop; shielded, so a cut stream never closes the file mid-write
                writing = asyncio.ensure_future(asyncio.to_thread(spool.write, chunk.data))
                await asyncio.shield(writing)
        finally:
            if writing is not None and not writing.done():
                await asyncio.wait([writing])
            spool.close()
        if spool.size < header.size:
            return pb.UploadReply(
                accepted=False,
                received_bytes=spool.size,
                message=f"incomplete: {spool.size} of {header.size} bytes",
            )
        digest = spool.digest.digest()
        if digest != header.sha256:
            spool.discard()
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"{source}: sha256 mismatch: header says {header.sha256.hex()}, "
                f"payload is {digest.hex()}",
            )
        path = spool.path.with_suffix(".safetensors")
        os.replace(spool.path, path)
        async with self._validations:
            weights, error = await asyncio.to_thread(_check_file, path, self.state.spec, source)
        if weights is None:
            path.unlink(missing_ok=True)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if header.task_id not in self.state.open:  # the round closed while we validated
            path.unlink(missing_ok=True)
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"{source}: the round closed before the upload completed",
            )
        assert weights is not None
        fit = FitResult(weights, int(header.num_examples), metrics)
        self.state.accept(header.task_id, fit, received_bytes=spool.size)
        return pb.UploadReply(accepted=True, received_bytes=spool.size)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        await self._session(context, request.session_token)
        return pb.HeartbeatReply()

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveReply:
        session = await self._session(context, request.session_token)
        session.queue.put_nowait(None)
        log.info("node %s left: %s", session.node_id, request.reason or "no reason given")
        return pb.LeaveReply()


def _check_file(path: Path, spec: Spec, source: str) -> tuple[FileWeights | None, str | None]:
    """Validate a received file block by block; the coordinator then folds it unread again."""
    try:
        weights = FileWeights(path, source=source)
        validate(weights, spec, source=source)
    except WeightsError as exc:
        return None, str(exc)
    return weights, None


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, server: AggregatorServer) -> None:
        self.server = server

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        name = peer_identity(context, self.server.settings.insecure)
        if self.server.settings.insecure:
            return
        if name not in self.server.settings.admins:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name!r} is not an admin; Control needs a certificate "
                f"named one of {list(self.server.settings.admins)}",
            )

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusReply:
        await self._authorize(context)
        s, state = self.server, self.server.state
        nodes = [
            pb.NodeStatus(
                node_id=x.node_id,
                cid=x.cid,
                address=x.address,
                connected_since_unix_ms=int(x.connected_since * 1000),
                last_seen_unix_ms=int(x.last_seen * 1000),
            )
            for x in sorted(state.sessions.values(), key=lambda x: x.cid)
        ]
        return pb.StatusReply(
            run_id=state.run_id,
            state=s.status,
            round=state.round,
            total_rounds=s.coordinator.rounds,
            nodes=nodes,
            metrics=s.last_metrics,
            results_received=state.received,
            results_expected=state.expected,
        )

    async def Stop(
        self, request: pb.StopRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopReply:
        await self._authorize(context)
        log.warning("stop requested: %s", request.reason or "no reason given")
        self.server.request_stop()
        return pb.StopReply(state="stopping")


class AggregatorServer:
    """Owns the gRPC server, the state store and the coordinator thread of one run."""

    def __init__(
        self,
        app: App,
        strategy: Strategy,
        settings: ServerSettings,
        *,
        rounds: int,
        seed: int,
        fit_config: dict[str, object],
        evaluate_config: dict[str, object],
        max_round_retries: int,
        run_id: str,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(settings.state_dir / "state.db")
        self.checkpoints = settings.state_dir / "checkpoints"
        self.run_id = run_id
        self.status = "starting"
        self.last_metrics: dict[str, float] = {}
        initial = app.initial_weights
        if initial is None:
            raise FedgeError("the app has no initial_weights; the server needs them")
        self.coordinator = Coordinator(
            strategy=strategy,
            weights=dict(initial),
            rounds=rounds,
            seed=seed,
            evaluate_fn=app.evaluate_fn,
            fit_config=fit_config,
            evaluate_config=evaluate_config,
            round_timeout=settings.round_timeout,
            max_round_retries=max_round_retries,
            run_id=run_id,
            observer=observer or Observer(),
            checkpoint=self._checkpoint,
        )
        self.start_round, self.history = 1, None
        resumed = latest_checkpoint(self.checkpoints)
        if resumed is not None and resumed.meta.get("run_id") == run_id:
            self.coordinator.weights, self.coordinator.state = resumed.weights, resumed.state
            self.history = History.from_dict(resumed.meta["history"])
            self.start_round = resumed.round + 1
            log.info("resuming run %s after round %d", run_id, resumed.round)
        self.store.start_run(run_id, {"seed": seed, "strategy": strategy.name}, rounds)
        self.state: FleetState
        self._stop: asyncio.Event

    def _checkpoint(self, record: RoundRecord, history: History) -> None:
        """Checkpoint first, then record: a round is never reported without its weights."""
        if record.status == "ok":
            meta = {"run_id": self.run_id, "history": history.to_dict()}
            ckpt = Checkpoint(record.round, self.coordinator.weights, self.coordinator.state, meta)
            save_checkpoint(self.checkpoints, ckpt)
            self.last_metrics = dict(record.metrics or record.evaluate_metrics)
        self.store.record_round(self.run_id, record)
        sessions = list(self.state.sessions.values())  # a snapshot, from this thread
        node_of = {s.cid: s.node_id for s in sessions}
        done = Counter(node_of[cid] for cid in record.participants if cid in node_of)
        self.store.record_activity({s.node_id: s.last_seen for s in sessions}, done)

    def request_stop(self) -> None:
        self.state.stopping = True
        self.state.notify()  # wake a coordinator waiting for nodes
        self._stop.set()

    async def serve(self) -> History | None:
        """Serve until the run finishes (returns its history) or a stop is requested."""
        loop = asyncio.get_running_loop()
        limit_arenas()  # uploads pass through in 1 MiB chunks on several threads
        self._stop = asyncio.Event()
        self.state = FleetState(self.settings.state_dir, self.run_id)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_FleetServicer_to_server(
            FleetServicer(self.state, self.settings, self.store), server
        )
        pb_grpc.add_ControlServicer_to_server(ControlServicer(self), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if self.settings.insecure:
            require_loopback(self.settings.address)
            port = server.add_insecure_port(self.settings.address)
        else:
            if self.settings.certs is None:
                raise FedgeError("--certs is required (or --insecure on loopback)")
            port = server.add_secure_port(
                self.settings.address, server_credentials(self.settings.certs)
            )
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on port %d (run %s)", port, self.run_id)
        self.status = "running"
        run = asyncio.ensure_future(asyncio.to_thread(self._run_rounds, loop))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
        self.state.stopping = True
        history: History | None = None
        try:
            history = await run
        except Stopped:
            self.status = "stopped"
        finally:
            stop.cancel()
            for session in list(self.state.sessions.values()):
                session.queue.put_nowait(None)
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace=1.0)
            self.store.close()
        return history

    def _run_rounds(self, loop: asyncio.AbstractEventLoop) -> History:
        fleet = GrpcFleet(loop, self.state, self.settings.round_timeout)
        if self.start_round > self.coordinator.rounds and self.history is not None:
            self.status = "finished"
            return self.history
        try:
            history = self.coordinator.run(
                fleet, start_round=self.start_round, history=self.history
            )
        except Stopped:
            self.store.set_run_status(self.run_id, "stopped")
            raise
        except FedgeError:
            self.status = "failed"
            self.store.set_run_status(self.run_id, "failed")
            raise
        self.status = "finished"
        self.store.set_run_status(self.run_id, "finished")
        return history


def run_id_for(config_text: str) -> str:
    """A stable run id from the config, so the same command resumes the same run."""
    return "run-" + hashlib.sha256(config_text.encode()).hexdigest()[:12]
