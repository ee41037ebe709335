"""The model registry: versions of named models in a backend, with tags.

Layout (every key under the store's URL)::

    blobs/sha256/HEX                          model files (safetensors), by content
    models/MODEL/versions/VERSION.json        one manifest per version
    models/MODEL/tags/TAG/NANOS-RANDOM.json   a tag's moves, newest last

A version is committed by writing its manifest after its blob, so a reader never sees a
version whose blob is missing or partial. A tag is never rewritten in place: each move
is a new small object, and the tag points where its newest move says. Concurrent
publishers and taggers therefore need no locks or conditional writes (which not every
S3 implementation has), and the moves are the history `rollback` walks back through.
Manifests and moves read from a store are validated like any input: a store can be
tampered with (signatures, `fedge.store.signing`, say whether it was).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec

from fedge.store.backends import Backend, NotFound, StoreError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME)]
MAX_MANIFEST = 64 << 10
MAX_METRICS = 64
BLOB_GRACE = 3600.0
"""Seconds an unreferenced blob is kept: a publisher may be about to commit it."""
TAG_MOVES_KEPT = 50


class Artifact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Another file of a version, e.g. its ONNX export: by content, like the model."""

    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, msgspec.Meta(ge=0)]


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a version is: its file (by SHA-256 and size) and where it came from."""

    model: Name
    version: Name
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, msgspec.Meta(ge=0)]
    created: float
    run: str = ""
    round: int = 0
    metrics: Annotated[dict[str, float], msgspec.Meta(max_length=MAX_METRICS)] = {}
    strategy: str = ""
    parent: str = ""
    """The version published before this one by the same run ("" for the first)."""
    artifacts: Annotated[dict[Name, Artifact], msgspec.Meta(max_length=16)] = {}
    """Files made from the model, by kind (``onnx``: the app's inference graph)."""
    format: int = 1
    key_id: str = ""
    signature: str = ""
    """Ed25519 over `signed_bytes()`, hex; empty when unsigned."""

    def signed_bytes(self) -> bytes:
        """The canonical bytes a signature covers: the manifest without its signature."""
        fields = msgspec.structs.asdict(self)
        del fields["signature"]
        return msgspec.json.encode(dict(sorted(fields.items())))

    @property
    def blob(self) -> str:
        return blob_key(self.sha256)


class Canary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A staged move: only the devices it selects follow the tag to the new version;
    the rest stay on `stable` until a plain move promotes it to all."""

    stable: Name
    fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of devices, chosen by a hash of (model, tag, version, device): stable as
    the fraction grows, and different for each new version."""
    labels: Annotated[dict[str, str], msgspec.Meta(max_length=16)] = {}
    """Only devices with all these labels (and, with a fraction, only that share)."""

    def selects(self, key: str, device: str, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.labels.items()):
            return False
        if self.fraction <= 0:
            return bool(self.labels)  # labels alone: every device that has them
        digest = hashlib.sha256(f"{key}/{device}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction


class TagMove(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tag: Name
    version: Name
    at: float
    by: str = ""
    canary: Canary | None = None


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


def check_name(value: str, what: str) -> str:
    if not re.match(NAME, value):
        raise StoreError(
            f"{what} {value!r}: expected 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class Registry:
    """Named models in one backend. `sign` (a `Signer`) signs what `publish` writes;
    `verify` (a callable raising on a bad signature) checks what `pull` reads."""

    def __init__(
        self,
        backend: Backend,
        *,
        sign: Callable[[Manifest], Manifest] | None = None,
        verify: Callable[[Manifest], None] | None = None,
    ) -> None:
        self.backend, self._sign, self._verify = backend, sign, verify

    @property
    def url(self) -> str:
        return self.backend.url

    # --- reading ---------------------------------------------------------------------

    def models(self) -> list[str]:
        names = {e.key.split("/")[1] for e in self.backend.list("models/")}
        return sorted(n for n in names if re.match(NAME, n))

    def versions(self, model: str) -> list[Manifest]:
        """Every committed version of `model`, oldest first."""
        prefix = f"models/{check_name(model, 'model')}/versions/"
        found = []
        for entry in self.backend.list(prefix):
            if entry.key.endswith(".json"):
                found.append(self.manifest(model, entry.key[len(prefix) : -len(".json")]))
        return sorted(found, key=lambda m: (m.created, m.version))

    def manifest(self, model: str, version: str) -> Manifest:
        key = _manifest_key(model, version)
        try:
            data = self.backend.get_bytes(key, MAX_MANIFEST)
        except NotFound:
            raise NotFound(f"model {model!r} has no version {version!r} in {self.url}") from None
        try:
            manifest = msgspec.json.decode(data, type=Manifest)
        except msgspec.ValidationError as exc:
            raise StoreError(f"{self.url}/{key}: not a valid manifest: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise StoreError(f"{self.url}/{key}: not JSON: {exc}") from exc
        if (manifest.model, manifest.version) != (model, version):
            raise StoreError(
                f"{self.url}/{key} describes {manifest.model}/{manifest.version}, "
                f"not {model}/{version}: the store was tampered with"
            )
        return manifest

    def tags(self, model: str) -> dict[str, str]:
        """Each tag of `model` and the version it points to."""
        prefix = f"models/{check_name(model, 'model')}/tags/"
        names = {e.key[len(prefix) :].split("/")[0] for e in self.backend.list(prefix)}
        current = {}
        for name in sorted(n for n in names if re.match(NAME, n)):
            moves = self.tag_moves(model, name)
            if moves:
                current[name] = moves[-1].version
        return current

    def tag_moves(self, model: str, tag: str, last: int = TAG_MOVES_KEPT) -> list[TagMove]:
        """The `last` moves of `tag`, oldest first."""
        prefix = f"models/{check_name(model, 'model')}/tags/{check_name(tag, 'tag')}/"
        moves = []
        for entry in self.backend.list(prefix)[-last:]:
            try:
                move = msgspec.json.decode(
                    self.backend.get_bytes(entry.key, MAX_MANIFEST), type=TagMove
                )
            except NotFound:
                continue  # pruned meanwhile
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise StoreError(f"{self.url}/{entry.key}: not a valid tag move: {exc}") from exc
            if move.tag != tag:
                raise StoreError(f"{self.url}/{entry.key} moves tag {move.tag!r}, not {tag!r}")
            moves.append(move)
        return moves

    def resolve(
        self, model: str, ref: str, *, device: str = "", labels: dict[str, str] | None = None
    ) -> Manifest:
        """The version `ref` names for `device` (with `labels`): a tag of `model` — in a
        staged move, its new version if the canary selects the device, else the stable
        one — or a version."""
        check_name(ref, "version or tag")
        moves = self.tag_moves(model, ref, last=1)
        if not moves:
            return self.manifest(model, ref)
        last = moves[-1]
        version = last.version
        if last.canary is not None and not last.canary.selects(
            f"{model}/{ref}/{last.version}", device, labels or {}
        ):
            version = last.canary.stable
        return self.manifest(model, version)

    def pull(self, model: str, ref: str, out: Path, *, artifact: str = "") -> Manifest:
        """Download the version `ref` names (or its `artifact`, e.g. ``onnx``) to `out`,
        checked (size, SHA-256 and, with `verify`, signature) before it appears there."""
        return self.pull_manifest(self.resolve(model, ref), out, artifact=artifact)

    def verify(self, manifest: Manifest) -> None:
        """Raise `StoreError` unless `manifest` is signed by a trusted key (with `verify`)."""
        if self._verify is not None:
            self._verify(manifest)

    def pull_manifest(self, manifest: Manifest, out: Path, *, artifact: str = "") -> Manifest:
        self.verify(manifest)
        file = Artifact(manifest.sha256, manifest.size)
        if artifact:
            found = manifest.artifacts.get(artifact)
            if found is None:
                raise NotFound(
                    f"{manifest.model}/{manifest.version} has no {artifact!r} file (it has: "
                    f"{', '.join(sorted(manifest.artifacts)) or 'only the model'})"
                )
            file = found
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as f:
            tmp = Path(f.name)
        try:
            self.backend.get_file(blob_key(file.sha256), tmp)
            what = f"{manifest.model}/{manifest.version}" + (f" ({artifact})" if artifact else "")
            check_blob(tmp, file, what, self.url)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        return manifest

    def check(self, model: str, ref: str) -> Manifest:
        """Whether a version is whole and genuine: its blob's size and hash, and its
        signature with `verify`. Raises `StoreError` saying what is wrong."""
        with tempfile.TemporaryDirectory(prefix="fedge-verify-") as tmp:
            return self.pull(model, ref, Path(tmp) / "model.safetensors")

    # --- writing ---------------------------------------------------------------------

    def publish(
        self,
        model: str,
        path: Path,
        version: str,
        *,
        run: str = "",
        round: int = 0,
        metrics: dict[str, float] | None = None,
        strategy: str = "",
        parent: str = "",
        tags: tuple[str, ...] = ("latest",),
        artifacts: dict[str, Path] | None = None,
    ) -> Manifest:
        """Store the model file at `path` as `version` of `model`, then move `tags` to
        it. Publishing the same version again is harmless (same blob, same key)."""
        check_name(model, "model")
        check_name(version, "version")
        sha, size = file_digest(path)
        files = {path: sha}
        extra = {}
        for kind, file in (artifacts or {}).items():
            check_name(kind, "artifact")
            digest, length = file_digest(file)
            extra[kind], files[file] = Artifact(digest, length), digest
        manifest = Manifest(
            model=model,
            version=version,
            sha256=sha,
            size=size,
            created=time.time(),
            run=run,
            round=round,
            metrics=dict(list((metrics or {}).items())[:MAX_METRICS]),
            strategy=strategy,
            parent=parent,
            artifacts=extra,
        )
        if self._sign is not None:
            manifest = self._sign(manifest)
        for file, digest in files.items():  # every file before the manifest commits
            if not self.backend.exists(blob_key(digest)):
                self.backend.put_file(blob_key(digest), file)
        self.backend.put_bytes(_manifest_key(model, version), msgspec.json.encode(manifest))
        for tag in tags:
            self.tag(model, tag, version, by="publish")
        return manifest

    def tag(
        self,
        model: str,
        tag: str,
        version: str,
        *,
        by: str = "",
        fraction: float = 0.0,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Point `tag` at `version` (which must exist); with a `fraction` of devices or
        `labels`, only for those (a canary), the rest staying where the tag was."""
        check_name(tag, "tag")
        self.manifest(model, version)
        canary = None
        if not 0 <= fraction <= 1:
            raise StoreError(f"a canary fraction is in (0, 1], got {fraction}")
        if fraction or labels:
            moves = self.tag_moves(model, tag)
            if not moves:
                raise StoreError(
                    f"tag {tag!r} of {model!r} points nowhere yet: a canary needs a stable "
                    "version to keep the other devices on"
                )
            last = moves[-1]
            stable = last.canary.stable if last.canary is not None else last.version
            canary = Canary(stable, fraction, dict(labels or {}))
        move = TagMove(tag, version, time.time(), by[:200], canary)
        key = f"models/{model}/tags/{tag}/{time.time_ns():020d}-{secrets.token_hex(4)}.json"
        self.backend.put_bytes(key, msgspec.json.encode(move))

    def rollback(self, model: str, tag: str, *, by: str = "") -> str:
        """Point `tag` back at the version it pointed to before its current one."""
        moves = self.tag_moves(model, tag)
        if not moves:
            raise NotFound(f"model {model!r} has no tag {tag!r} in {self.url}")
        current = moves[-1].version
        # walk back past the moves that rollbacks themselves made
        history = _effective_history(moves)
        previous = next((v for v in reversed(history[:-1]) if v != current), None)
        if previous is None:
            raise StoreError(f"tag {tag!r} of {model!r} has no earlier version than {current!r}")
        self.tag(model, tag, previous, by=f"rollback {by}".strip())
        return previous

    def prune(
        self, model: str, keep_last: int, keep: set[str] | frozenset[str] = frozenset()
    ) -> list[str]:
        """Delete all but the newest `keep_last` versions, the versions any tag points
        to and those in `keep`; then blobs no manifest refers to (older than an hour:
        a publisher may be about to commit one). Returns the deleted versions."""
        versions = self.versions(model)
        tagged = set(self.tags(model).values())
        newest = {m.version for m in versions[-keep_last:]} if keep_last > 0 else set()
        deleted = []
        for m in versions:
            if m.version not in newest | tagged | set(keep):
                self.backend.delete(_manifest_key(model, m.version))
                deleted.append(m.version)
        for tag in self.tags(model):
            prefix = f"models/{model}/tags/{tag}/"
            for entry in self.backend.list(prefix)[:-TAG_MOVES_KEPT]:
                self.backend.delete(entry.key)
        self._collect_blobs()
        return deleted

    def _collect_blobs(self) -> None:
        referenced = set()
        for name in self.models():
            for m in self.versions(name):
                referenced |= {m.sha256, *(a.sha256 for a in m.artifacts.values())}
        now = time.time()
        for entry in self.backend.list("blobs/sha256/"):
            sha = entry.key.rsplit("/", 1)[1]
            if sha not in referenced and now - entry.modified > BLOB_GRACE:
                self.backend.delete(entry.key)


def _effective_history(moves: list[TagMove]) -> list[str]:
    """The versions a tag stood at for the fleet at large (a canary move leaves it on
    its stable version), where a rollback undoes the move before it."""
    stack: list[str] = []
    for move in moves:
        version = move.canary.stable if move.canary is not None else move.version
        if move.by.startswith("rollback") and len(stack) >= 2 and stack[-2] == version:
            stack.pop()
        else:
            stack.append(version)
    return stack


def _manifest_key(model: str, version: str) -> str:
    return f"models/{check_name(model, 'model')}/versions/{check_name(version, 'version')}.json"


def file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def check_blob(path: Path, expected: Artifact, what: str, where: str) -> None:
    sha, size = file_digest(path)
    if size != expected.size:
        raise StoreError(
            f"{where}: {what} is {size} bytes, its manifest says {expected.size}: the blob "
            "is incomplete or was replaced"
        )
    if sha != expected.sha256:
        raise StoreError(
            f"{where}: {what} has SHA-256 {sha}, its manifest says {expected.sha256}: the "
            "blob was tampered with"
        )
