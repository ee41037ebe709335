"""File-backed updates: read with plain reads in blocks, checked and folded like in-memory ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.aggregate import WeightedMean
from fedge.errors import WeightsError
from fedge.weights import FileWeights, Weights, read_file, spec_of, to_file, validate

MODEL: Weights = {
    "conv": np.arange(2 * 3 * 50, dtype=np.float32).reshape(50, 3, 2) / 7,
    "scalar": np.array(3.5, dtype=np.float64),
    "steps": np.array([4, 5, 6], dtype=np.int64),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "mask": np.array([True, False]),
}


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileWeights, "BLOCK_BYTES", 64)  # "conv" spans 19 blocks


def saved(tmp_path: Path, weights: Weights, name: str = "u.safetensors") -> FileWeights:
    path = tmp_path / name
    to_file(weights, path)
    return FileWeights(path, source="node 7")


def test_tensors_read_back_bit_exactly_in_order(tmp_path: Path) -> None:
    fw = saved(tmp_path, MODEL)
    assert list(fw) == list(MODEL)
    for name, want in MODEL.items():
        got = fw[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert fw.layout(name) == (want.dtype, want.shape)


def test_read_file_decodes_the_whole_model_in_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    to_file(MODEL, path)
    decoded = read_file(path)
    assert list(decoded) == list(MODEL)
    for name, want in MODEL.items():
        np.testing.assert_array_equal(decoded[name], want)
        assert decoded[name].dtype == want.dtype and decoded[name].shape == want.shape


def test_blocks_cover_the_flattened_tensor(tmp_path: Path, small_blocks: None) -> None:
    fw = saved(tmp_path, MODEL)
    for name, want in MODEL.items():
        parts = [b.copy() for b in fw.blocks(name)]  # each block reuses one buffer
        assert all(p.nbytes <= 64 for p in parts)
        joined = np.concatenate(parts) if parts else np.zeros(0, want.dtype)
        np.testing.assert_array_equal(joined[: want.size], want.reshape(-1))


def test_membership_and_layout_read_no_tensor_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fw = saved(tmp_path, MODEL)

    def no_reads(*args: object) -> None:
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(FileWeights, "_read_into", no_reads)
    assert "conv" in fw and "nope" not in fw and "__metadata__" not in fw
    assert fw.layout("steps") == (np.dtype(np.int64), (3,))
    assert len(fw) == len(MODEL)


def test_validation_streams_blocks_and_names_the_bad_tensor(
    tmp_path: Path, small_blocks: None
) -> None:
    spec = spec_of(MODEL)
    validate(saved(tmp_path, MODEL), spec, source="node 7")
    bad = dict(MODEL, conv=MODEL["conv"].copy())
    bad["conv"][49, 2, 1] = np.inf  # in the last block
    with pytest.raises(WeightsError, match=r"node 7: tensor 'conv' has 1 NaN or Inf"):
        validate(saved(tmp_path, bad, "bad.safetensors"), spec, source="node 7")
    wrong = dict(MODEL, steps=MODEL["steps"].astype(np.int32))
    with pytest.raises(WeightsError, match="'steps' has dtype int32, expected int64"):
        validate(saved(tmp_path, wrong, "wrong.safetensors"), spec, source="node 7")


def test_a_file_cut_after_opening_is_an_error_not_garbage(tmp_path: Path) -> None:
    fw = saved(tmp_path, MODEL)
    with fw.path.open("r+b") as f:
        f.truncate(fw.path.stat().st_size - 10)
    with pytest.raises(WeightsError, match=r"node 7: tensor .* is cut short"):
        for name in fw:
            fw[name]


def test_garbage_file_is_rejected_naming_the_source(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError, match="node 7: not a valid safetensors payload"):
        FileWeights(path, source="node 7")


def test_folding_file_backed_updates_equals_folding_arrays(
    tmp_path: Path, small_blocks: None
) -> None:
    rng = np.random.default_rng(0)
    updates = [
        {"w": rng.standard_normal((40, 3)).astype(np.float32), "n": rng.integers(0, 9, 5)}
        for _ in range(4)
    ]
    counts = [3, 1, 7, 2]
    in_memory, on_disk = WeightedMean(), WeightedMean()
    for i, (u, n) in enumerate(zip(updates, counts, strict=True)):
        in_memory.add(u, n)
        on_disk.add(saved(tmp_path, u, f"{i}.safetensors"), n)
    want, got = in_memory.result(), on_disk.result()
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
