"""Security: the project CA and certificates that give every node its identity.

Exports load on first use (PEP 562): a node reads its credentials through
`fedge.security.credentials` and never loads `cryptography`, which `pki` needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedge.security.credentials import Credentials, PKIError, validate_name
    from fedge.security.pki import ca_pin, init_ca, issue, load_credentials

_EXPORTS = {
    "Credentials": "credentials",
    "PKIError": "credentials",
    "validate_name": "credentials",
    "ca_pin": "pki",
    "init_ca": "pki",
    "issue": "pki",
    "load_credentials": "pki",
}
__all__ = [
    "Credentials",
    "PKIError",
    "ca_pin",
    "init_ca",
    "issue",
    "load_credentials",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedge.security' has no attribute {name!r}")
    return getattr(import_module(f"fedge.security.{module}"), name)
