"""The MQTT transport's node side: a `fedge.node.link.Link` through the broker.

Calls go out on the node's own ``out`` topic with MQTT 5 correlation data and an expiry
(a call the server could not take in time is dropped by the broker, not answered late);
answers, tasks and keepalives come back, in order, on its ``in`` topic. The session is
persistent (clean start off): what the server sent while the node was offline is
delivered when it is back. Models are read from the retained chunks the server
published, a window of chunks at a time, from any offset.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes

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
from fedge.transport.grpc import convert
from fedge.transport.mqtt import topics
from fedge.transport.mqtt.client import (
    SESSION_TAKEN_OVER,
    BrokerAddress,
    Connection,
    Message,
    correlation_of,
    properties,
    user_properties,
)

CALL_TIMEOUT = 15.0
UPLOAD_WINDOW = 16
"""Chunks of an upload published but not yet taken by the broker."""
DOWNLOAD_WINDOW = 32
"""Model chunks asked for at once."""
CHUNK_TIMEOUT = 30.0
STREAM_SILENCE = 60.0
"""Seconds without a message on the task stream after which the link is taken as dead
(the server sends a keepalive every 15 s)."""


class MqttLink:
    def __init__(
        self,
        broker: str,
        name: str,
        certs: Path,
        *,
        prefix: str = topics.PREFIX,
        chunk_size: int = topics.CHUNK_SIZE,
    ) -> None:
        self.address, self.name, self.certs = BrokerAddress.parse(broker), name, certs
        self.prefix, self.chunk_size = topics.check_prefix(prefix), chunk_size
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._waiters: dict[bytes, queue.Queue[Message | LinkError]] = {}
        self._stream: queue.Queue[Message | LinkError] | None = None
        self._stream_id = b""
        self._chunks: dict[str, queue.Queue[Message | LinkError]] = {}
        self._server: dict[str, Any] = {}
        self._server_known = threading.Event()
        self._joined_instance = ""
        self._cancels = 0

    # --- the connection --------------------------------------------------------------

    def _connected(self, timeout: float = CALL_TIMEOUT) -> Connection:
        """The connection, made if needed, once the server's announcement is known; a
        `cancel` meanwhile ends the wait."""
        cancels = self._cancels
        with self._lock:
            if self._connection is not None and self._connection.connected:
                return self._connection
            if self._connection is not None:
                self._connection.close()
            self._server_known.clear()
            connection = Connection(
                self.address,
                self.certs,
                self.name,
                on_message=self._received,
                on_connect=self._subscribe,
                on_disconnect=self._lost,
            )
            will = properties(PacketTypes.WILLMESSAGE, correlation=b"gone", user=[("call", "gone")])
            out = topics.node_out(self.prefix, self.name)
            connection.client.will_set(out, b"", qos=1, properties=will)
            connection.connect()
            self._connection = connection
        deadline = time.monotonic() + timeout
        while not self._server_known.wait(0.1):
            if self._cancels != cancels:
                raise LinkError(Code.CANCELLED, "cancelled")
            if time.monotonic() > deadline:
                break
        if not self._server.get("instance"):
            raise LinkError(Code.UNAVAILABLE, "the server is not connected to the broker")
        return connection

    def _subscribe(self, client: Any) -> None:
        client.subscribe(
            [(topics.node_in(self.prefix, self.name), 1), (topics.server(self.prefix), 1)]
        )

    def _lost(self, reason: int) -> None:
        if reason == SESSION_TAKEN_OVER:
            error = LinkError(
                Code.ABORTED,
                f"replaced by a newer connection: another process connected as {self.name!r}",
            )
        else:
            error = LinkError(Code.UNAVAILABLE, f"the broker connection was lost ({reason})")
        self._fail_all(error)

    def _fail_all(self, error: LinkError) -> None:
        for waiter in [*self._waiters.values(), *self._chunks.values()]:
            waiter.put(error)
        if self._stream is not None:
            self._stream.put(error)

    def _received(self, message: Message) -> None:
        topic = message.topic
        if topic == topics.server(self.prefix):
            try:
                status = json.loads(message.payload) if message.payload else {}
            except ValueError:
                status = {}
            self._server = status if isinstance(status, dict) else {}
            self._server_known.set()
            instance = self._server.get("instance", "")
            if self._joined_instance and instance != self._joined_instance:
                self._joined_instance = ""
                what = "restarted" if instance else "went away"
                self._fail_all(LinkError(Code.UNAVAILABLE, f"the server {what}"))
            return
        if topic.startswith(f"{self.prefix}/models/"):
            waiter = self._chunks.get(topic)
            if waiter is not None:
                waiter.put(message)
            return
        kind = user_properties(message).get("kind", "")
        correlation = correlation_of(message, topics.MAX_CORRELATION)
        if kind == "reply":
            waiter = self._waiters.pop(correlation, None)
            if waiter is not None:
                waiter.put(message)
        elif kind in ("task", "end") and correlation == self._stream_id:
            stream = self._stream
            if stream is not None:
                stream.put(message)

    def _publish(self, call: str, payload: bytes, correlation: bytes, expiry: int) -> Any:
        connection = self._connected(min(expiry, CALL_TIMEOUT))
        props = properties(
            PacketTypes.PUBLISH, correlation=correlation, user=[("call", call)], expiry=expiry
        )
        return connection.client.publish(
            topics.node_out(self.prefix, self.name), payload, qos=1, properties=props
        )

    def _request(
        self,
        call: str,
        payload: bytes,
        timeout: float = CALL_TIMEOUT,
        *,
        correlation: bytes = b"",
        after: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Publish a call and wait for its answer's payload; `after` runs in between (an
        upload's chunks)."""
        correlation = correlation or secrets.token_bytes(12)
        waiter: queue.Queue[Message | LinkError] = queue.Queue()
        self._waiters[correlation] = waiter
        try:
            self._publish(call, payload, correlation, int(timeout) + 1)
            if after is not None:
                after(correlation)
            try:
                answer = waiter.get(timeout=timeout)
            except queue.Empty:
                raise LinkError(
                    Code.DEADLINE_EXCEEDED, f"no answer to {call} within {timeout:.0f} s"
                ) from None
        finally:
            self._waiters.pop(correlation, None)
        if isinstance(answer, LinkError):
            raise answer
        return _checked(answer)

    # --- the Link --------------------------------------------------------------------

    def join(self, cid: int, capabilities: Capabilities, protocol: int) -> Joined:
        request = pb.JoinRequest(
            cid=cid,
            capabilities=convert.capabilities_to_pb(capabilities),
            protocol=protocol,
            certificate_pem=(self.certs / f"{self.name}.crt").read_bytes(),
        )
        reply = pb.JoinReply.FromString(self._request("join", request.SerializeToString()))
        self._joined_instance = self._server.get("instance", "")
        return convert.joined_from_pb(reply)

    def tasks(self, joined: Joined) -> Iterator[TaskHeader | Keepalive]:
        """Opens the stream now, so a `cancel` that comes before the first read ends it."""
        stream: queue.Queue[Message | LinkError] = queue.Queue()
        correlation = secrets.token_bytes(12)
        self._stream, self._stream_id = stream, correlation
        request = pb.TasksRequest(node_id=joined.node_id, session_token=joined.token)
        self._request("connect", request.SerializeToString(), correlation=correlation)
        return self._read(stream)

    def _read(self, stream: queue.Queue[Message | LinkError]) -> Iterator[TaskHeader | Keepalive]:
        try:
            while True:
                try:
                    item = stream.get(timeout=STREAM_SILENCE)
                except queue.Empty:
                    raise LinkError(
                        Code.UNAVAILABLE, f"no keepalive from the server in {STREAM_SILENCE:.0f} s"
                    ) from None
                if isinstance(item, LinkError):
                    raise item
                if user_properties(item).get("kind") == "end":
                    _checked(item)
                    return
                message = pb.TaskMessage.FromString(bytes(item.payload))
                if message.HasField("task"):
                    yield convert.task_from_pb(message.task)
                elif message.HasField("keepalive"):
                    yield convert.keepalive_from_pb(message.keepalive)
        finally:
            if self._stream is stream:
                self._stream, self._stream_id = None, b""

    def cancel(self) -> None:
        """Ends the task stream and every call waiting for an answer (the node stops, or
        reconnects)."""
        self._cancels += 1  # a call waiting to hear of the server gives up too
        self._fail_all(LinkError(Code.CANCELLED, "cancelled"))

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]:
        """The model's retained chunks from `offset`, a window at a time: each chunk is a
        subscription, answered by the broker with the retained message. The first chunk
        asked for says how many there are."""
        connection = self._connected()
        size = int(self._server.get("chunk_size") or 0)
        if size <= 0:
            raise LinkError(Code.UNAVAILABLE, "the server announced no chunk size")
        index, skip = divmod(offset, size)
        total: int | None = None
        while total is None or index < total:
            end = index + 1 if total is None else min(total, index + DOWNLOAD_WINDOW)
            names = [topics.chunk(self.prefix, version, i) for i in range(index, end)]
            for message in self._fetch(connection, version, names):
                if total is None:
                    total = _count(message, version)
                yield bytes(message.payload)[skip:]
                skip, index = 0, index + 1

    def _fetch(self, connection: Connection, version: str, names: list[str]) -> list[Message]:
        arrived: queue.Queue[Message | LinkError] = queue.Queue()
        for name in names:
            self._chunks[name] = arrived
        got: dict[str, Message] = {}
        try:
            connection.client.subscribe([(name, 1) for name in names])
            deadline = time.monotonic() + CHUNK_TIMEOUT
            while len(got) < len(names):
                try:
                    item = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    missing = next(n for n in names if n not in got).rsplit("/", 1)[1]
                    raise LinkError(
                        Code.UNAVAILABLE,
                        f"model {version}: chunk {missing} did not arrive in {CHUNK_TIMEOUT:.0f} s",
                    ) from None
                if isinstance(item, LinkError):
                    raise item
                got[item.topic] = item
        finally:
            for name in names:
                self._chunks.pop(name, None)
            if connection.connected:
                connection.client.unsubscribe(names)
        return [got[name] for name in names]

    def query_upload(self, token: str, task_id: str) -> tuple[int, bool]:
        request = pb.QueryUploadRequest(task_id=task_id, session_token=token)
        reply = pb.QueryUploadReply.FromString(self._request("query", request.SerializeToString()))
        return int(reply.received_bytes), bool(reply.complete)

    def upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> UploadAck:
        message = convert.upload_header_to_pb(header)
        if header.offset == 0 and header.size <= self.chunk_size:
            parts = list(chunks)
            if not parts or (len(parts) == 1 and parts[0][0] == 0):  # one message
                message.data = parts[0][1] if parts else b""
                reply = self._request("upload", message.SerializeToString(), 120.0)
                return _ack(pb.UploadReply.FromString(reply))
            chunks = parts

        def send(correlation: bytes) -> None:
            in_flight: list[Any] = []
            for offset, data in chunks:
                info = self._publish("chunk", convert.chunk_bytes(data, offset), correlation, 600)
                in_flight.append(info)
                if len(in_flight) > UPLOAD_WINDOW:
                    _taken(in_flight.pop(0))
            for info in in_flight:
                _taken(info)

        reply = self._request("upload", message.SerializeToString(), 120.0, after=send)
        return _ack(pb.UploadReply.FromString(reply))

    def heartbeat(self, token: str, serving: str = "") -> None:
        request = pb.HeartbeatRequest(session_token=token, serving=serving)
        self._request("heartbeat", request.SerializeToString())

    def leave(self, token: str, reason: str) -> None:
        request = pb.LeaveRequest(session_token=token, reason=reason)
        self._request("leave", request.SerializeToString(), 2.0)

    def renew(self, token: str) -> None:
        from fedge.security import enroll  # cryptography, loaded only when renewing

        key, csr = enroll.make_request(self.name)
        request = pb.RenewRequest(session_token=token, csr_pem=csr)
        reply = pb.RenewReply.FromString(self._request("renew", request.SerializeToString(), 30.0))
        enroll.renewed(self.certs, self.name, key, reply.chain_pem)

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _checked(message: Message) -> bytes:
    """The payload of an answer, or the `LinkError` it carries."""
    props = user_properties(message)
    code = props.get("code", "")
    if code:
        raise LinkError(
            Code(code) if code in Code.__members__ else Code.UNKNOWN, props.get("message", "")
        )
    return bytes(message.payload)


def _ack(reply: pb.UploadReply) -> UploadAck:
    return UploadAck(reply.accepted, reply.duplicate, reply.message, reply.received_bytes)


def _taken(info: Any) -> None:
    info.wait_for_publish(CHUNK_TIMEOUT)
    if not info.is_published():
        raise LinkError(Code.UNAVAILABLE, "the broker did not take an upload chunk in time")


def _count(message: Message, version: str) -> int:
    """How many chunks the model has, as its chunks say (the server is checked: the node
    refuses more bytes than the task announced)."""
    text = user_properties(message).get("chunks", "")
    if not text.isdigit() or not 0 < int(text) <= 1 << 24:
        raise LinkError(Code.DATA_LOSS, f"model {version}: chunk count {text[:20]!r} is not valid")
    return int(text)
