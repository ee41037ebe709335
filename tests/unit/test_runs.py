"""The run lifecycle in a state directory (`fedge.fleet.runs.RunService`, real StateStore
and checkpoints in tmp_path, no sockets): same settings resume, other settings are
refused naming the change, --new-run keeps the old run, --resume continues it as it was,
a checkpoint the database lacks is recorded on start, and a full disk pauses the run
without losing the round."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedge.fleet.runs as runs_module
from fedge.checkpoint import Checkpoint, CheckpointError, list_checkpoints, save_checkpoint
from fedge.config import RunConfig, load_config
from fedge.errors import ConfigError, DiskFullError, is_disk_full
from fedge.fleet.runs import RunService, describe_changes
from fedge.fleet.service import Stopped
from fedge.history import RoundRecord
from fedge.launch import wait_for
from fedge.state import StateError, StateStore

CONFIG = """\
[app]
target = "app:create_app"
options = {{ partition = "iid", epochs = 5 }}

[run]
num_clients = 4
rounds = {rounds}
seed = 0
round_timeout = 60.0

[strategy]
name = "fedavg"
fraction_evaluate = {fraction_evaluate}
{strategy_extra}
"""

# The same settings as CONFIG with rounds = 3: other comments, order, spelling and layout.
SAME_SETTINGS = """\
# a comment only: the settings are what counts
[strategy]
fraction_evaluate = 0.5   # half of the clients evaluate
name = "fedavg"

[run]
round_timeout = 60        # an integer: the setting is the float 60.0
seed = 0
rounds = 3
num_clients = 4

[app]
target = "app:create_app"

[app.options]
epochs = 5
partition = "iid"
"""


def config(
    directory: Path,
    *,
    rounds: int = 3,
    fraction_evaluate: float = 0.5,
    strategy_extra: str = "",
    text: str | None = None,
) -> RunConfig:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fedge.toml"
    path.write_text(
        text
        if text is not None
        else CONFIG.format(
            rounds=rounds, fraction_evaluate=fraction_evaluate, strategy_extra=strategy_extra
        )
    )
    return load_config(path)


def weights_of(round: int) -> dict[str, np.ndarray]:
    return {"w": np.full(4, round, dtype=np.float32), "b": np.arange(2, dtype=np.float64)}


def record(round: int, **fields: Any) -> RoundRecord:
    return RoundRecord(
        round=round,
        selected=[0, 1, 2],
        participants=[0, 2],
        failures={1: "no result before the round's deadline"},
        num_examples=40,
        metrics={"loss": 1.0 / round},
        wall_time=0.5,
        **fields,
    )


def checkpointed(service: RunService) -> list[int]:
    """The rounds of the run's checkpoint files."""
    return [n for n, _ in list_checkpoints(service.checkpoints)]


def finish(service: RunService, *rounds: int) -> None:
    """What the coordinator does for each finished round."""
    for n in rounds:
        service.on_round(record(n), weights_of(n), {"m": np.zeros(3)})


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def opened() -> Iterator[list[RunService]]:
    """Services opened by a test; their stores are closed after it."""
    services: list[RunService] = []
    yield services
    for service in services:
        service.store.close()


@pytest.fixture
def open_run(state_dir: Path, opened: list[RunService]) -> Callable[..., RunService]:
    def open_(cfg: RunConfig, **options: bool) -> RunService:
        service = RunService.open(state_dir, cfg, **options)
        opened.append(service)
        return service

    return open_


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_module, "DISK_RETRY", 0.01)


# -- same settings, other settings ---------------------------------------------------


def test_a_restart_with_the_same_settings_resumes_the_run(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    cfg = config(tmp_path / "app")
    first = open_run(cfg)
    assert first.resume_point().round == 1
    finish(first, 1, 2)
    first.store.close()

    again = open_run(cfg)
    assert again.run_id == first.run_id
    assert [r["run_id"] for r in again.store.runs()] == [first.run_id]
    resume = again.resume_point()
    assert (resume.round, resume.attempt) == (3, 0)
    assert resume.weights is not None and resume.state is not None
    np.testing.assert_array_equal(resume.weights["w"], weights_of(2)["w"])
    assert [r.round for r in again.history().rounds] == [1, 2]
    assert not again.finished()


def test_comments_order_and_layout_of_the_file_are_not_a_change(
    tmp_path: Path, open_run: Callable[..., RunService]
) -> None:
    cfg = config(tmp_path / "app")
    other = config(tmp_path / "other", text=SAME_SETTINGS)
    assert other.settings() == cfg.settings()  # the identity is the parsed config
    first = open_run(cfg)
    finish(first, 1)
    first.store.close()
    again = open_run(other)
    assert again.run_id == first.run_id
    assert again.resume_point().round == 2


def test_other_settings_are_refused_naming_each_change(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    first = open_run(config(tmp_path / "app"))
    finish(first, 1, 2, 3)
    first.end("finished")
    first.store.close()
    changed = config(
        tmp_path / "app", rounds=5, fraction_evaluate=1.0, strategy_extra="min_results = 2"
    )

    with pytest.raises(ConfigError) as refused:
        RunService.open(state_dir, changed)
    message = str(refused.value)
    assert f"holds run {first.run_id} (finished) with other settings" in message
    assert "run.rounds: 3 -> 5" in message
    assert "strategy.fraction_evaluate: 0.5 -> 1.0" in message
    assert "strategy.min_results: (unset) -> 2" in message
    assert "--resume" in message and "--new-run" in message
    with StateStore(state_dir / "state.db") as store:  # nothing was changed, nor added
        (run,) = store.runs()
        assert run["run_id"] == first.run_id and run["config"] == first.config.settings()
        assert (run["status"], run["rounds_done"]) == ("finished", 3)

    with pytest.raises(ConfigError, match="exclude each other"):
        RunService.open(state_dir, changed, new_run=True, resume=True)


def test_new_run_keeps_the_old_runs_checkpoints_and_rounds(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    old = open_run(config(tmp_path / "app"))
    finish(old, 1, 2)
    old.end("stopped", "stopped by the operator")
    old_files = sorted(p.name for p in old.checkpoints.iterdir())
    old.store.close()

    new = open_run(config(tmp_path / "app", rounds=5), new_run=True)
    assert new.run_id != old.run_id
    resume = new.resume_point()
    assert (resume.round, resume.weights) == (1, None)  # a new run starts from the app
    finish(new, 1)

    assert sorted(p.name for p in old.checkpoints.iterdir()) == old_files
    assert new.checkpoints != old.checkpoints
    assert checkpointed(new) == [1]
    found = {r["run_id"]: r for r in new.store.runs()}
    assert list(found) == [old.run_id, new.run_id]
    assert (found[old.run_id]["status"], found[old.run_id]["rounds_done"]) == ("stopped", 2)
    assert (found[new.run_id]["total_rounds"], found[new.run_id]["rounds_done"]) == (5, 1)
    assert [r.to_dict() for r in new.store.history(old.run_id).rounds] == [
        record(1).to_dict(),
        record(2).to_dict(),
    ]
    # the same settings a new run was started with: the next start resumes the new run
    new.store.close()
    assert open_run(config(tmp_path / "app", rounds=5)).run_id == new.run_id


def test_resume_continues_the_old_run_as_it_was(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService], caplog: Any
) -> None:
    old = open_run(config(tmp_path / "app"))
    finish(old, 1)
    old.store.close()
    elsewhere = config(tmp_path / "moved", rounds=5, fraction_evaluate=1.0)

    with caplog.at_level(logging.WARNING, logger="fedge.fleet.runs"):
        resumed = open_run(elsewhere, resume=True)
    assert resumed.run_id == old.run_id
    assert resumed.config.settings() == old.config.settings()  # its own settings
    assert resumed.config.run.rounds == 3
    assert resumed.config.base_dir == (tmp_path / "app").resolve()  # its own app directory
    assert "ignoring the config's changes: run.rounds: 3 -> 5" in caplog.text
    assert resumed.resume_point().round == 2
    assert len(resumed.store.runs()) == 1


def test_a_stopped_run_served_again_is_running_and_a_complete_one_finished(
    tmp_path: Path, open_run: Callable[..., RunService]
) -> None:
    cfg = config(tmp_path / "app")
    service = open_run(cfg)
    finish(service, 1)
    service.end("stopped", "stopped by the operator")
    service.store.close()

    again = open_run(cfg)
    again.resume_point()
    run = again.store.get_run(again.run_id)
    assert run is not None and (run["status"], run["reason"]) == ("running", "")
    finish(again, 2, 3)
    again.end("stopped", "stopped by the operator")  # stopped after its last round
    again.store.close()

    last = open_run(cfg)
    last.resume_point()
    assert last.finished()
    run = last.store.get_run(last.run_id)
    assert run is not None and run["status"] == "finished"


# -- checkpoint first, record after ------------------------------------------------------


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


def crash_after_checkpoint(service: RunService, round: int, monkeypatch: Any) -> None:
    """on_round for `round`, dying between the checkpoint's rename and the SQLite record."""

    def die(run_id: str, rec: RoundRecord) -> None:
        raise Crash

    monkeypatch.setattr(service.store, "record_round", die)
    with pytest.raises(Crash):
        finish(service, round)
    monkeypatch.undo()


def test_a_checkpointed_round_the_database_lacks_is_recorded_on_start(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService], monkeypatch: Any
) -> None:
    cfg = config(tmp_path / "app")
    service = open_run(cfg)
    finish(service, 1)
    crash_after_checkpoint(service, 2, monkeypatch)
    assert checkpointed(service) == [1, 2]
    assert service.store.last_round(service.run_id) == 1
    service.store.close()

    again = open_run(cfg)
    assert again.store.last_round(again.run_id) == 1
    resume = again.resume_point()  # what the server does first
    assert (resume.round, resume.attempt) == (3, 0)
    assert resume.weights is not None
    np.testing.assert_array_equal(resume.weights["w"], weights_of(2)["w"])
    assert again.store.last_round(again.run_id) == 2
    assert [r.to_dict() for r in again.history().rounds] == [
        record(1).to_dict(),
        record(2).to_dict(),
    ]
    assert again.resume_point().round == 3  # recorded once: an upsert, not a second row
    assert again.store.attempts(again.run_id, 2) == 1


def test_a_new_run_records_the_old_runs_last_checkpointed_round_first(
    tmp_path: Path, open_run: Callable[..., RunService], monkeypatch: Any
) -> None:
    old = open_run(config(tmp_path / "app"))
    finish(old, 1)
    crash_after_checkpoint(old, 2, monkeypatch)
    old.store.close()

    new = open_run(config(tmp_path / "app"), new_run=True)
    assert new.store.last_round(old.run_id) == 2
    assert [r["rounds_done"] for r in new.store.runs()] == [2, 0]


# -- a full disk -------------------------------------------------------------------------


def fill_database(store: StateStore, full: bool) -> None:
    """SQLite's own SQLITE_FULL, for real: the database may not grow by another page."""
    pages = 1 << 30
    if full:
        row = store._query_one("PRAGMA page_count")
        assert row is not None
        pages = int(row[0])
    store._query_one(f"PRAGMA max_page_count = {pages}")


def big_record(round: int) -> RoundRecord:
    """A record that needs new pages of the database (so a full one refuses it)."""
    return record(round, evaluate_failures={c: "x" * 200 for c in range(100)})


def test_a_full_disk_pauses_the_run_until_space_is_freed_and_loses_nothing(
    tmp_path: Path, open_run: Callable[..., RunService], fast_retry: None, caplog: Any
) -> None:
    service = open_run(config(tmp_path / "app"))
    finish(service, 1)
    fill_database(service.store, full=True)
    with pytest.raises(DiskFullError) as full:  # what the store itself raises
        service.store.record_round(service.run_id, big_record(2))
    assert is_disk_full(full.value) and str(full.value).startswith("disk full: ")

    errors: list[BaseException] = []

    def round_2() -> None:
        try:
            service.on_round(big_record(2), weights_of(2), {})
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="fedge.fleet.runs")
    writer = threading.Thread(target=round_2)
    writer.start()
    try:
        paused = wait_for(lambda: service.paused, "the run to pause", timeout=10)
        assert paused.startswith(f"disk full under {service.state_dir}: disk full: ")
        assert "Traceback" not in paused
        assert writer.is_alive()  # the round waits in memory, retried
        assert checkpointed(service) == [1, 2]  # its weights are safe
        assert service.store.last_round(service.run_id) == 1  # reads still work
    finally:
        fill_database(service.store, full=False)  # space is freed
        writer.join(timeout=10)
    assert not writer.is_alive() and errors == []
    assert service.paused is None
    assert [r.to_dict() for r in service.history().rounds] == [
        record(1).to_dict(),
        big_record(2).to_dict(),
    ]
    warnings = [r for r in caplog.records if r.name == "fedge.fleet.runs"]
    assert [r.getMessage() for r in warnings] == [
        f"{paused}; the run is paused until space is freed",  # once, however long it lasts
        "space is available again; the run continues",
    ]
    assert all(r.exc_info is None for r in warnings)  # said plainly, no traceback


def test_a_full_disk_while_writing_the_checkpoint_pauses_too(
    tmp_path: Path, open_run: Callable[..., RunService], fast_retry: None, monkeypatch: Any
) -> None:
    service = open_run(config(tmp_path / "app"))
    real_save = runs_module.save_checkpoint
    seen: list[str | None] = []

    def save(directory: Path, ckpt: Checkpoint, **kw: Any) -> Path:
        seen.append(service.paused)
        if len(seen) <= 2:  # what save_checkpoint raises when the disk is full
            exc = OSError(errno.ENOSPC, "No space left on device")
            raise CheckpointError(f"{directory}: could not write checkpoint ({exc})") from exc
        return real_save(directory, ckpt, **kw)

    monkeypatch.setattr(runs_module, "save_checkpoint", save)
    finish(service, 1)
    assert len(seen) == 3
    assert seen[0] is None and seen[1] is not None and seen[1].startswith("disk full under ")
    assert "No space left on device" in seen[1]
    assert service.paused is None
    assert checkpointed(service) == [1]
    assert service.store.last_round(service.run_id) == 1


def test_stopped_while_paused_the_round_is_recorded_from_its_checkpoint_on_restart(
    tmp_path: Path, open_run: Callable[..., RunService], fast_retry: None
) -> None:
    cfg = config(tmp_path / "app")
    service = open_run(cfg)
    finish(service, 1)
    fill_database(service.store, full=True)
    service.stop_requested.set()  # the operator stops the paused server
    with pytest.raises(Stopped, match=r"^disk full under "):
        service.on_round(big_record(2), weights_of(2), {})
    fill_database(service.store, full=False)
    service.store.close()

    again = open_run(cfg)
    assert again.resume_point().round == 3
    assert again.history().rounds[-1].to_dict() == big_record(2).to_dict()


def test_other_write_errors_are_not_taken_for_a_full_disk(
    tmp_path: Path, open_run: Callable[..., RunService], fast_retry: None
) -> None:
    service = open_run(config(tmp_path / "app"))
    service.run_id = "not-a-run"  # the store refuses: not a reason to wait
    with pytest.raises(StateError, match="unknown run 'not-a-run'"):
        service.on_round(record(1, status="failed"), {}, {})
    assert service.paused is None


# -- describe_changes --------------------------------------------------------------------


def test_describe_changes_names_each_dotted_key_old_and_new() -> None:
    old = {"run": {"rounds": 3, "seed": 0}, "strategy": {"name": "fedavg", "mu": 0.1}, "fit": {}}
    new = {"run": {"rounds": 5, "seed": 0}, "strategy": {"name": "fedprox"}, "fit": {"lr": 0.5}}
    assert describe_changes(old, new) == (
        "fit: {} -> (unset); fit.lr: (unset) -> 0.5; run.rounds: 3 -> 5; "
        "strategy.mu: 0.1 -> (unset); strategy.name: 'fedavg' -> 'fedprox'"
    )
    assert describe_changes(old, old) == ""
    assert describe_changes({"a": None}, {}) == "a: None -> (unset)"  # None is a value
    assert describe_changes({}, {"a": {"b": 1}}) == "a.b: (unset) -> 1"


def test_describe_changes_says_how_many_more_it_left_out() -> None:
    old = {f"k{i:02d}": i for i in range(12)}
    new = {f"k{i:02d}": i + 1 for i in range(12)}
    described = describe_changes(old, new, most=3)
    assert described == "k00: 0 -> 1; k01: 1 -> 2; k02: 2 -> 3 and 9 more"


# -- state directories of earlier versions --------------------------------------------


def test_legacy_checkpoints_are_adopted_by_the_latest_run(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    cfg = config(tmp_path / "app")
    with StateStore(state_dir / "state.db") as store:
        store.start_run("old", cfg.settings(), 3)
        store.record_round("old", record(1))
    legacy = state_dir / "checkpoints"  # fedge < 0.2: one run's checkpoints, here
    for n in (1, 2):  # round 2: checkpointed, not recorded
        meta = {"run_id": "old", "record": record(n).to_dict()}
        save_checkpoint(legacy, Checkpoint(n, weights_of(n), {}, meta))

    service = open_run(cfg)
    assert service.run_id == "old"
    assert not legacy.exists()
    assert checkpointed(service) == [1, 2]
    assert service.checkpoints == state_dir / "runs" / "old" / "checkpoints"
    assert service.resume_point().round == 3
    assert service.store.last_round("old") == 2


def test_legacy_checkpoints_never_replace_a_runs_own(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    cfg = config(tmp_path / "app")
    first = open_run(cfg)
    finish(first, 1)
    first.store.close()
    save_checkpoint(state_dir / "checkpoints", Checkpoint(7, weights_of(7)))

    again = open_run(cfg)
    assert (state_dir / "checkpoints" / "round-000007.safetensors").exists()
    assert checkpointed(again) == [1]


def test_a_run_recorded_without_its_settings_resumes_only_with_resume(
    tmp_path: Path, state_dir: Path, open_run: Callable[..., RunService]
) -> None:
    with StateStore(state_dir / "state.db") as store:
        store.start_run("old", {"seed": 0}, 3)  # what fedge < 0.2 kept of a run
    cfg = config(tmp_path / "app")
    with pytest.raises(ConfigError, match=r"holds run old \(running\) with other settings"):
        RunService.open(state_dir, cfg)
    service = open_run(cfg, resume=True)
    assert (service.run_id, service.config) == ("old", cfg)
