"""Mutual TLS credentials from a PKI directory, peer identities, and the loopback rule."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import grpc

from fedge.errors import FedgeError
from fedge.security.credentials import read_credentials

NODE_NAME_METADATA = "fedge-node-name"
"""Plaintext (loopback-only) connections name themselves in this metadata key."""


def server_credentials(certs: Path, name: str = "server") -> grpc.ServerCredentials:
    from fedge.security.pki import load_credentials  # checked up front: say what to fix

    creds = load_credentials(certs, name)
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )


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
