"""Mutual TLS credentials from a PKI directory, peer identities, and the loopback rule."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import grpc

from fedge.errors import FedgeError
from fedge.security.credentials import read_credentials

log = logging.getLogger(__name__)

NODE_NAME_METADATA = "fedge-node-name"
"""Plaintext (loopback-only) connections name themselves in this metadata key."""


class ReloadingCredentials:
    """The server's mutual-TLS credentials, read again when its files change (or on
    `reload`, which SIGHUP calls): gRPC asks before each new handshake, so a replaced
    server certificate is used without a restart. A replacement that does not check out
    is logged and the current one kept.

    For the enrollment listener (`enrollment=True`) no client certificate is asked for,
    and the root is presented after the chain: a device that knows only the root's pin
    finds it there (`fedge.security.enroll`)."""

    def __init__(self, certs: Path, name: str = "server", *, enrollment: bool = False) -> None:
        self.certs, self.name, self.enrollment = Path(certs), name, enrollment
        self._files = [certs / "ca.crt", certs / f"{name}.crt", certs / f"{name}.key"]
        self._stamp = self._stat()
        self._forced = False
        self.initial = self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self._fetch, require_client_authentication=not self.enrollment
        )

    def reload(self) -> None:
        self._forced = True

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self._files:
            try:
                info = path.stat()
                stamps.append((info.st_mtime_ns, info.st_ino))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        from fedge.security.pki import load_credentials  # checked: say what is wrong

        creds = load_credentials(self.certs, self.name)
        if self.enrollment:
            chain = creds.cert_pem.rstrip(b"\n") + b"\n" + creds.ca_pem
            return grpc.ssl_server_certificate_configuration([(creds.key_pem, chain)])
        return grpc.ssl_server_certificate_configuration(
            [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stat()
        if stamp == self._stamp and not self._forced:
            return None
        self._stamp, self._forced = stamp, False
        try:
            configuration = self._configuration()
        except FedgeError as exc:
            log.error("kept the current server certificate: the new one is not usable: %s", exc)
            return None
        log.warning("server certificate reloaded from %s", self.certs)
        return configuration


def channel_credentials(certs: Path, name: str) -> grpc.ChannelCredentials:
    """The files as they are: the handshake checks them, and `explain_refusal` says what
    is wrong with them if it fails (a node that connects never loads `cryptography`)."""
    creds = read_credentials(certs, name)
    return grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)


def explain_refusal(certs: Path, name: str) -> None:
    """Raise `PKIError` naming what to fix if the credentials cannot work (another CA's
    certificate, a key of another certificate, expired); otherwise return."""
    from fedge.security.pki import load_credentials

    load_credentials(certs, name)


def peer_identity(context: grpc.aio.ServicerContext, insecure: bool) -> str | None:
    """The caller's name: its certificate's common name, or (plaintext) what it claims."""
    if insecure:
        for key, value in context.invocation_metadata() or ():
            if key == NODE_NAME_METADATA:
                return str(value)
        return None
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def require_loopback(address: str) -> None:
    """Plaintext is allowed only where no other machine can listen in."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = {info[4][0] for info in socket.getaddrinfo(host or "0.0.0.0", None)}
    except socket.gaierror as exc:
        raise FedgeError(f"cannot resolve {host!r} in {address!r}: {exc}") from exc
    if not infos or not all(
        ipaddress.ip_address(str(ip).split("%")[0]).is_loopback for ip in infos
    ):
        raise FedgeError(
            f"--insecure (plaintext) is only allowed on a loopback address, "
            f"got {address!r}; use TLS certificates (--certs) instead"
        )
