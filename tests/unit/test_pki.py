"""The project CA issues certificates that real gRPC mutual TLS accepts — and only those."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedge.errors import FedgeError
from fedge.security import (
    Credentials,
    PKIError,
    init_ca,
    issue,
    load_credentials,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _common_name(cert: x509.Certificate) -> str:
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn.value)


def _assert_issued_by_the_ca(cert: x509.Certificate, pki: Path) -> None:
    """Signed by the issuing CA, which the root signed."""
    issuing = _cert(pki / "issuing.crt")
    cert.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(_cert(pki / "ca.crt"))
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    """A CA with one server ("aggregator") and one node ("node-1")."""
    init_ca(tmp_path)
    issue(tmp_path, "aggregator", role="server")
    issue(tmp_path, "node-1")
    return tmp_path


# -- the CA -----------------------------------------------------------------------------


def test_init_ca_writes_a_self_signed_ca_with_a_private_key(tmp_path: Path) -> None:
    crt_path = init_ca(tmp_path / "pki", name="Acme fleet CA")

    assert crt_path == tmp_path / "pki" / "ca.crt"
    assert _mode(tmp_path / "pki" / "ca.key") == 0o600
    ca = _cert(crt_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Acme fleet CA"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())


def test_init_ca_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    original = (tmp_path / "ca.crt").read_bytes()

    with pytest.raises(PKIError, match=r"already exists.*force=True") as err:
        init_ca(tmp_path)
    assert isinstance(err.value, FedgeError)
    assert (tmp_path / "ca.crt").read_bytes() == original

    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.crt").read_bytes() != original


# -- leaf certificates ------------------------------------------------------------------


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(pki: Path) -> None:
    crt, key = issue(pki, "edge-gw", role="server", hosts=["gw.fleet.local", "10.0.0.5", "::1"])

    assert (crt, key) == (pki / "edge-gw.crt", pki / "edge-gw.key")
    assert _mode(key) == 0o600
    cert = _cert(crt)
    _assert_issued_by_the_ca(cert, pki)
    assert _common_name(cert) == "edge-gw"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.fleet.local"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_defaults_to_localhost_hosts(pki: Path) -> None:
    san = _cert(pki / "aggregator.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_node_certificate_is_client_only_and_named_after_the_node(pki: Path) -> None:
    cert = _cert(pki / "node-1.crt")

    assert _mode(pki / "node-1.key") == 0o600
    _assert_issued_by_the_ca(cert, pki)
    assert _common_name(cert) == "node-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-1"]


def test_certificate_from_another_ca_does_not_verify(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    issue(other, "node-1")

    with pytest.raises(InvalidSignature):  # same issuer name, different key
        _cert(other / "node-1.crt").verify_directly_issued_by(_cert(pki / "issuing.crt"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "non-empty"),
        ("node 1", r"only contain letters.*found ' '"),
        ("../escape", r"found '/'"),
        ("nöde", r"found 'ö'"),
        ("n" * 65, "at most 64 characters, got 65"),
        ("..", "not allowed"),
        ("ca", "reserved for the CA"),
    ],
)
def test_bad_names_are_rejected_with_a_precise_message(pki: Path, name: str, message: str) -> None:
    with pytest.raises(PKIError, match=message):
        issue(pki, name)


def test_bad_hosts_are_rejected(pki: Path) -> None:
    with pytest.raises(PKIError, match="neither an IP address nor a DNS name"):
        issue(pki, "srv", role="server", hosts=["bad host"])
    with pytest.raises(PKIError, match="must be a list"):
        issue(pki, "srv", role="server", hosts="localhost")


def test_issue_refuses_to_overwrite_existing_credentials(pki: Path) -> None:
    before = (pki / "node-1.key").read_bytes()

    with pytest.raises(PKIError, match=r"already exist.*force=True"):
        issue(pki, "node-1")
    assert (pki / "node-1.key").read_bytes() == before

    issue(pki, "node-1", force=True)
    assert (pki / "node-1.key").read_bytes() != before


def test_issue_without_a_ca_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=r"no CA in .*ca\.crt.*fedge ca init") as err:
        issue(tmp_path, "node-1")
    assert str(tmp_path / "ca.key") in str(err.value)
    assert not (tmp_path / "node-1.key").exists()


# -- loading ----------------------------------------------------------------------------


def test_load_credentials_returns_the_pem_files(pki: Path) -> None:
    creds = load_credentials(pki, "node-1")

    assert creds == Credentials(
        ca_pem=(pki / "ca.crt").read_bytes(),
        cert_pem=(pki / "node-1.crt").read_bytes(),
        key_pem=(pki / "node-1.key").read_bytes(),
    )


def test_load_credentials_names_the_missing_file(pki: Path) -> None:
    (pki / "node-1.key").unlink()
    with pytest.raises(PKIError, match=r"private key not found: .*node-1\.key"):
        load_credentials(pki, "node-1")
    with pytest.raises(PKIError, match=r"certificate not found: .*node-2\.crt"):
        load_credentials(pki, "node-2")


def test_load_credentials_rejects_a_mismatched_key(pki: Path) -> None:
    (pki / "node-1.key").write_bytes((pki / "aggregator.key").read_bytes())
    with pytest.raises(PKIError, match="does not belong to"):
        load_credentials(pki, "node-1")


def test_load_credentials_rejects_a_certificate_from_another_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    issue(other, "node-9")
    (other / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())  # a node given the wrong CA
    with pytest.raises(PKIError, match="was not issued by the CA"):
        load_credentials(other, "node-9")


# -- real gRPC mutual TLS ---------------------------------------------------------------


@contextmanager
def _health_server(creds: Credentials) -> Iterator[int]:
    """A gRPC health server on 127.0.0.1 that requires a client certificate from the CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server_creds = grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()


@pytest.fixture()
def mtls_server(pki: Path) -> Iterator[int]:
    with _health_server(load_credentials(pki, "aggregator")) as port:
        yield port


def _check(port: int, channel_creds: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(reply.status)


def test_node_with_a_ca_certificate_is_served(pki: Path, mtls_server: int) -> None:
    node = load_credentials(pki, "node-1")
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=node.ca_pem, private_key=node.key_pem, certificate_chain=node.cert_pem
    )

    assert _check(mtls_server, channel_creds) == health_pb2.HealthCheckResponse.SERVING


def test_client_without_a_certificate_is_refused(pki: Path, mtls_server: int) -> None:
    channel_creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())

    with pytest.raises(grpc.RpcError) as err:
        _check(mtls_server, channel_creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


def test_client_with_a_certificate_from_another_ca_is_refused(
    pki: Path, mtls_server: int, tmp_path: Path
) -> None:
    other = tmp_path / "rogue"
    init_ca(other, name="rogue CA")
    issue(other, "node-1")  # same name, wrong issuer
    rogue = load_credentials(other, "node-1")
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),  # it does trust the real server
        private_key=rogue.key_pem,
        certificate_chain=rogue.cert_pem,
    )

    with pytest.raises(grpc.RpcError) as err:
        _check(mtls_server, channel_creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


def test_node_certificate_cannot_impersonate_the_server(pki: Path) -> None:
    issue(pki, "stolen-node", hosts=["127.0.0.1"])  # right CA and SAN, but clientAuth only
    node = load_credentials(pki, "node-1")
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=node.ca_pem, private_key=node.key_pem, certificate_chain=node.cert_pem
    )

    with (
        _health_server(load_credentials(pki, "stolen-node")) as port,
        pytest.raises(grpc.RpcError) as err,
    ):
        _check(port, channel_creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
