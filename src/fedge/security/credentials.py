"""A PKI directory's files for one TLS endpoint, read without parsing them.

A node hands these bytes to gRPC, whose TLS checks them in the handshake; parsing them
here would load `cryptography` (~9 MiB that an idle node would keep for ever). The
checks that turn a refused handshake into a plain message live in `pki.load_credentials`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import FedgeError

CA_CERT_FILE = "ca.crt"
MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class PKIError(FedgeError):
    """A certificate or key is missing, invalid, or would be overwritten."""


@dataclass(frozen=True)
class Credentials:
    """PEM bytes for one TLS endpoint, ready for `grpc.ssl_*_credentials`."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


NEXT = ".next"
"""A renewed key or certificate waiting to replace the current one."""


def finish_replacement(directory: Path, name: str) -> None:
    """Move a renewed pair written as ``.next`` files into place (key first); after a
    crash half-way, the next call finishes it."""
    for suffix in (".key", ".crt"):
        pending = Path(directory) / f"{name}{suffix}{NEXT}"
        if pending.exists():
            os.replace(pending, Path(directory) / f"{name}{suffix}")


def read_credentials(directory: Path, name: str) -> Credentials:
    """`ca.crt`, `<name>.crt` and `<name>.key` of `directory`, as bytes."""
    directory = Path(directory)
    validate_name(name)
    if (directory / f"{name}.crt{NEXT}").exists():
        finish_replacement(directory, name)
    return Credentials(
        ca_pem=_read(directory / CA_CERT_FILE, "CA certificate", hint="copy ca.crt from the CA"),
        cert_pem=_read(
            directory / f"{name}.crt", "certificate", hint=f"issue one with issue(dir, {name!r})"
        ),
        key_pem=_read(
            directory / f"{name}.key", "private key", hint="it is written next to the .crt"
        ),
    )


def validate_name(name: str) -> None:
    """Check `name` is usable both as a CN and as a file name in the PKI directory."""
    if not isinstance(name, str) or not name:
        raise PKIError(f"certificate name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise PKIError(
            f"certificate name must be at most {MAX_NAME_LENGTH} characters, "
            f"got {len(name)}: {name[:20]!r}..."
        )
    if not _NAME_RE.fullmatch(name):
        bad = sorted({ch for ch in name if not _NAME_RE.fullmatch(ch)})
        raise PKIError(
            f"certificate name {name!r} may only contain letters, digits, '.', '_' and '-'; "
            f"found {''.join(bad)!r}"
        )
    if name in {".", ".."}:
        raise PKIError(f"certificate name {name!r} is not allowed (it is a directory name)")


def _read(path: Path, what: str, *, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{what} not found: {path} ({hint})") from None
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror}") from exc
