"""Enrollment without sockets: tokens (hashed, single use, bound, expiring, revocable) and
the CSR policy (nothing beyond what a node certificate grants)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.fleet.enrollment import Enrollment
from fedge.messages import Code, FleetError
from fedge.security import init_ca
from fedge.security.pki import PKIError, read_request, role_of
from fedge.state import StateStore


@pytest.fixture
def enrollment(tmp_path: Path) -> Enrollment:
    init_ca(tmp_path / "pki")
    return Enrollment(StateStore(tmp_path / "state.db"), tmp_path / "pki", node_days=7)


def csr(
    name: str = "dev-1",
    key: object = None,
    subject: x509.Name | None = None,
    *ext: x509.ExtensionType,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    for extension in ext:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def enroll(enrollment: Enrollment, token: str, request: bytes) -> x509.Certificate:
    enrolled = asyncio.run(enrollment.enroll(token, request))
    return x509.load_pem_x509_certificates(enrolled.chain_pem)[0]


def test_a_token_is_stored_as_a_hash_and_works_once(enrollment: Enrollment, tmp_path: Path) -> None:
    (token,) = enrollment.create_tokens(name="dev-1", prefix="", count=1, ttl=60, labels={})
    secret = token.split(".")[1]
    assert secret.encode() not in (tmp_path / "state.db").read_bytes()

    cert = enroll(enrollment, token, csr("dev-1"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert role_of(cert) == "node"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    with pytest.raises(FleetError, match="the enrollment token is used") as err:
        enroll(enrollment, token, csr("dev-1"))
    assert err.value.code == Code.PERMISSION_DENIED


def test_one_token_used_by_two_devices_at_once_issues_one_certificate(
    enrollment: Enrollment,
) -> None:
    tokens = enrollment.create_tokens(name="", prefix="dev-", count=1, ttl=60, labels={})
    requests = [csr(f"dev-{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda r: _outcome(enrollment._enroll, tokens[0], r), requests))
    assert outcomes.count("issued") == 1, outcomes


def _outcome(call: object, token: str, request: bytes) -> str:
    try:
        call(token, request)  # type: ignore[operator]
    except FleetError as exc:
        return exc.code.value
    return "issued"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "a", "prefix": "b"}, "either a name or a prefix"),
        ({"name": "", "prefix": ""}, "either a name or a prefix"),
        ({"name": "a", "count": 2}, "is one token, got 2"),
        ({"prefix": "p-", "count": 0}, "count must be in 1..10000"),
        ({"name": "a", "ttl": 0}, "ttl must be in"),
        ({"name": "../x"}, "may only contain"),
        ({"name": "a", "labels": {"k": "v" * 300}}, "values up to 256"),
        ({"name": "a", "labels": {str(i): "" for i in range(40)}}, "40 labels; at most 32"),
    ],
)
def test_bad_token_requests_say_what_is_wrong(
    enrollment: Enrollment, options: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"name": "", "prefix": "", "count": 1, "ttl": 60.0, "labels": {}}
    with pytest.raises(FleetError, match=message) as err:
        enrollment.create_tokens(**{**args, **options})  # type: ignore[arg-type]
    assert err.value.code == Code.INVALID_ARGUMENT


def test_only_unused_tokens_can_be_revoked(enrollment: Enrollment) -> None:
    (token,) = enrollment.create_tokens(name="dev-1", prefix="", count=1, ttl=60, labels={})
    token_id = token.split(".")[0]
    enrollment.revoke_token(token_id)
    with pytest.raises(FleetError, match="is revoked; nothing to revoke"):
        enrollment.revoke_token(token_id)
    with pytest.raises(FleetError, match="no token 'nope'") as err:
        enrollment.revoke_token("nope")
    assert err.value.code == Code.NOT_FOUND
    assert [t["state"] for t in enrollment.tokens()] == ["revoked"]


@pytest.mark.parametrize(
    ("request_pem", "message"),
    [
        (lambda: csr("dev-1", rsa.generate_private_key(65537, 1024)), "1024 bits; at least 2048"),
        (
            lambda: csr("dev-1", ec.generate_private_key(ec.SECP256K1())),
            "on secp256k1; expected P-256 or P-384",
        ),
        (
            lambda: csr(
                "dev-1",
                None,
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                    ]
                ),
            ),
            "subject must be exactly one CN",
        ),
        (
            lambda: csr(
                "dev-1", None, None, x509.SubjectAlternativeName([x509.DNSName("bank.com")])
            ),
            "asks for other names ['bank.com']",
        ),
        (
            lambda: csr(
                "dev-1",
                None,
                None,
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]
                ),
            ),
            "extra usages ['codeSigning']",
        ),
        (lambda: b"x" * 20_000, "the CSR is 20000 bytes"),
        (lambda: csr("bad/name"), "may only contain"),
    ],
)
def test_a_request_asking_for_more_than_a_node_gets_is_refused(
    request_pem: object, message: str
) -> None:
    with pytest.raises(PKIError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_request(request_pem())  # type: ignore[operator]


def test_enrollment_needs_the_issuing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "pki")
    (tmp_path / "pki" / "issuing.key").unlink()
    with pytest.raises(PKIError, match=r"missing .*issuing\.key"):
        Enrollment(StateStore(tmp_path / "state.db"), tmp_path / "pki")
