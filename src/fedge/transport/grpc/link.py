"""The gRPC transport's node side: a `fedge.node.link.Link` over one channel.

The task stream is `Connect`: small models arrive with their task (and `download` then
serves them from memory), and small results go up on the same stream, answered by acks
on it; only large payloads use the chunked, resumable Download and Upload calls. gRPC's
own errors become `LinkError` with the same code; so does a call on a channel that was
closed meanwhile (another thread reconnecting), which the runtime then retries.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedge.chunks import CHUNK_SIZE
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
from fedge.transport.grpc.tls import NODE_NAME_METADATA, channel_credentials, explain_refusal

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
        self._connect: Any = None  # Connect and Upload, with requests encoded by hand
        self._upload: Any = None
        self._stream: grpc.Future | None = None
        self._requests: queue.Queue[pb.NodeMessage | bytes | None] | None = None
        self._stream_token = ""
        self._acks: dict[str, queue.Queue[pb.UploadReply | LinkError]] = {}
        self._inline: OrderedDict[str, bytes] = OrderedDict()  # models that came with tasks
        self._explained = insecure  # a refused connection was checked against the certs

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
                self._connect = self._channel.stream_stream(
                    "/fedge.v1.Fleet/Connect",
                    request_serializer=convert.encode,
                    response_deserializer=pb.TaskMessage.FromString,
                )
                self._upload = self._channel.stream_unary(
                    "/fedge.v1.Fleet/Upload",
                    request_serializer=convert.encode,
                    response_deserializer=pb.UploadReply.FromString,
                )
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
        try:
            reply = self._call(lambda s: s.Join(request, timeout=10, metadata=self._metadata))
        except LinkError as exc:
            refused_tcp = "Connection refused" in exc.message  # the server is down
            if exc.code == Code.UNAVAILABLE and not refused_tcp and not self._explained:
                self._explained = True  # once: the check loads `cryptography`
                assert self.certs is not None
                explain_refusal(self.certs, self.name)
            raise
        self._explained = True
        return convert.joined_from_pb(reply)

    def tasks(self, joined: Joined) -> Iterator[TaskHeader | Keepalive]:
        """Opens the stream now, so a `cancel` that comes before the first read ends it."""
        requests: queue.Queue[pb.NodeMessage | bytes | None] = queue.Queue()
        requests.put(
            pb.NodeMessage(open=pb.TasksRequest(node_id=joined.node_id, session_token=joined.token))
        )

        def outgoing() -> Iterator[pb.NodeMessage | bytes]:
            while (message := requests.get()) is not None:
                yield message

        stream = self._call(lambda s: self._connect(outgoing(), metadata=self._metadata))
        self._stream, self._requests, self._stream_token = stream, requests, joined.token
        return self._receive(stream, requests)

    def _receive(
        self, stream: Any, requests: queue.Queue[pb.NodeMessage | bytes | None]
    ) -> Iterator[TaskHeader | Keepalive]:
        try:
            for message in stream:
                body = message.WhichOneof("body")
                if body == "task":
                    yield convert.task_from_pb(message.task)
                elif body == "model":
                    self._keep_inline(message.model.version, message.model.data)
                elif body == "ack":
                    waiter = self._acks.pop(message.ack.task_id, None)
                    if waiter is not None:
                        waiter.put(message.ack)
                else:
                    yield convert.keepalive_from_pb(message.keepalive)
        except grpc.RpcError as exc:
            raise LinkError(convert.code_of(exc.code()), exc.details() or str(exc)) from None
        finally:
            self._requests = None
            requests.put(None)
            for waiter in list(self._acks.values()):
                waiter.put(LinkError(Code.UNAVAILABLE, "the task stream ended"))

    def _keep_inline(self, version: str, data: bytes) -> None:
        self._inline[version] = data
        while len(self._inline) > 2:
            self._inline.popitem(last=False)

    def cancel(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]:
        inline = self._inline.get(version)
        if inline is not None:  # it came with its task
            yield inline[offset:]
            return
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
        requests = self._requests
        if requests is not None and header.offset == 0 and header.size <= CHUNK_SIZE:
            parts = list(chunks)
            if not parts or (len(parts) == 1 and parts[0][0] == 0):  # one message: the stream
                return self._upload_on_stream(requests, header, parts[0][1] if parts else b"")
            chunks = parts

        def messages() -> Iterator[pb.UploadMessage | bytes]:
            yield pb.UploadMessage(header=convert.upload_header_to_pb(header))
            for offset, data in chunks:
                yield convert.upload_chunk_bytes(data, offset)

        reply = self._call(lambda s: self._upload(messages(), timeout=600, metadata=self._metadata))
        return UploadAck(reply.accepted, reply.duplicate, reply.message, reply.received_bytes)

    def _upload_on_stream(
        self,
        requests: queue.Queue[pb.NodeMessage | bytes | None],
        header: UploadHeader,
        data: bytes,
    ) -> UploadAck:
        waiter: queue.Queue[pb.UploadReply | LinkError] = queue.Queue(maxsize=1)
        self._acks[header.task_id] = waiter
        requests.put(convert.node_upload_bytes(convert.upload_header_to_pb(header), data))
        try:
            reply = waiter.get(timeout=600)
        except queue.Empty:
            raise LinkError(Code.DEADLINE_EXCEEDED, "no answer to the upload") from None
        finally:
            self._acks.pop(header.task_id, None)
        if isinstance(reply, LinkError):
            raise reply
        if reply.code:
            code = Code(reply.code) if reply.code in Code.__members__ else Code.UNKNOWN
            raise LinkError(code, reply.message)
        return UploadAck(reply.accepted, reply.duplicate, reply.message, reply.received_bytes)

    def heartbeat(self, token: str, serving: str = "") -> None:
        request = pb.HeartbeatRequest(session_token=token, serving=serving)
        requests = self._requests
        if requests is not None and token == self._stream_token:  # a message, not a call
            requests.put(pb.NodeMessage(heartbeat=request))
            return
        self._call(lambda s: s.Heartbeat(request, timeout=10, metadata=self._metadata))

    def leave(self, token: str, reason: str) -> None:
        request = pb.LeaveRequest(session_token=token, reason=reason)
        self._call(lambda s: s.Leave(request, timeout=2, metadata=self._metadata))

    def renew(self, token: str) -> None:
        from fedge.security import enroll  # cryptography, loaded only when renewing

        if self.certs is None:
            raise LinkError(Code.FAILED_PRECONDITION, "a plaintext node has no certificate")
        key, csr = enroll.make_request(self.name)
        request = pb.RenewRequest(session_token=token, csr_pem=csr)
        reply = self._call(lambda s: s.Renew(request, timeout=30, metadata=self._metadata))
        enroll.renewed(self.certs, self.name, key, reply.chain_pem)

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._stub, self._stream = self._channel, None, None, None
        if channel is not None:
            channel.close()
