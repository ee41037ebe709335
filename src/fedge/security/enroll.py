"""The device's side of enrollment, apart from the wire: find the pinned root CA among the
certificates a server presents, make the key pair and CSR, check and save what the
server signed. The private key is made here and never leaves the device.

The pin is the SHA-256 of the root's SubjectPublicKeyInfo (as `kubeadm join
--discovery-token-ca-cert-hash`): the device reads the server's chain once without
verifying it, keeps the certificate that matches the pin, and from then on verifies the
server against that root like any TLS client.
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedge.security import pki
from fedge.security.credentials import NEXT, PKIError, finish_replacement, validate_name

_PIN_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_pin(pin: str) -> str:
    pin = pin.strip().lower()
    if not _PIN_RE.fullmatch(pin):
        raise PKIError(
            f"--ca-pin must look like sha256:<64 hex digits> (`fedge ca pin` prints it), "
            f"got {pin[:80]!r}"
        )
    return pin


def discover_root(server: str, pin: str, timeout: float = 10.0) -> bytes:
    """The PEM of the certificate with the pinned key among those `server` presents."""
    pin = check_pin(pin)
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read the chain: the pin decides
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            chain = _unverified_chain(tls)
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read the certificates of {server}: {exc}") from exc
    for der in chain:
        cert = x509.load_der_x509_certificate(der)
        if pki.spki_pin(cert) == pin:
            if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise PKIError(f"the certificate of {server} with the pinned key is not a CA")
            return cert.public_bytes(serialization.Encoding.PEM)
    raise PKIError(
        f"none of the {len(chain)} certificates {server} presented has the pinned key "
        f"{pin}: it is not the server you expect, or the pin is wrong"
    )


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    # public as SSLSocket.get_unverified_chain from Python 3.13; private before
    get = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in get()]  # type: ignore[attr-defined]


def make_request(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new P-256 key and a CSR naming `name` (CN only: the CA chooses the rest)."""
    validate_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def renewed(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, chain_pem: bytes) -> None:
    """Check a renewed certificate against the root already trusted here, then replace
    NAME.key and NAME.crt (`save`)."""
    ca_pem = (Path(directory) / pki.CA_CERT_FILE).read_bytes()
    root = x509.load_pem_x509_certificate(ca_pem)
    save(directory, name, key, chain_pem, ca_pem, pki.spki_pin(root))


def save(
    directory: Path,
    name: str,
    key: ec.EllipticCurvePrivateKey,
    chain_pem: bytes,
    ca_pem: bytes,
    pin: str,
) -> Path:
    """Check what the server signed — for this key and name, chained to the pinned root —
    and write ca.crt, NAME.key (0600) and NAME.crt. The pair is replaced in two steps:
    both written as ``.next`` files, then renamed; a crash between the renames is
    finished by the next `read_credentials`, so key and certificate always match."""
    directory = Path(directory)
    root = x509.load_pem_x509_certificate(ca_pem)
    if pki.spki_pin(root) != check_pin(pin):
        raise PKIError("the server answered with a root CA other than the pinned one")
    cert, *chain = x509.load_pem_x509_certificates(chain_pem)
    if cert.public_key() != key.public_key():
        raise PKIError("the server signed another key than this device's")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [name]:
        raise PKIError(f"the server issued a certificate for {names}, not for {name!r}")
    pki.verify_chain([cert, *chain], root, "the issued certificate", "the pinned root")
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_file(directory / pki.CA_CERT_FILE, ca_pem, private=False)
    pki.write_file(directory / f"{name}.key{NEXT}", pki.key_pem(key), private=True)
    pki.write_file(directory / f"{name}.crt{NEXT}", chain_pem, private=False)
    finish_replacement(directory, name)
    return directory / f"{name}.crt"
