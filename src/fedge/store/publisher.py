"""The server's side of the registry: each finished round's model, published in the
background as ``[store]`` says, so a slow or unreachable store never holds up training.

A model to publish is first written to the run's spool (``runs/ID/publish/``,
atomically: weights, then its record), so nothing waits in memory and a server killed
before its upload finished publishes it after the restart. A thread uploads the oldest
spooled model, retrying with backoff while the store fails and saying so; while it
fails, only the newest `keep` models are kept waiting (what a store that comes back
should get), so the spool does not grow with the outage. After each publish it moves ``latest`` (and
``best``, by ``best_metric``) and prunes to the newest `keep` versions plus tagged ones.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from fedge.app import App
from fedge.config import StoreSection
from fedge.errors import FedgeError
from fedge.history import RoundRecord
from fedge.store.backends import StoreError, Unreachable
from fedge.store.registry import Registry
from fedge.weights import Weights, to_file

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


class Publisher:
    def __init__(
        self,
        registry: Registry,
        section: StoreSection,
        run_id: str,
        spool: Path,
        strategy: str,
        app: App | None = None,
    ) -> None:
        """With an `app` that has an inference graph (`App.onnx_model`), each version
        also carries its ONNX export, made here (off the round's path), so a device
        serves it with ONNX Runtime alone."""
        self.registry, self.section, self.run_id = registry, section, run_id
        self.app = app if app is not None and app.onnx_model is not None else None
        self.spool, self.strategy = spool, strategy
        self.spool.mkdir(parents=True, exist_ok=True)
        self.published: list[str] = []
        """Versions this process published, in order."""
        self.error = ""
        """The store's last error while models wait, for status; "" when all is well."""
        self._parent: str | None = None
        self._best: float | None = None
        self._current: Path | None = None
        """The spooled model being uploaded: never trimmed."""
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fedge-publish", daemon=True)
        self._thread.start()

    def version_of(self, round: int) -> str:
        return f"{self.run_id}-r{round:06d}"

    def due(self, round: int, last: int) -> bool:
        return round % self.section.every == 0 or round == last

    def submit(self, record: RoundRecord, weights: Weights) -> None:
        """Spool round `record.round`'s model for publishing (returns once it is on disk)."""
        base = self.spool / f"{record.round:06d}"
        to_file(weights, base.with_suffix(".safetensors"))
        meta = {"round": record.round, "metrics": dict(record.metrics)}
        tmp = base.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(base.with_suffix(".json"))  # the commit: a model with its record
        self._trim()
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float) -> None:
        """Publish what waits, for up to `timeout` seconds (a failing store gets one
        more try at once); what is left stays spooled and is published by the next
        start of this run."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)
        left = self._waiting()
        if left:
            log.warning(
                "model store %s: %d model(s) not published yet (%s); they are kept in %s and "
                "published when this run is served again",
                self.registry.url, len(left), self.error or "still uploading", self.spool,
            )  # fmt: skip

    # --- the thread -------------------------------------------------------------------

    def _waiting(self) -> list[Path]:
        return sorted(self.spool.glob("*.json"))

    def _trim(self) -> None:
        if not self.error:
            return
        waiting = [m for m in self._waiting() if m != self._current]
        for meta in waiting[: -self.section.keep]:
            log.warning(
                "model store %s: dropping unpublished round %s", self.registry.url, meta.stem
            )
            self._remove(meta)

    def _remove(self, meta: Path) -> None:
        meta.unlink(missing_ok=True)
        meta.with_suffix(".safetensors").unlink(missing_ok=True)
        meta.with_suffix(".onnx").unlink(missing_ok=True)

    def _onnx(self, weights: Path) -> dict[str, Path]:
        """The version's ONNX export, or none if the app has no graph or it fails (then
        the models are published without, and it says why once)."""
        if self.app is None:
            return {}
        out = weights.with_suffix(".onnx")
        if not out.exists():
            from fedge.serve.export import export_onnx, read_weights

            try:
                export_onnx(self.app, read_weights(weights), out, source=str(weights))
            except FedgeError as exc:
                log.error("models are published without ONNX: %s", exc)
                self.app = None
                return {}
        return {"onnx": out}

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._wake:
                while not self._waiting() and not self._closing:
                    self._wake.wait()
                if not self._waiting():
                    return
            meta = self._current = self._waiting()[0]
            try:
                self._publish(meta)
            except Exception as exc:  # the store's, or e.g. a spool file gone: say, retry
                self._current = None
                first = not self.error
                self.error = str(exc) or type(exc).__name__
                self._trim()
                expected = isinstance(exc, StoreError)
                log.log(
                    logging.WARNING if expected and (first or isinstance(exc, Unreachable))
                    else logging.ERROR,
                    "model store %s: could not publish round %s (%s); training goes on, "
                    "retrying in %.0f s",
                    self.registry.url, meta.stem, self.error, backoff,
                    exc_info=not expected,
                )  # fmt: skip
                with self._wake:
                    if self._closing:
                        return
                    self._wake.wait(backoff)  # `close` wakes it for one last try
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            self._current = None
            if self.error:
                log.warning("model store %s is reachable again", self.registry.url)
            self.error, backoff = "", 1.0
            self._remove(meta)

    def _publish(self, meta_path: Path) -> None:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        round = int(meta["round"])
        metrics = {k: float(v) for k, v in meta["metrics"].items()}
        version = self.version_of(round)
        section, registry = self.section, self.registry
        if self._parent is None:  # first publish of this process: what came before
            self._parent, self._best = self._before()
        tags = ["latest"]
        value = metrics.get(section.best_metric) if section.best_metric else None
        if value is not None and (
            self._best is None
            or (value > self._best if section.best_mode == "max" else value < self._best)
        ):
            tags.append("best")
        registry.publish(
            section.model,
            meta_path.with_suffix(".safetensors"),
            version,
            run=self.run_id,
            round=round,
            metrics=metrics,
            strategy=self.strategy,
            parent=self._parent if self._parent != version else "",
            tags=tuple(tags),
            artifacts=self._onnx(meta_path.with_suffix(".safetensors")),
        )
        if "best" in tags:
            self._best = value
        self._parent = version
        self.published.append(version)
        registry.prune(section.model, section.keep)
        log.info("published %s/%s (tags: %s)", section.model, version, ", ".join(tags))

    def _before(self) -> tuple[str, float | None]:
        """The version this run published last (after a restart), and the best tag's
        value of `best_metric`, the bar a new version must beat."""
        section, registry = self.section, self.registry
        mine = [m for m in registry.versions(section.model) if m.run == self.run_id]
        best = registry.tags(section.model).get("best")
        value = None
        if section.best_metric and best is not None:
            value = registry.manifest(section.model, best).metrics.get(section.best_metric)
        return (mine[-1].version if mine else ""), value
