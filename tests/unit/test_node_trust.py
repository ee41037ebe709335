"""A node does not trust the server blindly: a model larger than its task announced is
refused, and never buffered beyond the announced size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.client import Client
from fedge.errors import WeightsError
from fedge.messages import Joined, ModelRef, TaskHeader
from fedge.node.runtime import Node, NodeSettings


class Idle(Client):
    def fit(self, weights: object, config: object) -> None:  # type: ignore[override]
        raise AssertionError("not reached")


class FloodingLink:
    """A hostile server: every download streams far more than the model it announced."""

    def __init__(self) -> None:
        self.sent = 0

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]:
        for _ in range(10_000):
            self.sent += 1 << 16
            yield bytes(1 << 16)

    def cancel(self) -> None:
        pass


def test_a_model_larger_than_announced_is_refused(tmp_path: Path) -> None:
    link = FloodingLink()
    node = Node(Idle(), link, NodeSettings(0, "node-0", cache_dir=tmp_path))  # type: ignore[arg-type]
    node._joined = Joined("node-0", "token", 5.0)
    node._connected.set()
    ref = ModelRef("v1", b"\0" * 32, 100_000)
    task = TaskHeader("t", "run", 1, "fit", {}, ref)
    with pytest.raises(WeightsError, match="sent more than the 100000 bytes it announced"):
        node._download(task)
    assert link.sent <= 100_000 + (1 << 16)  # it stopped reading at once
