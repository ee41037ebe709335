"""The state store: schema and WAL set up on open, runs/rounds/nodes round-trip, History
rebuilt exactly, and everything still there after a "restart" — including after SIGKILL
in the middle of writing rounds and checkpoints."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.checkpoint import latest_checkpoint, list_checkpoints
from fedge.errors import FedgeError
from fedge.history import History, RoundRecord
from fedge.state import SCHEMA_VERSION, StateError, StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state.db")


def sample_history() -> History:
    return History(
        initial_metrics={"loss": 2.3, "accuracy": 0.1},
        rounds=[
            RoundRecord(
                round=1,
                selected=[0, 1, 2],
                participants=[0, 2],
                failures={1: "timeout after 30.0 s"},
                num_examples=120,
                metrics={"loss": 1.5},
                fit_metrics={"train_loss": 1.7},
                evaluate_metrics={"loss": 1.6, "accuracy": 0.4},
                fit_time=1.25,
                evaluate_time=0.5,
                wall_time=1.875,
            ),
            RoundRecord(round=2, status="failed", selected=[3], failures={3: "crashed"}),
            RoundRecord(round=2, attempt=1, selected=[0, 3], participants=[0, 3], wall_time=0.1),
        ],
        wall_time=12.5,
    )


# -- schema -------------------------------------------------------------------------


def test_schema_is_created_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "rounds", "nodes"} <= tables
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_wal_mode_is_on(store: StateStore, tmp_path: Path) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # WAL is a property of the file: another connection sees it too
    other = sqlite3.connect(tmp_path / "state.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_reopening_keeps_schema_and_does_not_migrate_twice(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.db") as first:
        first.start_run("r", {}, 1)
    with StateStore(tmp_path / "state.db") as second:
        assert second.schema_version == SCHEMA_VERSION
        assert second.get_run("r") is not None


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    StateStore(tmp_path / "state.db").close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer than this fedge supports"):
        StateStore(tmp_path / "state.db")


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable fedge state database") as info:
        StateStore(path)
    assert str(path) in str(info.value) and isinstance(info.value, FedgeError)


# -- runs ---------------------------------------------------------------------------


def test_start_run_and_get_run(store: StateStore) -> None:
    assert store.get_run("r1") is None and store.latest_run() is None
    store.start_run("r1", {"strategy": "FedAvg", "lr": 0.1}, total_rounds=10)
    run = store.get_run("r1")
    assert run is not None
    assert run["config"] == {"strategy": "FedAvg", "lr": 0.1}
    assert (run["status"], run["total_rounds"]) == ("running", 10)
    assert run["created_at"] <= run["updated_at"]


def test_start_run_is_idempotent(store: StateStore) -> None:
    store.start_run("r1", {"a": 1, "b": [1, 2]}, total_rounds=3)
    store.set_run_status("r1", "stopped")
    store.start_run("r1", {"b": [1, 2], "a": 1}, total_rounds=3)  # key order does not matter
    run = store.get_run("r1")
    assert run is not None and run["status"] == "stopped"
    assert len([store.latest_run()]) == 1


def test_start_run_with_other_settings_is_refused(store: StateStore) -> None:
    store.start_run("r1", {"lr": 0.1}, total_rounds=3)
    with pytest.raises(StateError, match="already exists with total_rounds=3"):
        store.start_run("r1", {"lr": 0.2}, total_rounds=3)
    with pytest.raises(StateError, match="already exists"):
        store.start_run("r1", {"lr": 0.1}, total_rounds=4)


def test_set_run_status(store: StateStore) -> None:
    store.start_run("r1", {}, 3)
    store.set_run_status("r1", "finished", wall_time=42.0)
    run = store.get_run("r1")
    assert run is not None and (run["status"], run["wall_time"]) == ("finished", 42.0)
    store.set_run_status("r1", "running")  # wall_time kept when not given
    run = store.get_run("r1")
    assert run is not None and (run["status"], run["wall_time"]) == ("running", 42.0)
    with pytest.raises(StateError, match="must be one of"):
        store.set_run_status("r1", "done")  # type: ignore[arg-type]
    with pytest.raises(StateError, match="unknown run 'nope'"):
        store.set_run_status("nope", "failed")


def test_latest_run_is_the_last_started(store: StateStore) -> None:
    for run_id in ("b", "a", "c"):
        store.start_run(run_id, {}, 1)
    latest = store.latest_run()
    assert latest is not None and latest["run_id"] == "c"


def test_unserializable_config_is_refused(store: StateStore) -> None:
    with pytest.raises(StateError, match="config of run 'r1' is not JSON-serializable"):
        store.start_run("r1", {"fn": print}, 1)
    assert store.get_run("r1") is None


# -- rounds -------------------------------------------------------------------------


def test_history_rebuild_equals_original(store: StateStore) -> None:
    original = sample_history()
    store.start_run("r1", {}, total_rounds=2)
    store.set_initial_metrics("r1", original.initial_metrics)
    for record in reversed(original.rounds):  # stored out of order, read back in order
        store.record_round("r1", record)
    store.set_run_status("r1", "finished", wall_time=original.wall_time)
    rebuilt = store.history("r1")
    assert rebuilt == original
    assert rebuilt.rounds[0].failures == {1: "timeout after 30.0 s"}  # int keys again
    assert store.last_round("r1") == 2


def test_record_round_is_an_upsert(store: StateStore) -> None:
    store.start_run("r1", {}, 3)
    store.record_round("r1", RoundRecord(round=1, metrics={"loss": 2.0}))
    store.record_round("r1", RoundRecord(round=1, metrics={"loss": 1.0}))
    assert store.history("r1").rounds == [RoundRecord(round=1, metrics={"loss": 1.0})]


def test_rounds_of_runs_are_kept_apart(store: StateStore) -> None:
    store.start_run("a", {}, 3)
    store.start_run("b", {}, 3)
    store.record_round("a", RoundRecord(round=1))
    assert store.history("b").rounds == []
    assert (store.last_round("a"), store.last_round("b")) == (1, 0)


def test_failed_rounds_do_not_count_as_done(store: StateStore) -> None:
    store.start_run("r1", {}, 3)
    store.record_round("r1", RoundRecord(round=1))
    store.record_round("r1", RoundRecord(round=2, status="failed"))
    assert store.last_round("r1") == 1


def test_rounds_need_a_run(store: StateStore) -> None:
    with pytest.raises(StateError, match="unknown run 'ghost'"):
        store.record_round("ghost", RoundRecord(round=1))
    with pytest.raises(StateError, match="unknown run 'ghost'"):
        store.history("ghost")
    with pytest.raises(StateError, match="unknown run 'ghost'"):
        store.set_initial_metrics("ghost", {"loss": 1.0})


def test_round_record_dict_round_trip_through_json() -> None:
    import json

    for record in sample_history().rounds:
        assert RoundRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    history = sample_history()
    assert History.from_dict(json.loads(json.dumps(history.to_dict()))) == history


# -- nodes --------------------------------------------------------------------------


def test_nodes_bind_and_activity(store: StateStore) -> None:
    store.bind("node-b", 1, "10.0.0.2:5000", {"cpu": 4, "accelerator": None})
    store.bind("node-a", 0, "10.0.0.1:5000", {"cpu": 2})
    first = {n["node_id"]: n for n in store.nodes()}
    assert [n["cid"] for n in store.nodes()] == [0, 1]
    assert store.bindings() == {"node-a": 0, "node-b": 1}
    assert first["node-b"]["capabilities"] == {"cpu": 4, "accelerator": None}
    assert first["node-b"]["tasks_done"] == 0

    later = first["node-a"]["last_seen"] + 5
    store.record_activity({"node-a": later, "node-b": 0.0}, {"node-b": 2})
    store.record_activity({}, {"node-b": 1, "not-joined-yet": 1})  # skipped, no error
    after = {n["node_id"]: n for n in store.nodes()}
    assert after["node-a"]["last_seen"] == later
    assert after["node-b"]["last_seen"] == first["node-b"]["last_seen"]  # never moves back
    assert after["node-b"]["tasks_done"] == 3

    # re-join from a new address: identity, first_seen and task count survive
    store.bind("node-b", 1, "10.0.0.9:6000", {"cpu": 8})
    again = {n["node_id"]: n for n in store.nodes()}["node-b"]
    assert again["address"] == "10.0.0.9:6000" and again["capabilities"] == {"cpu": 8}
    assert again["first_seen"] == first["node-b"]["first_seen"]
    assert again["tasks_done"] == 3
    assert len(store.nodes()) == 2


def test_a_client_id_belongs_to_one_node_until_an_operator_moves_it(store: StateStore) -> None:
    store.bind("a", 0, "h:1", {})
    store.bind("b", 1, "h:2", {})
    with pytest.raises(StateError, match="client id 1 is bound to node 'b'"):
        store.bind("c", 1, "h:3", {})  # another identity cannot take it by joining
    with pytest.raises(StateError, match="node 'a' is bound to client id 0"):
        store.bind("a", 5, "h:1", {})  # nor can a node switch by itself
    assert store.bindings() == {"a": 0, "b": 1}

    assert store.assign("c", 1) == "b"  # a replacement device takes over cid 1
    store.bind("c", 1, "h:3", {"cpu": 1})
    assert [(n["node_id"], n["cid"]) for n in store.nodes()] == [("a", 0), ("c", 1), ("b", None)]
    assert store.assign("c", 1) is None  # assigning what it holds changes nothing
    assert store.assign("new", 7) is None  # a node not seen yet can be bound in advance
    assert store.bindings()["new"] == 7


def test_runs_lists_every_run_with_its_progress(store: StateStore) -> None:
    store.start_run("r1", {"seed": 1}, 3, base_dir="/apps")
    store.record_round("r1", RoundRecord(round=1))
    store.record_round("r1", RoundRecord(round=2, status="failed"))
    store.record_round("r1", RoundRecord(round=2, attempt=1))
    store.start_run("r2", {"seed": 2}, 5)
    store.set_run_status("r1", "failed", reason="disk full")
    runs = store.runs()
    assert [(r["run_id"], r["rounds_done"], r["status"]) for r in runs] == [
        ("r1", 2, "failed"),
        ("r2", 0, "running"),
    ]
    assert runs[0]["reason"] == "disk full" and runs[0]["base_dir"] == "/apps"
    assert (store.attempts("r1", 2), store.attempts("r1", 3)) == (2, 0)


def test_a_version_1_database_is_migrated_keeping_its_nodes(tmp_path: Path) -> None:
    from fedge.state import _MIGRATIONS

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        db.execute(statement)
    db.execute(
        "INSERT INTO nodes (node_id, cid, address, capabilities_json, first_seen, last_seen,"
        " tasks_done) VALUES ('old', 3, 'h:1', '{}', 1.0, 2.0, 7)"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with StateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        (node,) = store.nodes()
        assert (node["node_id"], node["cid"], node["tasks_done"]) == ("old", 3, 7)
        assert store.bindings() == {"old": 3}  # the binding a version-1 node had is kept
        assert store.assign("new", 3) == "old"  # possible only since version 2
        assert {n["node_id"]: n["cid"] for n in store.nodes()} == {"new": 3, "old": None}


# -- durability ---------------------------------------------------------------------


def test_reopened_store_sees_everything(tmp_path: Path) -> None:
    original = sample_history()
    with StateStore(tmp_path / "state.db") as store:
        store.start_run("r1", {"seed": 3}, total_rounds=2)
        store.set_initial_metrics("r1", original.initial_metrics)
        for record in original.rounds:
            store.record_round("r1", record)
        store.set_run_status("r1", "finished", wall_time=original.wall_time)
        store.bind("n", 5, "h:1", {"cpu": 1})
        store.record_activity({}, {"n": 1})
    with StateStore(tmp_path / "state.db") as restarted:
        run = restarted.latest_run()
        assert run is not None and run["run_id"] == "r1" and run["config"] == {"seed": 3}
        assert restarted.history("r1") == original
        assert [(n["node_id"], n["cid"], n["tasks_done"]) for n in restarted.nodes()] == [
            ("n", 5, 1)
        ]


def test_used_from_several_threads(store: StateStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store.start_run("r1", {}, 100)
    store.bind("n", 0, "h:1", {})

    def work(r: int) -> None:
        store.record_round("r1", RoundRecord(round=r))
        store.record_activity({}, {"n": 1})
        store.history("r1")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(1, 101)))
    assert [r.round for r in store.history("r1").rounds] == list(range(1, 101))
    assert store.nodes()[0]["tasks_done"] == 100


# The SIGKILL test. A child process plays the aggregator: each round it saves the
# checkpoint (with the round's record in its meta) and *then* records the round in the
# store — the order fedge.state documents. On every (re)start it resumes from the latest
# checkpoint, first recording that round if the kill landed between the two writes.
# Invariant checked after every kill, before the restart:
#     last ok round in the store  <=  latest checkpoint round  <=  that + 1,
# the store's rounds are exactly 1..last (no gaps, no duplicates), and the checkpoint's
# weights are bit-exactly those of its round — so resuming from it loses nothing.

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from fedge.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
    from fedge.history import RoundRecord
    from fedge.state import StateStore

    root = Path(sys.argv[1])
    store = StateStore(root / "state.db")
    store.start_run("run", {"seed": 0}, total_rounds=10**9)
    ckpt = latest_checkpoint(root / "ckpt")
    if ckpt is None:
        done, weights = 0, {"w": np.zeros(32768), "step": np.zeros((), np.int64)}
    else:
        done, weights = ckpt.round, ckpt.weights
        if store.last_round("run") < done:  # killed after the checkpoint, before the record
            store.record_round("run", RoundRecord.from_dict(ckpt.meta["record"]))
    print(done, flush=True)
    r = done
    while True:
        r += 1
        weights = {"w": weights["w"] * 0.5 + r, "step": weights["step"] + 1}
        record = RoundRecord(round=r, participants=[r % 7], failures={r % 5: "timeout"})
        meta = {"run_id": "run", "record": record.to_dict()}
        save_checkpoint(root / "ckpt", Checkpoint(r, weights, meta=meta), keep=2)
        store.record_round("run", record)
    """
)


def expected_weights(round: int) -> dict[str, np.ndarray]:
    w = np.zeros(32768)
    for r in range(1, round + 1):
        w = w * 0.5 + r
    return {"w": w, "step": np.array(round, dtype=np.int64)}


@pytest.mark.integration
def test_sigkill_during_writes_leaves_a_resumable_state(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    src = Path(__file__).resolve().parents[2] / "src"
    env = os.environ | {"PYTHONPATH": str(src)}
    resumed_from: list[int] = []
    checked: list[int] = []
    for kill in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line, f"child died at start: {child.communicate()[1]}"
            resumed_from.append(int(line))
            time.sleep(rng.uniform(0.02, 0.3))
            assert child.poll() is None, f"child died: {child.communicate()[1]}"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.communicate()
        context = f"(seed {seed}, kill {kill})"

        with StateStore(tmp_path / "state.db") as store:
            recorded = store.last_round("run")
            rounds = [r.round for r in store.history("run").rounds]
        ckpt = latest_checkpoint(tmp_path / "ckpt")
        assert ckpt is not None, context
        assert recorded <= ckpt.round <= recorded + 1, context
        assert rounds == list(range(1, recorded + 1)), context
        for name, want in expected_weights(ckpt.round).items():
            assert ckpt.weights[name].tobytes() == want.tobytes(), context
        assert ckpt.meta["record"]["round"] == ckpt.round, context
        # keep=2, plus one when the kill fell after the rename but before the pruning
        # (old checkpoints go only once the new one is durable); the next save prunes it
        assert len(list_checkpoints(tmp_path / "ckpt")) <= 3, context
        checked.append(ckpt.round)

    # every restart resumed exactly from the checkpoint checked after the previous kill
    assert resumed_from == [0, *checked[:-1]], f"seed {seed}"
    assert checked[-1] > 0


def test_the_state_database_is_private(tmp_path: Path) -> None:
    import stat

    with StateStore(tmp_path / "state.db") as store:
        store.bind("node-1", 1, "ipv4:10.0.0.1:5", {})  # a write: the WAL file exists
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert modes["state.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes
