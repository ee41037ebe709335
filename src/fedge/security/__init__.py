"""Security: the project CA and certificates that give every node its identity."""

from fedge.security.pki import (
    Credentials,
    PKIError,
    identity_from_cert_pem,
    init_ca,
    issue,
    load_credentials,
    validate_name,
)

__all__ = [
    "Credentials",
    "PKIError",
    "identity_from_cert_pem",
    "init_ca",
    "issue",
    "load_credentials",
    "validate_name",
]
