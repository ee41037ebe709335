"""Revocation through a real server: a revoked node's calls are cut at once, every later
call with its certificate is refused (after a server restart too), the CRL lists it, and
only a certificate the server issues afterwards brings the name back."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from conftest import cli, wait_exit, write_config
from cryptography import x509

from fedge.launch import Launcher, free_port, wait_for
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import ca_pin
from fedge.transport.grpc.enroll_client import enroll
from fedge.transport.grpc.tls import channel_credentials


def admin(fleet: Launcher, *args: str | Path) -> str:
    done = cli(fleet, *args, "--server", fleet.address, "--certs", fleet.certs)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def join(fleet: Launcher, certs: Path, name: str, cid: int) -> grpc.RpcError | pb.JoinReply:
    with grpc.secure_channel(fleet.address, channel_credentials(certs, name)) as channel:
        try:
            reply: pb.JoinReply = pb_grpc.FleetStub(channel).Join(
                pb.JoinRequest(cid=cid, protocol=2), timeout=10
            )
            return reply
        except grpc.RpcError as exc:
            return exc


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


@pytest.fixture
def slow_fleet(tmp_path: Path) -> Launcher:
    """4 nodes whose fit takes long, so that calls are in progress when a node is revoked."""
    config = write_config(tmp_path / "app", rounds=50, fit_delay=0.5, round_timeout=30)
    return Launcher(tmp_path, config)


def test_a_revoked_node_is_cut_at_once_and_refused_for_good(slow_fleet: Launcher) -> None:
    fleet = slow_fleet
    enroll_address = f"127.0.0.1:{free_port()}"
    with fleet:
        fleet.server("--wait-for", "3", "--enroll-address", enroll_address)
        wait_for(fleet.status, "the server's Control service")
        nodes = {cid: fleet.node(cid) for cid in range(4)}
        wait_for(lambda: len(fleet.status().nodes) == 4, "4 connected nodes")

        out = admin(fleet, "nodes", "revoke", "node-1", "--reason", "stolen")
        assert "node node-1 revoked" in out
        assert wait_exit(nodes[1], 30) == 1  # the node was told, and stops
        assert "revoked" in fleet.log("node-1") and "stolen" in fleet.log("node-1")
        refused = join(fleet, fleet.certs, "node-1", 1)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "of 'node-1' is revoked: stolen" in str(refused.details())
        assert all(nodes[c].poll() is None for c in (0, 2, 3))  # the others train on

        listed = admin(fleet, "nodes", "list")
        row = next(line for line in listed.splitlines() if "node-1" in line)
        assert "revoked" in row

        # one certificate by serial: node-2's; other certificates are not touched
        serial = f"{serial_of(fleet.certs / 'node-2.crt'):x}"
        out = admin(fleet, "nodes", "revoke", "--serial", serial)
        assert f"certificate {serial} node-2 revoked" in out
        assert wait_exit(nodes[2], 30) == 1
        assert isinstance(join(fleet, fleet.certs, "node-2", 2), grpc.RpcError)
        assert not isinstance(join(fleet, fleet.certs, "node-0", 0), grpc.RpcError)

        crl = x509.load_pem_x509_crl((fleet.state_dir / "crl.pem").read_bytes())
        revoked = {r.serial_number for r in crl}
        assert serial_of(fleet.certs / "node-1.crt") in revoked
        assert int(serial, 16) in revoked
        issuing = x509.load_pem_x509_certificate((fleet.certs / "issuing.crt").read_bytes())
        assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]

        # the server restarts: revocations are kept
        server = fleet.procs["server"]
        server.send_signal(signal.SIGTERM)
        wait_exit(server, 30)
        fleet.server("--wait-for", "3", "--enroll-address", enroll_address, name="server2")
        wait_for(fleet.status, "the restarted server")
        assert isinstance(join(fleet, fleet.certs, "node-1", 1), grpc.RpcError)
        assert isinstance(join(fleet, fleet.certs, "node-2", 2), grpc.RpcError)

        # a replacement device enrolled with a token for that exact name is accepted
        (token,) = admin(fleet, "tokens", "create", "--name", "node-1").split()[:1]
        device = fleet.work / "replacement"
        enroll(enroll_address, token, ca_pin(fleet.certs), "node-1", device)
        assert not isinstance(join(fleet, device, "node-1", 1), grpc.RpcError)
        assert isinstance(join(fleet, fleet.certs, "node-1", 1), grpc.RpcError)  # the old one

        shown = admin(fleet, "nodes", "show", "node-1")
        assert "node node-1: active" in shown
        assert f"{serial_of(device / 'node-1.crt'):x}" in shown


def test_revoking_needs_an_admin_and_a_valid_serial(fleet: Launcher) -> None:
    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server's Control service")
    done = cli(
        fleet, "nodes", "revoke", "--serial", "xyz", "--server", fleet.address,
        "--certs", fleet.certs,
    )  # fmt: skip
    assert done.returncode == 1 and "serial must be hexadecimal, got 'xyz'" in done.stderr
    fleet.issue("node-0")
    done = cli(
        fleet, "nodes", "revoke", "node-1", "--server", fleet.address, "--certs", fleet.certs,
        "--name", "node-0",
    )  # fmt: skip
    assert done.returncode == 1 and "needs a 'admin' certificate" in done.stderr
    fleet.issue("node-1")
    assert not isinstance(join(fleet, fleet.certs, "node-1", 1), grpc.RpcError)  # not revoked
