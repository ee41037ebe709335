"""The operator's side of the `Control` service (`fedge status`, `stop`, `nodes`): only
the stubs and the TLS credentials, none of the server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials


class Control:
    """A connection to a server's Control service as `name` (an admin certificate)."""

    def __init__(
        self,
        server: str,
        certs: Path | None,
        name: str = "admin",
        insecure: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if insecure or certs is None:
            self.channel = grpc.insecure_channel(server, options)
        else:
            self.channel = grpc.secure_channel(server, channel_credentials(certs, name), options)
        self.stub = pb_grpc.ControlStub(self.channel)
        self.metadata = ((NODE_NAME_METADATA, name),)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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

    def nodes(self, node_id: str = "", timeout: float = 10.0) -> list[pb.NodeStatus]:
        reply = self.stub.ListNodes(
            pb.ListNodesRequest(node_id=node_id), timeout=timeout, metadata=self.metadata
        )
        return list(reply.nodes)

    def revoke(
        self, node_id: str, serial: str = "", reason: str = "", timeout: float = 10.0
    ) -> pb.RevokeNodeReply:
        reply: pb.RevokeNodeReply = self.stub.RevokeNode(
            pb.RevokeNodeRequest(node_id=node_id, serial=serial, reason=reason),
            timeout=timeout,
            metadata=self.metadata,
        )
        return reply

    def create_tokens(
        self, request: pb.CreateTokensRequest, timeout: float = 60.0
    ) -> pb.CreateTokensReply:
        reply: pb.CreateTokensReply = self.stub.CreateTokens(
            request, timeout=timeout, metadata=self.metadata
        )
        return reply

    def tokens(self, timeout: float = 10.0) -> list[pb.TokenInfo]:
        reply = self.stub.ListTokens(
            pb.ListTokensRequest(), timeout=timeout, metadata=self.metadata
        )
        return list(reply.tokens)

    def revoke_token(self, token_id: str, timeout: float = 10.0) -> None:
        self.stub.RevokeToken(
            pb.RevokeTokenRequest(token_id=token_id), timeout=timeout, metadata=self.metadata
        )


def fetch_status(
    server: str,
    certs: Path | None,
    name: str = "admin",
    insecure: bool = False,
    timeout: float = 5.0,
) -> pb.StatusReply:
    with Control(server, certs, name, insecure) as control:
        return control.status(timeout)
