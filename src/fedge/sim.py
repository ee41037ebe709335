"""Simulation: the coordinator driving clients in this process or in a process pool.

Both backends run tasks in task order and fold results in that order, so they give
bit-identical models for the same seed. Stragglers and dropouts are drawn per (seed,
round, attempt, client) for experiments: a dropout sends nothing; a straggler misses the
deadline, unless the strategy keeps partial work (FedProx), in which case it trains with
``config["work_fraction"]`` in (0, 1) and its result is kept.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from types import TracebackType
from typing import Literal

import numpy as np

from fedge.client import Client, Config, EvaluateResult, FitResult
from fedge.coordinator import Coordinator, EvaluateFn, Observer, Outcome, RoundConfig, Task
from fedge.errors import ConfigError, QuorumError
from fedge.history import History
from fedge.strategy.base import Strategy
from fedge.strategy.fedavg import FedAvg
from fedge.weights import Weights

log = logging.getLogger(__name__)

ClientFn = Callable[[int], Client]
Backend = Literal["inprocess", "process"]


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
    ) -> None:
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        if backend not in ("inprocess", "process"):
            raise ConfigError(f"backend must be 'inprocess' or 'process', got {backend!r}")
        self.client_fn, self.num_clients, self.seed, self.faults = (
            client_fn,
            num_clients,
            seed,
            faults,
        )
        self._pool: Pool | None = None
        if backend == "process":
            # fork: client_fn (often a lambda) is inherited, never pickled
            context = multiprocessing.get_context("fork")
            self._pool = context.Pool(
                workers or os.cpu_count() or 1, initializer=_init_worker, initargs=(client_fn,)
            )

    def wait_available(self, count: int) -> list[int]:
        if count > self.num_clients:
            raise QuorumError(
                f"{count} clients are required but the simulation has only {self.num_clients}"
            )
        return list(range(self.num_clients))

    def run(
        self, tasks: Sequence[Task], weights: Weights, timeout: float | None
    ) -> Iterator[Outcome]:
        jobs: list[tuple[Task, Config]] = []
        skipped: dict[str, str] = {}
        for task in tasks:
            config, reason = self._apply_faults(task)
            if reason is None:
                jobs.append((task, config))
            else:
                skipped[task.task_id] = reason
        args = [(task.kind, task.cid, weights, config) for task, config in jobs]
        runs: Iterator[Executed] = (
            self._pool.imap(_execute_packed, args)
            if self._pool is not None
            else (_execute(*_private_copy(a), client_fn=self.client_fn) for a in args)
        )
        for task in tasks:
            if task.task_id in skipped:
                yield Outcome(task, error=skipped[task.task_id])
            else:
                result, error = next(runs)
                yield Outcome(task, result=result, error=error)

    def _apply_faults(self, task: Task) -> tuple[Config, str | None]:
        if task.kind != "fit" or (self.faults.stragglers == 0 and self.faults.dropouts == 0):
            return task.config, None
        rng = np.random.default_rng([self.seed, task.round, task.attempt, task.cid, 7])
        if rng.random() < self.faults.dropouts:
            return task.config, "dropped out (simulated)"
        if rng.random() < self.faults.stragglers:
            if not task.partial_work:
                return task.config, "straggler missed the round deadline (simulated)"
            return {**task.config, "work_fraction": float(rng.uniform(0.0, 1.0))}, None
        return task.config, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


Executed = tuple[FitResult | EvaluateResult | None, str | None]


def _execute(
    kind: str, cid: int, weights: Weights, config: Config, *, client_fn: ClientFn
) -> Executed:
    try:
        client = client_fn(cid)
        if kind == "fit":
            return client.fit(weights, config), None
        return client.evaluate(weights, config), None
    except Exception as exc:  # the client's code failed: report it, keep the round going
        log.debug("client %d failed:\n%s", cid, traceback.format_exc())
        return None, f"client {cid} raised {type(exc).__name__}: {exc}"


def _private_copy(args: tuple[str, int, Weights, Config]) -> tuple[str, int, Weights, Config]:
    """In-process clients get their own copy of the weights, as they would in a worker
    process or on a device, so in-place training cannot change the global model."""
    kind, cid, weights, config = args
    return kind, cid, {name: a.copy() for name, a in weights.items()}, config


_worker_client_fn: ClientFn | None = None


def _init_worker(client_fn: ClientFn) -> None:
    global _worker_client_fn
    _worker_client_fn = client_fn
    torch = sys.modules.get("torch")
    if torch is not None:  # two workers on two cores: one thread each
        torch.set_num_threads(1)


def _execute_packed(args: tuple[str, int, Weights, Config]) -> Executed:
    assert _worker_client_fn is not None
    return _execute(*args, client_fn=_worker_client_fn)


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
    observer: Observer | None = None,
) -> History:
    """Run `rounds` of federated training over `num_clients` simulated clients."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    if initial_weights is None:
        initial_weights = client_fn(0).get_weights({"round": 0, "seed": seed})
    coordinator = Coordinator(
        strategy=strategy or FedAvg(),
        weights=dict(initial_weights),
        rounds=rounds,
        seed=seed,
        evaluate_fn=evaluate_fn,
        fit_config=fit_config,
        evaluate_config=evaluate_config,
        max_round_retries=max_round_retries,
        run_id="sim",
        observer=observer or Observer(),
    )
    with LocalFleet(
        client_fn,
        num_clients,
        seed=seed,
        backend=backend,
        workers=workers,
        faults=Faults(stragglers, dropouts),
    ) as fleet:
        history = coordinator.run(fleet)
    history.weights = coordinator.weights
    return history
