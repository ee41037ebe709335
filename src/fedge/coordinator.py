"""The round loop: select, dispatch, collect, validate, aggregate, evaluate.

It knows nothing of transports: a `Fleet` (simulation, gRPC, ...) reports which clients
are available, runs tasks and yields their outcomes as they arrive. Given the same seed,
strategy and client code, every fleet produces the same model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from fedge.client import Config, EvaluateResult, FitResult, Metrics
from fedge.errors import QuorumError, WeightsError
from fedge.history import History, RoundRecord
from fedge.strategy.base import State, Strategy
from fedge.weights import Spec, Weights, spec_of, validate

log = logging.getLogger(__name__)

EvaluateFn = Callable[[Weights], Mapping[str, float]]
RoundConfig = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]
Kind = Literal["fit", "evaluate"]


@dataclass(frozen=True)
class Task:
    """One unit of work for one client."""

    task_id: str
    round: int
    attempt: int
    kind: Kind
    cid: int
    config: Config
    partial_work: bool = False
    """The strategy keeps partial work, so a straggler should send what it has."""


@dataclass
class Outcome:
    task: Task
    result: FitResult | EvaluateResult | None = None
    error: str | None = None


class Fleet(Protocol):
    """Moves tasks to clients and results back; implemented by each transport."""

    def wait_available(self, count: int) -> list[int]:
        """Client ids ready for work, once at least `count` are (or raise QuorumError)."""
        ...

    def run(
        self, tasks: Sequence[Task], weights: Weights, timeout: float | None
    ) -> Iterable[Outcome]:
        """Run `tasks` on `weights`; yield each outcome as it arrives, until all have
        arrived or `timeout` seconds passed. Results arriving later are rejected."""
        ...


class Observer:
    """Progress hooks; the CLI's progress view overrides them."""

    def round_started(self, round: int, selected: int) -> None: ...

    def result_received(self, round: int, received: int, selected: int) -> None: ...

    def round_finished(self, record: RoundRecord) -> None: ...


def client_seed(run_seed: int, round: int, cid: int) -> int:
    """Seed for one client in one round, so local training is reproducible."""
    return int(np.random.SeedSequence([run_seed, round, cid]).generate_state(1)[0])


@dataclass
class Coordinator:
    strategy: Strategy
    weights: Weights
    rounds: int
    seed: int = 0
    evaluate_fn: EvaluateFn | None = None
    fit_config: RoundConfig | None = None
    evaluate_config: RoundConfig | None = None
    round_timeout: float | None = None
    max_round_retries: int = 2
    run_id: str = "run"
    observer: Observer = field(default_factory=Observer)
    state: State = field(default_factory=dict)
    checkpoint: Callable[[RoundRecord, History], None] | None = None
    """Called after every attempt, before observers hear of it (the server persists here)."""

    def __post_init__(self) -> None:
        self.spec: Spec = spec_of(self.weights)
        if not self.state:
            self.state = self.strategy.init_state(self.weights)

    def run(self, fleet: Fleet, *, start_round: int = 1, history: History | None = None) -> History:
        """Run rounds `start_round`..`rounds`; resume by passing the saved history."""
        started = time.perf_counter()
        if history is None:
            history = History(initial_metrics=self._evaluate_centrally())
        server_round, attempt = start_round, 0
        while server_round <= self.rounds:
            record = self.run_round(fleet, server_round, attempt)
            history.rounds.append(record)
            if self.checkpoint is not None:  # durable before it is announced
                self.checkpoint(record, history)
            self.observer.round_finished(record)
            if record.status == "failed":
                attempt += 1
                if attempt > self.max_round_retries:
                    raise QuorumError(
                        f"round {server_round} failed {attempt} time(s); last: {record.reason}",
                        history,
                    )
                continue
            server_round, attempt = server_round + 1, 0
        history.wall_time = time.perf_counter() - started
        return history

    def run_round(self, fleet: Fleet, server_round: int, attempt: int = 0) -> RoundRecord:
        """One attempt at a round; on success the global weights and state advance."""
        started = time.perf_counter()
        record = RoundRecord(round=server_round, attempt=attempt)
        needed = max(self.strategy.min_available_clients, self.strategy.min_results)
        available = sorted(fleet.wait_available(needed))
        rng = np.random.default_rng([self.seed, server_round, attempt])
        record.selected = _sample(rng, available, self.strategy.num_fit_clients(len(available)))
        self.observer.round_started(server_round, len(record.selected))

        aggregate = self._fit(fleet, record)
        record.fit_time = time.perf_counter() - started
        if aggregate is None:
            record.status = "failed"
            record.reason = record.reason or (
                f"only {len(record.participants)} of the required "
                f"{self.strategy.min_results} results arrived"
            )
            log.warning(
                "round %d failed: %s (failures: %s)", server_round, record.reason, record.failures
            )
        else:
            self.weights, self.state = self.strategy.apply(self.weights, aggregate, self.state)
            self.weights = _conform(self.weights, self.spec)
            record.metrics = self._evaluate_centrally()
            eval_started = time.perf_counter()
            record.evaluate_metrics = self._evaluate_federated(fleet, record, rng, available)
            record.evaluate_time = time.perf_counter() - eval_started
        record.wall_time = time.perf_counter() - started
        return record

    def _fit(self, fleet: Fleet, record: RoundRecord) -> Weights | None:
        tasks = self._tasks(record, "fit", record.selected)
        aggregator = self.strategy.aggregator()
        metrics = _WeightedMetrics()
        for outcome in fleet.run(tasks, self.weights, self.round_timeout):
            cid = outcome.task.cid
            result = outcome.result
            try:
                if outcome.error is not None:
                    raise WeightsError(outcome.error)
                if not isinstance(result, FitResult):
                    raise WeightsError(
                        f"client {cid}: expected a FitResult, got {type(result).__name__}"
                    )
                _check_examples(result.num_examples, cid)
                if not isinstance(result.metrics, Mapping):
                    raise WeightsError(
                        f"client {cid}: metrics must be a dict, got {type(result.metrics).__name__}"
                    )
                validate(result.weights, self.spec, source=f"client {cid}")
            except WeightsError as exc:
                record.failures[cid] = str(exc)
                log.warning("round %d: rejected result of client %d: %s", record.round, cid, exc)
                continue
            num_examples = int(result.num_examples)  # a NumPy integer would not be JSON
            aggregator.add(result.weights, num_examples)
            record.participants.append(cid)
            record.num_examples += num_examples
            metrics.add(result.metrics, num_examples)
            self.observer.result_received(record.round, len(record.participants), len(tasks))
        for task in tasks:
            if task.cid not in record.participants and task.cid not in record.failures:
                record.failures[task.cid] = "no result before the round closed"
        record.fit_metrics = metrics.mean()
        if aggregator.count < self.strategy.min_results:
            return None
        try:
            return aggregator.result()
        except ValueError as exc:  # e.g. a robust rule with too few results for its f
            record.reason = f"{self.strategy.name} could not aggregate: {exc}"
            return None

    def _evaluate_federated(
        self, fleet: Fleet, record: RoundRecord, rng: np.random.Generator, available: list[int]
    ) -> Metrics:
        count = self.strategy.num_evaluate_clients(len(available))
        if count == 0:
            return {}
        tasks = self._tasks(record, "evaluate", _sample(rng, available, count))
        metrics = _WeightedMetrics()
        for outcome in fleet.run(tasks, self.weights, self.round_timeout):
            result = outcome.result
            if outcome.error is None and _usable_evaluation(result):
                assert isinstance(result, EvaluateResult)
                metrics.add({"loss": result.loss, **result.metrics}, int(result.num_examples))
            else:
                log.warning(
                    "round %d: no usable evaluation from client %d: %s",
                    record.round,
                    outcome.task.cid,
                    outcome.error or f"bad result {result!r}",
                )
        return metrics.mean()

    def _tasks(self, record: RoundRecord, kind: Kind, cids: list[int]) -> list[Task]:
        if kind == "fit":
            base = {
                **self.strategy.fit_config(record.round),
                **_resolve(self.fit_config, record.round),
            }
        else:
            base = dict(_resolve(self.evaluate_config, record.round))
        return [
            Task(
                task_id=f"{self.run_id}/{record.round}.{record.attempt}/{kind}/{cid}",
                round=record.round,
                attempt=record.attempt,
                kind=kind,
                cid=cid,
                config={
                    **base,
                    "round": record.round,
                    "seed": client_seed(self.seed, record.round, cid),
                },
                partial_work=self.strategy.accept_partial_work,
            )
            for cid in cids
        ]

    def _evaluate_centrally(self) -> Metrics:
        if self.evaluate_fn is None:
            return {}
        return {k: float(v) for k, v in self.evaluate_fn(self.weights).items()}


def _sample(rng: np.random.Generator, available: list[int], count: int) -> list[int]:
    if count >= len(available):
        return list(available)
    return sorted(int(c) for c in rng.choice(available, size=count, replace=False))


def _resolve(config: RoundConfig | None, server_round: int) -> Mapping[str, Any]:
    if config is None:
        return {}
    return config(server_round) if callable(config) else config


def _check_examples(num_examples: object, cid: int) -> None:
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | np.integer)
        or num_examples <= 0
    ):
        raise WeightsError(
            f"client {cid}: num_examples must be a positive integer, got {num_examples!r}"
        )


def _usable_evaluation(result: object) -> bool:
    """A finite numeric loss over a positive number of examples, with dict metrics."""
    return (
        isinstance(result, EvaluateResult)
        and isinstance(result.loss, int | float | np.number)
        and not isinstance(result.loss, bool)
        and math.isfinite(float(result.loss))
        and isinstance(result.num_examples, int | np.integer)
        and not isinstance(result.num_examples, bool)
        and result.num_examples > 0
        and isinstance(result.metrics, Mapping)
    )


def _conform(weights: Weights, spec: Spec) -> Weights:
    """Keep the global model's dtypes stable whatever the server optimizer computed."""
    return {name: np.asarray(weights[name], dtype=s.dtype) for name, s in spec.items()}


class _WeightedMetrics:
    """Example-weighted means of numeric metrics, accumulated one client at a time."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: Mapping[str, object], weight: int) -> None:
        for key, value in metrics.items():
            if (
                isinstance(value, int | float | np.number)
                and not isinstance(value, bool)
                and math.isfinite(float(value))
            ):
                self._sums[key] = self._sums.get(key, 0.0) + float(value) * weight
                self._weights[key] = self._weights.get(key, 0.0) + weight

    def mean(self) -> Metrics:
        return {k: self._sums[k] / self._weights[k] for k in self._sums}
