"""Asynchronous rounds: FedBuff's workflow over the same coordinator and fleets.

The coordinator still runs rounds; under FedBuff a round is one server update. The
workflow keeps up to ``concurrency`` fit tasks outstanding *across* rounds (the fleet
lets tasks of several model versions stay open): whenever a result arrives it is
validated, weighed by its staleness and folded into the buffer, and its client is given
a new task on the newest model at once. After ``buffer_size`` results the buffered mean
delta goes to `FedBuff.apply`, the coordinator checkpoints and evaluates, and the next
round's buffer starts empty while the outstanding tasks keep training. Given the seed
and the order in which results arrive (in simulation: a simulated clock over node
speeds) the run is deterministic.

Durability: with a `BufferStore` (the server's run directory) the buffer — the partial
sum, the task ids folded in, the round's record so far and the tasks outstanding on the
current model — is written after every fold. A server killed mid-buffer resumes with it:
the folded results are not folded again (their task ids are recorded; a re-sent upload of
one is refused as of an unknown task, and the node drops it), and the outstanding tasks
that trained from the resumed model are opened again under their own ids, so a node's
kept result for one is delivered and counted once. Tasks on older models are given up
(at most ``concurrency`` results of work). Measured in benchmarks/fedbuff_bench.py: one
buffer write costs well under the time of validating the upload it follows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from fedge.checkpoint import Checkpoint
from fedge.client import FIT
from fedge.coordinator import Outcome, Round, Task, Workflow, client_seed, fit_round
from fedge.metrics import WeightedMetrics
from fedge.strategy.base import Strategy
from fedge.strategy.fedbuff import Buffer, FedBuff
from fedge.weights import Weights

log = logging.getLogger(__name__)


class BufferStore(Protocol):
    """Where the buffer is kept durably between folds (the server's run directory)."""

    def save_buffer(self, ckpt: Checkpoint) -> None: ...

    def load_buffer(self) -> Checkpoint | None: ...


def workflow_for(strategy: Strategy, store: BufferStore | None = None) -> Workflow:
    """The default workflow of `strategy`: buffered asynchronous rounds for FedBuff,
    synchronous rounds for every other strategy."""
    return BufferedAsync(store) if isinstance(strategy, FedBuff) else fit_round


class BufferedAsync:
    """FedBuff's workflow; one instance serves every round of a run (it holds the tasks
    outstanding between rounds)."""

    def __init__(self, store: BufferStore | None = None) -> None:
        self.store = store
        self.outstanding: dict[str, Task] = {}
        self.bases: dict[int, Weights] = {}
        """Global weights at the start of each round that outstanding tasks train from."""
        self.buffer: Buffer | None = None
        self.sequence = 0
        """Tasks opened in the run so far: makes task ids and client seeds unique."""
        self._restored = False
        self._partial: dict[str, Any] = {}

    def __call__(self, rnd: Round) -> Weights | None:
        strategy = rnd.strategy
        if not isinstance(strategy, FedBuff):
            raise TypeError(f"BufferedAsync runs FedBuff, not {strategy.name}")
        if not self._restored:
            self._restored = True
            self._restore(rnd)
        if self.buffer is None or self.buffer.round != rnd.number:
            self.buffer = Buffer(rnd.number)
            self._partial = {"participants": [], "num_examples": 0, "stale": 0}
        buffer, record = self.buffer, rnd.record
        self.bases[rnd.number] = rnd.weights
        record.participants = list(self._partial["participants"])
        record.num_examples = int(self._partial["num_examples"])
        record.stale = int(self._partial["stale"])
        self._drop_too_stale(rnd, strategy)
        rnd.coordinator.observer.round_started(rnd.number, strategy.buffer_size)
        config = rnd.fit_config()
        metrics, selected = WeightedMetrics(), set[int]()
        while buffer.count < strategy.buffer_size:
            selected.update(self._top_up(rnd, strategy, config))
            self._save(rnd)
            outcome = next(rnd.fleet.outcomes(rnd.deadline), None)
            if outcome is None:  # the round's deadline passed
                break
            self._take(rnd, strategy, outcome, metrics)
        record.selected = sorted(selected)
        record.tasks = list(buffer.tasks)
        record.fit_metrics = metrics.mean()
        self._partial["participants"] = list(record.participants)
        self._partial["num_examples"], self._partial["stale"] = record.num_examples, record.stale
        if buffer.count < strategy.buffer_size:
            record.reason = (
                f"only {buffer.count} of the buffer's {strategy.buffer_size} results arrived "
                "before the round's deadline"
            )
            return None  # the buffer is kept: the retry fills it further
        if rnd.number >= rnd.coordinator.rounds:  # the last update: nothing more to train
            rnd.fleet.close(list(self.outstanding))
            self.outstanding.clear()
        return buffer.mean()

    # --- steps ------------------------------------------------------------------------

    def _top_up(self, rnd: Round, strategy: FedBuff, config: Mapping[str, Any]) -> list[int]:
        """Open tasks on the newest model for idle available clients, up to the
        concurrency; with none outstanding, wait for clients first."""
        need = 0 if self.outstanding else max(1, strategy.min_available_clients)
        available = rnd.wait_available(need)
        busy = {t.cid for t in self.outstanding.values()}
        idle = sorted(c for c in available if c not in busy)
        room = strategy.concurrency - len(self.outstanding)
        if room <= 0 or not idle:
            return []
        cids = rnd.sample(idle, min(room, len(idle)))
        tasks = [self._task(rnd, cid, config) for cid in cids]
        rnd.fleet.open(tasks)
        self.outstanding.update((t.task_id, t) for t in tasks)
        return cids

    def _task(self, rnd: Round, cid: int, config: Mapping[str, Any]) -> Task:
        self.sequence += 1
        coordinator = rnd.coordinator
        return Task(
            task_id=f"{coordinator.run_id}/{rnd.number}.{rnd.attempt}/{FIT}/{cid}.{self.sequence}",
            round=rnd.number,
            attempt=rnd.attempt,
            kind=FIT,
            cid=cid,
            config={
                **config,
                "round": rnd.number,
                "seed": client_seed(coordinator.seed, self.sequence, cid),
            },
            model=rnd.model(),
            expects=coordinator.spec,
        )

    def _take(
        self, rnd: Round, strategy: FedBuff, outcome: Outcome, metrics: WeightedMetrics
    ) -> None:
        task, record = outcome.task, rnd.record
        assert self.buffer is not None
        rnd.fleet.close([task.task_id])
        if self.outstanding.pop(task.task_id, None) is None:
            return  # closed already (given up as too stale)
        if task.task_id in self.buffer.tasks:  # cannot happen through a fleet; be sure
            log.warning("round %d: task %s is in the buffer already", rnd.number, task.task_id)
            return
        staleness = rnd.number - task.round
        if staleness > strategy.max_staleness:
            self._stale(rnd, strategy, task)
            return
        accepted = rnd.accept_fit(outcome, self.bases[task.round])
        if accepted is None:
            return
        weights, examples, found = accepted
        counted = rnd.coordinator.example_weights(examples)
        weight = counted if strategy.weight_by_examples else 1
        self.buffer.fold(task.task_id, weights, self.bases[task.round], weight, staleness)
        record.participants.append(task.cid)
        record.num_examples += examples
        metrics.add(found, counted)
        self._forget_bases(rnd.number)
        rnd.coordinator.observer.result_received(
            rnd.number, self.buffer.count, strategy.buffer_size
        )

    def _drop_too_stale(self, rnd: Round, strategy: FedBuff) -> None:
        """Give up tasks whose result could no longer be used, so their clients take new
        ones (a node still training one finds its upload refused as closed)."""
        old = [
            t for t in self.outstanding.values() if rnd.number - t.round > strategy.max_staleness
        ]
        if old:
            rnd.fleet.close([t.task_id for t in old])
            for task in old:
                del self.outstanding[task.task_id]
                self._stale(rnd, strategy, task)
        self._forget_bases(rnd.number)

    def _stale(self, rnd: Round, strategy: FedBuff, task: Task) -> None:
        rnd.record.stale += 1
        rnd.record.failures[task.cid] = (
            f"task {task.task_id} trained on the model of round {task.round - 1}, more than "
            f"strategy.max_staleness = {strategy.max_staleness} versions old; dropped"
        )

    def _forget_bases(self, current: int) -> None:
        needed = {t.round for t in self.outstanding.values()} | {current}
        for round_ in [r for r in self.bases if r not in needed]:
            del self.bases[round_]

    # --- durability -------------------------------------------------------------------

    def _save(self, rnd: Round) -> None:
        """Checkpoint the buffer, and the tasks on the current model (they can be opened
        again after a restart), when it changed."""
        if self.store is None or self.buffer is None:
            return
        reopenable = [t for t in self.outstanding.values() if t.round == rnd.number]
        meta = {
            "attempt": rnd.attempt,
            "weight": self.buffer.weight,
            "tasks": list(self.buffer.tasks),
            "participants": list(rnd.record.participants),
            "num_examples": rnd.record.num_examples,
            "stale": rnd.record.stale,
            "sequence": self.sequence,
            "outstanding": [
                {"id": t.task_id, "cid": t.cid, "attempt": t.attempt, "config": dict(t.config)}
                for t in reopenable
            ],
        }
        if meta == self._partial.get("saved"):
            return
        self._partial["saved"] = meta
        self.store.save_buffer(Checkpoint(rnd.number, dict(self.buffer.sums), {}, meta))

    def _restore(self, rnd: Round) -> None:
        """After a restart: the buffer of the round being resumed, and its tasks that
        trained from the resumed model, opened again under their own ids."""
        ckpt = None if self.store is None else self.store.load_buffer()
        if ckpt is None:
            return
        meta = ckpt.meta
        self.sequence = int(meta.get("sequence", 0))
        if ckpt.round != rnd.number:  # that round was applied and checkpointed
            return
        self.buffer = Buffer(
            ckpt.round, dict(ckpt.weights), float(meta["weight"]), [str(t) for t in meta["tasks"]]
        )
        self._partial = {
            "participants": [int(c) for c in meta["participants"]],
            "num_examples": int(meta["num_examples"]),
            "stale": int(meta["stale"]),
        }
        tasks = [
            Task(
                task_id=str(t["id"]),
                round=rnd.number,
                attempt=int(t["attempt"]),
                kind=FIT,
                cid=int(t["cid"]),
                config=dict(t["config"]),
                model=rnd.model(),
                expects=rnd.coordinator.spec,
            )
            for t in meta["outstanding"]
        ]
        if tasks:
            rnd.fleet.open(tasks)
            self.outstanding.update((t.task_id, t) for t in tasks)
        log.warning(
            "round %d: resumed a buffer of %d result(s) and %d outstanding task(s)",
            rnd.number,
            self.buffer.count,
            len(tasks),
        )


__all__ = ["BufferStore", "BufferedAsync", "workflow_for"]
