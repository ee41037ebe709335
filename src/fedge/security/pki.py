"""A small project CA for mutual TLS: a node's identity is the CN of its certificate,
its role (node, admin, server) the OU.

Everything cryptographic is done by the `cryptography` package; this module only chooses
sane defaults (EC P-256, SHA-256, tight key usages) and writes files safely: private keys
are created with mode 0600 and every file is written atomically, so a crash never leaves a
half-written key behind.

Two CAs: a root, whose key can go offline once it has signed the issuing CA, and the
issuing CA that signs every server, node and admin certificate (by hand here, or by the
server's enrollment service from a CSR). Each certificate file holds its chain up to, not
including, the root, so a peer that trusts only `ca.crt` verifies it.

Layout of a PKI directory::

    ca.crt  ca.key            the root CA (ca.key may leave for offline storage)
    issuing.crt  issuing.key  the issuing CA (the server needs it to enroll nodes)
    <name>.crt  <name>.key    one pair per server, node or admin
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.security.credentials import (
    CA_CERT_FILE,
    Credentials,
    PKIError,
    read_credentials,
    validate_name,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_SERVER_HOSTS",
    "ROLES",
    "Credentials",
    "PKIError",
    "Role",
    "ca_pin",
    "init_ca",
    "issue",
    "load_credentials",
    "read_request",
    "role_of",
    "sign_request",
    "validate_name",
]

CA_KEY_FILE = "ca.key"
ISSUING_CERT_FILE, ISSUING_KEY_FILE = "issuing.crt", "issuing.key"
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
Role = Literal["node", "admin", "server"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_DAYS: dict[Role, int] = {"node": 30, "admin": 365, "server": 365}
"""Node certificates live 30 days and are renewed by the node over its link."""

# A DNS name as it may appear in a SAN: labels of letters, digits, '-' and '_', optionally
# a leading "*." wildcard.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")
# Certificates start a little in the past so that a node whose clock lags the CA's
# by a few minutes still accepts a freshly issued certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)


def init_ca(
    directory: Path, name: str = "fedge CA", days: int = 3650, *, force: bool = False
) -> Path:
    """Create the root CA and the issuing CA under it in `directory`; return the path of
    `ca.crt`.

    Refuses to replace an existing CA unless `force=True`, because every certificate
    it issued would stop being trusted.
    """
    directory = Path(directory)
    if not name or not name.strip():
        raise PKIError("CA name must be a non-empty string, got an empty one")
    _check_days(days)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PKIError(
            f"a CA already exists ({', '.join(existing)}); refusing to overwrite it because "
            "every certificate it issued would stop being trusted (pass force=True to replace)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
        ]
    )
    root = _ca_certificate(subject, key, subject, key, days, path_length=1)
    # Key first: a ca.crt without its key would look like a usable CA but could sign nothing.
    write_file(key_path, key_pem(key), private=True)
    write_file(cert_path, _pem(root), private=False)
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing_subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} (issuing)"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
        ]
    )
    issuing = _ca_certificate(issuing_subject, issuing_key, subject, key, days, path_length=0)
    write_file(directory / ISSUING_KEY_FILE, key_pem(issuing_key), private=True)
    write_file(directory / ISSUING_CERT_FILE, _pem(issuing), private=False)
    release_key(directory, force=force)
    return cert_path


RELEASE_KEY_FILE, RELEASE_PUB_FILE = "release.key", "release.pub"


def release_key(directory: Path, *, force: bool = False) -> Path:
    """The Ed25519 key that signs published models (`fedge.store.signing`), made with the
    CA (or on first use for a CA made before there was one); `release.pub` is what
    nodes and inference servers verify with. Returns the private key's path (0600)."""
    private, public = directory / RELEASE_KEY_FILE, directory / RELEASE_PUB_FILE
    if private.exists() and not force:
        return private
    key = ed25519.Ed25519PrivateKey.generate()
    write_file(private, key_pem(key), private=True)
    write_file(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private=False,
    )
    return private


def _ca_certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    path_length: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def issue(
    directory: Path,
    name: str,
    *,
    role: Role = "node",
    hosts: Sequence[str] = (),
    days: int | None = None,
    force: bool = False,
    validity: tuple[dt.datetime, dt.datetime] | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate for `name` from the CA in `directory`; return (crt, key) paths.

    Nodes and admins get clientAuth only, so a stolen node certificate cannot
    impersonate the server. Servers get serverAuth + clientAuth and a SAN for each of
    `hosts` (default: localhost and 127.0.0.1), which clients check against the address
    they dial. The role goes into the OU: the server lets only nodes join and only admins
    use Control. An existing pair is only replaced with `force=True`, so a deployed node's
    key is never clobbered by accident. `validity` (not before, not after) replaces
    `days`: for tests and benchmarks of renewal, with lives of minutes.
    """
    directory = Path(directory)
    if isinstance(hosts, str):
        raise PKIError(f"hosts must be a list of host names or IPs, got the string {hosts!r}")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _check_subject(name, role)
    issuer = _load_issuer(directory)
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PKIError(
            f"credentials for {name!r} already exist ({', '.join(existing)}); "
            "pass force=True to replace them"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(issuer, key.public_key(), name, role, hosts, days or DEFAULT_DAYS[role], validity)
    write_file(key_path, key_pem(key), private=True)
    write_file(cert_path, _chain_pem(cert, issuer), private=False)
    return cert_path, key_path


@dataclass(frozen=True)
class Issuer:
    """A CA that signs leaf certificates, with the chain between it and the root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # the issuer and any CA above it, root excluded


def check_issuer(directory: Path) -> None:
    """Raise `PKIError` unless `directory` holds an issuing CA that can sign (enrollment
    signs with it, so that the root's key may stay offline)."""
    _load_issuer(Path(directory), root_allowed=False)


def _load_issuer(directory: Path, *, root_allowed: bool = True) -> Issuer:
    """The issuing CA, or the root itself in a directory made before there was one."""
    if not root_allowed or (directory / ISSUING_CERT_FILE).is_file():
        cert, key = _load_pair(directory / ISSUING_CERT_FILE, directory / ISSUING_KEY_FILE)
        return Issuer(cert, key, (cert,))
    cert, key = _load_pair(directory / CA_CERT_FILE, directory / CA_KEY_FILE)
    return Issuer(cert, key, ())


def _check_subject(name: str, role: str) -> None:
    validate_name(name)
    if name.lower() in {"ca", "issuing"}:
        raise PKIError(f"name {name!r} is reserved for the CA's own files; choose another name")
    if role not in ROLES:
        raise PKIError(f"role must be one of {list(ROLES)}, got {role!r}")


def _sign(
    issuer: Issuer,
    public_key: CertificatePublicKeyTypes,
    name: str,
    role: Role,
    hosts: Sequence[str],
    days: int,
    validity: tuple[dt.datetime, dt.datetime] | None = None,
) -> x509.Certificate:
    """A leaf certificate for `public_key`: every extension is the CA's choice."""
    _check_days(days)
    host_list = list(hosts) if hosts else (list(DEFAULT_SERVER_HOSTS) if role == "server" else [])
    san = _subject_alt_names(host_list if role == "server" else [name, *host_list])
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = validity or (now - _CLOCK_SKEW, now + dt.timedelta(days=days))
    not_after = min(not_after, issuer.cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "server":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )


MAX_REQUEST_BYTES = 16 << 10
"""A CSR is a few hundred bytes; anything this large is not one."""


def read_request(pem: bytes) -> tuple[x509.CertificateSigningRequest, str]:
    """A device's certificate signing request, checked against what fedge would issue:
    a CN that is a valid name and nothing else in the subject, a valid self-signature,
    an EC (P-256/P-384) or RSA (>= 2048 bits) key, and no extension asking for more than
    a node certificate grants. Returns the request and the name it asks for."""
    if len(pem) > MAX_REQUEST_BYTES:
        raise PKIError(f"the CSR is {len(pem)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise PKIError(f"expected a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not verify with its own public key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or len(csr.subject) != 1:
        raise PKIError(
            f"the CSR's subject must be exactly one CN, got {csr.subject.rfc4514_string()!r}"
        )
    name = str(names[0].value)
    validate_name(name)
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise PKIError(f"the CSR's EC key is on {key.curve.name}; expected P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PKIError(f"the CSR's RSA key has {key.key_size} bits; at least 2048")
    else:
        raise PKIError(f"the CSR's key is {type(key).__name__}; expected EC or RSA")
    for extension in csr.extensions:
        _check_requested(extension.value, name)
    return csr, name


MAX_CHAIN_BYTES = 16 << 10
"""A node's certificate and its issuing CA are a few KB."""


def presented_chain(pem: bytes, directory: Path, name: str, role: str) -> x509.Certificate:
    """The leaf of a certificate chain a caller says it holds, once checked: issued by
    the project CA of `directory`, for `name` in `role`, and valid now."""
    if len(pem) > MAX_CHAIN_BYTES:
        raise PKIError(f"the certificate chain is {len(pem)} bytes; at most {MAX_CHAIN_BYTES}")
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PKIError(f"expected PEM X.509 certificates: {exc}") from exc
    if len(chain) > 3:
        raise PKIError(f"the chain has {len(chain)} certificates; at most 3")
    root_path = directory / CA_CERT_FILE
    verify_chain(chain, _parse_cert(root_path.read_bytes(), root_path), "the chain", directory)
    leaf = chain[0]
    names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [name] or role_of(leaf) != role:
        raise PKIError(
            f"the certificate is for {leaf.subject.rfc4514_string()!r}; expected name "
            f"{name!r} in role {role!r}"
        )
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PKIError(f"the certificate expired or is not yet valid (now {now:%Y-%m-%d %H:%M})")
    return leaf


def _check_requested(value: x509.ExtensionType, name: str) -> None:
    """Refuse a CSR extension asking for more than a node gets (fedge sets its own)."""
    if isinstance(value, x509.BasicConstraints):
        if value.ca:
            raise PKIError("the CSR asks for CA rights (basicConstraints CA:TRUE)")
    elif isinstance(value, x509.ExtendedKeyUsage):
        extra = [u._name for u in value if u != ExtendedKeyUsageOID.CLIENT_AUTH]
        if extra:
            raise PKIError(f"the CSR asks for extra usages {extra}; a node gets clientAuth only")
    elif isinstance(value, x509.KeyUsage):
        if value.key_cert_sign or value.crl_sign:
            raise PKIError("the CSR asks to sign certificates or CRLs")
    elif isinstance(value, x509.SubjectAlternativeName):
        if [str(n.value) for n in value] != [name]:
            raise PKIError(
                f"the CSR asks for other names {[str(n.value) for n in value]}; "
                f"a node is named {name!r} only"
            )
    else:
        raise PKIError(
            f"the CSR asks for an extension fedge does not grant: {value.oid.dotted_string}"
        )


def sign_request(
    directory: Path, csr: x509.CertificateSigningRequest, name: str, days: int
) -> tuple[x509.Certificate, bytes]:
    """A node certificate for a checked request (`read_request`), by the issuing CA;
    returns it and its chain as PEM (certificate first, root excluded)."""
    issuer = _load_issuer(Path(directory), root_allowed=False)
    cert = _sign(issuer, csr.public_key(), name, "node", (), days)
    return cert, _chain_pem(cert, issuer)


CRL_VALIDITY = dt.timedelta(days=7)
"""A CRL's nextUpdate: the server rewrites it on every revocation and at start."""


def write_crl(directory: Path, revoked: Mapping[int, float], path: Path) -> None:
    """A CRL of the `revoked` serials (with their Unix times), signed by the issuing CA,
    written atomically to `path`."""
    issuer = _load_issuer(Path(directory), root_allowed=False)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
    )
    for serial, when in sorted(revoked.items()):
        revocation = x509.RevokedCertificateBuilder().serial_number(serial)
        date = dt.datetime.fromtimestamp(when, dt.UTC)
        builder = builder.add_revoked_certificate(revocation.revocation_date(date).build())
    crl = builder.sign(issuer.key, hashes.SHA256())
    write_file(path, crl.public_bytes(serialization.Encoding.PEM), private=False)


def role_of(cert: x509.Certificate) -> str | None:
    """The fedge role a certificate was issued for (its OU), or None."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if len(units) == 1 else None


def ca_pin(directory: Path) -> str:
    """``sha256:<hex>`` of the root CA's public key (SubjectPublicKeyInfo), the value a
    device pins when it enrolls (as `kubeadm join --discovery-token-ca-cert-hash`)."""
    path = Path(directory) / CA_CERT_FILE
    if not path.is_file():
        raise PKIError(f"no CA certificate at {path}")
    return spki_pin(_parse_cert(path.read_bytes(), path))


def spki_pin(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def load_credentials(directory: Path, name: str) -> Credentials:
    """Read `ca.crt`, `<name>.crt` and `<name>.key` from `directory` and check they fit.

    Checking here (key matches certificate, certificate signed by this CA, not expired)
    turns what would be an opaque TLS handshake failure into an error that says what to fix.
    """
    directory = Path(directory)
    creds = read_credentials(directory, name)
    ca_pem, cert_pem, key_pem = creds.ca_pem, creds.cert_pem, creds.key_pem
    ca_cert = _parse_cert(ca_pem, directory / CA_CERT_FILE)
    cert, *chain = _parse_chain(cert_pem, directory / f"{name}.crt")
    key = _parse_key(key_pem, directory / f"{name}.key")
    if key.public_key() != cert.public_key():
        raise PKIError(
            f"{directory / f'{name}.key'} does not belong to {directory / f'{name}.crt'}: "
            "the public keys differ (were the files copied from different issues?)"
        )
    verify_chain([cert, *chain], ca_cert, directory / f"{name}.crt", directory / CA_CERT_FILE)
    now = dt.datetime.now(dt.UTC)
    for path, c in ((directory / CA_CERT_FILE, ca_cert), (directory / f"{name}.crt", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise PKIError(
                f"{path} is valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, but now is {now:%Y-%m-%d %H:%M} UTC"
            )
    return creds


# -- helpers ---------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PKIError(f"days must be a positive integer, got {days!r}")


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host or len(host) > 253 or not _HOST_RE.fullmatch(host):
            raise PKIError(
                f"host {host!r} is neither an IP address nor a DNS name "
                "(expected e.g. '10.0.0.5', 'aggregator.local' or '*.fleet.example')"
            )
        names.append(x509.DNSName(host))
    return names


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise PKIError(
            f"no CA in {cert_path.parent}: missing {', '.join(missing)}; create one with "
            "`fedge ca init`"
        )
    cert = _parse_cert(cert_path.read_bytes(), cert_path)
    key = _parse_key(key_path.read_bytes(), key_path)
    if key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} does not belong to {cert_path}: the public keys differ")
    return cert, key


def verify_chain(
    chain: Sequence[x509.Certificate], root: x509.Certificate, where: object, root_where: object
) -> None:
    """Each certificate of `chain` (leaf first) is signed by the next, the last by `root`."""
    for cert, issuer in zip(chain, [*chain[1:], root], strict=True):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            reason = str(exc) or "signature does not verify"
            raise PKIError(
                f"{where} was not issued by the CA in {root_where} "
                f"({root.subject.rfc4514_string()}; at {cert.subject.rfc4514_string()}): {reason}"
            ) from exc


def _parse_chain(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PKIError(f"expected PEM X.509 certificates in {path}: {exc}") from exc


def _parse_cert(pem: bytes, path: Path | None) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        where = f" in {path}" if path else ""
        raise PKIError(f"expected a PEM X.509 certificate{where}: {exc}") from exc


def _parse_key(pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"expected an unencrypted PEM private key in {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"expected an EC private key in {path}, found {type(key).__name__}")
    return key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _chain_pem(cert: x509.Certificate, issuer: Issuer) -> bytes:
    return b"".join(_pem(c) for c in (cert, *issuer.chain))


def key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically (temp file + rename); private files are 0600 from creation on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; public files are then widened to 0644.
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
