"""The Fleet service over grpc.aio: identity from TLS, protobuf in and out, and
`FleetError` codes as gRPC statuses. The behaviour lives in `fedge.fleet`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc

from fedge.fleet.enrollment import Enrollment
from fedge.fleet.service import FleetService
from fedge.messages import Code, FleetError, Keepalive, TaskHeader
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.guard import Peer, PeerCertificates
from fedge.transport.grpc.tls import peer_identity

T = TypeVar("T")


async def abort(context: grpc.aio.ServicerContext, exc: FleetError) -> NoReturn:
    await context.abort(convert.status_of(exc.code), exc.message)
    raise AssertionError("unreachable")  # abort raises


async def call(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except FleetError as exc:
        await abort(context, exc)


class FleetServicer(pb_grpc.FleetServicer):
    def __init__(
        self,
        service: FleetService,
        insecure: bool,
        chunk_size: int,
        peers: PeerCertificates | None = None,
        renewal: Enrollment | None = None,
    ) -> None:
        self.service, self.insecure, self.chunk_size = service, insecure, chunk_size
        self.peers, self.renewal = peers or PeerCertificates(), renewal
        self._models: dict[str, bytes] = {}

    def _who(self, context: grpc.aio.ServicerContext) -> str:
        return peer_identity(context, self.insecure) or ""

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        caps = convert.capabilities_from_pb(request.capabilities)
        joined = await call(
            context,
            self.service.join(
                self._who(context), request.cid, context.peer(), caps, request.protocol or 1
            ),
        )
        peer = None if self.insecure or self.renewal is None else self.peers.of(context)
        return pb.JoinReply(
            node_id=joined.node_id,
            heartbeat_interval_s=joined.heartbeat_interval,
            session_token=joined.token,
            renew_after_unix_ms=0 if peer is None else int(renew_after(peer) * 1000),
        )

    async def Renew(
        self, request: pb.RenewRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewReply:
        who = self._who(context)
        await call(context, self.service.check_session(who, request.session_token))
        if self.renewal is None:
            await abort(
                context,
                FleetError(
                    Code.FAILED_PRECONDITION,
                    "this server does not renew certificates (it has no issuing CA: "
                    "--enroll-address with the issuing CA in --certs)",
                ),
            )
        chain = await call(context, self.renewal.renew(who, request.csr_pem))
        return pb.RenewReply(chain_pem=chain)

    async def Tasks(
        self, request: pb.TasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskMessage]:
        async for message in self._tasks(context, request.session_token, inline=False):
            yield message

    async def Connect(
        self, request_iterator: AsyncIterator[pb.NodeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskMessage]:
        """Tasks down, small results up and their acks down, on one stream: a round costs
        a node no call of its own (measured: a call costs the server ~0.6 ms of CPU, a
        message on an open stream less than half of that)."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("open"):
            await abort(
                context, FleetError(Code.INVALID_ARGUMENT, "Connect must start with `open`")
            )
        acks: asyncio.Queue[object] = asyncio.Queue()

        token = first.open.session_token

        async def results() -> None:
            try:
                async for message in request_iterator:
                    body = message.WhichOneof("body")
                    if body == "upload":
                        reply = await self._upload_inline(context, message.upload)
                        await acks.put(pb.TaskMessage(ack=reply))
                    elif body == "heartbeat":  # for the session this stream belongs to
                        serving = message.heartbeat.serving
                        await self.service.heartbeat(self._who(context), token, serving)
            except FleetError as exc:  # the session was taken over: end the stream
                await acks.put(exc)

        reader = asyncio.ensure_future(results())
        try:
            async for message in self._tasks(context, token, True, acks):
                yield message
        finally:
            reader.cancel()

    async def _tasks(
        self,
        context: grpc.aio.ServicerContext,
        token: str,
        inline: bool,
        acks: asyncio.Queue[object] | None = None,
    ) -> AsyncIterator[pb.TaskMessage]:
        """The session's task stream as protobuf, merged with `acks`; with `inline`, a small
        model goes down once per version, just before the first task that uses it."""
        out: asyncio.Queue[object] = acks or asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for item in self.service.tasks(self._who(context), token):
                    await out.put(item)
            except FleetError as exc:
                await out.put(exc)
            finally:
                await out.put(done)

        tasks = asyncio.ensure_future(pump())
        sent = ""  # the model version this stream carried last
        try:
            while (item := await out.get()) is not done:
                if isinstance(item, FleetError):
                    await abort(context, item)
                elif isinstance(item, pb.TaskMessage):
                    yield item
                elif isinstance(item, Keepalive):
                    yield pb.TaskMessage(keepalive=convert.keepalive_to_pb(item))
                else:
                    assert isinstance(item, TaskHeader)
                    model = item.model
                    if inline and model is not None and model.version != sent:
                        encoded = self._model_message(model.version)
                        if encoded is not None:
                            sent = model.version
                            self.service.traffic.add_sent(len(encoded))
                            yield encoded  # type: ignore[misc]
                    yield pb.TaskMessage(task=convert.task_to_pb(item))
        finally:
            tasks.cancel()

    def _model_message(self, version: str) -> bytes | None:
        """The model as one encoded message, made once and sent as is on every stream."""
        if version not in self._models:
            data = self.service.models.inline(version, self.chunk_size)
            if data is None:
                return None
            self._models[version] = convert.model_message_bytes(version, data)
            while len(self._models) > 2:
                self._models.pop(next(iter(self._models)))
        return self._models[version]

    async def _upload_inline(
        self, context: grpc.aio.ServicerContext, msg: pb.UploadHeader
    ) -> pb.UploadReply:
        header = convert.upload_header_from_pb(msg)
        data = msg.data

        async def chunks() -> AsyncIterator[tuple[int, bytes]]:
            if data:
                yield header.offset, data

        try:
            ack = await self.service.upload(self._who(context), header, chunks())
        except FleetError as exc:
            return pb.UploadReply(task_id=header.task_id, code=exc.code.value, message=exc.message)
        return convert.ack_to_pb(ack, header.task_id)

    async def Download(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        try:
            chunks = self.service.download(
                self._who(context),
                request.session_token,
                request.model_version,
                request.offset,
                self.chunk_size,
            )
        except FleetError as exc:
            await abort(context, exc)
        for offset, data in chunks:
            yield convert.chunk_bytes(data, offset)  # type: ignore[misc]

    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryUploadReply:
        held, complete = await call(
            context,
            self.service.query_upload(self._who(context), request.session_token, request.task_id),
        )
        return pb.QueryUploadReply(received_bytes=held, complete=complete)

    async def Upload(
        self, request_iterator: AsyncIterator[pb.UploadMessage], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            await abort(
                context,
                FleetError(
                    Code.INVALID_ARGUMENT, "the first upload message must be an UploadHeader"
                ),
            )
        header = convert.upload_header_from_pb(first.header)

        async def chunks() -> AsyncIterator[tuple[int, bytes]]:
            async for message in request_iterator:
                if not message.HasField("chunk"):
                    raise FleetError(
                        Code.INVALID_ARGUMENT, "after the header, an upload carries only chunks"
                    )
                yield message.chunk.offset, message.chunk.data

        ack = await call(context, self.service.upload(self._who(context), header, chunks()))
        return convert.ack_to_pb(ack)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        who, token = self._who(context), request.session_token
        await call(context, self.service.heartbeat(who, token, request.serving))
        return pb.HeartbeatReply()

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveReply:
        await call(
            context, self.service.leave(self._who(context), request.session_token, request.reason)
        )
        return pb.LeaveReply()


def renew_after(peer: Peer) -> float:
    """When a node should renew: between a half and two thirds of its certificate's
    life, at a point fixed by its serial, so a fleet's renewals spread over the window."""
    life = peer.not_after - peer.not_before
    spread = (peer.serial % 1000) / 1000
    return peer.not_before + life * (1 / 2 + spread * (2 / 3 - 1 / 2))
