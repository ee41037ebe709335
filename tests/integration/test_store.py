"""The model registry on a directory, on a real S3 server (moto's server mode, in its own
process) and on a real single-node Ceph RADOS Gateway: versions, tags and rollback,
signatures, tampering, interrupted and concurrent publishing, refused credentials, an
unreachable store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgspec
import numpy as np
import pytest

from fedge.launch import wait_for
from fedge.security import init_ca
from fedge.security.pki import release_key
from fedge.store import Registry, StoreError, Unreachable, open_registry
from fedge.store.backends import S3Backend
from fedge.store.cephrgw import CephRGW
from fedge.store.s3server import S3Server
from fedge.weights import to_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "s3", pytest.param("ceph", marks=pytest.mark.ceph)])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    server: S3Server | CephRGW = request.getfixturevalue(request.param)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"models-{request.node.name.split('[')[0][-20:].replace('_', '-')}"
    server.create_bucket(bucket)
    return f"s3://{bucket}/fleet-a"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    certs = tmp_path / "pki"
    init_ca(certs)
    return certs


def model_file(directory: Path, value: float, size: int = 1000) -> Path:
    path = directory / f"model-{value}.safetensors"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes({"w": np.full(size, value, np.float32)}))
    return path


def test_versions_tags_and_rollback(url: str, tmp_path: Path, keys: Path) -> None:
    registry = open_registry(url, sign_key=keys / "release.key", verify_keys=[keys / "release.pub"])
    parent = ""
    for r in range(1, 4):
        published = registry.publish(
            "digits", model_file(tmp_path / "m", r), f"run1-r{r}", run="run1", round=r,
            metrics={"accuracy": 0.5 + r / 10}, strategy="fedavg", parent=parent,
        )  # fmt: skip
        parent = published.version
    assert [m.version for m in registry.versions("digits")] == ["run1-r1", "run1-r2", "run1-r3"]
    assert registry.models() == ["digits"]
    assert registry.tags("digits") == {"latest": "run1-r3"}
    got = registry.pull("digits", "latest", tmp_path / "out.safetensors")
    assert got.round == 3 and got.parent == "run1-r2" and got.metrics == {"accuracy": 0.8}
    assert (tmp_path / "out.safetensors").read_bytes() == model_file(tmp_path / "m", 3).read_bytes()

    registry.tag("digits", "production", "run1-r1", by="operator")
    registry.tag("digits", "production", "run1-r2")
    registry.tag("digits", "production", "run1-r3")
    assert registry.rollback("digits", "production") == "run1-r2"
    assert registry.rollback("digits", "production") == "run1-r1"
    assert registry.tags("digits")["production"] == "run1-r1"
    with pytest.raises(StoreError, match="no earlier version than 'run1-r1'"):
        registry.rollback("digits", "production")
    with pytest.raises(StoreError, match="has no version 'nope'"):
        registry.tag("digits", "production", "nope")
    with pytest.raises(StoreError, match=r"model '\.\./etc': expected 1-128 letters"):
        registry.versions("../etc")

    # keep the newest one and what a tag points to; the rest goes, blobs included
    registry.tag("digits", "production", "run1-r2")
    with_blobs = {m.sha256 for m in registry.versions("digits")}
    assert registry.prune("digits", keep_last=1) == ["run1-r1"]
    assert [m.version for m in registry.versions("digits")] == ["run1-r2", "run1-r3"]
    assert len(with_blobs) == 3


@pytest.mark.parametrize("url", ["file", "s3"], indirect=True)  # many reads, nothing new on Ceph
def test_a_staged_rollout_moves_a_canary_first_then_everyone(url: str, tmp_path: Path) -> None:
    registry = open_registry(url)
    for v in ("v1", "v2", "v3"):
        registry.publish("m", model_file(tmp_path, float(v[1])), v, tags=())
    devices = [f"device-{i}" for i in range(200)]

    def serving(version: str, **labels: str) -> list[str]:
        return [
            d
            for d in devices
            if registry.resolve("m", "prod", device=d, labels=labels).version == version
        ]

    with pytest.raises(StoreError, match="a canary needs a stable version"):
        registry.tag("m", "prod", "v2", fraction=0.1)
    registry.tag("m", "prod", "v1")
    registry.tag("m", "prod", "v2", fraction=0.1)
    first = serving("v2")
    assert 8 <= len(first) <= 35, len(first)  # ~10% of 200
    registry.tag("m", "prod", "v2", fraction=0.5)  # the canary grows: nobody moves back
    wider = serving("v2")
    assert set(first) <= set(wider) and 70 <= len(wider) <= 130
    assert registry.resolve("m", "prod").version == "v1"  # no device: the stable one
    # by label: every device of plant-3, and only those
    registry.tag("m", "prod", "v3", labels={"site": "plant-3"})
    assert len(serving("v3", site="plant-3")) == len(devices)
    assert serving("v3", site="plant-4") == [] and len(serving("v1", site="plant-4")) == 200
    # promoted to all, then rolled back to where everyone was
    registry.tag("m", "prod", "v3")
    assert len(serving("v3")) == 200
    assert registry.rollback("m", "prod") == "v1"
    with pytest.raises(StoreError, match=r"a canary fraction is in \(0, 1\], got 1.5"):
        registry.tag("m", "prod", "v2", fraction=1.5)


def test_tampering_and_foreign_keys_are_refused(url: str, tmp_path: Path, keys: Path) -> None:
    signer = open_registry(url, sign_key=keys / "release.key")
    published = signer.publish("m", model_file(tmp_path, 1.0), "v1", metrics={"accuracy": 0.9})
    reader = open_registry(url, verify_keys=[keys / "release.pub"])
    assert reader.check("m", "v1").signature == published.signature

    # a manifest altered after signing (better metrics claimed)
    forged = msgspec.structs.replace(published, metrics={"accuracy": 0.99})
    signer.backend.put_bytes("models/m/versions/v1.json", msgspec.json.encode(forged))
    with pytest.raises(StoreError, match="signature does not match the manifest"):
        reader.check("m", "v1")
    # a replaced blob, with the genuine manifest
    signer.backend.put_bytes("models/m/versions/v1.json", msgspec.json.encode(published))
    signer.backend.put_bytes(published.blob, model_file(tmp_path, 2.0).read_bytes())
    with pytest.raises(StoreError, match=r"has SHA-256 .* the blob was tampered with"):
        reader.check("m", "v1")
    # another key's release, an unsigned one, a manifest that is not one
    other = tmp_path / "other"
    other.mkdir()
    release_key(other)
    open_registry(url, sign_key=other / "release.key").publish("m", model_file(tmp_path, 3.0), "v2")
    with pytest.raises(StoreError, match="not a trusted release key"):
        reader.check("m", "v2")
    Registry(signer.backend).publish("m", model_file(tmp_path, 4.0), "v3")
    with pytest.raises(StoreError, match="m/v3 is not signed"):
        reader.check("m", "v3")
    signer.backend.put_bytes("models/m/versions/v4.json", b'{"model": "m", "version": 7}')
    with pytest.raises(StoreError, match=r"v4\.json: not a valid manifest"):
        reader.manifest("m", "v4")
    signer.backend.put_bytes("models/m/versions/v5.json", msgspec.json.encode(published))
    with pytest.raises(StoreError, match="describes m/v1, not m/v5: the store was tampered"):
        reader.manifest("m", "v5")


PUBLISH_BIG = """
import sys
from pathlib import Path
from fedge.store import open_registry
open_registry(sys.argv[1]).publish("big", Path(sys.argv[2]), "v-big")
"""


def test_an_interrupted_publish_leaves_no_version(url: str, tmp_path: Path) -> None:
    """The publisher is killed while it uploads a 300 MB model: no version, no tag and no
    partial blob is ever visible; publishing again completes."""
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(300 << 20)  # over S3Backend.MULTIPART: uploaded in parts
    registry = open_registry(url)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PUBLISH_BIG), url, str(big)])
    if url.startswith("file://"):
        root = Path(url[len("file://") :])
        wait_for(lambda: any(root.rglob(".*.tmp")), "the upload to start", 30, 0.005)
    else:
        assert isinstance(registry.backend, S3Backend)
        wait_for(lambda: _multipart_started(registry.backend), "the upload to start", 30, 0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert registry.versions("big") == []
    assert registry.tags("big") == {}
    assert not registry.backend.list("blobs/"), registry.backend.list("blobs/")
    published = registry.publish("big", big, "v-big")
    assert registry.check("big", "latest") == published


def _multipart_started(backend: S3Backend) -> bool:
    uploads = backend.client.list_multipart_uploads(Bucket=backend.bucket, Prefix=backend.prefix)
    return bool(uploads.get("Uploads"))


def test_concurrent_publishers_and_readers(url: str, tmp_path: Path) -> None:
    registry = open_registry(url)
    registry.publish("m", model_file(tmp_path, 0.0), "seed")
    errors: list[BaseException] = []
    stop = threading.Event()

    def publisher(worker: int) -> None:
        try:
            for i in range(5):
                path = model_file(tmp_path / f"p{worker}", worker * 10 + i)
                registry.publish("m", path, f"w{worker}-v{i}")
        except BaseException as exc:
            errors.append(exc)

    def reader(worker: int) -> None:
        out = tmp_path / f"r{worker}.safetensors"
        try:
            while not stop.is_set():
                registry.pull("m", "latest", out)  # checked: whole and as described
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=publisher, args=(w,)) for w in range(3)]
    readers = [threading.Thread(target=reader, args=(w,)) for w in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    versions = {m.version for m in registry.versions("m")}
    assert versions == {"seed"} | {f"w{w}-v{i}" for w in range(3) for i in range(5)}
    assert registry.tags("m")["latest"] in versions
    assert len(registry.tag_moves("m", "latest")) == 16  # no move lost


@pytest.mark.ceph
def test_a_real_server_checks_the_credentials(
    ceph: CephRGW, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ceph RGW, unlike moto, checks the keys: wrong ones are a precise error, and a
    registry opened after the environment changed signs with the new keys, not with
    those an earlier client in this process found."""
    ceph.create_bucket("credentials")
    url = "s3://credentials/fleet"
    monkeypatch.setenv("AWS_ENDPOINT_URL", ceph.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError, match=rf"{url}: the store refused the credentials \(Sign"):
        open_registry(url).versions("m")
    with pytest.raises(StoreError, match=rf"{url}/blobs/sha256/.*: access denied \(403\)"):
        open_registry(url).publish("m", model_file(tmp_path, 1.0), "v1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(StoreError, match=r"refused the credentials \(InvalidAccessKeyId\)"):
        open_registry(url).tags("m")
    for key, value in ceph.env.items():
        monkeypatch.setenv(key, value)
    registry = open_registry(url)
    published = registry.publish("m", model_file(tmp_path, 2.0), "v1")
    assert registry.pull("m", "latest", tmp_path / "out.safetensors") == published
    # boto3's upload_file wraps the server's refusal in an exception of its own
    with pytest.raises(StoreError, match="s3://no-such-bucket/x: bucket 'no-such-bucket' does"):
        open_registry("s3://no-such-bucket/x").publish("m", model_file(tmp_path, 3.0), "v1")


@pytest.mark.ceph
def test_keys_from_a_profile_of_a_credentials_file(
    ceph: CephRGW, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[store] profile` and `credentials_file` (a mounted Secret, say): the registry signs
    with that profile's keys, not with the environment's, and a missing profile or file
    is named."""
    ceph.create_bucket("profiles")
    url = "s3://profiles/fleet"
    monkeypatch.setenv("AWS_ENDPOINT_URL", ceph.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # would be refused
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[fleet]\naws_access_key_id = {ceph.access_key}\n"
        f"aws_secret_access_key = {ceph.secret_key}\n"
    )
    registry = open_registry(url, profile="fleet", credentials_file=str(credentials))
    published = registry.publish("m", model_file(tmp_path, 1.0), "v1")
    assert registry.pull("m", "latest", tmp_path / "out.safetensors") == published
    with pytest.raises(StoreError, match=rf"{url}: no profile 'other' in the AWS credentials"):
        open_registry(url, profile="other", credentials_file=str(credentials))
    with pytest.raises(StoreError, match=rf"{url}: no credentials file {tmp_path}/missing"):
        open_registry(url, profile="fleet", credentials_file=str(tmp_path / "missing"))


def test_an_unreachable_store_is_a_precise_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.launch import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    registry = open_registry("s3://bucket/p", endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable, match=r"s3://bucket/p: Could not connect"):
        registry.publish("m", model_file(tmp_path, 1.0), "v1")
    with pytest.raises(StoreError, match="expected a file:///path or s3://bucket/prefix URL"):
        open_registry("ftp://host/x")
    with pytest.raises(StoreError, match="a file URL names a local path"):
        open_registry("file://relative/x")
    missing = open_registry(f"file://{tmp_path / 'empty'}")
    assert missing.versions("m") == []
    with pytest.raises(StoreError, match="model 'm' has no version 'latest'"):
        missing.resolve("m", "latest")
