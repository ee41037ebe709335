"""Open tasks: who must answer what, and the outcomes that go back to the coordinator.

A task is open from `add` until `close`. Its outcome (a result, or the node's report of a
failure) is accepted once; a re-sent upload of an accepted task is acknowledged and not
counted again. When a node's task stream (re)opens, the open tasks of its client id that
have no outcome yet are pushed to it again, so a node that reconnected or restarted can
still answer. Closed *stages* (run/round.attempt/kind) are remembered — a bounded number
of them, not every task id — so a late upload is told its round is closed.
"""

from __future__ import annotations

import queue
from collections import OrderedDict
from dataclasses import dataclass

from fedge.client import FIT, Result
from fedge.coordinator import Outcome, Task
from fedge.messages import Code, FleetError, TaskHeader

CLOSED_STAGES = 1000


@dataclass(eq=False)
class OpenTask:
    task: Task
    header: TaskHeader
    done: bool = False
    received_bytes: int = 0


def stage_of(task_id: str) -> str:
    """``run/round.attempt/kind`` of ``run/round.attempt/kind/cid``."""
    return task_id.rsplit("/", 1)[0]


class TaskBoard:
    """Touched only from the event loop; outcomes cross to the coordinator's thread
    through `results`."""

    def __init__(self) -> None:
        self.open: dict[str, OpenTask] = {}
        self.by_cid: dict[int, dict[str, OpenTask]] = {}
        self.closed: OrderedDict[str, int] = OrderedDict()  # stage -> round, bounded
        self.results: queue.Queue[Outcome] = queue.Queue()
        self.fit_stage = ""
        self.expected = 0
        self.received = 0
        """Tasks opened, and results accepted, in the latest fit stage (for status)."""

    def add(self, task: Task, header: TaskHeader) -> OpenTask:
        open_task = OpenTask(task, header)
        self.open[task.task_id] = open_task
        self.by_cid.setdefault(task.cid, {})[task.task_id] = open_task
        if task.kind == FIT:
            stage = stage_of(task.task_id)
            if stage != self.fit_stage:
                self.fit_stage, self.expected, self.received = stage, 0, 0
            self.expected += 1
        return open_task

    def pending(self, cid: int) -> list[TaskHeader]:
        """Headers of the open tasks of `cid` that have no outcome yet."""
        return [t.header for t in self.by_cid.get(cid, {}).values() if not t.done]

    def lookup(self, task_id: str) -> OpenTask:
        open_task = self.open.get(task_id)
        if open_task is not None:
            return open_task
        closed_round = self.closed.get(stage_of(task_id))
        if closed_round is not None:
            raise FleetError(
                Code.ABORTED,
                f"task {task_id!r} belongs to round {closed_round}, which is closed; "
                "the result was not counted",
            )
        raise FleetError(Code.NOT_FOUND, f"unknown task id {task_id!r}")

    def accept(
        self, open_task: OpenTask, result: Result | None, error: str | None, size: int = 0
    ) -> None:
        open_task.done, open_task.received_bytes = True, size
        if error is None and stage_of(open_task.task.task_id) == self.fit_stage:
            self.received += 1
        self.results.put(Outcome(open_task.task, result=result, error=error))

    def close(self, task_ids: list[str]) -> list[OpenTask]:
        closed = []
        for task_id in task_ids:
            open_task = self.open.pop(task_id, None)
            if open_task is None:
                continue
            closed.append(open_task)
            mine = self.by_cid.get(open_task.task.cid, {})
            mine.pop(task_id, None)
            if not mine:
                self.by_cid.pop(open_task.task.cid, None)
            self.closed[stage_of(task_id)] = open_task.task.round
        while len(self.closed) > CLOSED_STAGES:
            self.closed.popitem(last=False)
        return closed
