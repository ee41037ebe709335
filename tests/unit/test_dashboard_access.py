"""Who the dashboard lets in, and its token file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from fedge.errors import FedgeError
from fedge.observe.dashboard import COOKIE, PEER_CERT, Access, load_token

TOKEN = "s3cret-token-of-enough-length"


def _request(headers: dict[str, str] | None = None, cert: dict[str, Any] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "headers": raw, "state": {PEER_CERT: cert} if cert else {}}
    return Request(scope)


def _cert(name: str, role: str, serial: str = "1A") -> dict[str, Any]:
    return {
        "subject": ((("organizationalUnitName", role),), (("commonName", name),)),
        "serialNumber": serial,
    }


def test_the_token_lets_in_by_header_or_by_the_cookie_it_sets() -> None:
    access = Access(TOKEN)
    assert access.allows(_request({"authorization": f"Bearer {TOKEN}"}))
    assert access.allows(_request({"authorization": f"bearer  {TOKEN} "}))
    assert access.allows(_request({"cookie": f"{COOKIE}={access.cookie()}"}))
    assert TOKEN not in access.cookie()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer "},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": "Bearer ünïcode-is-not-the-token"},
        {"cookie": f"{COOKIE}={TOKEN}"},  # the cookie holds an HMAC, not the token
        {"cookie": f"{COOKIE}=0"},
    ],
)
def test_anything_else_is_refused(headers: dict[str, str]) -> None:
    assert not Access(TOKEN).allows(_request(headers))


def test_an_admin_certificate_lets_in_unless_revoked_or_not_an_admin() -> None:
    revoked = {0x2B}
    access = Access(
        TOKEN, ("admin",), lambda name, serial: "revoked" if serial in revoked else None
    )
    assert access.allows(_request(cert=_cert("admin", "admin")))
    assert not access.allows(_request(cert=_cert("admin", "admin", "2B")))
    assert not access.allows(_request(cert=_cert("admin", "node")))  # a node named admin
    assert not access.allows(_request(cert=_cert("ops", "admin")))  # not one of the admins
    assert not access.allows(_request(cert=_cert("admin", "admin", "zz")))
    # without TLS (no revocation source) no certificate counts
    assert not Access(TOKEN).allows(_request(cert=_cert("admin", "admin")))


def test_the_token_file_is_made_private_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.token"
    token = load_token(path)
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_token(path) == token
    path.write_text("short\n")
    with pytest.raises(FedgeError, match="at least 16 printable ASCII characters, found 5"):
        load_token(path)
