"""Enrollment: a device with a one-time token gets a node certificate for its own key.

Tokens read ``<id>.<secret>``; the server keeps only the SHA-256 of the secret. Each is
single use, expires, may be revoked, and is bound to one node name or to a prefix of
names. A device sends a CSR with its token (its private key never leaves it); the
issuing CA signs a node certificate — every extension chosen by the CA, none copied
from the request. Refused, with nothing issued: unknown, wrong-secret, used, expired or
revoked tokens; a CSR whose name the token does not allow, or asking for more than a
node gets (`pki.read_request`); a prefix token for a name that holds a live certificate
(a device must not take over another's identity; a token for that exact name, made by
the operator, may replace it).

With a TPM policy (`--tpm-policy`), a device must also prove its TPM and boot state in
two steps: `challenge` (its endorsement and attestation keys; it gets a credential only
that TPM can activate, and a nonce) and `enroll` with the activated secret and a quote
of PCRs 0–7 over the nonce and its CSR (`fedge.security.attestation`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.fleet.revocation import Revocations
from fedge.limits import MAX_KEY_LENGTH
from fedge.messages import Code, FleetError
from fedge.security.attestation import (
    AttestationError,
    EkIssuers,
    PcrPolicy,
    TpmPublic,
    check_attestation_key,
    check_quote,
    make_credential,
    read_public,
)
from fedge.security.credentials import PKIError, validate_name
from fedge.state import StateStore

MAX_TOKENS_PER_CALL = 10_000
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_TOKEN_LENGTH = 128
MAX_TTL_S = 365 * 86_400.0


MAX_CHALLENGES = 1024
"""TPM challenges outstanding at once (one per token); the oldest is dropped beyond it."""
CHALLENGE_TTL_S = 120.0


@dataclass(frozen=True)
class Enrolled:
    chain_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class Attestation:
    """Step two of a TPM enrollment, as the device sent it."""

    secret: bytes
    quote: bytes
    signature: bytes
    pcr_values: tuple[bytes, ...]


@dataclass(frozen=True)
class _Challenge:
    ak: TpmPublic
    ek_id: str
    secret: bytes
    nonce: bytes
    expires: float


class Enrollment:
    """Tokens and CSR signing for one server; `certs` holds ca.crt and the issuing CA."""

    def __init__(
        self,
        store: StateStore,
        certs: Path,
        *,
        node_days: int = 30,
        revocations: Revocations | None = None,
        tpm_policy: PcrPolicy | None = None,
        ek_issuers: EkIssuers | None = None,
    ) -> None:
        from fedge.security import pki

        self.store, self.certs, self.node_days = store, Path(certs), node_days
        self.revocations, self.tpm_policy, self.ek_issuers = revocations, tpm_policy, ek_issuers
        self._challenges: OrderedDict[str, _Challenge] = OrderedDict()  # by token id
        self._challenges_lock = threading.Lock()  # enrollments run in threads
        self.ca_pem = (self.certs / pki.CA_CERT_FILE).read_bytes()
        self.pin = pki.ca_pin(self.certs)
        pki.check_issuer(self.certs)  # say now, not at the first device, if it cannot sign

    # --- tokens (the operator, through Control) ---------------------------------------

    def create_tokens(
        self, *, name: str, prefix: str, count: int, ttl: float, labels: dict[str, str]
    ) -> list[str]:
        if bool(name) == bool(prefix):
            raise FleetError(
                Code.INVALID_ARGUMENT, "give a token either a name or a prefix, not both or neither"
            )
        if name and count != 1:
            raise FleetError(
                Code.INVALID_ARGUMENT, f"a token for the name {name!r} is one token, got {count}"
            )
        if not 1 <= count <= MAX_TOKENS_PER_CALL:
            raise FleetError(
                Code.INVALID_ARGUMENT, f"count must be in 1..{MAX_TOKENS_PER_CALL}, got {count}"
            )
        if not 0 < ttl <= MAX_TTL_S:
            raise FleetError(
                Code.INVALID_ARGUMENT, f"ttl must be in (0, {MAX_TTL_S:.0f}] seconds, got {ttl}"
            )
        try:
            validate_name(name or prefix)
        except PKIError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from None
        _check_labels(labels)
        now = time.time()
        rows, tokens = [], []
        for _ in range(count):
            token_id, secret = secrets.token_hex(5), secrets.token_urlsafe(18)
            tokens.append(f"{token_id}.{secret}")
            rows.append(
                {
                    "token_id": token_id,
                    "secret_sha256": hashlib.sha256(secret.encode()).digest(),
                    "name": name,
                    "prefix": prefix,
                    "labels": labels,
                    "created_at": now,
                    "expires_at": now + ttl,
                }
            )
        self.store.add_tokens(rows)
        return tokens

    def tokens(self) -> list[dict[str, Any]]:
        now = time.time()
        return [{**t, "state": _state(t, now)} for t in self.store.tokens()]

    def revoke_token(self, token_id: str) -> None:
        if not self.store.revoke_token(token_id[:MAX_TOKEN_LENGTH]):
            found = self.store.tokens(token_id[:MAX_TOKEN_LENGTH])
            if not found:
                raise FleetError(Code.NOT_FOUND, f"no token {token_id[:MAX_TOKEN_LENGTH]!r}")
            state = _state(found[0], time.time())
            raise FleetError(
                Code.FAILED_PRECONDITION, f"token {token_id!r} is {state}; nothing to revoke"
            )

    # --- devices (the enrollment listener) -------------------------------------------

    async def challenge(
        self, token: str, ek_public: bytes, ak_public: bytes, ek_certificate: bytes = b""
    ) -> tuple[bytes, bytes, bytes]:
        """(credential, encrypted secret, nonce) for a device with a TPM; see the module."""
        return await asyncio.to_thread(self._challenge, token, ek_public, ak_public, ek_certificate)

    def _challenge(
        self, token: str, ek_public: bytes, ak_public: bytes, ek_certificate: bytes
    ) -> tuple[bytes, bytes, bytes]:
        if self.tpm_policy is None:
            raise FleetError(
                Code.FAILED_PRECONDITION,
                "this server does not check TPM attestation (start it with --tpm-policy); "
                "enroll without --tpm",
            )
        found = self._token(token)
        try:
            ek = read_public(ek_public, "the endorsement key")
            ak = read_public(ak_public, "the attestation key")
            check_attestation_key(ak)
        except AttestationError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, f"TPM attestation: {exc}") from None
        try:
            if self.ek_issuers is not None:
                self.ek_issuers.check(ek, ek_certificate)
            secret, nonce = secrets.token_bytes(32), secrets.token_bytes(32)
            credential, encrypted = make_credential(ek, ak.name, secret)
        except AttestationError as exc:
            raise FleetError(Code.PERMISSION_DENIED, f"TPM attestation: {exc}") from None
        ek_id = hashlib.sha256(ek_public).hexdigest()[:16]
        challenge = _Challenge(ak, ek_id, secret, nonce, time.monotonic() + CHALLENGE_TTL_S)
        with self._challenges_lock:
            self._challenges.pop(found["token_id"], None)
            self._challenges[found["token_id"]] = challenge
            while len(self._challenges) > MAX_CHALLENGES:
                self._challenges.popitem(last=False)
        return credential, encrypted, nonce

    async def enroll(
        self, token: str, csr_pem: bytes, attestation: Attestation | None = None
    ) -> Enrolled:
        """Off the event loop: parsing, signing and the state write (an fsync) are slow."""
        return await asyncio.to_thread(self._enroll, token, csr_pem, attestation)

    def _enroll(
        self, token: str, csr_pem: bytes, attestation: Attestation | None = None
    ) -> Enrolled:
        from fedge.security import pki

        found = self._token(token)
        try:
            csr, name = pki.read_request(csr_pem)
        except PKIError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from None
        labels = dict(found["labels"])
        if self.tpm_policy is not None:
            labels["tpm.ek"] = self._attested(found["token_id"], csr_pem, attestation)
        if found["name"] and name != found["name"]:
            raise FleetError(
                Code.PERMISSION_DENIED,
                f"the CSR names {name!r}, but the token is for {found['name']!r}",
            )
        if found["prefix"]:
            if not name.startswith(found["prefix"]):
                raise FleetError(
                    Code.PERMISSION_DENIED,
                    f"the CSR names {name!r}, but the token is for names starting with "
                    f"{found['prefix']!r}",
                )
            if self.store.enrolled(name):
                raise FleetError(
                    Code.ALREADY_EXISTS,
                    f"{name!r} is enrolled already; a prefix token cannot replace it "
                    "(the operator may revoke it, or make a token for that name)",
                )
        cert, chain = pki.sign_request(self.certs, csr, name, self.node_days)
        if not self.store.record_enrollment(
            found["token_id"],
            name,
            cert.serial_number,
            cert.not_valid_after_utc.timestamp(),
            labels,
        ):  # another device used it a moment ago: this certificate is never handed out
            raise FleetError(Code.PERMISSION_DENIED, "the token was used a moment ago")
        if self.revocations is not None:  # a revoked name re-enrolled by the operator
            self.revocations.issued(name, cert.serial_number)
        return Enrolled(chain, self.ca_pem)

    async def renew(self, name: str, csr_pem: bytes) -> bytes:
        """A new certificate for a node's own name (the caller's certificate was checked:
        a node, not revoked), carrying the labels of its last one; the chain as PEM."""
        return await asyncio.to_thread(self._renew, name, csr_pem)

    def _renew(self, name: str, csr_pem: bytes) -> bytes:
        from fedge.security import pki

        try:
            csr, asked = pki.read_request(csr_pem)
        except PKIError as exc:
            raise FleetError(Code.INVALID_ARGUMENT, str(exc)) from None
        if asked != name:
            raise FleetError(
                Code.PERMISSION_DENIED, f"{name!r} may renew only its own name, not {asked!r}"
            )
        cert, chain = pki.sign_request(self.certs, csr, name, self.node_days)
        last = self.store.certificates(name)
        labels = last[0]["labels"] if last else {}
        self.store.record_certificate(
            cert.serial_number, name, cert.not_valid_after_utc.timestamp(), labels
        )
        if self.revocations is not None:
            self.revocations.issued(name, cert.serial_number)
        return chain

    def _attested(self, token_id: str, csr_pem: bytes, attestation: Attestation | None) -> str:
        """Check step two of a TPM enrollment; the endorsement key's id (for `nodes show`)."""
        assert self.tpm_policy is not None
        if attestation is None:
            raise FleetError(
                Code.FAILED_PRECONDITION,
                "this server enrolls only devices that attest their TPM and boot state: "
                "run `fedge node enroll --tpm`",
            )
        with self._challenges_lock:
            challenge = self._challenges.pop(token_id, None)
        if challenge is None or challenge.expires < time.monotonic():
            raise FleetError(
                Code.FAILED_PRECONDITION,
                "no TPM challenge for this token (none asked, used, or older than "
                f"{CHALLENGE_TTL_S:.0f} s): ask Challenge first",
            )
        if not hmac.compare_digest(attestation.secret, challenge.secret):
            raise FleetError(
                Code.PERMISSION_DENIED,
                "TPM attestation: the credential was not activated by the TPM holding the "
                "endorsement key (wrong secret)",
            )
        nonce = hashlib.sha256(challenge.nonce + csr_pem).digest()
        try:
            check_quote(
                challenge.ak,
                attestation.quote,
                attestation.signature,
                attestation.pcr_values,
                nonce,
            )
            self.tpm_policy.check(attestation.pcr_values)
        except AttestationError as exc:
            raise FleetError(Code.PERMISSION_DENIED, f"TPM attestation: {exc}") from None
        return challenge.ek_id

    def _token(self, token: str) -> dict[str, Any]:
        token_id, _, secret = token[:MAX_TOKEN_LENGTH].partition(".")
        found = self.store.tokens(token_id) if token_id and secret else []
        digest = hashlib.sha256(secret.encode()).digest()
        if not found or not hmac.compare_digest(found[0]["secret_sha256"], digest):
            raise FleetError(
                Code.UNAUTHENTICATED,
                "unknown enrollment token (expected <id>.<secret> from `fedge tokens create`)",
            )
        state = _state(found[0], time.time())
        if state != "unused":
            raise FleetError(Code.PERMISSION_DENIED, f"the enrollment token is {state}")
        return found[0]


def _state(token: dict[str, Any], now: float) -> str:
    if token["used_at"] is not None:
        return "used"
    if token["revoked_at"] is not None:
        return "revoked"
    return "expired" if token["expires_at"] <= now else "unused"


def _check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise FleetError(Code.INVALID_ARGUMENT, f"{len(labels)} labels; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_KEY_LENGTH or len(value) > MAX_LABEL_VALUE:
            raise FleetError(
                Code.INVALID_ARGUMENT,
                f"label {key[:MAX_KEY_LENGTH]!r}: keys take 1..{MAX_KEY_LENGTH} characters, "
                f"values up to {MAX_LABEL_VALUE}",
            )
