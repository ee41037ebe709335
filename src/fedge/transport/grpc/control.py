"""The `Control` service: its server side (for the operator's CLI, admin certificates only)
and its client side (`fedge status`, `stop`, `nodes`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from fedge.messages import Code, FleetError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.servicer import abort, call
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials, peer_identity

if TYPE_CHECKING:
    from fedge.fleet.server import Aggregator


class ControlServicer(pb_grpc.ControlServicer):
    """For the operator's CLI; only admin certificates may call it."""

    def __init__(self, control: Aggregator, insecure: bool) -> None:
        self.control, self.insecure = control, insecure

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.insecure:
            return
        name = peer_identity(context, self.insecure)
        if not self.control.authorized(name):
            await abort(
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
        previous = await call(context, self.control.assign(request.node_id, request.cid))
        return pb.AssignReply(previous_node=previous or "")

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesReply:
        await self._authorize(context)
        return pb.ListNodesReply(nodes=[convert.node_to_pb(n) for n in await self.control.nodes()])


class Control:
    """A connection to a server's Control service as `name` (an admin certificate)."""

    def __init__(
        self, server: str, certs: Path | None, name: str = "admin", insecure: bool = False
    ) -> None:
        if insecure or certs is None:
            self.channel = grpc.insecure_channel(server)
        else:
            self.channel = grpc.secure_channel(server, channel_credentials(certs, name))
        self.stub = pb_grpc.ControlStub(self.channel)
        self.metadata = ((NODE_NAME_METADATA, name),)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def status(self, timeout: float = 5.0) -> pb.StatusReply:
        reply: pb.StatusReply = self.stub.Status(
            pb.StatusRequest(), timeout=timeout, metadata=self.metadata
        )
        return reply

    def stop(self, reason: str, timeout: float = 5.0) -> str:
        reply = self.stub.Stop(
            pb.StopRequest(reason=reason), timeout=timeout, metadata=self.metadata
        )
        return str(reply.state)

    def assign(self, node_id: str, cid: int, timeout: float = 10.0) -> str:
        reply = self.stub.AssignNode(
            pb.AssignRequest(node_id=node_id, cid=cid), timeout=timeout, metadata=self.metadata
        )
        return str(reply.previous_node)

    def nodes(self, timeout: float = 10.0) -> list[pb.NodeStatus]:
        reply = self.stub.ListNodes(pb.ListNodesRequest(), timeout=timeout, metadata=self.metadata)
        return list(reply.nodes)


def fetch_status(
    server: str,
    certs: Path | None,
    name: str = "admin",
    insecure: bool = False,
    timeout: float = 5.0,
) -> pb.StatusReply:
    with Control(server, certs, name, insecure) as control:
        return control.status(timeout)
