"""Signed releases: the server signs each manifest it publishes with the CA's Ed25519
release key (`fedge.security.pki.release_key`); whoever loads a model checks the
signature against the release public keys it trusts. The manifest holds the blob's
SHA-256 and size, so a good signature plus a checked blob means the model is the one the
server published — whatever the store, or anyone with write access to it, did since.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import msgspec

from fedge.store.backends import StoreError
from fedge.store.registry import Manifest


def _key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


class Signer:
    def __init__(self, key_path: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise StoreError(f"{key_path} is not an Ed25519 private key")
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = _key_id(raw)

    def __call__(self, manifest: Manifest) -> Manifest:
        unsigned = msgspec.structs.replace(manifest, key_id=self.key_id, signature="")
        signature = self._key.sign(unsigned.signed_bytes()).hex()
        return msgspec.structs.replace(unsigned, signature=signature)


class Verifier:
    """Accepts manifests signed by one of `public_keys` (PEM files), refuses the rest."""

    def __init__(self, public_keys: Iterable[Path]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for path in public_keys:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise StoreError(f"release key {path}: {exc}") from exc
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise StoreError(f"release key {path} is not an Ed25519 public key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self._keys[_key_id(raw)] = key
        if not self._keys:
            raise StoreError("no release public key to verify models with")

    def __call__(self, manifest: Manifest) -> None:
        from cryptography.exceptions import InvalidSignature

        what = f"{manifest.model}/{manifest.version}"
        if not manifest.signature:
            raise StoreError(f"{what} is not signed; only signed releases are loaded")
        key = self._keys.get(manifest.key_id)
        if key is None:
            raise StoreError(
                f"{what} is signed by key {manifest.key_id!r}, which is not a trusted release "
                f"key (trusted: {', '.join(sorted(self._keys))})"
            )
        try:
            key.verify(bytes.fromhex(manifest.signature), manifest.signed_bytes())
        except (InvalidSignature, ValueError):
            raise StoreError(
                f"{what}: the signature does not match the manifest: it was altered after signing"
            ) from None
