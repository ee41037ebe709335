"""The `Control` service's server side: for the operator's CLI, admin certificates only.
The client side is in `control_client.py` (a CLI need not load the server to call it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from fedge.messages import Code, FleetError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.servicer import abort, call
from fedge.transport.grpc.tls import peer_identity

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
