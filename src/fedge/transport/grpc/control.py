"""Client side of the `Control` service, for `fedge status` and the demo's live view."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials


def control_channel(server: str, certs: Path | None, name: str, insecure: bool) -> grpc.Channel:
    if insecure or certs is None:
        return grpc.insecure_channel(server)
    return grpc.secure_channel(server, channel_credentials(certs, name))


def fetch_status(
    server: str,
    certs: Path | None,
    name: str = "admin",
    insecure: bool = False,
    timeout: float = 5.0,
) -> pb.StatusReply:
    with control_channel(server, certs, name, insecure) as channel:
        reply: pb.StatusReply = pb_grpc.ControlStub(channel).Status(
            pb.StatusRequest(), timeout=timeout, metadata=((NODE_NAME_METADATA, name),)
        )
        return reply
