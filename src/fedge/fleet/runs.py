"""Runs in a state directory: start a new one, resume one, or refuse to mix two.

A state directory holds runs kept apart by run id: one SQLite database (runs, rounds,
nodes) and, per run, ``runs/<id>/checkpoints``. When the server starts:

* no run yet, or ``--new-run``: a new run (earlier runs and their checkpoints are kept);
* the latest run has the same settings: it resumes after its last checkpoint (a run that
  already finished is reported, not run again);
* its settings differ — comments and layout of the file do not count — it is refused,
  naming what changed, unless ``--resume`` (continue that run as it was, with its own
  settings) or ``--new-run``.

Every finished round is checkpointed first (weights, strategy state and the round's
record) and recorded in the database after, so a round is never reported without its
weights; a crash between the two leaves a checkpoint the database lacks, and on start the
checkpoint is the truth: its record is written then (also for the run a ``--new-run``
leaves behind). A stopped or failed run served again is ``running`` again. The history
lives in the database only, so checkpoints and memory do not grow with the number of
rounds. A full disk pauses the run (the round waits in memory) until space is freed or the
server is stopped.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedge.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, save_checkpoint
from fedge.config import RunConfig, parse_config
from fedge.errors import ConfigError, is_disk_full
from fedge.fleet.service import Stopped
from fedge.history import History, RoundRecord
from fedge.metrics import Metrics
from fedge.state import RunStatus, StateStore
from fedge.weights import State, Weights

log = logging.getLogger(__name__)

T = TypeVar("T")

DISK_RETRY = 5.0
"""Seconds between attempts to write a checkpoint while the disk is full."""


@dataclass
class Resume:
    """Where a run continues: the next round and attempt, and the model to start from
    (None: the app's initial weights)."""

    round: int = 1
    attempt: int = 0
    weights: Weights | None = None
    state: State | None = None


class RunService:
    """One run's durable record: a `fedge.coordinator.Recorder` backed by checkpoints and
    the state database."""

    def __init__(self, store: StateStore, state_dir: Path, run_id: str, config: RunConfig) -> None:
        self.store, self.state_dir, self.run_id, self.config = store, state_dir, run_id, config
        self.checkpoints = state_dir / "runs" / run_id / "checkpoints"
        self.buffer_dir = state_dir / "runs" / run_id / "buffer"
        """FedBuff's buffer between server updates (`fedge.asynchronous.BufferStore`)."""
        self.stop_requested = threading.Event()
        self.paused: str | None = None
        """Why the run is paused (a full disk), while it is."""
        self.last_checkpoint: tuple[float, int] | None = None
        """Seconds the last checkpoint took to write (durably), and its size in bytes."""

    @classmethod
    def open(
        cls, state_dir: Path, config: RunConfig, *, new_run: bool = False, resume: bool = False
    ) -> RunService:
        """The run this start of the server serves (see the module docstring)."""
        if new_run and resume:
            raise ConfigError("--new-run and --resume exclude each other: choose one")
        state_dir.mkdir(parents=True, exist_ok=True)
        store = StateStore(state_dir / "state.db")
        latest = store.latest_run()
        if latest is not None:
            _adopt_legacy_checkpoints(state_dir, latest["run_id"])
        settings = config.settings()
        if latest is not None and new_run:  # the old run keeps its last checkpointed round
            try:
                cls(store, state_dir, latest["run_id"], config).reconcile()
            except CheckpointError as exc:
                log.warning("run %s: %s", latest["run_id"], exc)
        if latest is None or new_run:
            run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            store.start_run(run_id, settings, config.run.rounds, str(config.base_dir.resolve()))
            log.info("new run %s", run_id)
            return cls(store, state_dir, run_id, config)
        run_id = latest["run_id"]
        if latest["config"] == settings:
            return cls(store, state_dir, run_id, config)
        changes = describe_changes(latest["config"], settings)
        if not resume:
            store.close()
            raise ConfigError(
                f"{state_dir} holds run {run_id} ({latest['status']}) with other settings: "
                f"{changes}. Start with --resume to continue run {run_id} as it was, or "
                "--new-run to start a new run (the old one is kept)"
            )
        if "app" not in latest["config"]:  # a run recorded before settings were kept
            log.warning("run %s kept no settings; resuming it with the given config", run_id)
            return cls(store, state_dir, run_id, config)
        stored = parse_config(latest["config"], source=f"run {run_id}")
        stored.base_dir = Path(latest["base_dir"] or config.base_dir)
        stored.store = config.store  # where to publish is not a setting of the run
        stored.metrics = config.metrics
        log.warning("resuming run %s as it was; ignoring the config's changes: %s", run_id, changes)
        return cls(store, state_dir, run_id, stored)

    # --- resuming --------------------------------------------------------------------

    def resume_point(self) -> Resume:
        """Where to continue, reconciling the database with the newest checkpoint. A run
        served again is no longer stopped or failed: its status says so."""
        ckpt = self.reconcile()
        run = self.store.get_run(self.run_id)
        status: RunStatus = "finished" if self.finished() else "running"
        if run is not None and run["status"] != status:
            self.store.set_run_status(self.run_id, status)
        if ckpt is None:
            return Resume(1, self.store.attempts(self.run_id, 1))
        next_round = ckpt.round + 1
        return Resume(
            next_round, self.store.attempts(self.run_id, next_round), ckpt.weights, ckpt.state
        )

    def reconcile(self) -> Checkpoint | None:
        """The newest checkpoint, after recording its round if the database lacks it (a
        crash between the checkpoint and the record: the checkpoint is the truth)."""
        ckpt = latest_checkpoint(self.checkpoints)
        if ckpt is None:
            return None
        if self.store.last_round(self.run_id) < ckpt.round and "record" in ckpt.meta:
            log.warning(
                "run %s: round %d was checkpointed but not recorded; recording it now",
                self.run_id,
                ckpt.round,
            )
            self.store.record_round(self.run_id, RoundRecord.from_dict(ckpt.meta["record"]))
        return ckpt

    def finished(self) -> bool:
        return self.store.last_round(self.run_id) >= self.config.run.rounds

    # --- recording (fedge.coordinator.Recorder) ---------------------------------------

    def on_start(self, initial_metrics: Metrics) -> None:
        self._durably(lambda: self.store.set_initial_metrics(self.run_id, initial_metrics))

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        if record.status == "ok":  # the weights first: a round is never reported without them
            meta = {"run_id": self.run_id, "record": record.to_dict()}
            ckpt = Checkpoint(record.round, weights, state, meta)
            started = time.perf_counter()
            path = self._durably(lambda: save_checkpoint(self.checkpoints, ckpt))
            self.last_checkpoint = (time.perf_counter() - started, path.stat().st_size)
        self._durably(lambda: self.store.record_round(self.run_id, record))

    def save_buffer(self, ckpt: Checkpoint) -> None:
        """The asynchronous buffer, written atomically after every fold (one file)."""
        self._durably(lambda: save_checkpoint(self.buffer_dir, ckpt, keep=1))

    def load_buffer(self) -> Checkpoint | None:
        return latest_checkpoint(self.buffer_dir)

    def record_activity(self, last_seen: Mapping[str, float], done: Mapping[str, int]) -> None:
        self._durably(lambda: self.store.record_activity(last_seen, done))

    def end(self, status: RunStatus, reason: str = "", wall_time: float | None = None) -> None:
        self.store.set_run_status(self.run_id, status, reason=reason, wall_time=wall_time)

    def history(self) -> History:
        return self.store.history(self.run_id)

    def latest_weights(self) -> Weights | None:
        ckpt = latest_checkpoint(self.checkpoints)
        return None if ckpt is None else ckpt.weights

    def _durably(self, write: Callable[[], T]) -> T:
        """Run `write`; while the disk is full, pause and try again (nothing is lost:
        the round waits in memory) until it succeeds or the server is stopped."""
        warned = 0.0
        while True:
            try:
                result = write()
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self.paused = f"disk full under {self.state_dir}: {exc}"
                if time.time() - warned > 60:
                    warned = time.time()
                    log.warning("%s; the run is paused until space is freed", self.paused)
                if self.stop_requested.wait(DISK_RETRY):
                    raise Stopped(self.paused) from exc
                continue
            if self.paused is not None:
                log.warning("space is available again; the run continues")
            self.paused = None
            return result


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], most: int = 8) -> str:
    """``key: old -> new`` for every setting that differs (dotted keys, at most `most`)."""
    before, after = dict(_flatten(old)), dict(_flatten(new))
    keys = sorted(set(before) | set(after))
    changed = [
        f"{k}: {_shown(before, k)} -> {_shown(after, k)}"
        for k in keys
        if k not in before or k not in after or before[k] != after[k]
    ]
    more = f" and {len(changed) - most} more" if len(changed) > most else ""
    return "; ".join(changed[:most]) + more


def _shown(settings: Mapping[str, Any], key: str) -> str:
    return repr(settings[key]) if key in settings else "(unset)"


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and (value or not prefix):  # an empty table is a value
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def _adopt_legacy_checkpoints(state_dir: Path, run_id: str) -> None:
    """State directories of fedge < 0.2 kept one run's checkpoints in ``checkpoints/``."""
    legacy = state_dir / "checkpoints"
    if legacy.is_dir():
        target = state_dir / "runs" / run_id / "checkpoints"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.move(str(legacy), str(target))
            log.warning("moved %s to %s (one directory per run)", legacy, target)
