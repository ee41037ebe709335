"""The `Control` service's server side: for the operator's CLI, admin certificates only.
The client side is in `control_client.py` (a CLI need not load the server to call it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from fedge.messages import Code, FleetError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security.credentials import MAX_NAME_LENGTH
from fedge.transport.grpc import convert
from fedge.transport.grpc.guard import Guard
from fedge.transport.grpc.servicer import abort, call
from fedge.transport.grpc.tls import peer_identity

if TYPE_CHECKING:
    from fedge.fleet.enrollment import Enrollment
    from fedge.fleet.server import Aggregator


class ControlServicer(pb_grpc.ControlServicer):
    """For the operator's CLI; only admin certificates may call it."""

    def __init__(
        self,
        control: Aggregator,
        insecure: bool,
        guard: Guard,
        enrollment: Enrollment | None = None,
        enroll_address: str = "",
    ) -> None:
        self.control, self.insecure, self.guard = control, insecure, guard
        self.enrollment, self.enroll_address = enrollment, enroll_address

    async def _enrollment(self, context: grpc.aio.ServicerContext) -> Enrollment:
        if self.enrollment is None or not self.enroll_address:
            await abort(
                context,
                FleetError(
                    Code.FAILED_PRECONDITION,
                    "this server does not enroll devices: start it with --enroll-address "
                    "and a --certs directory holding the issuing CA",
                ),
            )
        return self.enrollment

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
        node_id = request.node_id[:MAX_NAME_LENGTH]
        nodes = await self.control.nodes(node_id)
        if node_id and not nodes:
            await abort(context, FleetError(Code.NOT_FOUND, f"no node {node_id!r} is known"))
        return pb.ListNodesReply(nodes=[convert.node_to_pb(n) for n in nodes])

    async def RevokeNode(
        self, request: pb.RevokeNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeNodeReply:
        await self._authorize(context)
        serial = None
        if request.serial:
            try:
                serial = int(request.serial[:64], 16)
            except ValueError:
                await abort(
                    context,
                    FleetError(
                        Code.INVALID_ARGUMENT,
                        f"serial must be hexadecimal, got {request.serial[:64]!r}",
                    ),
                )
        node_id = request.node_id[:MAX_NAME_LENGTH] or self.guard.holder(serial)
        if not node_id and serial is None:
            await abort(context, FleetError(Code.INVALID_ARGUMENT, "name a node or a serial"))
        reason = request.reason[:256] or "revoked by the operator"
        await self.control.revoke(node_id, serial, reason, self.guard.serials(node_id))
        cut = await self.guard.cut(node_id, f"certificate revoked: {reason}", serial)
        return pb.RevokeNodeReply(node_id=node_id, calls_cut=cut)

    async def CreateTokens(
        self, request: pb.CreateTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTokensReply:
        await self._authorize(context)
        enrollment = await self._enrollment(context)
        try:
            tokens = enrollment.create_tokens(
                name=request.name,
                prefix=request.prefix,
                count=request.count or 1,
                ttl=request.ttl_s,
                labels=dict(request.labels),
            )
        except FleetError as exc:
            await abort(context, exc)
        return pb.CreateTokensReply(
            tokens=tokens, ca_pin=enrollment.pin, enroll_address=self.enroll_address
        )

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTokensReply:
        await self._authorize(context)
        enrollment = await self._enrollment(context)
        return pb.ListTokensReply(tokens=[convert.token_to_pb(t) for t in enrollment.tokens()])

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeTokenReply:
        await self._authorize(context)
        enrollment = await self._enrollment(context)
        try:
            enrollment.revoke_token(request.token_id)
        except FleetError as exc:
            await abort(context, exc)
        return pb.RevokeTokenReply()
