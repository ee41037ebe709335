"""Certificates change without anyone's help and without a restart: a node renews its
own before two thirds of its life, over its link; the server picks up a replaced
certificate of its own at the next handshake (or on SIGHUP)."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import time
from pathlib import Path

from conftest import write_config
from cryptography import x509

from fedge.launch import Launcher, wait_for
from fedge.security import issue
from fedge.security.credentials import read_credentials


def short_lived(certs: Path, name: str, seconds: float) -> int:
    """A node certificate half way through a life of `seconds` (so it is due for
    renewal now or within a sixth of that); its serial."""
    now = dt.datetime.now(dt.UTC)
    half = dt.timedelta(seconds=seconds / 2)
    crt, _ = issue(certs, name, validity=(now - half, now + half), force=True)
    return leaf(crt).serial_number


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_a_node_renews_its_certificate_over_its_link_and_trains_on(
    tmp_path: Path, transport: str
) -> None:
    config = write_config(tmp_path / "app", rounds=400, fit_delay=0.05)
    with Launcher(tmp_path, config, transport=transport) as fleet:
        fleet.issue("node-1")
        fleet.issue()
        old_serial = short_lived(fleet.certs, "node-0", 120)
        old_key = (fleet.certs / "node-0.key").read_bytes()
        fleet.server("--wait-for", "2", "--heartbeat-interval", "0.5")
        wait_for(fleet.status, "the server")
        node = fleet.node(0)
        fleet.node(1)

        renewed = wait_for(
            lambda: leaf(fleet.certs / "node-0.crt").serial_number != old_serial,
            "node-0 to renew its certificate",
            timeout=90,
        )
        assert renewed
        cert = leaf(fleet.certs / "node-0.crt")
        assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
        assert (fleet.certs / "node-0.key").read_bytes() != old_key  # a new key, made there
        assert (fleet.certs / "node-0.key").stat().st_mode & 0o777 == 0o600
        assert not list(fleet.certs.glob("node-0.*.next"))

        # it reconnects with the new certificate and keeps getting work
        done_before = _tasks_done(fleet, "node-0")
        wait_for(lambda: _tasks_done(fleet, "node-0") > done_before + 3, "node-0 to train on")
        assert node.poll() is None
        from fedge.transport.grpc.control_client import Control

        with Control(fleet.address, fleet.certs) as control:
            (shown,) = control.nodes("node-0")
        assert f"{cert.serial_number:x}" in [c.serial for c in shown.certificates]


def _tasks_done(fleet: Launcher, name: str) -> int:
    status = fleet.status()
    return next((n.tasks_done for n in status.nodes if n.node_id == name), 0) if status else 0


def test_a_half_done_replacement_is_finished_on_the_next_read(tmp_path: Path) -> None:
    from fedge.security import init_ca

    init_ca(tmp_path)
    issue(tmp_path, "node-0")
    new_key, new_crt = tmp_path / "node-0.key.next", tmp_path / "node-0.crt.next"
    issue(tmp_path, "spare")
    (tmp_path / "spare.key").rename(new_key)
    (tmp_path / "spare.crt").rename(new_crt)
    new = (new_key.read_bytes(), new_crt.read_bytes())
    new_key.rename(tmp_path / "node-0.key")  # a crash came after the first rename
    creds = read_credentials(tmp_path, "node-0")
    assert (creds.key_pem, creds.cert_pem) == new
    assert not new_crt.exists()


def _server_serial(address: str) -> int:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_server_uses_a_replaced_certificate_without_a_restart(fleet: Launcher) -> None:
    server = fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server")
    first = _server_serial(fleet.address)
    issue(fleet.certs, "server", role="server", hosts=["127.0.0.1", "localhost"], force=True)
    second = leaf(fleet.certs / "server.crt").serial_number
    assert wait_for(lambda: _server_serial(fleet.address) == second, "the new certificate")
    assert first != second
    assert fleet.status() is not None  # clients verify it as before
    assert "server certificate reloaded" in fleet.log("server")

    (fleet.certs / "server.key").write_bytes(b"garbage")  # a bad replacement is not taken
    time.sleep(0.1)
    assert _server_serial(fleet.address) == second
    assert "the new one is not usable" in fleet.log("server")

    server.send_signal(signal.SIGHUP)  # SIGHUP: read again, here still the bad key
    time.sleep(0.2)
    assert _server_serial(fleet.address) == second and server.poll() is None


def test_a_connection_that_outlives_its_certificate_is_refused(fleet: Launcher) -> None:
    import grpc

    from fedge.proto.fedge.v1 import fleet_pb2 as pb
    from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
    from fedge.transport.grpc.tls import channel_credentials

    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server")
    now = dt.datetime.now(dt.UTC)
    issue(
        fleet.certs,
        "node-0",
        validity=(now - dt.timedelta(minutes=1), now + dt.timedelta(seconds=3)),
    )
    with grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, "node-0")) as channel:
        stub = pb_grpc.FleetStub(channel)
        joined = stub.Join(pb.JoinRequest(cid=0, protocol=2), timeout=10)
        time.sleep(4)  # the TLS connection stays up; the certificate expires
        try:
            stub.Heartbeat(pb.HeartbeatRequest(session_token=joined.session_token), timeout=10)
            raise AssertionError("a call with an expired certificate was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "the certificate of 'node-0' has expired" in str(exc.details())


def test_a_node_can_renew_only_its_own_name_and_only_in_its_session(fleet: Launcher) -> None:
    import grpc
    import pytest

    from fedge.proto.fedge.v1 import fleet_pb2 as pb
    from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
    from fedge.security.enroll import make_request
    from fedge.transport.grpc.tls import channel_credentials

    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server")
    fleet.issue("node-0")
    with grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, "node-0")) as channel:
        stub = pb_grpc.FleetStub(channel)
        joined = stub.Join(pb.JoinRequest(cid=0, protocol=2), timeout=10)
        assert joined.renew_after_unix_ms > time.time() * 1000  # told when to renew
        cases = [
            (joined.session_token, make_request("node-1")[1], "may renew only its own name"),
            ("stale", make_request("node-0")[1], "has no current session with this token"),
            (joined.session_token, b"junk", "expected a PEM certificate signing request"),
        ]
        for token, csr, message in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Renew(pb.RenewRequest(session_token=token, csr_pem=csr), timeout=10)
            assert message in str(refused.value.details())
        renewed = stub.Renew(
            pb.RenewRequest(session_token=joined.session_token, csr_pem=make_request("node-0")[1]),
            timeout=10,
        )
        assert leaf_of(renewed.chain_pem).subject.rfc4514_string() == "OU=node,CN=node-0"


def leaf_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]
