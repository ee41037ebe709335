"""The gRPC transport's node side: a `fedge.node.link.Link` over one channel.

gRPC's own errors become `LinkError` with the same code; so does a call on a channel that
was closed meanwhile (another thread reconnecting), which the runtime then retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from fedge.messages import (
    Capabilities,
    Code,
    Joined,
    Keepalive,
    TaskHeader,
    UploadAck,
    UploadHeader,
)
from fedge.node.link import LinkError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc import convert
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials

T = TypeVar("T")

OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class GrpcLink:
    def __init__(self, server: str, name: str, certs: Path | None, insecure: bool = False) -> None:
        if not insecure and certs is None:
            raise ValueError("certs are required unless insecure")
        self.server, self.name, self.certs, self.insecure = server, name, certs, insecure
        self._metadata = ((NODE_NAME_METADATA, name),) if insecure else ()
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.FleetStub | None = None
        self._stream: grpc.Future | None = None

    def _fleet(self) -> pb_grpc.FleetStub:
        with self._lock:
            if self._stub is None:
                if self.insecure:
                    self._channel = grpc.insecure_channel(self.server, options=OPTIONS)
                else:
                    assert self.certs is not None
                    creds = channel_credentials(self.certs, self.name)
                    self._channel = grpc.secure_channel(self.server, creds, options=OPTIONS)
                self._stub = pb_grpc.FleetStub(self._channel)
            return self._stub

    def _call(self, call: Callable[[pb_grpc.FleetStub], T]) -> T:
        try:
            return call(self._fleet())
        except grpc.RpcError as exc:
            raise LinkError(convert.code_of(exc.code()), exc.details() or str(exc)) from None
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            raise LinkError(Code.UNAVAILABLE, f"the connection was closed ({exc})") from None

    def join(self, cid: int, capabilities: Capabilities, protocol: int) -> Joined:
        request = pb.JoinRequest(
            cid=cid, capabilities=convert.capabilities_to_pb(capabilities), protocol=protocol
        )
        reply = self._call(lambda s: s.Join(request, timeout=10, metadata=self._metadata))
        return Joined(reply.node_id, reply.session_token, reply.heartbeat_interval_s)

    def tasks(self, joined: Joined) -> Iterator[TaskHeader | Keepalive]:
        request = pb.TasksRequest(node_id=joined.node_id, session_token=joined.token)
        stream = self._call(lambda s: s.Tasks(request, metadata=self._metadata))
        self._stream = stream
        try:
            for message in stream:
                if message.HasField("task"):
                    yield convert.task_from_pb(message.task)
                else:
                    yield convert.keepalive_from_pb(message.keepalive)
        except grpc.RpcError as exc:
            raise LinkError(convert.code_of(exc.code()), exc.details() or str(exc)) from None

    def cancel(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]:
        request = pb.DownloadRequest(model_version=version, offset=offset, session_token=token)
        chunks = self._call(lambda s: s.Download(request, metadata=self._metadata, timeout=600))
        try:
            for chunk in chunks:
                yield chunk.data
        except grpc.RpcError as exc:
            raise LinkError(convert.code_of(exc.code()), exc.details() or str(exc)) from None

    def query_upload(self, token: str, task_id: str) -> tuple[int, bool]:
        request = pb.QueryUploadRequest(task_id=task_id, session_token=token)
        reply = self._call(lambda s: s.QueryUpload(request, timeout=30, metadata=self._metadata))
        return int(reply.received_bytes), bool(reply.complete)

    def upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> UploadAck:
        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=convert.upload_header_to_pb(header))
            for offset, data in chunks:
                yield pb.UploadMessage(chunk=pb.Chunk(data=data, offset=offset))

        reply = self._call(lambda s: s.Upload(messages(), timeout=600, metadata=self._metadata))
        return UploadAck(reply.accepted, reply.duplicate, reply.message, reply.received_bytes)

    def heartbeat(self, token: str) -> None:
        request = pb.HeartbeatRequest(session_token=token)
        self._call(lambda s: s.Heartbeat(request, timeout=10, metadata=self._metadata))

    def leave(self, token: str, reason: str) -> None:
        request = pb.LeaveRequest(session_token=token, reason=reason)
        self._call(lambda s: s.Leave(request, timeout=2, metadata=self._metadata))

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._stub, self._stream = self._channel, None, None, None
        if channel is not None:
            channel.close()
