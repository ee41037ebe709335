"""Devices enroll from one-time tokens against a real server: the operator makes tokens
with the CLI, a device makes its key, pins the root CA, trades a CSR and the token for a
certificate, and trains with it. Every refusal issues nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from conftest import cli, finished
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.launch import Launcher, free_port, wait_for
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import ca_pin
from fedge.security.credentials import PKIError
from fedge.transport.grpc.enroll_client import enroll


@pytest.fixture
def enrolling(fleet: Launcher) -> tuple[Launcher, str]:
    """The fleet's server with an enrollment listener; returns (fleet, its address)."""
    address = f"127.0.0.1:{free_port()}"
    fleet.server("--wait-for", "4", "--out", fleet.work / "out.json", "--enroll-address", address)
    wait_for(fleet.status, "the server's Control service")
    return fleet, address


def tokens(fleet: Launcher, *args: str) -> list[str]:
    done = cli(fleet, "tokens", "create", "--server", fleet.address, "--certs", fleet.certs, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def token_states(fleet: Launcher) -> dict[str, tuple[str, str]]:
    """token id -> (state, used by), from `fedge tokens list`."""
    with grpc.secure_channel(fleet.address, _admin(fleet)) as channel:
        found = pb_grpc.ControlStub(channel).ListTokens(pb.ListTokensRequest(), timeout=10)
    return {t.token_id: (t.state, t.used_by) for t in found.tokens}


def _admin(fleet: Launcher) -> grpc.ChannelCredentials:
    from fedge.transport.grpc.tls import channel_credentials

    return channel_credentials(fleet.certs, "admin")


def test_devices_enroll_from_tokens_and_train(enrolling: tuple[Launcher, str]) -> None:
    fleet, address = enrolling
    pin = ca_pin(fleet.certs)
    (by_name,) = tokens(fleet, "--name", "cam-0", "--labels", "site=plant3")
    by_prefix = tokens(fleet, "--prefix", "sensor-", "--count", "3", "--ttl", "1h")
    assert len(by_prefix) == 3 and len(set(by_prefix)) == 3
    devices = {"cam-0": by_name, "sensor-17": by_prefix[0]}
    for name, token in devices.items():
        device = fleet.work / "devices" / name
        done = cli(
            fleet, "node", "enroll", "--server", address, "--token", token, "--ca-pin", pin,
            "--name", name, "--certs", device,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (device / f"{name}.key").stat().st_mode & 0o777 == 0o600
        chain = x509.load_pem_x509_certificates((device / f"{name}.crt").read_bytes())
        assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
        assert 29 <= lifetime.days <= 30  # short-lived by default
        assert (device / "ca.crt").read_bytes() == (fleet.certs / "ca.crt").read_bytes()

    states = token_states(fleet)
    assert states[by_name.split(".")[0]] == ("used", "cam-0")
    assert states[by_prefix[0].split(".")[0]] == ("used", "sensor-17")
    assert states[by_prefix[1].split(".")[0]] == ("unused", "")

    # two enrolled devices and two nodes with certificates made by hand train together
    for cid, name in enumerate(devices):
        fleet.start(
            name, "node", "--server", fleet.address, "--config", fleet.config, "--cid", cid,
            "--certs", fleet.work / "devices" / name, "--name", name,
        )  # fmt: skip
    fleet.node(2)
    fleet.node(3)
    finished(fleet.procs["server"], fleet)
    rounds = json.loads((fleet.work / "out.json").read_text())["rounds"]
    assert all(r["participants"] == [0, 1, 2, 3] for r in rounds)


def _refused(address: str, root: bytes, token: str, csr_pem: bytes) -> grpc.RpcError:
    """Send an Enroll as a device would, over TLS verified against the root."""
    credentials = grpc.ssl_channel_credentials(root)
    with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.EnrollmentStub(channel).Enroll(
            pb.EnrollRequest(token=token, csr_pem=csr_pem), timeout=10
        )
    return err.value


def _csr(name: str, *extensions: x509.ExtensionType) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_bad_tokens_and_greedy_requests_are_refused_and_nothing_is_issued(
    enrolling: tuple[Launcher, str],
) -> None:
    fleet, address = enrolling
    root = (fleet.certs / "ca.crt").read_bytes()
    pin = ca_pin(fleet.certs)
    (used,) = tokens(fleet, "--name", "dev-1")
    enroll(address, used, pin, "dev-1", fleet.work / "dev-1")
    (short,) = tokens(fleet, "--name", "dev-2", "--ttl", "1s")
    (revoked,) = tokens(fleet, "--name", "dev-3")
    done = cli(
        fleet, "tokens", "revoke", revoked.split(".")[0], "--server", fleet.address,
        "--certs", fleet.certs,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (fresh,) = tokens(fleet, "--name", "dev-4")
    (prefix,) = tokens(fleet, "--prefix", "dev-")
    time.sleep(1.2)  # `short` expires

    cases = [
        (used, _csr("dev-1"), grpc.StatusCode.PERMISSION_DENIED, "the enrollment token is used"),
        (short, _csr("dev-2"), grpc.StatusCode.PERMISSION_DENIED, "is expired"),
        (revoked, _csr("dev-3"), grpc.StatusCode.PERMISSION_DENIED, "is revoked"),
        ("0123456789.nosuchsecret", _csr("dev-4"), grpc.StatusCode.UNAUTHENTICATED, "unknown"),
        (fresh.split(".")[0] + ".wrong", _csr("dev-4"), grpc.StatusCode.UNAUTHENTICATED, "unknown"),
        (fresh, _csr("dev-5"), grpc.StatusCode.PERMISSION_DENIED, "but the token is for 'dev-4'"),
        (
            fresh,
            _csr("dev-4", x509.BasicConstraints(ca=True, path_length=None)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "asks for CA rights",
        ),
        (
            fresh,
            _csr("dev-4", x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "extra usages ['serverAuth']",
        ),
        (fresh, b"not a CSR", grpc.StatusCode.INVALID_ARGUMENT, "expected a PEM certificate"),
        (prefix, _csr("dev-1"), grpc.StatusCode.ALREADY_EXISTS, "'dev-1' is enrolled already"),
        (prefix, _csr("other-1"), grpc.StatusCode.PERMISSION_DENIED, "starting with 'dev-'"),
    ]
    for token, csr, code, message in cases:
        error = _refused(address, root, token, csr)
        assert error.code() == code, (message, error)
        assert message in str(error.details()), (message, error.details())

    states = token_states(fleet)  # nothing refused used a token up
    assert states[fresh.split(".")[0]] == ("unused", "")
    assert states[prefix.split(".")[0]] == ("unused", "")
    # and the fresh token still works for what it is for
    enroll(address, fresh, pin, "dev-4", fleet.work / "dev-4")


def test_a_device_refuses_a_server_whose_root_is_not_the_pinned_one(
    enrolling: tuple[Launcher, str], tmp_path: Path
) -> None:
    fleet, address = enrolling
    (token,) = tokens(fleet, "--name", "dev-9")
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(PKIError, match=r"none of the 3 certificates .* has the pinned key"):
        enroll(address, token, wrong, "dev-9", tmp_path / "dev-9")
    assert not (tmp_path / "dev-9").exists()  # no key, no certificate
    with pytest.raises(PKIError, match="--ca-pin must look like sha256:<64 hex digits>"):
        enroll(address, token, "abc", "dev-9", tmp_path / "dev-9")
    assert token_states(fleet)[token.split(".")[0]] == ("unused", "")


def test_only_node_certificates_join_and_only_admins_use_control(fleet: Launcher) -> None:
    from fedge.transport.grpc.tls import channel_credentials

    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server's Control service")
    fleet.issue("node-0")
    for name in ("admin", "server"):  # certificates of other roles cannot act as nodes
        credentials = channel_credentials(fleet.certs, name)
        with (
            grpc.secure_channel(fleet.address, credentials) as ch,
            pytest.raises(grpc.RpcError) as err,
        ):
            pb_grpc.FleetStub(ch).Join(pb.JoinRequest(cid=0, protocol=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"holds a '{'admin' if name == 'admin' else 'server'}' certificate" in str(
            err.value.details()
        )
    with grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, "node-0")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ControlStub(ch).Status(pb.StatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs a 'admin' certificate" in str(err.value.details())
        joined = pb_grpc.FleetStub(ch).Join(pb.JoinRequest(cid=0, protocol=2), timeout=10)
        assert joined.node_id == "node-0"


def test_token_commands_need_an_enrolling_server(fleet: Launcher) -> None:
    fleet.server("--wait-for", "4")
    wait_for(fleet.status, "the server's Control service")
    done = cli(
        fleet, "tokens", "create", "--server", fleet.address, "--certs", fleet.certs,
        "--name", "x",
    )  # fmt: skip
    assert done.returncode == 1
    assert "does not enroll devices: start it with --enroll-address" in done.stderr
