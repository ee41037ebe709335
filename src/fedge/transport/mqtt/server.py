"""The MQTT transport's server side: the fleet service behind a broker.

The server is one MQTT client. Node calls arrive on ``PREFIX/nodes/NAME/out`` (the
broker's ACL lets only certificate NAME write there, so NAME is the caller's identity),
and answers, tasks and keepalives go to ``PREFIX/nodes/NAME/in``. Models are published
once per version as retained chunks that every node reads: the broker fans them out, so
the server's work per model does not grow with the fleet.

Messages are acknowledged to the broker (manual PUBACK) only when used, and the broker
sends at most `RECEIVE_MAXIMUM` unacknowledged ones: that bounds what uploads can pile up
in this process. The operator's Control service, enrollment and health stay on gRPC
(`GrpcTransport`, which also serves nodes that dial gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from paho.mqtt.packettypes import PacketTypes

from fedge.errors import FedgeError
from fedge.fleet.service import FleetService
from fedge.logs import escape
from fedge.messages import (
    PROTOCOL,
    Code,
    FleetError,
    Keepalive,
    ModelRef,
    TaskHeader,
    UploadHeader,
)
from fedge.node.link import LinkError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.security.credentials import validate_name
from fedge.transport.grpc import convert
from fedge.transport.grpc.server import GrpcTransport
from fedge.transport.mqtt import topics
from fedge.transport.mqtt.client import (
    BrokerAddress,
    Connection,
    Message,
    correlation_of,
    properties,
    user_properties,
)

if TYPE_CHECKING:
    from fedge.fleet.server import Aggregator

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 64
"""Unacknowledged messages the broker may send the server (64 x 256 KiB chunks: 16 MiB)."""
MAX_REQUEST = 64 << 10
"""A call other than an upload fits in this many bytes."""
UPLOADS_PER_NODE = 4
UPLOAD_IDLE = 30.0
"""Seconds without a chunk after which an upload ends as incomplete (the node resumes)."""
SEEN = 4096
"""Recent (node, correlation) pairs kept to answer a QoS 1 duplicate only once."""
PUBLISH_WINDOW = 32
"""Model chunks in flight to the broker while a model is published."""
MODELS_KEPT = 2


class MqttTransport:
    """The fleet over MQTT at `broker`, with gRPC (`grpc`) for the operator."""

    def __init__(
        self,
        broker: str,
        grpc: GrpcTransport,
        *,
        name: str = "server",
        prefix: str = topics.PREFIX,
        chunk_size: int = topics.CHUNK_SIZE,
    ) -> None:
        if grpc.certs is None:
            raise FedgeError("the MQTT transport needs --certs: the broker asks for them")
        if not 1 << 10 <= chunk_size <= topics.MAX_CHUNK:
            raise FedgeError(
                f"MQTT chunk size must be 1 KiB..{topics.MAX_CHUNK >> 10} KiB, got {chunk_size}"
            )
        self.address, self.grpc = BrokerAddress.parse(broker), grpc
        self.name, self.prefix = name, topics.check_prefix(prefix)
        self.chunk_size = chunk_size
        self.bridge: Bridge | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self, service: FleetService, control: Aggregator) -> None:
        await self.grpc.start(service, control)
        assert self.grpc.certs is not None
        self.bridge = Bridge(self, service, control, self.grpc.certs)
        await self.bridge.start()

    def reload_certificates(self) -> None:
        self.grpc.reload_certificates()

    async def stop(self, grace: float) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
        await self.grpc.stop(grace)


class Bridge:
    """MQTT messages to `FleetService` calls and back; everything runs on the loop but
    paho's callbacks, which only hand messages over."""

    def __init__(
        self, transport: MqttTransport, service: FleetService, control: Aggregator, certs: Path
    ) -> None:
        self.service, self.control = service, control
        self.prefix, self.chunk_size = transport.prefix, transport.chunk_size
        self.own_name = transport.name
        self.enrollment = transport.grpc.enrollment
        self.instance = secrets.token_hex(8)
        self.rejected = 0
        """Messages refused as malformed, oversized or not allowed (also logged)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._uploads: dict[tuple[str, bytes], _Upload] = {}
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._calls: set[asyncio.Task[None]] = set()
        self._published: OrderedDict[str, int] = OrderedDict()  # version -> chunks
        self._publishing: dict[str, asyncio.Future[None]] = {}
        self._handlers: dict[str, Callable[[str, bytes, bytes], Awaitable[bytes | None]]] = {
            "join": self._join,
            "connect": self._connect,
            "query": self._query,
            "upload": self._upload,
            "heartbeat": self._heartbeat,
            "leave": self._leave,
            "renew": self._renew,
        }
        self.connection = Connection(
            transport.address,
            certs,
            transport.name,
            on_message=self._received,
            on_connect=self._on_connect,
            receive_maximum=RECEIVE_MAXIMUM,
            manual_ack=True,
            reconnect=True,  # the broker restarting is survived: paho dials again
        )
        # a server that dies clears its announcement: nodes notice at once
        self.connection.client.will_set(topics.server(self.prefix), b"", qos=1, retain=True)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self.connection.connect)
        except LinkError as exc:
            raise FedgeError(exc.message) from None
        log.info(
            "MQTT: connected to %s:%d", self.connection.address.host, self.connection.address.port
        )

    async def stop(self) -> None:
        for task in [*self._streams.values(), *self._calls]:
            task.cancel()
        client = self.connection.client
        with contextlib.suppress(Exception):
            client.publish(topics.server(self.prefix), b"", qos=1, retain=True).wait_for_publish(2)
        await asyncio.to_thread(self.connection.close)

    # --- from paho's thread ---------------------------------------------------------

    def _on_connect(self, client: Any) -> None:
        client.subscribe(topics.node_out(self.prefix, "+"), qos=1)
        status = {"instance": self.instance, "chunk_size": self.chunk_size, "protocol": PROTOCOL}
        client.publish(topics.server(self.prefix), json.dumps(status), qos=1, retain=True)

    def _received(self, message: Message) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, message)

    # --- on the loop ---------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        name = topics.sender(self.prefix, message.topic)
        call = user_properties(message).get("call", "")
        correlation = correlation_of(message, topics.MAX_CORRELATION)
        if name is None or call not in topics.CALLS or not correlation:
            self._ack(message)
            self._reject(name or message.topic, f"not a fedge call (call {call[:32]!r})")
            return
        if call == "chunk":
            self._chunk(name, correlation, message)
            return
        self._ack(message)
        if call == "gone":  # its connection dropped: its task stream ends, as over gRPC
            stream = self._streams.pop(name, None)
            if stream is not None:
                stream.cancel()
            return
        key = (name, correlation)
        if key in self._seen:  # a QoS 1 duplicate: answered already
            return
        self._seen[key] = None
        while len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        answer = self._begin(name, call, correlation, bytes(message.payload))
        task = asyncio.ensure_future(self._call(name, call, correlation, answer))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _begin(
        self, name: str, call: str, correlation: bytes, payload: bytes
    ) -> Awaitable[bytes | None]:
        """The call's checks and its handler's first step, now: in arrival order, so an
        upload is registered before its chunks, dispatched right after it, look for it
        (in a task it started a loop pass late, and they were dropped)."""
        try:
            self._admit(name)
            if call != "upload" and len(payload) > MAX_REQUEST:
                raise FleetError(
                    Code.INVALID_ARGUMENT,
                    f"a {call} message of {len(payload)} bytes; at most {MAX_REQUEST}",
                )
            return self._handlers[call](name, correlation, payload)
        except (DecodeError, FleetError) as exc:
            return _raising(exc)

    async def _call(
        self, name: str, call: str, correlation: bytes, answer: Awaitable[bytes | None]
    ) -> None:
        try:
            reply = await answer
        except DecodeError as exc:
            self._reject(name, f"malformed {call} message: {exc}")
            self._reply(name, correlation, b"", Code.INVALID_ARGUMENT, f"malformed {call}: {exc}")
        except FleetError as exc:
            if exc.code in (Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED):
                self._reject(name, f"{call}: {exc.message}")
            self._reply(name, correlation, b"", exc.code, exc.message)
        else:
            if reply is not None:
                self._reply(name, correlation, reply)

    def _admit(self, name: str) -> None:
        """The name the broker vouches for must be a node's, and not revoked."""
        try:
            validate_name(name)
        except FedgeError as exc:
            raise FleetError(Code.PERMISSION_DENIED, str(exc)) from None
        if name == self.own_name or name in self.control.settings.admins:
            raise FleetError(
                Code.PERMISSION_DENIED, f"{name!r} is not a node's certificate: it cannot join"
            )
        revoked = self.control.revocations.names.get(name)
        if revoked is not None:
            raise FleetError(Code.PERMISSION_DENIED, f"node {name!r} is revoked: {revoked[1]}")

    def _reply(
        self, name: str, correlation: bytes, payload: bytes, code: str = "", message: str = ""
    ) -> None:
        self._send(name, "reply", correlation, payload, code, message)

    def _send(
        self,
        name: str,
        kind: str,
        correlation: bytes,
        payload: bytes,
        code: str = "",
        message: str = "",
    ) -> None:
        user = [("kind", kind)]
        if code:
            user += [("code", str(code)), ("message", message[:4096])]
        props = properties(PacketTypes.PUBLISH, correlation=correlation, user=user)
        self.connection.client.publish(
            topics.node_in(self.prefix, name), payload, qos=1, properties=props
        )

    def _ack(self, message: Message) -> None:
        if message.qos:
            self.connection.client.ack(message.mid, message.qos)

    def _reject(self, who: str, why: str) -> None:
        self.rejected += 1
        log.warning("MQTT: refused a message from %s: %s", escape(who), escape(why))

    # --- the calls -------------------------------------------------------------------

    async def _join(self, name: str, correlation: bytes, payload: bytes) -> bytes:
        request = pb.JoinRequest.FromString(payload)
        caps = convert.capabilities_from_pb(request.capabilities)
        renew = await self._renew_after(name, request.certificate_pem)
        joined = await self.service.join(name, request.cid, "mqtt", caps, request.protocol or 1)
        return pb.JoinReply(
            node_id=joined.node_id,
            heartbeat_interval_s=joined.heartbeat_interval,
            session_token=joined.token,
            renew_after_unix_ms=int(renew * 1000),
        ).SerializeToString()

    async def _renew_after(self, name: str, pem: bytes) -> float:
        """When the node's certificate is due for renewal; 0: never (no issuing CA here).
        The broker does not pass on the certificate the node presented: the node sends
        its chain (checked here), and without one the newest the server issued counts."""
        if self.enrollment is None:
            return 0.0
        from fedge.security import pki
        from fedge.transport.grpc.guard import Peer
        from fedge.transport.grpc.servicer import renew_after

        if pem:
            try:
                leaf = await asyncio.to_thread(
                    pki.presented_chain, pem, self.enrollment.certs, name, "node"
                )
            except pki.PKIError as exc:
                raise FleetError(Code.INVALID_ARGUMENT, f"join: certificate_pem: {exc}") from exc
            return renew_after(
                Peer(
                    name,
                    "node",
                    leaf.serial_number,
                    leaf.not_valid_before_utc.timestamp(),
                    leaf.not_valid_after_utc.timestamp(),
                )
            )
        rows = await asyncio.to_thread(self.control.runs.store.certificates, name)
        for row in rows:  # newest first
            if row["issued_at"] and not row["revoked_at"]:
                peer = Peer(
                    name, "node", int(row["serial"], 16), row["issued_at"], row["not_after"]
                )
                return renew_after(peer)
        return 0.0

    async def _connect(self, name: str, correlation: bytes, payload: bytes) -> None:
        request = pb.TasksRequest.FromString(payload)
        await self.service.check_session(name, request.session_token)
        self._reply(name, correlation, b"")  # before the first task, on the same topic
        old = self._streams.pop(name, None)
        if old is not None:
            old.cancel()
        self._streams[name] = asyncio.ensure_future(
            self._pump(name, request.session_token, correlation)
        )

    async def _pump(self, name: str, token: str, correlation: bytes) -> None:
        """The session's task stream, as messages tagged with the connect's correlation
        data (a node drops those of a stream it no longer reads)."""
        code, why = Code.CANCELLED, "the session ended"
        try:
            async for item in self.service.tasks(name, token):
                if isinstance(item, Keepalive):
                    body = pb.TaskMessage(keepalive=convert.keepalive_to_pb(item))
                else:
                    assert isinstance(item, TaskHeader)
                    if item.model is not None:
                        await self._ensure_model(item.model)
                    body = pb.TaskMessage(task=convert.task_to_pb(item))
                self._send(name, "task", correlation, body.SerializeToString())
        except FleetError as exc:
            code, why = exc.code, exc.message
        except asyncio.CancelledError:
            return
        finally:
            if self._streams.get(name) is asyncio.current_task():
                del self._streams[name]
        self._send(name, "end", correlation, b"", code, why)

    async def _query(self, name: str, correlation: bytes, payload: bytes) -> bytes:
        request = pb.QueryUploadRequest.FromString(payload)
        held, complete = await self.service.query_upload(
            name, request.session_token, request.task_id
        )
        return pb.QueryUploadReply(received_bytes=held, complete=complete).SerializeToString()

    def _upload(self, name: str, correlation: bytes, payload: bytes) -> Awaitable[bytes]:
        """Not a coroutine: the header is read and the upload registered at once (see
        `_begin`); what comes back is the upload itself."""
        message = pb.UploadHeader.FromString(payload)
        header = convert.upload_header_from_pb(message)
        data = message.data
        if data or not header.size:  # the whole result in this one message
            return self._upload_whole(name, header, data)
        if sum(1 for n, _ in self._uploads if n == name) >= UPLOADS_PER_NODE:
            raise FleetError(
                Code.RESOURCE_EXHAUSTED,
                f"node {name!r} has {UPLOADS_PER_NODE} uploads in progress; wait for one",
            )
        upload = self._uploads[name, correlation] = _Upload(header.offset, header.size, self._ack)
        return self._upload_chunks(name, correlation, header, upload)

    async def _upload_whole(self, name: str, header: UploadHeader, data: bytes) -> bytes:
        async def whole() -> AsyncIterator[tuple[int, bytes]]:
            if data:
                yield header.offset, data

        ack = await self.service.upload(name, header, whole())
        return convert.ack_to_pb(ack, header.task_id).SerializeToString()

    async def _upload_chunks(
        self, name: str, correlation: bytes, header: UploadHeader, upload: _Upload
    ) -> bytes:
        try:
            ack = await self.service.upload(name, header, upload.chunks())
        finally:
            del self._uploads[name, correlation]
            upload.close()
        return convert.ack_to_pb(ack, header.task_id).SerializeToString()

    def _chunk(self, name: str, correlation: bytes, message: Message) -> None:
        upload = self._uploads.get((name, correlation))
        if upload is None:  # after its upload ended (cut at a gap, or refused): dropped
            self._ack(message)
            return
        try:
            chunk = pb.Chunk.FromString(bytes(message.payload))
        except DecodeError as exc:
            self._ack(message)
            self._reject(name, f"malformed chunk: {exc}")
            upload.end()
            return
        upload.offer(chunk.offset, chunk.data, message)

    async def _heartbeat(self, name: str, correlation: bytes, payload: bytes) -> bytes:
        request = pb.HeartbeatRequest.FromString(payload)
        await self.service.heartbeat(name, request.session_token, request.serving)
        return b""

    async def _leave(self, name: str, correlation: bytes, payload: bytes) -> bytes:
        request = pb.LeaveRequest.FromString(payload)
        await self.service.leave(name, request.session_token, request.reason)
        return b""

    async def _renew(self, name: str, correlation: bytes, payload: bytes) -> bytes:
        request = pb.RenewRequest.FromString(payload)
        await self.service.check_session(name, request.session_token)
        enrollment = self.enrollment
        if enrollment is None:
            raise FleetError(
                Code.FAILED_PRECONDITION,
                "this server does not renew certificates (it has no issuing CA)",
            )
        chain = await enrollment.renew(name, request.csr_pem)
        return pb.RenewReply(chain_pem=chain).SerializeToString()

    # --- models ----------------------------------------------------------------------

    async def _ensure_model(self, ref: ModelRef) -> None:
        if ref.version in self._published:
            return
        publishing = self._publishing.get(ref.version)
        if publishing is None:
            publishing = asyncio.ensure_future(asyncio.to_thread(self._publish_model, ref))
            self._publishing[ref.version] = publishing
            publishing.add_done_callback(lambda _: self._publishing.pop(ref.version, None))
        try:
            await asyncio.shield(publishing)
        except FleetError as exc:  # the node's download times out and it asks again
            log.warning("MQTT: model %s not published: %s", ref.version, exc.message)

    def _publish_model(self, ref: ModelRef) -> None:
        """Every chunk of the model, retained, then its announcement; older versions but
        the last `MODELS_KEPT` are cleared from the broker."""
        client = self.connection.client
        in_flight: deque[Any] = deque()
        count = max(1, -(-ref.size // self.chunk_size))
        said = properties(PacketTypes.PUBLISH, user=[("chunks", str(count))])
        for offset, data in self.service.models.read(ref.version, 0, self.chunk_size):
            topic = topics.chunk(self.prefix, ref.version, offset // self.chunk_size)
            in_flight.append(client.publish(topic, data, 1, True, said))
            self.service.traffic.add_sent(len(data))  # once: the broker fans it out
            if len(in_flight) > PUBLISH_WINDOW:
                _wait(in_flight.popleft())
        while in_flight:
            _wait(in_flight.popleft())
        announcement = {
            "version": ref.version,
            "sha256": ref.sha256.hex(),
            "size": ref.size,
            "chunks": count,
        }
        _wait(client.publish(topics.model(self.prefix), json.dumps(announcement), 1, True))
        self._published[ref.version] = count
        while len(self._published) > MODELS_KEPT:
            old, chunks = self._published.popitem(last=False)
            for index in range(chunks):  # an empty retained message clears the topic
                client.publish(topics.chunk(self.prefix, old, index), b"", 1, True)
        log.info("MQTT: published model %s (%d bytes, %d chunks)", ref.version, ref.size, count)


async def _raising(error: Exception) -> bytes | None:
    raise error


def _wait(info: Any, timeout: float = 60.0) -> None:
    info.wait_for_publish(timeout)
    if not info.is_published():
        raise FleetError(Code.UNAVAILABLE, f"the broker did not take a message in {timeout:.0f} s")


class _Upload:
    """One upload's chunks, in order. A chunk the broker delivers twice is dropped; a
    gap (the broker dropped one) ends the upload early: the node asks where the server
    stands and resumes from there, as after a cut connection."""

    def __init__(self, offset: int, size: int, ack: Callable[[Message], None]) -> None:
        self.expected, self.size, self.ack = offset, size, ack
        self.queue: asyncio.Queue[tuple[int, bytes, Message] | None] = asyncio.Queue()
        self.ended = False

    def offer(self, offset: int, data: bytes, message: Message) -> None:
        if self.ended or offset < self.expected:
            self.ack(message)
            return
        if offset > self.expected:
            self.ack(message)
            self.end()
            return
        self.expected = offset + len(data)
        self.queue.put_nowait((offset, data, message))  # acknowledged once consumed
        if self.expected >= self.size:
            self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[tuple[int, bytes]]:
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), UPLOAD_IDLE)
            except TimeoutError:
                return
            if item is None:
                return
            offset, data, message = item
            self.ack(message)
            yield offset, data

    def close(self) -> None:
        self.ended = True
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                self.ack(item[2])
