"""Every call's certificate is checked before its handler runs: its role must fit the
service (only nodes use Fleet, only admins use Control: an admin or server certificate
cannot join as a node). gRPC's server interceptors do not see the peer's certificate,
so the check wraps each method handler instead."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

MAX_CACHED = 4096
"""Parsed certificates kept (a fleet's worth); beyond it the oldest is parsed again."""


@dataclass(frozen=True)
class Peer:
    name: str
    role: str | None
    serial: int


class PeerCertificates:
    """The caller's certificate, parsed once per certificate (not per call)."""

    def __init__(self) -> None:
        self._parsed: dict[bytes, Peer] = {}

    def of(self, context: grpc.aio.ServicerContext) -> Peer | None:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            return None
        pem = pems[0]
        peer = self._parsed.get(pem)
        if peer is None:
            peer = _parse(pem)
            if len(self._parsed) >= MAX_CACHED:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[pem] = peer
        return peer


def _parse(pem: bytes) -> Peer:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedge.security.pki import role_of

    cert = x509.load_pem_x509_certificate(pem)
    (name,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Peer(str(name.value), role_of(cert), cert.serial_number)


class Guard:
    """Wraps a service's handlers so that each call is refused unless its peer holds a
    certificate of `role`. On plaintext (loopback, tests) there are no certificates."""

    def __init__(self, insecure: bool) -> None:
        self.insecure = insecure
        self.peers = PeerCertificates()

    def refusal(self, context: grpc.aio.ServicerContext, role: str) -> str | None:
        """Why this call may not proceed, or None."""
        if self.insecure:
            return None
        peer = self.peers.of(context)
        if peer is None:
            return "no client certificate"
        if peer.role != role:
            held = f"a {peer.role!r} certificate" if peer.role else "a certificate without a role"
            return (
                f"{peer.name!r} holds {held}; this service needs a {role!r} certificate "
                f"(`fedge ca issue --role {role}`, or enrollment for nodes)"
            )
        return None

    def wrap(
        self, handlers: dict[str, grpc.RpcMethodHandler], role: str
    ) -> dict[str, grpc.RpcMethodHandler]:
        return {name: self._wrap(h, role) for name, h in handlers.items()}

    def _wrap(self, handler: Any, role: str) -> Any:
        if handler.unary_unary or handler.stream_unary:
            kind = "unary_unary" if handler.unary_unary else "stream_unary"
            return handler._replace(**{kind: self._unary(getattr(handler, kind), role)})
        kind = "unary_stream" if handler.unary_stream else "stream_stream"
        return handler._replace(**{kind: self._streaming(getattr(handler, kind), role)})

    def _unary(self, behaviour: Callable[..., Any], role: str) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            reason = self.refusal(context, role)
            if reason is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            return await behaviour(request, context)

        return guarded

    def _streaming(self, behaviour: Callable[..., Any], role: str) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            reason = self.refusal(context, role)
            if reason is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            async for message in behaviour(request, context):
                yield message

        return guarded
