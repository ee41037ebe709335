"""Following a tag in the registry: the inference server serves the newest version the tag
names for this device, pulled with its signature and hash checked, loaded and warmed up
off the request path, then swapped in by one reference assignment — a request that
already holds the old model finishes on it.

The verified ONNX files are cached on disk with their manifests, so a device that
restarts while the store is unreachable serves what it served before (checked again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from fedge.errors import FedgeError
from fedge.serve.model import ServedModel
from fedge.store import Manifest, Registry
from fedge.store.registry import check_blob

log = logging.getLogger(__name__)

ARTIFACT = "onnx"
MIN_CHECK_SPACING = 0.2
"""Seconds between the starts of two store checks."""
EAGER_CHECKS, EAGER_SPACING = 5, 2.0
"""After `expect_new`: checks this many seconds apart until a new version is served."""
KEEP_CACHED = 2
"""Versions kept in the cache: the one served and the one before (a rollback's target)."""


class ModelFollower:
    """Polls `tag` of `model` every `interval` seconds, or at once when `check_now` is
    called (by a node on the device that saw a new global model, or an operator)."""

    def __init__(
        self,
        registry: Registry,
        model: str,
        tag: str,
        cache_dir: Path,
        *,
        device: str = "",
        labels: dict[str, str] | None = None,
        interval: float = 30.0,
        threads: int = 0,
    ) -> None:
        self.registry, self.model, self.tag = registry, model, tag
        self.device, self.labels = device, dict(labels or {})
        self.interval, self.threads = interval, threads
        self.cache = cache_dir / model
        self.current: ServedModel | None = None
        self.error = ""
        """Why the last check failed ("" when it did not): shown in the model listing."""
        self.checked_at = 0.0
        self.swaps = 0
        self.on_swap: list[Callable[[ServedModel], None]] = []
        self._requested = self._done = 0
        self._eager = 0
        self._changed = threading.Condition()
        self._poke = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedge-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._poke.set()
        self._thread.join(timeout=10)

    def expect_new(self) -> None:
        """A new version is on its way (a node saw a new global model): check now, and a
        few more times shortly after, since the server publishes it in the background."""
        self._eager = EAGER_CHECKS
        self._poke.set()

    def check_now(self, timeout: float = 30.0) -> bool:
        """Ask for a check and wait until one that began after this call has ended."""
        with self._changed:
            self._requested += 1
            wanted = self._requested
            self._poke.set()
            return self._changed.wait_for(lambda: self._done >= wanted, timeout)

    def _loop(self) -> None:
        first, started = True, 0.0
        while not self._stopping.is_set():
            spacing = MIN_CHECK_SPACING - (time.monotonic() - started)
            if spacing > 0:  # a flood of check_now calls cannot hammer the store
                self._stopping.wait(spacing)
            started = time.monotonic()
            with self._changed:
                target = self._requested
            self.check()
            if first and self.current is None:
                self._load_cached()
            first = False
            with self._changed:
                self._done = max(self._done, target)
                self._changed.notify_all()
            self._poke.wait(EAGER_SPACING if self._eager > 0 else self.interval)
            self._eager = max(0, self._eager - 1)
            self._poke.clear()

    def check(self) -> None:
        """Resolve the tag; load and swap in the version it names if it is a new one."""
        try:
            manifest = self.registry.resolve(
                self.model, self.tag, device=self.device, labels=self.labels
            )
            current = self.current
            if current is None or current.version != manifest.version:
                self._swap(self._fetch(manifest))
            self._set_error("")
        except (FedgeError, OSError) as exc:  # OSError: the cache's disk (full, read-only)
            self._set_error(str(exc))
        except Exception as exc:  # never let the follower die: it is the only one
            log.exception("model %s: checking the store failed", self.model)
            self._set_error(f"{type(exc).__name__}: {exc}")
        finally:
            self.checked_at = time.time()

    def _fetch(self, manifest: Manifest) -> ServedModel:
        artifact = manifest.artifacts.get(ARTIFACT)
        if artifact is None:
            raise FedgeError(
                f"{self.model}/{manifest.version} has no ONNX file to serve: publish it from "
                "a run whose app has onnx_model, or attach one with `fedge export --store`"
            )
        path = self.cache / f"{manifest.version}.onnx"
        try:
            self.registry.verify(manifest)
            check_blob(path, artifact, f"cached {manifest.version}", str(self.cache))
        except (OSError, FedgeError):
            self.registry.pull_manifest(manifest, path, artifact=ARTIFACT)
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.cache / f"{manifest.version}.json").write_bytes(msgspec.json.encode(manifest))
        return ServedModel.load(
            path, self.model, manifest.version, manifest=manifest, threads=self.threads
        )

    def _swap(self, model: ServedModel) -> None:
        old, self.current = self.current, model
        self._eager = 0
        self.swaps += 1
        (self.cache / "current").write_text(model.version)
        log.info(
            "serving %s/%s (was %s)", self.model, model.version, old.version if old else "nothing"
        )
        self._prune()
        for callback in self.on_swap:
            callback(model)

    def _load_cached(self) -> None:
        """At start with the store unreachable: the version served last, checked again."""
        try:
            version = (self.cache / "current").read_text().strip()
            manifest = msgspec.json.decode(
                (self.cache / f"{version}.json").read_bytes(), type=Manifest
            )
        except (OSError, msgspec.MsgspecError):
            return  # nothing cached, or not readable: wait for the store
        try:
            self.registry.verify(manifest)
            check_blob(
                self.cache / f"{version}.onnx",
                manifest.artifacts[ARTIFACT],
                f"cached {version}",
                str(self.cache),
            )
            self._swap(
                ServedModel.load(
                    self.cache / f"{version}.onnx",
                    self.model,
                    version,
                    manifest=manifest,
                    threads=self.threads,
                )
            )
            log.warning("store unreachable: serving the cached %s/%s", self.model, version)
        except (OSError, KeyError, FedgeError) as exc:
            log.warning("the cached %s/%s is not served: %s", self.model, version, exc)

    def _prune(self) -> None:
        onnx = sorted(self.cache.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        keep = {self.current.version} if self.current else set()
        for path in onnx:
            if path.stem in keep or len(keep) < KEEP_CACHED:
                keep.add(path.stem)
                continue
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)

    def _set_error(self, error: str) -> None:
        if error and error != self.error:
            log.warning(
                "model %s tag %s: %s (serving %s)",
                self.model,
                self.tag,
                error,
                self.current.version if self.current else "nothing yet",
            )
        self.error = error
