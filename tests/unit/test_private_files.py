"""Payloads and models on disk (spools, spilled results, a node's results, published
models, checkpoints) are created 0600, like keys and the state database."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import numpy as np

from fedge.checkpoint import Checkpoint, save_checkpoint
from fedge.chunks import Spool
from fedge.fleet.models import IN_MEMORY, ModelStore
from fedge.node.cache import SPILL_BYTES, Cache


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_spool_is_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "upload.part")
    spool.write(b"x" * 10)
    spool.close()
    assert _mode(tmp_path / "upload.part") == 0o600


def test_a_large_result_waiting_on_a_node_is_private(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "node")
    big = {"w": np.zeros(SPILL_BYTES // 4 + 1, np.float32)}
    payload, _, _ = cache.encode(big, "run/1.0/fit/3")
    assert isinstance(payload, Path) and _mode(payload) == 0o600


def test_a_result_spilled_by_the_server_is_private(tmp_path: Path) -> None:
    from fedge.fleet.uploads import _write_private

    asyncio.run(asyncio.to_thread(_write_private, tmp_path / "r.safetensors", b"data"))
    assert _mode(tmp_path / "r.safetensors") == 0o600


def test_a_published_model_on_disk_is_private(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.publish({"w": np.zeros(IN_MEMORY // 4 + 1, np.float32)})
    (published,) = (tmp_path / "models").iterdir()
    assert _mode(published) == 0o600


def test_a_checkpoint_is_private(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, Checkpoint(round=1, weights={"w": np.zeros(3, np.float32)}))
    assert _mode(path) == 0o600
