"""TPM 2.0 attestation, checked on the server: the structures a device's TPM produced,
parsed with bounds (a device may lie), signatures verified, and credentials made so that
only the TPM holding a given endorsement key can read them.

What an enrollment with `--tpm` proves, step by step:
1. `make_credential`: a secret only the TPM holding the EK can decrypt, and only for an
   attestation key (AK) with the given name loaded in that same TPM (TPM 2.0 Part 1,
   "Credential Protection"); the device answering with the secret proves the AK lives
   beside that EK and cannot leave it (its attributes say fixedTPM).
2. `check_quote`: the AK signed the device's PCRs 0–7 (the measured boot) and a nonce
   bound to the token and the CSR, so the quote is fresh and belongs to this request.
3. `PcrPolicy`: each PCR holds one of its known-good values.
4. `EkIssuers` (optional): the EK comes with a certificate from a TPM manufacturer's CA,
   which is what tells a TPM chip from a software TPM replaying known-good measurements.

Only the structures fedge asks the TPM for are accepted: an RSA-2048 or NIST P-256
AK, SHA-256 names and banks, ECDSA or RSASSA signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB  # the TPM's credential cipher
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedge.errors import FedgeError

ALG_RSA, ALG_ECC, ALG_SHA256, ALG_NULL = 0x0001, 0x0023, 0x000B, 0x0010
ALG_RSASSA, ALG_ECDSA, ALG_AES, ALG_CFB = 0x0014, 0x0018, 0x0006, 0x0043
ECC_NIST_P256 = 0x0003
ST_ATTEST_QUOTE = 0x8018
GENERATED_VALUE = 0xFF544347
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
AK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
PCRS = tuple(range(8))
"""The boot-measurement PCRs quoted: firmware, its configuration, option ROMs, boot loader
(0–5), platform state (6) and Secure Boot policy (7)."""
MAX_STRUCTURE = 2048


class AttestationError(FedgeError):
    """A TPM structure or attestation that does not hold up; the message says which part."""


@dataclass(frozen=True)
class TpmPublic:
    """A TPM2B_PUBLIC: the key, its attributes, and its TPM name (nameAlg ‖ hash)."""

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    attributes: int
    name: bytes
    symmetric_bits: int
    """The key's storage cipher (AES bits): what `make_credential` wraps with."""


@dataclass(frozen=True)
class Quote:
    extra_data: bytes
    pcr_selection: tuple[int, tuple[int, ...]]
    pcr_digest: bytes


class _Reader:
    """Big-endian TPM marshalling, every read bounded by what is left."""

    def __init__(self, data: bytes, what: str) -> None:
        if len(data) > MAX_STRUCTURE:
            raise AttestationError(f"{what}: {len(data)} bytes; at most {MAX_STRUCTURE}")
        self.data, self.at, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise AttestationError(f"{self.what}: truncated at byte {self.at}")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.at != len(self.data):
            raise AttestationError(f"{self.what}: {len(self.data) - self.at} bytes left over")


def read_public(data: bytes, what: str) -> TpmPublic:
    """Parse a TPM2B_PUBLIC (as `tpm2_createek -u`/`tpm2_createak -u` write it)."""
    outer = _Reader(data, what)
    area = outer.sized()
    outer.end()
    r = _Reader(area, what)
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    if name_alg != ALG_SHA256:
        raise AttestationError(f"{what}: name algorithm {name_alg:#06x}, expected SHA-256")
    r.sized()  # authPolicy
    sym = r.u16()
    sym_bits = 0
    if sym != ALG_NULL:
        sym_bits, mode = r.u16(), r.u16()
        if sym != ALG_AES or mode != ALG_CFB:
            raise AttestationError(
                f"{what}: storage cipher {sym:#06x}/{mode:#06x}, expected AES-CFB"
            )
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if kind == ALG_RSA:
        if r.u16() != ALG_NULL:  # scheme
            r.u16()
        bits, exponent = r.u16(), r.u32() or 65537
        modulus = r.sized()
        if bits != 2048 or len(modulus) != 256:
            raise AttestationError(f"{what}: an RSA key of {bits} bits, expected 2048")
        key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
    elif kind == ALG_ECC:
        if r.u16() != ALG_NULL:  # scheme
            r.u16()
        curve = r.u16()
        if r.u16() != ALG_NULL:  # kdf
            r.u16()
        x, y = r.sized(), r.sized()
        if curve != ECC_NIST_P256 or len(x) != 32 or len(y) != 32:
            raise AttestationError(f"{what}: curve {curve:#06x}, expected NIST P-256")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as exc:
            raise AttestationError(f"{what}: not a point on P-256 ({exc})") from None
    else:
        raise AttestationError(f"{what}: key type {kind:#06x}, expected RSA or ECC")
    r.end()
    name = struct.pack(">H", ALG_SHA256) + hashlib.sha256(area).digest()
    return TpmPublic(key, attributes, name, sym_bits)


def check_attestation_key(ak: TpmPublic) -> None:
    """An AK made inside the TPM, never to leave it, that signs only TPM-made structures."""
    if ak.attributes & AK_ATTRIBUTES != AK_ATTRIBUTES or ak.attributes & DECRYPT:
        raise AttestationError(
            f"the attestation key's attributes are {ak.attributes:#010x}; expected a "
            "restricted signing key, fixed to its TPM, generated inside it"
        )


def make_credential(ek: TpmPublic, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) that TPM2_ActivateCredential turns back into
    `secret` only in the TPM holding `ek`, and only for the object named `ak_name`."""
    if not isinstance(ek.key, rsa.RSAPublicKey) or ek.symmetric_bits != 128:
        raise AttestationError("the endorsement key must be RSA-2048 with AES-128 (the default)")
    seed = os.urandom(32)
    encrypted_seed = ek.key.encrypt(
        seed,
        padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label=b"IDENTITY\x00"),
    )
    sym_key = _kdfa(seed, b"STORAGE", ak_name, b"", 128)
    plain = struct.pack(">H", len(secret)) + secret
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", b"", 256)
    integrity = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    id_object = struct.pack(">H", len(integrity)) + integrity + enc_identity
    return (
        struct.pack(">H", len(id_object)) + id_object,
        struct.pack(">H", len(encrypted_seed)) + encrypted_seed,
    )


def _kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (TPM 2.0 Part 1, 11.4.10.2): counter-mode HMAC."""
    out, counter = b"", 1
    while len(out) * 8 < bits:
        block = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
        out += hmac.new(key, block + struct.pack(">I", bits), hashlib.sha256).digest()
        counter += 1
    return out[: bits // 8]


def check_quote(
    ak: TpmPublic, message: bytes, signature: bytes, pcr_values: Sequence[bytes], nonce: bytes
) -> Quote:
    """The quote is signed by `ak`, carries `nonce`, covers SHA-256 PCRs 0–7, and its digest
    matches `pcr_values` (as the device read them)."""
    _verify(ak, message, signature)
    r = _Reader(message, "the quote")
    if r.u32() != GENERATED_VALUE or r.u16() != ST_ATTEST_QUOTE:
        raise AttestationError("the quote is not a TPM-generated quote structure")
    r.sized()  # qualifiedSigner
    extra = r.sized()
    r.take(17 + 8)  # clockInfo, firmwareVersion
    if r.u32() != 1:
        raise AttestationError("the quote must select one PCR bank")
    bank, bitmap = r.u16(), r.take(r.u8())
    selected = tuple(i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1)
    digest = r.sized()
    r.end()
    if not hmac.compare_digest(extra, nonce):
        raise AttestationError("the quote's nonce is not the one for this request (a replay?)")
    if bank != ALG_SHA256 or selected != PCRS:
        raise AttestationError(
            f"the quote covers PCRs {list(selected)} of bank {bank:#06x}; "
            f"expected SHA-256 PCRs {list(PCRS)}"
        )
    if len(pcr_values) != len(PCRS) or any(len(v) != 32 for v in pcr_values):
        raise AttestationError(f"expected {len(PCRS)} SHA-256 PCR values")
    if not hmac.compare_digest(hashlib.sha256(b"".join(pcr_values)).digest(), digest):
        raise AttestationError("the PCR values sent do not match the digest the TPM quoted")
    return Quote(extra, (bank, selected), digest)


def _verify(ak: TpmPublic, message: bytes, signature: bytes) -> None:
    r = _Reader(signature, "the quote's signature")
    scheme, digest_alg = r.u16(), r.u16()
    if digest_alg != ALG_SHA256:
        raise AttestationError(f"the quote is signed with hash {digest_alg:#06x}, not SHA-256")
    try:
        if scheme == ALG_ECDSA and isinstance(ak.key, ec.EllipticCurvePublicKey):
            sr, ss = r.sized(), r.sized()
            r.end()
            der = encode_dss_signature(int.from_bytes(sr, "big"), int.from_bytes(ss, "big"))
            ak.key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        elif scheme == ALG_RSASSA and isinstance(ak.key, rsa.RSAPublicKey):
            sig = r.sized()
            r.end()
            ak.key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise AttestationError(f"signature scheme {scheme:#06x} does not fit the key")
    except InvalidSignature:
        raise AttestationError("the quote's signature does not verify with the AK") from None


class PcrPolicy:
    """Known-good values of PCRs 0–7 (JSON: {"0": ["<hex>", ...], ..., "7": [...]}); a PCR
    left out may hold anything."""

    def __init__(self, allowed: Mapping[int, frozenset[bytes]], source: str) -> None:
        self.allowed, self.source = dict(allowed), source

    @classmethod
    def load(cls, path: Path) -> PcrPolicy:
        try:
            raw = json.loads(path.read_text())
            allowed = {
                int(index): frozenset(bytes.fromhex(v) for v in values)
                for index, values in raw.items()
            }
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise FedgeError(
                f"{path}: expected a JSON object of PCR index -> list of hex SHA-256 values ({exc})"
            ) from None
        for index, values in allowed.items():
            if index not in PCRS or any(len(v) != 32 for v in values):
                raise FedgeError(f"{path}: PCR {index}: indexes are 0..7, values 64 hex digits")
        return cls(allowed, str(path))

    def check(self, pcr_values: Sequence[bytes]) -> None:
        for index, value in zip(PCRS, pcr_values, strict=True):
            known = self.allowed.get(index)
            if known is not None and value not in known:
                raise AttestationError(
                    f"PCR {index} is {value.hex()}, not a known-good value of {self.source}: "
                    "the device did not boot into a known state"
                )


class EkIssuers:
    """TPM manufacturers' CAs (a PEM bundle of the CAs that issue EK certificates): an
    endorsement key must come with a certificate one of them signed, for that very key."""

    def __init__(self, path: Path) -> None:
        try:
            self.issuers = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise FedgeError(f"{path}: expected PEM CA certificates ({exc})") from None
        self.source = str(path)

    def check(self, ek: TpmPublic, certificate: bytes) -> None:
        if not certificate:
            raise AttestationError(
                "no endorsement key certificate (the TPM holds none at NV index 0x01c00002)"
            )
        try:
            cert = x509.load_der_x509_certificate(certificate)
            key = cert.public_key()
        except ValueError as exc:
            raise AttestationError(f"the EK certificate is not valid DER X.509 ({exc})") from None
        if (
            not isinstance(key, rsa.RSAPublicKey)
            or not isinstance(ek.key, rsa.RSAPublicKey)
            or (key.public_numbers() != ek.key.public_numbers())
        ):
            raise AttestationError("the EK certificate is for another key than the TPM's EK")
        for issuer in self.issuers:
            try:
                cert.verify_directly_issued_by(issuer)
                return
            except (ValueError, TypeError, InvalidSignature):
                continue
        raise AttestationError(
            f"the EK certificate (issuer {cert.issuer.rfc4514_string()[:200]!r}) was not issued "
            f"by a TPM manufacturer CA of {self.source}"
        )
