"""Scale over MQTT: N nodes speaking fedge's MQTT protocol, through mosquitto, to one
`fedge server --transport mqtt`.

As `scale_bench.py` (the same model, rounds and numbers), but the nodes dial a mosquitto
broker started for the run with the config `fedge broker config` writes (mutual TLS, a
certificate per node, the ACL), and speak as `MqttLink` does: wait for the server's
retained announcement, the join and connect calls with correlation data, the tasks on
the node's own `in` topic, the model from the retained chunks, the result as an upload
header and its chunk, heartbeat calls, the last will. A load-generator process runs its
nodes' paho clients on one selector loop (paho's external-loop API) instead of a
network thread each.

Usage: python benchmarks/mqtt_scale_bench.py [--nodes 100 500 1000] [--rounds 3]
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import random
import secrets
import selectors
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt.packettypes import PacketTypes

from fedge.messages import PROTOCOL, UploadHeader
from fedge.node.runtime import CHUNK
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.transport.grpc import convert
from fedge.transport.mqtt import topics
from fedge.transport.mqtt.client import (
    BrokerAddress,
    Connection,
    Message,
    correlation_of,
    properties,
    user_properties,
)
from fedge.transport.mqtt.link import CALL_TIMEOUT
from fedge.weights import from_bytes, to_bytes

sys.path.insert(0, str(Path(__file__).parent))
from scale_bench import main

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
Answer = Callable[[Message], None]


class Hub:
    """One selector loop for many paho clients, and timers on it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[Any] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def attach(self, client: Any) -> None:
        selector = self.selector
        client.on_socket_open = lambda c, _u, sock: selector.register(sock, READ, c)
        client.on_socket_close = lambda _c, _u, sock: self._forget(sock)
        client.on_socket_register_write = lambda c, _u, sock: selector.modify(sock, READ | WRITE, c)
        client.on_socket_unregister_write = lambda c, _u, sock: selector.modify(sock, READ, c)
        self.clients.append(client)

    def _forget(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), action))

    def run(self) -> None:
        housekeeping = time.monotonic()
        while True:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                heapq.heappop(self._timers)[2]()
            wait = min(1.0, self._timers[0][0] - now) if self._timers else 1.0
            for key, mask in self.selector.select(max(0.0, wait)):
                client = key.data
                if mask & READ:
                    client.loop_read()
                    sock = client.socket()  # TLS may hold decrypted bytes select misses
                    while sock is not None and sock.pending():
                        client.loop_read()
                        sock = client.socket()
                if mask & WRITE:
                    client.loop_write()
            if now - housekeeping >= 1.0:  # keepalive pings, retries
                housekeeping = now
                for client in self.clients:
                    client.loop_misc()


class SimNode:
    """One node on `hub`, its messages as `MqttLink` sends them; it trains w + 1e-3."""

    def __init__(self, hub: Hub, broker: BrokerAddress, certs: Path, cid: int) -> None:
        self.hub, self.cid, self.name = hub, cid, f"node-{cid}"
        self.prefix = topics.PREFIX
        self.connection = Connection(
            broker,
            certs,
            self.name,
            on_message=self._received,
            on_connect=self._subscribe,
            on_disconnect=self._lost,
        )
        will = properties(PacketTypes.WILLMESSAGE, correlation=b"gone", user=[("call", "gone")])
        self.out = topics.node_out(self.prefix, self.name)
        self.connection.client.will_set(self.out, b"", qos=1, properties=will)
        hub.attach(self.connection.client)
        self.instance = ""  # of the server this node joined
        self.token, self.stream, self.session = "", b"", 0
        self.calls: dict[bytes, Answer] = {}
        self.models: dict[str, bytes] = {}
        self.chunks: dict[str, Message] = {}
        self.task: pb.TaskHeader | None = None

    def start(self) -> None:
        try:
            self.connection.dial()
        except Exception as exc:  # the broker is busy with the connection storm
            _complain(self.name, f"dial: {exc}")
            self.hub.later(random.uniform(1, 3), self._redial)

    def _redial(self) -> None:
        try:
            self.connection.client.reconnect()
        except OSError as exc:
            _complain(self.name, f"redial: {exc}")
            self.hub.later(random.uniform(1, 3), self._redial)

    def _subscribe(self, client: Any) -> None:
        client.subscribe(
            [(topics.node_in(self.prefix, self.name), 1), (topics.server(self.prefix), 1)]
        )

    def _lost(self, reason: int) -> None:
        self.instance, self.session = "", self.session + 1  # joins again once back
        self.calls.clear()
        self.hub.later(random.uniform(1, 2), self._redial)

    # --- messages ----------------------------------------------------------------------

    def _received(self, message: Message) -> None:
        if message.topic == topics.server(self.prefix):
            status = json.loads(message.payload) if message.payload else {}
            instance = status.get("instance", "")
            if instance and instance != self.instance:
                self.instance = instance
                self._join()
            return
        if message.topic.startswith(f"{self.prefix}/models/"):
            self._chunk(message)
            return
        kind = user_properties(message).get("kind", "")
        correlation = correlation_of(message, topics.MAX_CORRELATION)
        if kind == "reply":
            answer = self.calls.pop(correlation, None)
            if answer is not None:
                answer(message)
        elif kind == "task" and correlation == self.stream:
            self._task(pb.TaskMessage.FromString(bytes(message.payload)))
        elif kind == "end" and correlation == self.stream:
            _complain(self.name, f"stream ended: {user_properties(message)}")
            self.hub.later(random.uniform(0.5, 1), self._join)

    def _publish(self, call: str, payload: bytes, correlation: bytes, expiry: int) -> None:
        props = properties(
            PacketTypes.PUBLISH, correlation=correlation, user=[("call", call)], expiry=expiry
        )
        self.connection.client.publish(self.out, payload, qos=1, properties=props)

    def _call(
        self,
        call: str,
        payload: bytes,
        answer: Answer,
        *,
        timeout: float = CALL_TIMEOUT,
        correlation: bytes = b"",
    ) -> bytes:
        """Publish a call; `answer` gets its reply. Unanswered in time: join again."""
        correlation = correlation or secrets.token_bytes(12)
        self.calls[correlation] = answer
        self._publish(call, payload, correlation, int(timeout) + 1)
        session = self.session

        def expired() -> None:
            if self.calls.pop(correlation, None) is not None and session == self.session:
                _complain(self.name, f"no answer to {call} in {timeout:.0f} s")
                self._join()

        self.hub.later(timeout, expired)
        return correlation

    # --- the session -------------------------------------------------------------------

    def _join(self) -> None:
        self.session += 1
        self.stream = b""
        request = pb.JoinRequest(cid=self.cid, protocol=PROTOCOL)
        self._call("join", request.SerializeToString(), self._joined)

    def _joined(self, message: Message) -> None:
        if not _ok(self.name, "join", message):
            self.hub.later(random.uniform(1, 2), self._join)
            return
        reply = pb.JoinReply.FromString(bytes(message.payload))
        self.token, session = reply.session_token, self.session
        self.stream = secrets.token_bytes(12)
        request = pb.TasksRequest(node_id=reply.node_id, session_token=self.token)
        connect = request.SerializeToString()
        self._call(
            "connect", connect, lambda m: _ok(self.name, "connect", m), correlation=self.stream
        )
        self.hub.later(reply.heartbeat_interval_s or 5.0, lambda: self._beat(session, reply))

    def _beat(self, session: int, reply: pb.JoinReply) -> None:
        if session != self.session:
            return
        request = pb.HeartbeatRequest(session_token=self.token).SerializeToString()
        self._call("heartbeat", request, lambda m: _ok(self.name, "heartbeat", m))
        self.hub.later(reply.heartbeat_interval_s or 5.0, lambda: self._beat(session, reply))

    def _task(self, message: pb.TaskMessage) -> None:
        if not message.HasField("task"):
            return  # a keepalive
        self.task = task = message.task
        data = self.models.get(task.model_version)
        if data is not None:
            self._train(task, data)
            return
        self.chunks = {}
        self.connection.client.subscribe([(topics.chunk(self.prefix, task.model_version, 0), 1)])

    def _chunk(self, message: Message) -> None:
        """The model's retained chunks: the first says how many there are; the rest are
        asked for at once (the model has only a few)."""
        task = self.task
        if task is None or message.topic in self.chunks:
            return
        self.chunks[message.topic] = message
        count = int(user_properties(message).get("chunks", "0"))
        names = [topics.chunk(self.prefix, task.model_version, i) for i in range(count)]
        client = self.connection.client
        if len(self.chunks) == 1 and count > 1:
            client.subscribe([(name, 1) for name in names[1:]])
        if len(self.chunks) < count:
            return
        client.unsubscribe(names)
        data = b"".join(bytes(self.chunks[name].payload) for name in names)
        self.chunks = {}
        if hashlib.sha256(data).digest() != task.model_sha256:
            _complain(self.name, f"model {task.model_version}: hash mismatch")
            return
        self.models = {task.model_version: data}
        self._train(task, data)

    def _train(self, task: pb.TaskHeader, data: bytes) -> None:
        weights = from_bytes(data)
        payload = to_bytes({k: v + np.float32(1e-3) for k, v in weights.items()})
        header = UploadHeader(
            task.task_id,
            self.token,
            num_examples=1,
            encoding="safetensors",
            size=len(payload),
            sha256=hashlib.sha256(payload).digest(),
        )
        message = convert.upload_header_to_pb(header)
        uploaded = lambda m: self._uploaded(task.task_id, m)  # noqa: E731
        if len(payload) <= topics.CHUNK_SIZE:  # as MqttLink: small results in one message
            message.data = payload
            self._call("upload", message.SerializeToString(), uploaded, timeout=120.0)
            return
        correlation = self._call("upload", message.SerializeToString(), uploaded, timeout=120.0)
        for offset in range(0, len(payload), CHUNK):  # the node's chunks (1 MiB)
            chunk = convert.chunk_bytes(payload[offset : offset + CHUNK], offset)
            self._publish("chunk", chunk, correlation, 600)

    def _uploaded(self, task_id: str, message: Message) -> None:
        if _ok(self.name, "upload", message):
            reply = pb.UploadReply.FromString(bytes(message.payload))
            if not reply.accepted:
                _complain(self.name, f"upload of {task_id} refused: {reply.message}")


def _ok(name: str, call: str, message: Message) -> bool:
    code = user_properties(message).get("code", "")
    if code:
        _complain(name, f"{call}: {code} {user_properties(message).get('message', '')}")
    return not code


_complaints = itertools.count()


def _complain(name: str, what: str) -> None:
    if next(_complaints) < 20:  # the first few say what went wrong
        print(f"{name}: {what}", file=sys.stderr, flush=True)


def loadgen(broker: str, certs: Path, cids: list[int]) -> None:
    hub, address = Hub(), BrokerAddress.parse(broker)
    for cid in cids:
        SimNode(hub, address, certs, cid).start()
    hub.run()


if __name__ == "__main__":
    main(__doc__ or "", name="mqtt_scale", transport="mqtt", generator=loadgen)
