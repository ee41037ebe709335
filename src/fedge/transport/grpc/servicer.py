"""The Fleet and Control services over grpc.aio: identity from TLS, protobuf in and out,
and `FleetError` codes as gRPC statuses. The behaviour lives in `fedge.fleet`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc

from fedge.fleet.server import Aggregator
from fedge.fleet.service import FleetService
from fedge.messages import Code, FleetError, Keepalive
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.tls import peer_identity

T = TypeVar("T")


async def _abort(context: grpc.aio.ServicerContext, exc: FleetError) -> NoReturn:
    await context.abort(convert.status_of(exc.code), exc.message)
    raise AssertionError("unreachable")  # abort raises


async def _call(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except FleetError as exc:
        await _abort(context, exc)


class FleetServicer(pb_grpc.FleetServicer):
    def __init__(self, service: FleetService, insecure: bool, chunk_size: int) -> None:
        self.service, self.insecure, self.chunk_size = service, insecure, chunk_size

    def _who(self, context: grpc.aio.ServicerContext) -> str:
        return peer_identity(context, self.insecure) or ""

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        caps = convert.capabilities_from_pb(request.capabilities)
        joined = await _call(
            context,
            self.service.join(
                self._who(context), request.cid, context.peer(), caps, request.protocol or 1
            ),
        )
        return pb.JoinReply(
            node_id=joined.node_id,
            heartbeat_interval_s=joined.heartbeat_interval,
            session_token=joined.token,
        )

    async def Tasks(
        self, request: pb.TasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TaskMessage]:
        try:
            async for item in self.service.tasks(self._who(context), request.session_token):
                if isinstance(item, Keepalive):
                    yield pb.TaskMessage(keepalive=convert.keepalive_to_pb(item))
                else:
                    yield pb.TaskMessage(task=convert.task_to_pb(item))
        except FleetError as exc:
            await _abort(context, exc)

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
            await _abort(context, exc)
        for offset, data in chunks:
            yield pb.Chunk(data=data, offset=offset)

    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryUploadReply:
        held, complete = await _call(
            context,
            self.service.query_upload(self._who(context), request.session_token, request.task_id),
        )
        return pb.QueryUploadReply(received_bytes=held, complete=complete)

    async def Upload(
        self, request_iterator: AsyncIterator[pb.UploadMessage], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            await _abort(
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

        ack = await _call(context, self.service.upload(self._who(context), header, chunks()))
        return pb.UploadReply(
            accepted=ack.accepted,
            duplicate=ack.duplicate,
            message=ack.message,
            received_bytes=ack.received_bytes,
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        await _call(context, self.service.heartbeat(self._who(context), request.session_token))
        return pb.HeartbeatReply()

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveReply:
        await _call(
            context, self.service.leave(self._who(context), request.session_token, request.reason)
        )
        return pb.LeaveReply()


class ControlServicer(pb_grpc.ControlServicer):
    """For the operator's CLI; only admin certificates may call it."""

    def __init__(self, control: Aggregator, insecure: bool) -> None:
        self.control, self.insecure = control, insecure

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.insecure:
            return
        name = peer_identity(context, self.insecure)
        if not self.control.authorized(name):
            await _abort(
                context,
                FleetError(
                    Code.PERMISSION_DENIED,
                    f"{name!r} is not an admin; the Control service needs a certificate "
                    f"named one of {list(self.control.settings.admins)}",
                ),
            )

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusReply:
        await self._authorize(context)
        return convert.status_to_pb(self.control.status())

    async def Stop(
        self, request: pb.StopRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopReply:
        await self._authorize(context)
        self.control.request_stop(request.reason[:256])
        return pb.StopReply(state="stopping")

    async def AssignNode(
        self, request: pb.AssignRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignReply:
        await self._authorize(context)
        previous = await _call(context, self.control.assign(request.node_id, request.cid))
        return pb.AssignReply(previous_node=previous or "")

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesReply:
        await self._authorize(context)
        return pb.ListNodesReply(nodes=[convert.node_to_pb(n) for n in await self.control.nodes()])
