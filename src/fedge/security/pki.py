"""A small project CA for mutual TLS: a node's identity is the CN of its certificate.

Everything cryptographic is done by the `cryptography` package; this module only chooses
sane defaults (EC P-256, SHA-256, tight key usages) and writes files safely: private keys
are created with mode 0600 and every file is written atomically, so a crash never leaves a
half-written key behind.

Layout of a PKI directory::

    ca.crt  ca.key            the project CA (ca.key stays on the operator's machine)
    <name>.crt  <name>.key    one pair per server, node or admin
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
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
    "Credentials",
    "PKIError",
    "init_ca",
    "issue",
    "load_credentials",
    "validate_name",
]

CA_KEY_FILE = "ca.key"
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")

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
    """Create a self-signed CA in `directory` and return the path of `ca.crt`.

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
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a ca.crt without its key would look like a usable CA but could sign nothing.
    _write_file(key_path, _key_pem(key), private=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path


def issue(
    directory: Path,
    name: str,
    *,
    server: bool = False,
    hosts: Sequence[str] = (),
    days: int = 825,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a certificate for `name` from the CA in `directory`; return (crt, key) paths.

    Nodes (and admins) get clientAuth only, so a stolen node certificate cannot
    impersonate the server. Servers get serverAuth + clientAuth and a SAN for each of
    `hosts` (default: localhost and 127.0.0.1), which clients check against the address
    they dial. An existing pair is only replaced with `force=True`, so a deployed node's
    key is never clobbered by accident.
    """
    directory = Path(directory)
    validate_name(name)
    if name.lower() == "ca":
        raise PKIError(f"name {name!r} is reserved for the CA's own files; choose another name")
    if isinstance(hosts, str):
        raise PKIError(f"hosts must be a list of host names or IPs, got the string {hosts!r}")
    _check_days(days)
    host_list = list(hosts) if hosts else (list(DEFAULT_SERVER_HOSTS) if server else [])
    san = _subject_alt_names(host_list if server else [name, *host_list])

    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PKIError(
            f"credentials for {name!r} already exist ({', '.join(existing)}); "
            "pass force=True to replace them"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_file(key_path, _key_pem(key), private=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path


def load_credentials(directory: Path, name: str) -> Credentials:
    """Read `ca.crt`, `<name>.crt` and `<name>.key` from `directory` and check they fit.

    Checking here (key matches certificate, certificate signed by this CA, not expired)
    turns what would be an opaque TLS handshake failure into an error that says what to fix.
    """
    directory = Path(directory)
    creds = read_credentials(directory, name)
    ca_pem, cert_pem, key_pem = creds.ca_pem, creds.cert_pem, creds.key_pem
    ca_cert = _parse_cert(ca_pem, directory / CA_CERT_FILE)
    cert = _parse_cert(cert_pem, directory / f"{name}.crt")
    key = _parse_key(key_pem, directory / f"{name}.key")
    if key.public_key() != cert.public_key():
        raise PKIError(
            f"{directory / f'{name}.key'} does not belong to {directory / f'{name}.crt'}: "
            "the public keys differ (were the files copied from different issues?)"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        reason = str(exc) or "signature does not verify"
        raise PKIError(
            f"{directory / f'{name}.crt'} was not issued by the CA in {directory / CA_CERT_FILE} "
            f"({ca_cert.subject.rfc4514_string()}): {reason}"
        ) from exc
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


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise PKIError(
            f"no CA in {directory}: missing {', '.join(missing)}; create one with init_ca()"
        )
    cert = _parse_cert(cert_path.read_bytes(), cert_path)
    key = _parse_key(key_path.read_bytes(), key_path)
    if key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} does not belong to {cert_path}: the public keys differ")
    return cert, key


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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_file(path: Path, data: bytes, *, private: bool) -> None:
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
