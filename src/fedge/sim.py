"""Simulation: the coordinator driving clients in this process, a process pool, or Ray.

Every backend runs tasks in task order and folds results in that order, so they give
bit-identical models for the same seed (the Ray backend is `fedge.sim_ray`). Stragglers
and dropouts are drawn per (seed, round, attempt, client) for experiments: a dropout
sends nothing; a straggler misses the deadline, unless the strategy keeps partial work
(FedProx), in which case it trains with ``config["work_fraction"]`` in (0, 1) and its
result is kept.

The process pool is `workers` forked processes of one CPU each, as Ray's actors are: one
BLAS/OpenMP thread in every worker (a thread per core in each of them oversubscribes the
cores, and on the tiny matrix products of small clients threads only cost), and tasks
sent in chunks (`batch_size`), the model pickled once per chunk.

With compression, fit results are encoded here, in this process, by one `Compressor` per
client (its error-feedback residual lives as long as the simulation, whichever worker
trained): the bytes a node would send, decoded by the coordinator as the server does.

With node speeds (`task_times`: simulated seconds each client takes per task, e.g. from
`spread_task_times`) the fleet keeps a simulated clock: a task opened at time t finishes
at t + its client's task time, and outcomes come in order of finishing (ties in the
order opened), tasks opened meanwhile included. Nothing sleeps: the clock is what a
benchmark compares (synchronous rounds wait for their slowest client, FedBuff does not),
and the order is a function of the seed, so asynchronous runs are deterministic too.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedge.asynchronous import workflow_for
from fedge.client import EVALUATE, FIT, Client, Config, FitResult, Message, Reply, Result
from fedge.compression import Compressor
from fedge.config import CompressionSection
from fedge.coordinator import (
    Coordinator,
    EvaluateFn,
    Observer,
    Outcome,
    RoundConfig,
    Task,
    Workflow,
)
from fedge.errors import ConfigError, QuorumError, WeightsError
from fedge.history import History, RoundRecord
from fedge.limits import MAX_EXAMPLES, ExampleWeights
from fedge.metrics import Metrics
from fedge.strategy.base import Strategy
from fedge.strategy.fedavg import FedAvg
from fedge.strategy.fedbuff import FedBuff
from fedge.weights import State, Weights, validate

if TYPE_CHECKING:
    from fedge.sim_ray import RayPool

log = logging.getLogger(__name__)

ClientFn = Callable[[int], Client]
ClientFactory = Callable[[], ClientFn]
Backend = Literal["inprocess", "process", "ray"]
BACKENDS: tuple[Backend, ...] = ("inprocess", "process", "ray")
MAX_BATCH = 64
"""Tasks sent to a pool worker at once at most: sending one costs about as much as a
small client's fit, so one at a time spends half the round in the pool's plumbing."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Set to 1 in every pool worker, for thread pools loaded after it started."""


def batch_size(tasks: int, workers: int) -> int:
    """Tasks per chunk: up to `MAX_BATCH`, and at least four chunks per worker, so that
    the last chunks of a round keep every worker busy and ten clients still spread
    over two workers."""
    return max(1, min(MAX_BATCH, math.ceil(tasks / (4 * workers))))


@dataclass(frozen=True)
class Faults:
    stragglers: float = 0.0
    """Probability that a selected client is a straggler in a round."""
    dropouts: float = 0.0
    """Probability that a selected client drops out of a round entirely."""

    def __post_init__(self) -> None:
        for key in ("stragglers", "dropouts"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"simulation.{key} must be a probability in [0, 1], got {value!r}"
                )


def spread_task_times(num_clients: int, spread: float, seed: int = 0) -> list[float]:
    """Per-client task times from 1 to `spread` simulated seconds, evenly spaced on a log
    scale (so the slowest is exactly `spread` times the fastest) and assigned to clients
    in a seeded random order."""
    if not spread >= 1.0:
        raise ConfigError(f"simulation.speed_spread must be >= 1, got {spread!r}")
    times = spread ** np.linspace(0.0, 1.0, num_clients) if num_clients > 1 else np.ones(1)
    order = np.random.default_rng([seed, 11]).permutation(num_clients)
    return [float(times[i]) for i in order]


class LocalFleet:
    """A `Fleet` of `num_clients` simulated clients built on demand by `client_fn`."""

    def __init__(
        self,
        client_fn: ClientFn,
        num_clients: int,
        *,
        seed: int = 0,
        backend: Backend = "inprocess",
        workers: int | None = None,
        faults: Faults = Faults(),
        compression: CompressionSection | None = None,
        task_times: Sequence[float] | None = None,
        ray_address: str | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        if task_times is not None and (
            len(task_times) != num_clients or not all(t > 0 for t in task_times)
        ):
            raise ConfigError(
                f"simulation.task_times must be {num_clients} positive numbers (one per "
                f"client), got {list(task_times)!r}"
            )
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be 'inprocess', 'process' or 'ray', got {backend!r}")
        self.client_fn, self.num_clients, self.seed, self.faults = (
            client_fn,
            num_clients,
            seed,
            faults,
        )
        self.compression = compression
        self._compressors: dict[int, Compressor] = {}
        self.task_times = None if task_times is None else [float(t) for t in task_times]
        self.clock = 0.0
        """Simulated seconds so far (with `task_times`)."""
        self._models: dict[str, Weights] = {}
        self._published = 0
        self._open: list[Task] = []
        self._finish: dict[str, tuple[float, int]] = {}
        self._opened = 0
        self._pool: Pool | None = None
        self._workers = workers or os.cpu_count() or 1
        self._ray: RayPool | None = None
        if backend == "ray":
            from fedge.sim_ray import RayPool

            self._ray = RayPool(
                client_fn, workers=workers, address=ray_address, client_factory=client_factory
            )
        elif backend == "process":
            # fork: client_fn (often a lambda) is inherited, never pickled
            context = multiprocessing.get_context("fork")
            self._pool = context.Pool(
                self._workers, initializer=_init_worker, initargs=(client_fn,)
            )

    def wait_available(self, count: int, deadline: float | None = None) -> list[int]:
        if count > self.num_clients:
            raise QuorumError(
                f"{count} clients are required but the simulation has only {self.num_clients}"
            )
        return list(range(self.num_clients))

    def publish(self, weights: Weights) -> str:
        self._published += 1
        version = f"v{self._published}"
        self._models[version] = weights
        used = {t.model for t in self._open}  # asynchronous tasks may use older ones
        for old in list(self._models)[:-2]:
            if old not in used:
                del self._models[old]
        if self._ray is not None:
            self._ray.publish(version, weights, keep=list(self._models))
        return version

    def open(self, tasks: Sequence[Task]) -> None:
        self._open.extend(tasks)
        if self.task_times is not None:
            for task in tasks:
                self._opened += 1
                finish = self.clock + self.task_times[task.cid]
                self._finish[task.task_id] = (finish, self._opened)

    def close(self, task_ids: Iterable[str]) -> None:
        closing = set(task_ids)
        self._open = [t for t in self._open if t.task_id not in closing]
        for task_id in closing:
            self._finish.pop(task_id, None)

    def outcomes(self, deadline: float | None = None) -> Iterator[Outcome]:
        """Run the open tasks in the order they were opened (with `task_times`: in the
        order they finish on the simulated clock), and yield their outcomes."""
        if self.task_times is not None:
            yield from self._clocked()
            return
        tasks, self._open = self._open, []
        jobs: list[tuple[Task, Config]] = []
        skipped: dict[str, str] = {}
        for task in tasks:
            config, reason = self._apply_faults(task)
            if reason is None:
                jobs.append((task, config))
            else:
                skipped[task.task_id] = reason
        runs: Iterator[Executed]
        if self._ray is not None:
            runs = self._ray.imap([_ray_job(task, config) for task, config in jobs])
        else:
            args = [
                (
                    task.kind,
                    task.cid,
                    self._models.get(task.model or ""),
                    config,
                    task.payload or {},
                )
                for task, config in jobs
            ]
            runs = (  # in task order, whichever worker finished first
                self._pool.imap(
                    _execute_packed, args, chunksize=batch_size(len(args), self._workers)
                )
                if self._pool is not None
                else (_execute(*_private_copy(a), client_fn=self.client_fn) for a in args)
            )
        for task in tasks:
            if task.task_id in skipped:
                yield Outcome(task, error=skipped[task.task_id])
            else:
                yield self._outcome(task, *next(runs))

    def _outcome(self, task: Task, result: Result | None, error: str | None) -> Outcome:
        if isinstance(result, FitResult) and error is None:
            result, error = self._compress(task, result)
        error = error or _reply_problem(task, result)
        return Outcome(task, result=None if error else result, error=error)

    def _compress(self, task: Task, result: FitResult) -> Executed:
        """The result as the client's node would send it (unchanged without compression)."""
        if self.compression is None or self.compression.mode == "none" or task.model is None:
            return result, None
        compressor = self._compressors.get(task.cid)
        if compressor is None:
            compressor = self._compressors[task.cid] = Compressor(self.compression)
        try:
            return compressor.compress(self._models[task.model], result, task.config), None
        except WeightsError as exc:
            return None, f"client {task.cid}: {exc}"

    def _clocked(self) -> Iterator[Outcome]:
        """One task at a time, the next to finish first, until none is open."""
        while self._open:
            task = min(self._open, key=lambda t: self._finish[t.task_id])
            self._open.remove(task)
            self.clock = max(self.clock, self._finish.pop(task.task_id)[0])
            config, reason = self._apply_faults(task)
            if reason is not None:
                yield Outcome(task, error=reason)
                continue
            if self._ray is not None:
                yield self._outcome(task, *self._ray.run(_ray_job(task, config)))
                continue
            args = (
                task.kind,
                task.cid,
                self._models.get(task.model or ""),
                config,
                task.payload or {},
            )
            yield self._outcome(
                task,
                *(
                    self._pool.apply(_execute_packed, (args,))
                    if self._pool is not None
                    else _execute(*_private_copy(args), client_fn=self.client_fn)
                ),
            )

    def _apply_faults(self, task: Task) -> tuple[Config, str | None]:
        if task.kind != FIT or (self.faults.stragglers == 0 and self.faults.dropouts == 0):
            return task.config, None
        rng = np.random.default_rng([self.seed, task.round, task.attempt, task.cid, 7])
        if rng.random() < self.faults.dropouts:
            return task.config, "dropped out (simulated)"
        if rng.random() < self.faults.stragglers:
            if not task.partial_work:
                return task.config, "straggler missed the round deadline (simulated)"
            return {**task.config, "work_fraction": float(rng.uniform(0.0, 1.0))}, None
        return task.config, None

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._ray is not None:
            self._ray.close()
            self._ray = None


Executed = tuple[Result | None, str | None]
Job = tuple[str, int, Weights | None, Config, Weights]


def _ray_job(task: Task, config: Config) -> tuple[str, int, str | None, Config, Weights]:
    """A task as the Ray backend sends it: the model by version, not by value."""
    return task.kind, task.cid, task.model, config, task.payload or {}


def _execute(
    kind: str,
    cid: int,
    weights: Weights | None,
    config: Config,
    payload: Weights,
    *,
    client_fn: ClientFn,
) -> Executed:
    try:
        return client_fn(cid).handle(Message(kind, config, weights, payload)), None
    except Exception as exc:  # the client's code failed: report it, keep the round going
        log.debug("client %d failed:\n%s", cid, traceback.format_exc())
        return None, f"client {cid} raised {type(exc).__name__}: {exc}"


def _reply_problem(task: Task, result: Result | None) -> str | None:
    """Why the reply to a task of a workflow's own kind is refused, as the server refuses
    it on upload: not a `Reply`, or arrays that are not what the task `expects`."""
    if task.kind in (FIT, EVALUATE):
        return None  # the coordinator checks these itself
    source = f"client {task.cid}"
    if not isinstance(result, Reply):
        return f"{source}: a {task.kind!r} task returned {type(result).__name__}, not Reply"
    if task.expects is None:
        if result.arrays:
            return f"{source}: tasks of kind {task.kind!r} carry no arrays in their reply"
        return None
    try:
        validate(result.arrays, task.expects, source=source)
    except WeightsError as exc:
        return str(exc)
    return None


def _private_copy(args: Job) -> Job:
    """In-process clients get their own copy of the weights, as they would in a worker
    process or on a device, so in-place training cannot change the global model."""
    kind, cid, weights, config, payload = args
    copied = None if weights is None else {name: a.copy() for name, a in weights.items()}
    return kind, cid, copied, config, payload


_worker_client_fn: ClientFn | None = None


def _init_worker(client_fn: ClientFn) -> None:
    """One CPU per worker: one thread in the thread pools loaded already (forked from the
    parent, NumPy's OpenBLAS among them: too late for the environment) and in those a
    client loads later, which read the environment."""
    import threadpoolctl  # only here: a node never needs it

    global _worker_client_fn
    _worker_client_fn = client_fn
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    threadpoolctl.threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:  # its intra-op pool, whichever threading it was built with
        torch.set_num_threads(1)


def _execute_packed(args: Job) -> Executed:
    """A task in a worker. The tasks of a chunk share one unpickled model (pickled once
    for the chunk), so each client gets its own copy, as in-process."""
    assert _worker_client_fn is not None
    return _execute(*_private_copy(args), client_fn=_worker_client_fn)


def simulate(
    client_fn: ClientFn,
    num_clients: int,
    rounds: int,
    *,
    strategy: Strategy | None = None,
    initial_weights: Weights | None = None,
    evaluate_fn: EvaluateFn | None = None,
    seed: int = 0,
    fit_config: RoundConfig | None = None,
    evaluate_config: RoundConfig | None = None,
    backend: Backend = "inprocess",
    workers: int | None = None,
    stragglers: float = 0.0,
    dropouts: float = 0.0,
    max_round_retries: int = 2,
    max_examples: int = MAX_EXAMPLES,
    example_weights: ExampleWeights | None = None,
    workflow: Workflow | None = None,
    observer: Observer | None = None,
    compression: CompressionSection | None = None,
    task_times: Sequence[float] | None = None,
    speed_spread: float = 1.0,
    ray_address: str | None = None,
    client_factory: ClientFactory | None = None,
) -> History:
    """Run `rounds` of federated training over `num_clients` simulated clients.

    Node speeds: `task_times` (simulated seconds per task, per client), or a
    `speed_spread` > 1 (`spread_task_times`); each round's record then carries the
    simulated time (``sim_time``). An asynchronous strategy (FedBuff) always runs on the
    simulated clock, its clients equally fast unless told otherwise. The default
    workflow is the strategy's (`fedge.asynchronous.workflow_for`). `example_weights`
    caps what the example count a client reports weighs (default: as reported).

    ``backend="ray"`` runs the clients in Ray actors (`fedge.sim_ray`): a local Ray is
    started and stopped for the run, or the session this process already has is used, or
    the cluster at `ray_address` (``"auto"``, ``HOST:PORT``) is joined. Each actor gets
    `client_fn` through the object store (cloudpickle: closures by value, module-level
    functions and classes by reference, so their module must be importable where the
    actors run), or calls `client_factory` once to build its own."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    strategy = strategy or FedAvg()
    if task_times is None and (speed_spread != 1.0 or isinstance(strategy, FedBuff)):
        task_times = spread_task_times(num_clients, speed_spread, seed)
    if initial_weights is None:
        initial_weights = client_fn(0).get_weights({"round": 0, "seed": seed})
    coordinator = Coordinator(
        strategy=strategy,
        weights=dict(initial_weights),
        rounds=rounds,
        seed=seed,
        evaluate_fn=evaluate_fn,
        fit_config=fit_config,
        evaluate_config=evaluate_config,
        max_round_retries=max_round_retries,
        max_examples=max_examples,
        example_weights=example_weights or ExampleWeights(),
        run_id="sim",
        observer=observer or Observer(),
        workflow=workflow or workflow_for(strategy),
    )
    history = History()
    started = time.perf_counter()
    with LocalFleet(
        client_fn,
        num_clients,
        seed=seed,
        backend=backend,
        workers=workers,
        faults=Faults(stragglers, dropouts),
        compression=compression,
        task_times=task_times,
        ray_address=ray_address,
        client_factory=client_factory,
    ) as fleet:
        try:
            coordinator.run(fleet, _Clocked(history, fleet))
        except QuorumError as exc:
            exc.history = history
            raise
    history.wall_time = time.perf_counter() - started
    history.weights, history.ended_early = coordinator.weights, coordinator.ended_early
    return history


class _Clocked:
    """Stamps each round with the simulated clock before the history records it."""

    def __init__(self, history: History, fleet: LocalFleet) -> None:
        self.history, self.fleet = history, fleet

    def on_start(self, initial_metrics: Metrics) -> None:
        self.history.on_start(initial_metrics)

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        record.sim_time = self.fleet.clock
        self.history.on_round(record, weights, state)
