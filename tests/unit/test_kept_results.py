"""A node keeps each result on disk until it is discarded: a new process finds the whole
ones, and removes what was half-written or damaged."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from fedge.messages import UploadHeader
from fedge.node.cache import Cache, Pending


def result(cache: Cache, task_id: str, data: bytes) -> Pending:
    header = UploadHeader(
        task_id, num_examples=3, metrics={"loss": 0.5}, encoding="safetensors",
        size=len(data), sha256=hashlib.sha256(data).digest(),
    )  # fmt: skip
    return cache.save(Pending(header, data))


def test_kept_results_survive_a_restart_and_damaged_ones_are_dropped(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    whole = result(cache, "run/1.0/fit/3", b"payload one")
    damaged = result(cache, "run/2.0/fit/3", b"payload two")
    damaged.files[1].write_bytes(b"payload tw")  # cut short by a power loss
    (cache.results / "half-written").write_bytes(b"x")
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in whole.files)

    found = Cache(tmp_path).saved()
    assert [p.header for p in found] == [whole.header]
    assert isinstance(found[0].payload, Path) and found[0].payload.read_bytes() == b"payload one"
    assert sorted(cache.results.iterdir()) == sorted(whole.files)
    found[0].discard()
    assert not list(cache.results.iterdir())


def test_a_result_without_arrays_is_kept_too(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.save(Pending(UploadHeader("run/1.0/evaluate/0", num_examples=5, loss=0.25)))
    (found,) = Cache(tmp_path).saved()
    assert found.payload is None and (found.header.loss, found.header.num_examples) == (0.25, 5)
