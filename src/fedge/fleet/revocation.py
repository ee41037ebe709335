"""Which certificates the server refuses: revoked serials, and revoked names.

Revoking a name refuses every certificate of that name except the ones the server
issues afterwards (a replacement device enrolled with a token for that name). So a
certificate made by hand, which the server never recorded, is refused as well. Both
kinds are kept in the state database, so they survive restarts, and each revocation
rewrites a CRL signed by the issuing CA (`crl.pem` in the state directory) for other
components: the MQTT broker, the inference server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from fedge.state import StateStore

log = logging.getLogger(__name__)

CRL_FILE = "crl.pem"
MAX_REASON = 256


class Revocations:
    def __init__(self, store: StateStore, crl_path: Path, certs: Path | None) -> None:
        self.store, self.crl_path, self.certs = store, crl_path, certs
        self.names, self.serials, self.reissued = store.revocations()

    def refusal(self, name: str, serial: int) -> str | None:
        """Why a certificate may not be used, or None."""
        if serial in self.serials:
            return f"certificate {serial:x} of {name!r} is revoked: {self.serials[serial][1]}"
        if name in self.names and serial not in self.reissued:
            return f"node {name!r} is revoked: {self.names[name][1]}"
        return None

    async def revoke_name(self, name: str, reason: str, live_serials: Iterable[int]) -> None:
        serials, reason = set(live_serials), reason[:MAX_REASON]
        when = await asyncio.to_thread(self.store.revoke_name, name, reason, serials)
        self.names[name] = (when, reason)
        for c in self.store.certificates(name):
            if c["revoked_at"]:
                self.serials.setdefault(int(c["serial"], 16), (c["revoked_at"], c["reason"]))
        self.reissued -= self.serials.keys()
        await self.publish()

    async def revoke_serial(self, serial: int, reason: str, name: str = "") -> None:
        reason = reason[:MAX_REASON]
        await asyncio.to_thread(self.store.revoke_serial, serial, reason, name)
        self.serials.setdefault(serial, (time.time(), reason))
        self.reissued.discard(serial)
        await self.publish()

    def issued(self, name: str, serial: int) -> None:
        """The server issued `serial` to `name` just now: a revoked name may use it."""
        if name in self.names:
            self.reissued.add(serial)

    async def publish(self) -> None:
        """Write the CRL (when the issuing CA's key is here to sign it)."""
        if self.certs is None or not (self.certs / "issuing.key").exists():
            return
        from fedge.security.pki import write_crl

        try:
            revoked = {serial: when for serial, (when, _) in self.serials.items()}
            await asyncio.to_thread(write_crl, self.certs, revoked, self.crl_path)
        except OSError as exc:
            log.warning("cannot write the CRL %s: %s", self.crl_path, exc)
