"""Every call's certificate is checked before its handler runs: its role must fit the
service (only nodes use Fleet, only admins use Control: an admin or server certificate
cannot join as a node), and it must not be revoked. gRPC's server interceptors do not
see the peer's certificate, so the check wraps each method handler instead.

The guard also knows each identity's calls in progress, so a revocation cuts them at
once: it aborts each call from outside its handler (which gRPC allows: the status goes
out at once) and cancels the handler. Cancelling alone would leave the caller waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

MAX_CACHED = 4096
"""Parsed certificates kept (a fleet's worth); beyond it the oldest is parsed again."""
MAX_CALLS: dict[str, int] = {"Download": 4, "Upload": 4, "Connect": 2, "Tasks": 2}
"""Calls of a kind one identity may have in progress: a node needs one or two; 200
Download streams left unread once held ~880 MB of server memory."""


@dataclass(frozen=True)
class Peer:
    name: str
    role: str | None
    serial: int
    not_before: float = 0.0
    not_after: float = 0.0


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
    return Peer(
        str(name.value),
        role_of(cert),
        cert.serial_number,
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )


Revoked = Callable[[str, int], "str | None"]


@dataclass(frozen=True)
class Call:
    context: grpc.aio.ServicerContext
    serial: int
    method: str


class Guard:
    """Wraps a service's handlers so that each call is refused unless its peer holds a
    certificate of `role` that `revoked` does not refuse. On plaintext (loopback, tests)
    there are no certificates."""

    def __init__(
        self,
        insecure: bool,
        revoked: Revoked = lambda name, serial: None,
        peers: PeerCertificates | None = None,
    ) -> None:
        self.insecure, self.revoked = insecure, revoked
        self.peers = peers or PeerCertificates()
        self.calls: dict[str, dict[asyncio.Task[Any], Call]] = {}

    def admit(self, context: grpc.aio.ServicerContext, role: str) -> tuple[Peer | None, str | None]:
        """(the peer, why this call may not proceed or None)."""
        if self.insecure:
            return None, None
        peer = self.peers.of(context)
        if peer is None:
            return None, "no client certificate"
        if peer.role != role:
            held = f"a {peer.role!r} certificate" if peer.role else "a certificate without a role"
            return peer, (
                f"{peer.name!r} holds {held}; this service needs a {role!r} certificate "
                f"(`fedge ca issue --role {role}`, or enrollment for nodes)"
            )
        if peer.not_after and peer.not_after < time.time():  # a connection outlived it
            return peer, f"the certificate of {peer.name!r} has expired; renew or enroll again"
        return peer, self.revoked(peer.name, peer.serial)

    def serials(self, name: str) -> set[int]:
        """The serials of `name`'s certificates on calls in progress."""
        return {call.serial for call in self.calls.get(name, {}).values()}

    def holder(self, serial: int | None) -> str:
        """The name whose calls in progress use certificate `serial` ('' if none)."""
        for name, calls in self.calls.items():
            if any(call.serial == serial for call in calls.values()):
                return name
        return ""

    async def cut(self, name: str, reason: str, serial: int | None = None) -> int:
        """End `name`'s calls in progress (only those with `serial`, if given) with
        PERMISSION_DENIED and `reason`; returns how many."""
        cut = 0
        for task, call in list(self.calls.get(name, {}).items()):
            if serial is not None and call.serial != serial:
                continue
            with contextlib.suppress(Exception):  # AbortError, or the call just ended
                await call.context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            task.cancel()
            cut += 1
        return cut

    @contextlib.contextmanager
    def _tracked(
        self, peer: Peer | None, context: grpc.aio.ServicerContext, method: str
    ) -> Iterator[None]:
        task = asyncio.current_task()
        if peer is None or task is None:
            yield
            return
        calls = self.calls.setdefault(peer.name, {})
        calls[task] = Call(context, peer.serial, method)
        try:
            yield
        finally:
            calls.pop(task, None)
            if not calls:
                self.calls.pop(peer.name, None)

    def _busy(self, peer: Peer | None, method: str) -> str | None:
        """Why `peer` may not start another call of `method` now, or None."""
        limit = MAX_CALLS.get(method)
        if peer is None or limit is None:
            return None
        held = sum(c.method == method for c in self.calls.get(peer.name, {}).values())
        if held < limit:
            return None
        return f"{peer.name!r} has {held} {method} calls in progress; at most {limit}"

    def wrap(
        self, handlers: dict[str, grpc.RpcMethodHandler], role: str
    ) -> dict[str, grpc.RpcMethodHandler]:
        return {name: self._wrap(h, role, name) for name, h in handlers.items()}

    def _wrap(self, handler: Any, role: str, method: str) -> Any:
        if handler.unary_unary or handler.stream_unary:
            kind = "unary_unary" if handler.unary_unary else "stream_unary"
            behaviour = self._unary(getattr(handler, kind), role, method)
        else:
            kind = "unary_stream" if handler.unary_stream else "stream_stream"
            behaviour = self._streaming(getattr(handler, kind), role, method)
        return handler._replace(**{kind: behaviour})

    async def _enter(
        self, context: grpc.aio.ServicerContext, role: str, method: str
    ) -> Peer | None:
        peer, reason = self.admit(context, role)
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        busy = self._busy(peer, method)
        if busy is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        return peer

    def _unary(self, behaviour: Callable[..., Any], role: str, method: str) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            peer = await self._enter(context, role, method)
            with self._tracked(peer, context, method):
                return await behaviour(request, context)

        return guarded

    def _streaming(
        self, behaviour: Callable[..., Any], role: str, method: str
    ) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            peer = await self._enter(context, role, method)
            with self._tracked(peer, context, method):
                async for message in behaviour(request, context):
                    yield message

        return guarded
