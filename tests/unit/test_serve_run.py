"""Where the server runs a model: a request the model answers in well under a millisecond
stays on the event loop (a hop to a thread would cost more), a slower one goes to a
worker thread so the loop keeps answering; both give the same outputs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.adapters.numpy import softmax_onnx, softmax_weights

onnx = pytest.importorskip("onnx")
pytest.importorskip("starlette")
from fedge.serve.app import run  # noqa: E402
from fedge.serve.model import ServedModel, rows  # noqa: E402


def test_quick_runs_stay_on_the_event_loop_and_slow_ones_go_to_a_thread(tmp_path: Path) -> None:
    onnx.save(softmax_onnx(softmax_weights(64, 10)), tmp_path / "digits.onnx")
    model = ServedModel.load(tmp_path / "digits.onnx", "digits", "v1", threads=1)
    feeds = {"input": np.ones((4, 64), np.float32)}
    assert rows(feeds) == 4 and rows({"x": np.float32(1)}) == 1
    where: list[int] = []
    session = model.session

    class Spy:
        def run(self, names: Any, inputs: dict[str, np.ndarray]) -> Any:
            where.append(threading.get_ident())
            return session.run(names, inputs)

    model.session = Spy()

    async def twice() -> tuple[list[np.ndarray], list[np.ndarray]]:
        quick = await run(model, feeds)
        model.row_seconds = 1.0  # as if one example had taken a second
        return quick, await run(model, feeds)

    quick, slow = asyncio.run(twice())
    assert where[0] == threading.get_ident() != where[1]
    for a, b in zip(quick, slow, strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.expected_seconds(feeds) < 0.001  # measured again on the slow run
