"""The coordinator's view of the fleet service: a `fedge.coordinator.Fleet`.

The coordinator runs in its own thread (validating and folding updates is CPU work that
must not stall the event loop); the service lives on the loop. Calls cross with
`run_coroutine_threadsafe`; outcomes come back through the board's thread-safe queue.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from fedge.coordinator import Outcome, Task
from fedge.fleet.service import FleetService, Stopped
from fedge.messages import ModelRef
from fedge.weights import Weights

T = TypeVar("T")


class ServiceFleet:
    def __init__(self, service: FleetService, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self._refs: dict[str, ModelRef] = {}
        self._waiting: set[str] = set()
        """Opened tasks whose outcome the coordinator has not been given yet."""

    def _on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()

    def wait_available(self, count: int, deadline: float | None) -> list[int]:
        future = asyncio.run_coroutine_threadsafe(
            self.service.wait_available(count, deadline), self.loop
        )
        return future.result()

    def publish(self, weights: Weights) -> str:
        ref = self.service.models.publish(weights)  # encodes in this thread, not on the loop
        self._refs[ref.version] = ref
        return ref.version

    def open(self, tasks: Sequence[Task]) -> None:
        self._waiting.update(t.task_id for t in tasks)
        refs = {t.model: self._refs[t.model] for t in tasks if t.model}
        self._on_loop(self.service.open_tasks, tasks, refs)

    def outcomes(self, deadline: float | None) -> Iterator[Outcome]:
        results = self.service.board.results
        while self._waiting and not self.service.stopping:
            remaining = 0.5 if deadline is None else deadline - time.time()
            if remaining <= 0:
                break
            try:
                outcome = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if outcome.task.task_id in self._waiting:  # not one of a task closed since
                self._waiting.discard(outcome.task.task_id)
                yield outcome
        if self.service.stopping:
            raise Stopped("the server is stopping")

    def close(self, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        self._waiting.difference_update(ids)
        self._on_loop(self.service.close_tasks, ids)
