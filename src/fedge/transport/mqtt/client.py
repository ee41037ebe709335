"""A paho-mqtt 2 client as both sides use it: MQTT 5, mutual TLS with the project CA, a
persistent session, and the broker address parsed from ``mqtts://HOST:PORT``."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.errors import FedgeError
from fedge.messages import Code
from fedge.node.link import LinkError

SESSION_EXPIRY = 86_400
"""Seconds the broker keeps an offline client's session and the messages queued for it."""
SESSION_TAKEN_OVER = 142
"""MQTT 5 reason code: another connection with this client id replaced this one."""

Message = mqtt.MQTTMessage


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url if "://" in url else f"mqtts://{url}")
        if parts.scheme != "mqtts":
            raise FedgeError(
                f"--broker must be mqtts://HOST:PORT (TLS with client certificates), got {url!r}"
            )
        try:
            port = parts.port or 8883
        except ValueError:
            raise FedgeError(f"--broker {url!r}: the port is not a number") from None
        if not parts.hostname:
            raise FedgeError(f"--broker {url!r} names no host")
        return cls(parts.hostname, port)


def properties(
    packet: int,
    *,
    correlation: bytes = b"",
    user: Sequence[tuple[str, str]] = (),
    expiry: int = 0,
) -> Properties:
    props = Properties(packet)  # type: ignore[no-untyped-call]
    if correlation:
        props.CorrelationData = correlation
    if user:
        props.UserProperty = list(user)
    if expiry:
        props.MessageExpiryInterval = expiry
    return props


def user_properties(message: Message) -> dict[str, str]:
    props = getattr(message, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs[:8]}  # a node sends at most a few


def correlation_of(message: Message, most: int) -> bytes:
    props = getattr(message, "properties", None)
    data = getattr(props, "CorrelationData", None) or b""
    return bytes(data[:most])


class Connection:
    """One connection to the broker. `connect` blocks until the broker accepted it (or
    raises `LinkError` saying why); callbacks run on paho's network thread."""

    def __init__(
        self,
        address: BrokerAddress,
        certs: Path,
        name: str,
        *,
        on_message: Callable[[Message], None],
        on_connect: Callable[[mqtt.Client], None] = lambda client: None,
        on_disconnect: Callable[[int], None] = lambda code: None,
        receive_maximum: int = 64,
        manual_ack: bool = False,
        reconnect: bool = False,
    ) -> None:
        self.address, self.name = address, name
        self.where = f"broker {address.host}:{address.port}"
        self._connected = threading.Event()
        self._refused = ""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=reconnect,
            manual_ack=manual_ack,
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs / "ca.crt")
        context.load_cert_chain(certs / f"{name}.crt", certs / f"{name}.key")
        client.tls_set_context(context)
        client.max_inflight_messages_set(64)
        client.reconnect_delay_set(1, 5)
        self._on_connect, self._on_disconnect = on_connect, on_disconnect
        client.on_connect = self._connect_cb
        client.on_disconnect = self._disconnect_cb
        client.on_message = lambda _c, _u, message: on_message(message)
        self._receive_maximum = receive_maximum
        self.client = client

    def _connect_cb(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._connected.set()
            return
        self._refused = ""
        sock = self.client.socket()
        if isinstance(
            sock, socket.socket
        ):  # paho leaves Nagle on: small calls waited ~40 ms for delayed acks
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_connect(self.client)
        self._connected.set()

    def _disconnect_cb(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        self._on_disconnect(int(getattr(reason, "value", 0) or 0))

    def dial(self) -> None:
        """Open the TLS connection and send CONNECT; the answer comes to whoever runs
        paho's loop (`connect` starts its thread; a load generator runs many clients on
        one loop of its own)."""
        props = properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        props.ReceiveMaximum = self._receive_maximum
        try:
            self.client.connect(
                self.address.host, self.address.port, 30, clean_start=False, properties=props
            )
        except ssl.SSLError as exc:
            raise LinkError(Code.UNAVAILABLE, f"{self.where} refused TLS: {exc}") from None
        except OSError as exc:
            raise LinkError(Code.UNAVAILABLE, f"cannot reach the {self.where}: {exc}") from None

    def connect(self, timeout: float = 10.0) -> None:
        self.dial()
        where = self.where
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise LinkError(
                Code.UNAVAILABLE,
                f"no answer from the {where} in {timeout:.0f} s (a broker that refuses the "
                f"certificate {self.name!r} closes the connection like this: is it from the "
                "project CA, and not revoked?)",
            )
        if self._refused:
            refused = self._refused
            self.close()
            raise LinkError(
                Code.UNAVAILABLE, f"{where} refused the connection as {self.name!r}: {refused}"
            )

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._refused

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
