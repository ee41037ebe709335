"""Checkpoints round-trip bit-exactly, are replaced atomically, are pruned to `keep`, and
a damaged newest file is skipped for the one before it rather than resumed from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedge.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fedge.errors import FedgeError


def make(round: int) -> Checkpoint:
    rng = np.random.default_rng(round)
    # Names deliberately not in sorted order: the model's order must survive.
    weights = {
        "fc2.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "fc1.bias": rng.standard_normal(4).astype(np.float16),
        "bn.num_batches_tracked": np.array(round, dtype=np.int64),  # 0-d stays 0-d
        "mask": rng.random(5) > 0.5,
        "empty": np.zeros((0, 3), dtype=np.float64),
        "a/nested.name": np.arange(6, dtype=np.uint8).reshape(2, 3),
    }
    state = {"m": rng.standard_normal((3, 4)), "v": np.full(4, np.nan, dtype=np.float32)}
    meta = {"run_id": "r1", "rng": [1, 2, 3], "record": {"failures": {"7": "timeout"}}}
    return Checkpoint(round=round, weights=weights, state=state, meta=meta)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name  # bit-exact, NaN included


def test_round_trip_is_bit_exact_and_keeps_order(tmp_path: Path) -> None:
    ckpt = make(5)
    path = save_checkpoint(tmp_path, ckpt)
    assert path == tmp_path / "round-000005.safetensors"
    loaded = load_checkpoint(path)
    assert loaded.round == 5
    assert_same(loaded.weights, ckpt.weights)
    assert_same(loaded.state, ckpt.state)
    assert loaded.meta == ckpt.meta


def test_empty_state_and_meta_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, Checkpoint(0, {"w": np.ones(2, np.float32)}))
    loaded = load_checkpoint(path)
    assert (loaded.round, loaded.state, loaded.meta) == (0, {}, {})
    assert_same(loaded.weights, {"w": np.ones(2, np.float32)})


def test_same_name_in_weights_and_state_does_not_clash(tmp_path: Path) -> None:
    ckpt = Checkpoint(1, {"w": np.zeros(2)}, state={"w": np.ones(3)})
    loaded = load_checkpoint(save_checkpoint(tmp_path, ckpt))
    assert_same(loaded.weights, ckpt.weights)
    assert_same(loaded.state, ckpt.state)


def test_numpy_scalar_is_stored_as_0d_array(tmp_path: Path) -> None:
    step = np.array(4, dtype=np.int64) + 1  # a numpy scalar, not an array
    loaded = load_checkpoint(save_checkpoint(tmp_path, Checkpoint(1, {"step": step})))
    assert_same(loaded.weights, {"step": np.array(5, dtype=np.int64)})


def test_file_is_plain_safetensors_with_json_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_checkpoint(tmp_path, make(2))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        names = set(f.keys())
    assert names == {f"weights/{n}" for n in make(2).weights} | {"state/m", "state/v"}
    assert json.loads(metadata["fedge.checkpoint.weights"]) == list(make(2).weights)
    assert json.loads(metadata["fedge.checkpoint.meta"]) == make(2).meta


def test_latest_is_the_highest_round_not_the_last_name(tmp_path: Path) -> None:
    for r in (2, 999_999, 1_000_000):
        save_checkpoint(tmp_path, make(r))
    # "round-1000000" sorts before "round-999999" as text
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.round == 1_000_000


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_prunes_older_checkpoints(tmp_path: Path) -> None:
    for r in range(1, 7):
        save_checkpoint(tmp_path, make(r), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5, 6]
    save_checkpoint(tmp_path, make(7), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(7)]


def test_saving_an_earlier_round_drops_the_abandoned_later_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, make(r), keep=10)
    with caplog.at_level(logging.WARNING, logger="fedge.checkpoint"):
        save_checkpoint(tmp_path, make(3), keep=10)  # resumed from round 2, redid round 3
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert "removing checkpoint of round 4" in caplog.text


def test_resaving_a_round_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(3))
    other = Checkpoint(3, {"x": np.arange(3)}, meta={"second": True})
    save_checkpoint(tmp_path, other)
    loaded = latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.meta == {"second": True}
    assert_same(loaded.weights, other.weights)


def test_leftover_temp_file_is_ignored_then_cleaned_up(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make(1))
    # What a writer killed mid-write leaves behind: a half-written temp of round 2.
    good = (tmp_path / checkpoint_name(1)).read_bytes()
    temp = tmp_path / ".round-000002.safetensors.0123456789abcdef.tmp"
    temp.write_bytes(good[: len(good) // 2])
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.round == 1
    save_checkpoint(tmp_path, make(2))
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1), checkpoint_name(2)]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:5], id="header-cut"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), id="bit-flip-in-data"),
    ],
)
def test_damaged_newest_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, make(r))
    newest = tmp_path / checkpoint_name(3)
    newest.write_bytes(damage(newest.read_bytes()))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="fedge.checkpoint"):
        latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.round == 2
    assert_same(latest.weights, make(2).weights)
    assert "round 3" in caplog.text and str(newest) in caplog.text


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    for r in (1, 2):
        path = save_checkpoint(tmp_path, make(r), keep=5)
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        latest_checkpoint(tmp_path)


def test_corrupt_file_error_names_file_and_problem(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, make(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)
    assert isinstance(info.value, FedgeError)


def test_flipped_data_byte_is_caught_by_checksum(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(64, np.float32)}))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match its SHA-256.*corrupt"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / checkpoint_name(4))


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / checkpoint_name(1)
    save_file({"w": np.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"not written by fedge\.save_checkpoint"):
        load_checkpoint(path)


def test_renamed_file_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, make(1))
    moved = path.rename(tmp_path / checkpoint_name(8))
    with pytest.raises(CheckpointError, match="file name says round 8 but its metadata says 1"):
        load_checkpoint(moved)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(1)}, meta={"x": object()}))
    with pytest.raises(CheckpointError, match="'w' is a list"):
        save_checkpoint(tmp_path, Checkpoint(1, {"w": [1.0]}))  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="without pickle"):
        save_checkpoint(tmp_path, Checkpoint(1, {"w": np.array([None])}))
    with pytest.raises(CheckpointError, match="round must be an integer >= 0"):
        save_checkpoint(tmp_path, Checkpoint(-1, {"w": np.zeros(1)}))
    with pytest.raises(CheckpointError, match="keep must be"):
        save_checkpoint(tmp_path, make(1), keep=0)
    assert list(tmp_path.iterdir()) == []


def test_creates_missing_directory(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "a" / "b", make(1))
    assert path.parent == tmp_path / "a" / "b"
    assert load_checkpoint(path).round == 1


# --- what a run's checkpoint carries -----------------------------------------------------


def header_size(path: Path) -> int:
    """Bytes of the safetensors header (the JSON with the metadata)."""
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_a_runs_checkpoint_carries_its_round_record_not_the_history(tmp_path: Path) -> None:
    """The server checkpoints every finished round through `RunService.on_round`: weights,
    strategy state and the round's record. The history lives in the state database, so the
    header stays the same size however long the run (a copy of the history in the header
    grew by a record per round and was rewritten whole every round)."""
    from fedge.config import parse_config
    from fedge.fleet.runs import RunService
    from fedge.history import RoundRecord

    rounds = 24
    config = parse_config({"app": {"target": "app:create_app"}, "run": {"rounds": rounds}})
    service = RunService.open(tmp_path / "state", config)
    weights = {"w": np.arange(6, dtype=np.float32), "n": np.array(7, dtype=np.int64)}
    state = {"m": np.full(6, 0.5), "v": np.full(6, 0.25)}
    sizes: dict[int, int] = {}
    try:
        for r in range(1, rounds + 1):
            if r == 20:  # a failed attempt is recorded, never checkpointed
                failed = RoundRecord(round=r, status="failed", reason="only 1 of 3 arrived")
                service.on_round(failed, weights, state)
            record = RoundRecord(
                round=r,
                attempt=1 if r == 20 else 0,
                selected=[0, 1, 2, 3],
                participants=[0, 1, 2],
                failures={3: "dropped out (simulated)"},
                num_examples=300,
                metrics={"loss": 0.5, "accuracy": 0.75},
                fit_metrics={"train_loss": 0.625},
                fit_time=0.25,
                wall_time=0.5,
            )
            service.on_round(record, weights, state)
            sizes[r] = header_size(service.checkpoints / checkpoint_name(r))
        last = load_checkpoint(service.checkpoints / checkpoint_name(rounds))
        history = service.history()
    finally:
        service.store.close()
    assert last.round == rounds
    assert_same(last.weights, weights)
    assert_same(last.state, state)
    assert last.meta == {"run_id": service.run_id, "record": record.to_dict()}
    # only the round's number changes from one checkpoint to the next
    assert len({sizes[r] for r in range(10, rounds + 1)}) == 1
    assert sizes[rounds] - sizes[1] <= 8  # two more digits, padding to 8 bytes
    assert len(history.rounds) == rounds + 1  # the database has every attempt
