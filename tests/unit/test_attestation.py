"""TPM structures from a device are parsed with bounds: anything malformed is an
`AttestationError` naming the part, never a crash; a PCR allow-list file is checked."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedge.errors import FedgeError
from fedge.security.attestation import (
    AttestationError,
    EkIssuers,
    PcrPolicy,
    check_attestation_key,
    check_quote,
    read_public,
)


def ecc_public(attributes: int = 0x00050072, curve: int = 0x0003) -> bytes:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    area = b"".join(
        n.to_bytes(w, "big")
        for n, w in [(0x0023, 2), (0x000B, 2), (attributes, 4), (0, 2), (0x0010, 2),
                     (0x0018, 2), (0x000B, 2), (curve, 2), (0x0010, 2)]
    ) + (32).to_bytes(2, "big") + numbers.x.to_bytes(32, "big") + (32).to_bytes(
        2, "big"
    ) + numbers.y.to_bytes(32, "big")  # fmt: skip
    return len(area).to_bytes(2, "big") + area


def test_a_well_formed_attestation_key_is_read_and_named() -> None:
    ak = read_public(ecc_public(), "ak")
    check_attestation_key(ak)
    assert ak.name[:2] == b"\x00\x0b" and len(ak.name) == 34


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "truncated at byte 0"),
        (ecc_public()[:-5], "truncated"),
        (ecc_public() + b"x", "1 bytes left over"),
        (ecc_public(curve=0x0004), "expected NIST P-256"),
        (b"\x00\x02\x00\x99", "truncated"),
        (os.urandom(5000), "at most 2048"),
    ],
)
def test_malformed_public_areas_are_refused_precisely(data: bytes, fragment: str) -> None:
    with pytest.raises(AttestationError, match=fragment):
        read_public(data, "the attestation key")


def test_a_key_that_is_not_a_restricted_tpm_signing_key_is_no_attestation_key() -> None:
    for attributes in (
        0x00040072,
        0x00050070,
        0x00070072,
    ):  # not restricted / not fixedTPM / decrypt
        with pytest.raises(AttestationError, match="attributes"):
            check_attestation_key(read_public(ecc_public(attributes), "ak"))


def test_random_quotes_never_escape_as_anything_but_attestation_errors() -> None:
    ak = read_public(ecc_public(), "ak")
    for size in (0, 1, 10, 100, 300):
        for _ in range(20):
            with pytest.raises(AttestationError):
                check_quote(ak, os.urandom(size), os.urandom(size), [bytes(32)] * 8, b"n")


def test_a_pcr_policy_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"7": ["ab" * 32]}))
    policy = PcrPolicy.load(good)
    policy.check([bytes(32)] * 7 + [bytes.fromhex("ab" * 32)])  # only PCR 7 is pinned
    with pytest.raises(AttestationError, match="PCR 7 is 00"):
        policy.check([bytes(32)] * 8)
    for content, fragment in [
        ("[1, 2]", "expected a JSON object"),
        ('{"9": ["' + "ab" * 32 + '"]}', "indexes are 0..7"),
        ('{"0": ["abc"]}', "expected a JSON object"),
        ('{"0": ["abcd"]}', "values 64 hex digits"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(FedgeError, match=fragment):
            PcrPolicy.load(bad)


def rsa_public(key: rsa.RSAPublicKey) -> bytes:
    """TPM2B_PUBLIC of an RSA-2048 storage key (the EK template's shape)."""
    area = b"".join(
        n.to_bytes(w, "big")
        for n, w in [(0x0001, 2), (0x000B, 2), (0x000300B2, 4), (0, 2), (0x0006, 2),
                     (128, 2), (0x0043, 2), (0x0010, 2), (2048, 2), (0, 4), (256, 2)]
    ) + key.public_numbers().n.to_bytes(256, "big")  # fmt: skip
    return len(area).to_bytes(2, "big") + area


def certificate(
    subject_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(subject_key).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )  # fmt: skip


def test_an_ek_certificate_must_be_for_that_ek_and_from_a_listed_manufacturer(
    tmp_path: Path,
) -> None:
    vendor, stranger = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ek_key = rsa.generate_private_key(65537, 2048).public_key()
    ek = read_public(rsa_public(ek_key), "ek")
    ca = certificate(vendor.public_key(), "vendor", vendor)
    (tmp_path / "vendors.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    issuers = EkIssuers(tmp_path / "vendors.pem")
    der = serialization.Encoding.DER
    issuers.check(ek, certificate(ek_key, "vendor", vendor).public_bytes(der))
    other_key = rsa.generate_private_key(65537, 2048).public_key()
    for cert, fragment in [
        (b"", "no endorsement key certificate"),
        (b"\x30\x03abc", "not valid DER"),
        (certificate(other_key, "vendor", vendor).public_bytes(der), "for another key"),
        (
            certificate(ek_key, "vendor", stranger).public_bytes(der),
            "not issued by a TPM manufacturer",
        ),
    ]:
        with pytest.raises(AttestationError, match=fragment):
            issuers.check(ek, cert)
