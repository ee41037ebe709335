"""Where a model registry keeps its objects: a POSIX directory or an S3 bucket.

A backend stores whole objects under keys and nothing else: each write is atomic (a
reader sees the old object, the new one, or none — never part of one), so the registry
can commit a version by writing its manifest last. A directory backend writes a
temporary file, fsyncs and renames it; S3 makes an object visible only when its upload
(multipart for large ones) completes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fedge.errors import FedgeError


class StoreError(FedgeError):
    """The store refused or failed an operation."""


class NotFound(StoreError):
    pass


class Unreachable(StoreError):
    """The store could not be reached: worth retrying later."""


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    modified: float


class Backend(Protocol):
    url: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str, limit: int) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str) -> list[Entry]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...


def open_backend(
    url: str,
    *,
    endpoint: str = "",
    region: str = "",
    profile: str = "",
    credentials_file: str = "",
) -> Backend:
    """A backend for ``file:///path`` or ``s3://bucket/prefix`` (`endpoint`: an S3 API
    other than AWS, e.g. Ceph RGW or MinIO; also from ``AWS_ENDPOINT_URL``; `profile` and
    `credentials_file`: where boto3 finds the keys, else the usual AWS variables and files)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store {url!r}: a file URL names a local path (file:///path)")
        return FileBackend(Path(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StoreError(f"store {url!r}: expected s3://BUCKET/PREFIX")
        return S3Backend(
            parts.netloc, parts.path.strip("/"), endpoint=endpoint, region=region,
            profile=profile, credentials_file=credentials_file,
        )  # fmt: skip
    raise StoreError(f"store {url!r}: expected a file:///path or s3://bucket/prefix URL")


class FileBackend:
    """Objects as files under `root`: a local disk, NFS, GlusterFS or CephFS mount."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise StoreError(f"store path {root} must be absolute (file:///path)")
        self.root = root
        self.url = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._writing(key) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._writing(key) as f, path.open("rb") as src:
            while block := src.read(1 << 20):
                f.write(block)

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[Any]:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            try:
                with tmp.open("wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _os_error(self.url, key, exc) from exc

    def get_bytes(self, key: str, limit: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise _os_error(self.url, key, exc) from exc
        if len(data) > limit:
            raise StoreError(f"{self.url}/{key} is larger than {limit} bytes")
        return data

    def get_file(self, key: str, path: Path) -> None:
        try:
            with self._path(key).open("rb") as src, path.open("wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        except OSError as exc:
            raise _os_error(self.url, key, exc) from exc

    def list(self, prefix: str) -> list[Entry]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            if path.name.startswith(".") or not path.is_file():
                continue  # temporaries being written
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                st = path.stat()
                found.append(Entry(str(path.relative_to(self.root)), st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _os_error(self.url, key, exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


def _os_error(url: str, key: str, exc: OSError) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{url}/{key} does not exist")
    return StoreError(f"{url}/{key}: {exc.strerror or exc}")


class S3Backend:
    """Objects in an S3 bucket under a prefix, with boto3: AWS S3, Ceph RGW, MinIO.
    Credentials and region come from the usual AWS variables and files, or from the
    `profile` of a shared `credentials_file`."""

    MULTIPART = 256 << 20
    """Smaller objects go in one PUT (faster than parts here); larger in 64 MiB parts."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str = "",
        region: str = "",
        profile: str = "",
        credentials_file: str = "",
    ) -> None:
        try:
            import boto3
            import botocore.session
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
            from botocore.exceptions import ProfileNotFound
        except ImportError as exc:
            raise StoreError("an s3:// store needs boto3: pip install 'fedge[s3]'") from exc
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # every blob is checked end to end by its SHA-256 in the manifest: the extra
            # CRC botocore adds to each request costs a pass over the data for nothing
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default one resolves credentials once per process
        # and keeps them, so a backend made after the environment changed (another store,
        # renewed keys) would sign with stale keys, which only a real server refuses.
        core = botocore.session.Session()
        if credentials_file:
            if not Path(credentials_file).is_file():
                raise StoreError(f"{self.url}: no credentials file {credentials_file}")
            core.set_config_variable("credentials_file", credentials_file)
        try:
            session = boto3.session.Session(botocore_session=core, profile_name=profile or None)
        except ProfileNotFound as exc:
            raise StoreError(
                f"{self.url}: no profile {profile!r} in the AWS credentials or config files"
                f" ({credentials_file or core.get_config_variable('credentials_file')})"
            ) from exc
        self.client = session.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region or None,
            config=config,
        )
        self.transfer = TransferConfig(
            multipart_threshold=self.MULTIPART, multipart_chunksize=64 << 20, max_concurrency=4
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return call(*args, **kwargs)
        except NoCredentialsError as exc:
            raise StoreError(
                f"{self.url}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from exc
        except S3UploadFailedError as exc:  # upload_file wraps the server's refusal
            if isinstance(exc.__context__, ClientError):
                raise self._refused(key, exc.__context__) from exc
            raise StoreError(f"{self.url}/{key}: {exc}") from exc
        except ClientError as exc:
            raise self._refused(key, exc) from exc
        except BotoCoreError as exc:
            raise Unreachable(f"{self.url}: {exc}") from exc

    def _refused(self, key: str, exc: Any) -> StoreError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        said = f"{code} {error.get('Message') or ''}".strip()
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(f"{self.url}/{key} does not exist")
        if code == "NoSuchBucket":
            return StoreError(f"{self.url}: bucket {self.bucket!r} does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StoreError(
                f"{self.url}: the store refused the credentials ({code}): check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if code in ("403", "AccessDenied"):  # a HEAD's refusal has no body, only the status
            return StoreError(
                f"{self.url}/{key}: access denied ({code}): check the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"
            )
        if code.startswith("5") or code in ("SlowDown", "ServiceUnavailable"):
            return Unreachable(f"{self.url}/{key}: {said}")
        return StoreError(f"{self.url}/{key}: {said}")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self._call(
            key, self.client.upload_file, str(path), self.bucket, self._key(key),
            Config=self.transfer,
        )  # fmt: skip

    def get_bytes(self, key: str, limit: int) -> bytes:
        reply = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        if int(reply.get("ContentLength", 0)) > limit:
            reply["Body"].close()
            raise StoreError(f"{self.url}/{key} is larger than {limit} bytes")
        return bytes(self._call(key, reply["Body"].read, limit + 1))

    def get_file(self, key: str, path: Path) -> None:
        self._call(
            key, self.client.download_file, self.bucket, self._key(key), str(path),
            Config=self.transfer,
        )  # fmt: skip

    def list(self, prefix: str) -> list[Entry]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix)
        skip = len(self._key(""))
        found = []

        def pages() -> list[Any]:
            return list(paginator.paginate(Bucket=self.bucket, Prefix=full))

        for page in self._call(prefix, pages):
            for item in page.get("Contents", []):
                found.append(
                    Entry(item["Key"][skip:], int(item["Size"]), item["LastModified"].timestamp())
                )
        return sorted(found, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True
