"""The MQTT transport as an attacker meets it: a real mosquitto with the config `fedge
broker config` writes, a real server, and hand-driven paho clients with project (and
foreign) certificates."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import ssl
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import cli, finished, write_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes

from fedge.compression import PLAIN
from fedge.launch import Launcher, wait_for
from fedge.messages import PROTOCOL, Capabilities, Code, TaskHeader, UploadHeader
from fedge.node.link import LinkError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.security import init_ca, issue
from fedge.transport.mqtt import topics
from fedge.transport.mqtt.client import properties
from fedge.transport.mqtt.link import MqttLink
from fedge.weights import from_bytes, to_bytes

pytestmark = pytest.mark.integration


class Raw:
    """A paho client as `name` that records what it receives and what the broker said."""

    def __init__(self, fleet: Launcher, name: str, certs: Path | None = None) -> None:
        certs = certs or fleet.issue(name)
        self.received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        context = ssl.create_default_context(cafile=fleet.certs / "ca.crt")
        context.load_cert_chain(certs / f"{name}.crt", certs / f"{name}.key")
        client.tls_set_context(context)
        client.on_message = lambda _c, _u, m: self.received.put(m)
        client.on_subscribe = lambda _c, _u, _m, codes, _p: self.subacks.put(
            [int(c.value) for c in codes]
        )
        client.on_publish = lambda _c, _u, mid, code, _p: self.pubacks.__setitem__(
            mid, int(code.value)
        )
        port = int(fleet.broker_url().rsplit(":", 1)[1])
        client.connect("127.0.0.1", port)
        client.loop_start()
        wait_for(client.is_connected, f"{name} to connect", 10)
        self.client = client

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)[0]

    def publish(self, topic: str, payload: bytes, call: str, correlation: bytes = b"c1") -> int:
        props = properties(PacketTypes.PUBLISH, correlation=correlation, user=[("call", call)])
        info = self.client.publish(topic, payload, qos=1, properties=props)
        wait_for(lambda: info.mid in self.pubacks, "the broker's PUBACK", 10)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fleet(tmp_path: Path, **config: object) -> Launcher:
    return Launcher(tmp_path, write_config(tmp_path / "app", **config), transport="mqtt")  # type: ignore[arg-type]


def test_the_acl_keeps_each_node_to_its_own_topics(tmp_path: Path) -> None:
    with _fleet(tmp_path, num_clients=2, rounds=2) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "2", "--out", out)
        wait_for(fleet.status, "the server")
        spy = Raw(fleet, "spy")
        try:
            # the broker may grant the subscriptions, but delivers none of another node's
            # messages (the ACL is applied to every message it would deliver)
            for topic in (topics.node_in("fedge", "node-0"), "fedge/nodes/+/in", "fedge/#"):
                spy.subscribe(topic)
            # nor can a node speak in another's name: the broker refuses the publish
            join = pb.JoinRequest(cid=0, protocol=PROTOCOL).SerializeToString()
            assert spy.publish(topics.node_out("fedge", "node-0"), join, "join") == 0x87
            # nor announce models or the server
            assert spy.publish(topics.model("fedge"), b"{}", "join") == 0x87
            assert spy.publish(topics.chunk("fedge", "v", 0), b"x", "join") == 0x87
            for cid in range(2):
                fleet.node(cid)
            finished(server, fleet)
            time.sleep(0.5)
        finally:
            spy.close()
        seen = []
        while not spy.received.empty():
            seen.append(spy.received.get().topic)
        assert topics.server("fedge") in seen  # what it may read, it reads
        assert topics.model("fedge") in seen
        assert not [t for t in seen if "/nodes/" in t], seen  # tasks for node-0 and node-1
        rounds = json.loads(out.read_text())["rounds"]
        assert [r["participants"] for r in rounds] == [[0, 1], [0, 1]]  # no forged join
        assert "spy" not in fleet.log("server")  # nothing it sent reached the server


def test_no_certificate_or_a_foreign_ca_is_refused(tmp_path: Path) -> None:
    with _fleet(tmp_path) as fleet:
        port = int(fleet.broker_url().rsplit(":", 1)[1])
        fleet.issue()
        # no client certificate: the TLS handshake fails
        bare = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
        bare.tls_set_context(ssl.create_default_context(cafile=fleet.certs / "ca.crt"))
        with pytest.raises((ssl.SSLError, OSError)):
            bare.connect("127.0.0.1", port)
            bare.loop_start()
            wait_for(lambda: False, "never", 2)
        bare.loop_stop()
        # a certificate from another CA: refused the same way
        other = tmp_path / "other"
        init_ca(other)
        issue(other, "node-0")
        link = MqttLink(fleet.broker_url(), "node-0", _mixed(tmp_path, fleet, other))
        with pytest.raises(LinkError) as info:
            link.join(0, Capabilities(), PROTOCOL)
        assert info.value.code == Code.UNAVAILABLE
        assert "certificate" in info.value.message, info.value.message


def _mixed(tmp_path: Path, fleet: Launcher, other: Path) -> Path:
    """The fleet's CA to check the broker, with a node certificate of `other`'s CA."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca.crt").write_bytes((fleet.certs / "ca.crt").read_bytes())
    for suffix in (".crt", ".key"):
        (mixed / f"node-0{suffix}").write_bytes((other / f"node-0{suffix}").read_bytes())
    return mixed


def test_bad_messages_are_refused_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    with _fleet(tmp_path, num_clients=3, rounds=2) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "2", "--out", out)
        wait_for(fleet.status, "the server")
        rogue = Raw(fleet, "rogue")
        admin = Raw(fleet, "admin", fleet.certs)
        try:
            assert rogue.subscribe(topics.node_in("fedge", "rogue")) == 1
            mine = topics.node_out("fedge", "rogue")
            rogue.publish(mine, b"\xff\xfe not protobuf", "join", b"a")
            reply = rogue.received.get(timeout=10)
            assert dict(reply.properties.UserProperty)["code"] == "INVALID_ARGUMENT"
            assert "malformed join" in dict(reply.properties.UserProperty)["message"]
            rogue.publish(mine, b"x" * (100 << 10), "heartbeat", b"b")  # over 64 KiB
            reply = rogue.received.get(timeout=10)
            assert "at most 65536" in dict(reply.properties.UserProperty)["message"]
            rogue.publish(mine, b"", "format-disk", b"c")  # not a call: dropped, counted
            # a QoS 1 duplicate (same correlation) is answered once
            join = pb.JoinRequest(cid=2, protocol=PROTOCOL).SerializeToString()
            rogue.publish(mine, join, "join", b"d")
            rogue.publish(mine, join, "join", b"d")
            first = rogue.received.get(timeout=10)
            assert pb.JoinReply.FromString(first.payload).node_id == "rogue"
            with pytest.raises(queue.Empty):
                rogue.received.get(timeout=1.5)
            # the certificate a node sends with its join (for when to renew) is checked
            foreign = tmp_path / "foreign"
            init_ca(foreign)
            issue(foreign, "rogue")
            cases = [
                (b"junk", "expected PEM X.509 certificates"),
                ((fleet.issue("node-0") / "node-0.crt").read_bytes(), "expected name 'rogue'"),
                ((foreign / "rogue.crt").read_bytes(), "was not issued by the CA"),
                (b"x" * (17 << 10), "at most 16384"),
            ]
            for i, (pem, fragment) in enumerate(cases):
                bad = pb.JoinRequest(cid=2, protocol=PROTOCOL, certificate_pem=pem)
                rogue.publish(mine, bad.SerializeToString(), "join", b"p%d" % i)
                refused = dict(rogue.received.get(timeout=10).properties.UserProperty)
                assert refused["code"] == "INVALID_ARGUMENT", refused
                assert fragment in refused["message"], refused
            # an admin certificate cannot join as a node
            assert admin.subscribe(topics.node_in("fedge", "admin")) == 1
            admin.publish(topics.node_out("fedge", "admin"), join, "join", b"e")
            refused = dict(admin.received.get(timeout=10).properties.UserProperty)
            assert refused["code"] == "PERMISSION_DENIED", refused
            # a packet over the broker's limit closes the sender's connection, nothing else
            rogue.client.publish(mine, b"x" * (topics.MAX_PACKET + 1), qos=1)
            wait_for(lambda: not rogue.client.is_connected(), "the broker to drop rogue", 10)
        finally:
            rogue.close()
            admin.close()
        for cid in range(2):
            fleet.node(cid)
        finished(server, fleet)
        log = fleet.log("server", 20000)
    assert log.count("MQTT: refused a message") >= 4, log
    assert [r["status"] for r in json.loads(out.read_text())["rounds"]] == ["ok", "ok"]


def test_an_upload_and_its_chunks_sent_back_to_back_are_taken_whole(tmp_path: Path) -> None:
    """A node publishes an upload's header and its chunks at once, so the server may
    dispatch the first chunk in the loop pass of the header: it must find the upload
    (it was registered a pass later, in its task, and such uploads came back
    incomplete, to be resumed; at 1,000 nodes most were)."""
    rounds = 6
    with _fleet(tmp_path, num_clients=1, rounds=rounds, fraction_evaluate=0.0) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "1", "--out", out)
        wait_for(fleet.status, "the server")
        link = MqttLink(fleet.broker_url(), "node-0", fleet.issue("node-0"), chunk_size=1024)
        try:
            joined = link.join(0, Capabilities(), PROTOCOL)
            stream = link.tasks(joined)
            for _ in range(rounds):
                task = next(t for t in stream if isinstance(t, TaskHeader))
                assert task.model is not None
                model = b"".join(link.download(joined.token, task.model.version, 0))
                weights = from_bytes(model)
                payload = to_bytes({k: v + np.float32(0.01) for k, v in weights.items()})
                header = UploadHeader(
                    task.task_id,
                    joined.token,
                    num_examples=10,
                    encoding=PLAIN,
                    size=len(payload),
                    sha256=hashlib.sha256(payload).digest(),
                )
                parts = [(o, payload[o : o + 4096]) for o in range(0, len(payload), 4096)]
                ack = link.upload(header, parts)
                assert ack.accepted, ack.message  # the first time: nothing was resumed
            finished(server, fleet)
        finally:
            link.close()
    assert [r["status"] for r in json.loads(out.read_text())["rounds"]] == ["ok"] * rounds


def test_a_run_survives_broker_and_server_restarts(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app", num_clients=3, rounds=6, fit_delay=0.3)
    with Launcher(tmp_path, config, transport="mqtt") as fleet:
        out = tmp_path / "out.json"
        options = ("--wait-for", "3", "--out", out)
        server = fleet.server(*options, name="server-1")
        for cid in range(3):
            fleet.node(cid)
        wait_for(lambda: (s := fleet.status()) is not None and s.round >= 2, "round 2")
        fleet.broker.restart()  # sessions and queued messages are persisted
        wait_for(lambda: (s := fleet.status()) is not None and s.round >= 4, "round 4", 90)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = fleet.server(*options, name="server-2")
        finished(server, fleet, "server-2")
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds if r["status"] == "ok"] == [1, 2, 3, 4, 5, 6]


def test_an_unreachable_broker_is_a_precise_error(tmp_path: Path) -> None:
    with _fleet(tmp_path) as fleet:
        fleet.issue("node-0")
        link = MqttLink("mqtts://127.0.0.1:9", "node-0", fleet.certs)
        with pytest.raises(LinkError) as info:
            link.join(0, Capabilities(), PROTOCOL)
        assert info.value.code == Code.UNAVAILABLE
        assert "cannot reach the broker 127.0.0.1:9" in info.value.message
        run = cli(
            fleet, "server", "--config", fleet.config, "--certs", fleet.certs,
            "--state-dir", tmp_path / "state", "--address", "127.0.0.1:0",
            "--transport", "mqtt", "--broker", "mqtts://127.0.0.1:9",
        )  # fmt: skip
        assert run.returncode == 1
        assert "cannot reach the broker 127.0.0.1:9" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        run = cli(fleet, "server", "--config", fleet.config, "--transport", "mqtt")
        assert run.returncode == 1 and "--transport mqtt needs --broker" in run.stderr


def test_broker_config_writes_a_config_mosquitto_accepts(tmp_path: Path) -> None:
    with _fleet(tmp_path) as fleet:
        fleet.broker_url()  # made the broker certificate, and proves the config runs
        run = cli(fleet, "broker", "config", "--certs", fleet.certs, "--out", tmp_path / "b")
        assert run.returncode == 0, run.stderr
        conf = (tmp_path / "b" / "mosquitto.conf").read_text()
        for line in ("require_certificate true", "use_identity_as_username true",
                     "use_username_as_clientid true", "allow_anonymous false"):  # fmt: skip
            assert line in conf
        acl = (tmp_path / "b" / "acl").read_text()
        assert "pattern write fedge/nodes/%u/out" in acl
        assert "pattern read fedge/nodes/%u/in" in acl
        missing = cli(fleet, "broker", "config", "--certs", tmp_path, "--out", tmp_path / "c")
        assert missing.returncode == 1 and "the broker needs the project CA" in missing.stderr
