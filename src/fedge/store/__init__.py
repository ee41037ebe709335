"""The model registry: trained models as signed, content-addressed versions with tags,
in a directory (``file:///path``: local disk, NFS, GlusterFS, CephFS) or an S3 bucket
(``s3://bucket/prefix``: AWS, Ceph RGW, MinIO). See `registry` for the layout."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedge.store.backends import NotFound, StoreError, Unreachable, open_backend
from fedge.store.registry import Manifest, Registry


def open_registry(
    url: str,
    *,
    endpoint: str = "",
    region: str = "",
    profile: str = "",
    credentials_file: str = "",
    sign_key: Path | None = None,
    verify_keys: Iterable[Path] = (),
) -> Registry:
    """The registry at `url` (`endpoint` ... `credentials_file`: `open_backend`'s); it
    signs what it publishes with `sign_key` and, given `verify_keys`, loads only models
    signed by one of them."""
    from fedge.store.signing import Signer, Verifier

    keys = list(verify_keys)
    return Registry(
        open_backend(
            url,
            endpoint=endpoint,
            region=region,
            profile=profile,
            credentials_file=credentials_file,
        ),
        sign=Signer(sign_key) if sign_key is not None else None,
        verify=Verifier(keys) if keys else None,
    )


__all__ = ["Manifest", "NotFound", "Registry", "StoreError", "Unreachable", "open_registry"]
