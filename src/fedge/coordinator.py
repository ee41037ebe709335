"""The round loop: each round is a workflow of stages over a transport-neutral fleet.

A stage sends tasks of one kind, each with its config and an optional typed payload, to
a set of clients, and collects their replies until all have answered or the round's one
deadline passes. The default workflow is synchronous FedAvg: a fit stage whose updates
are folded in client-id order (early arrivals wait, on disk when large), so every fleet
gives the same model bit for bit; then the strategy applies the aggregate, and an
optional federated evaluation stage runs. A workflow of several stages (a key exchange
before masked updates, a probe before fit) is a function of the `Round`. Since a fleet
opens and closes tasks freely and tasks name the model version they start from, an
asynchronous workflow (FedBuff: fold every K arrivals while nodes keep training on the
newest model they have) can keep tasks of several versions open at once.

The coordinator knows nothing of transports: a `Fleet` (the simulator, the server's
fleet service) says which clients are available, publishes models, opens tasks and yields
their outcomes as they arrive. Every finished attempt goes to a `Recorder` (the
simulation's `History`; the server's checkpoint and database) before observers hear of
it. Given the same seed, strategy and client code, every fleet produces the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedge.client import EVALUATE, FIT, Config, EvaluateResult, FitResult, Result
from fedge.compression import decode
from fedge.errors import QuorumError, WeightsError
from fedge.history import RoundRecord
from fedge.limits import MAX_EXAMPLES, ExampleWeights
from fedge.metrics import Metrics, WeightedMetrics, as_float, normalize
from fedge.strategy.base import RoundContext, Strategy
from fedge.weights import (
    Array,
    CheckedWeights,
    Spec,
    State,
    Weights,
    nonfinite,
    spec_of,
    validate,
)

log = logging.getLogger(__name__)

NO_RESULT = "no result before the round's deadline"
"""Why a selected client failed when it did not answer in time (metrics count it apart)."""

EvaluateFn = Callable[[Weights], Mapping[str, float]]
RoundConfig = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


@dataclass(frozen=True)
class Task:
    """One unit of work for one client."""

    task_id: str
    round: int
    attempt: int
    kind: str
    """``fit``, ``evaluate``, or a kind of the round's workflow (e.g. ``secagg.share``)."""
    cid: int
    config: Config
    model: str | None = None
    """Version (from `Fleet.publish`) of the model the client starts from, if any."""
    payload: Weights | None = None
    """Small arrays for this client only: the stage's typed payload."""
    expects: Spec | None = None
    """The arrays the reply must carry (checked before use); None: no arrays."""
    partial_work: bool = False
    """The strategy keeps partial work, so a straggler should send what it has."""
    deadline: float | None = None
    """Unix time after which the result is refused."""


@dataclass
class Outcome:
    task: Task
    result: Result | None = None
    error: str | None = None


class Fleet(Protocol):
    """Moves tasks to clients and results back; the simulator and the server implement it."""

    def wait_available(self, count: int, deadline: float | None) -> list[int]:
        """Client ids ready for work, once at least `count` are; `QuorumError` naming the
        missing clients if the deadline passes first."""
        ...

    def publish(self, weights: Weights) -> str:
        """Make a model available to clients; returns its version."""
        ...

    def open(self, tasks: Sequence[Task]) -> None:
        """Send `tasks`; their outcomes come from `outcomes`."""
        ...

    def outcomes(self, deadline: float | None) -> Iterator[Outcome]:
        """Outcomes of the open tasks as they arrive, until none is left without an outcome
        or the deadline passes."""
        ...

    def close(self, task_ids: Iterable[str]) -> None:
        """Stop accepting results for these tasks (later ones are refused) and free what
        their outcomes held."""
        ...


class Observer:
    """Progress hooks; the CLI's progress view overrides them."""

    def round_started(self, round: int, selected: int) -> None: ...

    def result_received(self, round: int, received: int, selected: int) -> None: ...

    def round_finished(self, record: RoundRecord) -> None: ...


class Recorder(Protocol):
    """Where finished rounds go, durably, before observers hear of them."""

    def on_start(self, initial_metrics: Metrics) -> None:
        """A new run: centralized evaluation of the initial weights."""
        ...

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        """One attempt finished; for a successful one, `weights` and `state` are the new
        global model and strategy state."""
        ...


def client_seed(run_seed: int, round: int, cid: int) -> int:
    """Seed for one client in one round, so local training is reproducible."""
    return int(np.random.SeedSequence([run_seed, round, cid]).generate_state(1)[0])


Workflow = Callable[["Round"], "Weights | None"]
"""Runs a round's stages and returns the aggregate for the strategy to apply (None: the
round failed; the reason is in ``round.record.reason``)."""


def fit_round(rnd: Round) -> Weights | None:
    """Synchronous FedAvg-family round: sample the available clients, one fit stage."""
    strategy = rnd.strategy
    available = rnd.wait_available(max(strategy.min_available_clients, strategy.min_results))
    return rnd.fit(rnd.sample(available, strategy.num_fit_clients(len(available))))


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
    """One deadline per round: waiting for clients, fit and evaluation all fit in it."""
    max_round_retries: int = 2
    max_examples: int = MAX_EXAMPLES
    example_weights: ExampleWeights = field(default_factory=ExampleWeights)
    """What a valid example count weighs in every strategy's aggregate and metric means."""
    run_id: str = "run"
    observer: Observer = field(default_factory=Observer)
    state: State = field(default_factory=dict)
    workflow: Workflow = fit_round

    def __post_init__(self) -> None:
        self.ended_early = ""
        """Why the run ended before its last round (the strategy's `stop_reason`), or ""."""
        self.spec: Spec = spec_of(self.weights)
        self.last_published: tuple[Fleet, Weights, str] | None = None
        """The fleet, model and version published last: a round's evaluated aggregate
        is the next round's model, and goes out once."""
        if not self.state:
            self.state = self.strategy.init_state(self.weights)

    def run(
        self, fleet: Fleet, recorder: Recorder, *, start_round: int = 1, start_attempt: int = 0
    ) -> None:
        """Run rounds `start_round`..`rounds` (resume by passing where to start)."""
        if (start_round, start_attempt) == (1, 0):
            recorder.on_start(self.evaluate_centrally(self.weights))
        server_round, attempt = start_round, start_attempt
        while server_round <= self.rounds:
            self.ended_early = self.strategy.stop_reason(self.state)
            if self.ended_early:
                log.warning("run ends before round %d: %s", server_round, self.ended_early)
                return
            record, weights, state = self.run_round(fleet, server_round, attempt)
            recorder.on_round(record, weights, state)  # durable before it is announced
            self.weights, self.state = weights, state
            self.observer.round_finished(record)
            if record.status == "failed":
                attempt += 1
                if attempt > self.max_round_retries:
                    raise QuorumError(
                        f"round {server_round} failed {attempt} time(s); last: {record.reason}"
                    )
                continue
            server_round, attempt = server_round + 1, 0

    def run_round(
        self, fleet: Fleet, server_round: int, attempt: int = 0
    ) -> tuple[RoundRecord, Weights, State]:
        """One attempt at a round: its record, and the global weights and state after it
        (unchanged if it failed)."""
        started, cpu = time.perf_counter(), time.process_time()
        deadline = None if self.round_timeout is None else time.time() + self.round_timeout
        rnd = Round(self, fleet, server_round, attempt, deadline)
        record = rnd.record
        try:
            aggregate = self.workflow(rnd)
        except QuorumError as exc:  # not enough clients came in time
            aggregate, record.reason = None, str(exc)
        record.fit_time = time.perf_counter() - started
        weights, state = self.weights, self.state
        if aggregate is not None:
            new_weights, new_state = self.strategy.apply(
                self.weights, aggregate, self.state, rnd.context
            )
            new_weights = _conform(new_weights, self.spec)
            bad = nonfinite(new_weights)
            if bad is None:
                weights, state = new_weights, new_state
                record.strategy_metrics = self.strategy.report(state)
                record.metrics = self.evaluate_centrally(weights)
                eval_started = time.perf_counter()
                record.evaluate_metrics = rnd.evaluate(weights)
                record.evaluate_time = time.perf_counter() - eval_started
            else:
                aggregate = None
                record.reason = f"the aggregated model is not finite ({bad}); it was not applied"
        if aggregate is None:
            record.status = "failed"
            record.reason = record.reason or (
                f"only {len(record.participants)} of the required "
                f"{self.strategy.min_results} results arrived"
            )
            log.warning(
                "round %d failed: %s (failures: %s)", server_round, record.reason, record.failures
            )
        record.wall_time = time.perf_counter() - started
        record.cpu_time = time.process_time() - cpu
        return record, weights, state

    def evaluate_centrally(self, weights: Weights) -> Metrics:
        if self.evaluate_fn is None:
            return {}
        return normalize(self.evaluate_fn(weights), source="evaluate_fn")

    def check_examples(self, num_examples: object, cid: int) -> int:
        """A result's example count as an int, or `WeightsError` if it is not one in
        1..max_examples: it weighs the update, and a node may lie about it."""
        if (
            isinstance(num_examples, bool)
            or not isinstance(num_examples, int | np.integer)
            or not 0 < num_examples <= self.max_examples
        ):
            raise WeightsError(
                f"client {cid}: num_examples must be an integer in 1..{self.max_examples} "
                f"(limits.max_examples), got {num_examples!r}"
            )
        return int(num_examples)


class Round:
    """One attempt at one round: what its stages may use, and what they record."""

    def __init__(
        self,
        coordinator: Coordinator,
        fleet: Fleet,
        number: int,
        attempt: int,
        deadline: float | None,
    ) -> None:
        self.coordinator, self.fleet = coordinator, fleet
        self.number, self.attempt, self.deadline = number, attempt, deadline
        self.strategy = coordinator.strategy
        self.weights = coordinator.weights
        """The global weights at the start of the round."""
        self.record = RoundRecord(round=number, attempt=attempt)
        self.rng = np.random.default_rng([coordinator.seed, number, attempt])
        """Seeded sampling: a resumed run draws what the uninterrupted one drew."""
        self.context = RoundContext(
            number,
            attempt,
            self.weights,
            np.random.default_rng([coordinator.seed, number, attempt, 1]),
            coordinator.state,
        )
        self.available: list[int] = []
        self._versions: dict[int, str] = {}

    # --- building blocks ------------------------------------------------------------

    def wait_available(self, count: int) -> list[int]:
        """At least `count` available clients (sorted), or `QuorumError` at the deadline;
        the time it waited is added to the record's `wait_time`."""
        started = time.perf_counter()
        try:
            self.available = sorted(self.fleet.wait_available(count, self.deadline))
        finally:
            self.record.wait_time += time.perf_counter() - started
        return self.available

    def sample(self, among: Sequence[int], count: int) -> list[int]:
        """`count` of `among`, drawn with the round's seeded RNG, sorted."""
        if count >= len(among):
            return sorted(among)
        return sorted(int(c) for c in self.rng.choice(list(among), size=count, replace=False))

    def model(self, weights: Weights | None = None) -> str:
        """The published version of `weights` (default: the round's global weights)."""
        weights = self.weights if weights is None else weights
        if id(weights) not in self._versions:
            last = self.coordinator.last_published
            if last is not None and last[0] is self.fleet and last[1] is weights:
                version = last[2]
            else:
                version = self.fleet.publish(weights)
                self.coordinator.last_published = (self.fleet, weights, version)
            self._versions[id(weights)] = version
        return self._versions[id(weights)]

    def fit_config(self) -> dict[str, Any]:
        """What every fit task of the round is told (before its ``round`` and ``seed``):
        the strategy's settings, overridden by the user's ``fit_config``."""
        return {
            **self.strategy.fit_config(self.number),
            **_resolve(self.coordinator.fit_config, self.number),
        }

    def tasks(
        self,
        kind: str,
        cids: Iterable[int],
        *,
        config: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] = {},  # noqa: B006
        payload: Callable[[int], Weights] | None = None,
        model: Weights | None = None,
        send_model: bool = True,
        expects: Spec | None = None,
        partial_work: bool = False,
    ) -> list[Task]:
        """One task of `kind` per client; every config gets ``round`` and ``seed``."""
        version = self.model(model) if send_model else None
        seed = self.coordinator.seed
        return [
            Task(
                task_id=f"{self.coordinator.run_id}/{self.number}.{self.attempt}/{kind}/{cid}",
                round=self.number,
                attempt=self.attempt,
                kind=kind,
                cid=cid,
                config={
                    **(config(cid) if callable(config) else config),
                    "round": self.number,
                    "seed": client_seed(seed, self.number, cid),
                },
                model=version,
                payload=None if payload is None else payload(cid),
                expects=expects,
                partial_work=partial_work,
                deadline=self.deadline,
            )
            for cid in cids
        ]

    @contextmanager
    def stage(self, tasks: Sequence[Task]) -> Iterator[Iterator[Outcome]]:
        """Open `tasks`; iterate their outcomes as they arrive (until all answered or the
        deadline); on leaving the block the tasks close and late results are refused."""
        self.fleet.open(tasks)
        try:
            yield self.fleet.outcomes(self.deadline)
        finally:
            self.fleet.close([t.task_id for t in tasks])

    # --- the standard stages --------------------------------------------------------

    def select(self, cids: Sequence[int]) -> None:
        """Record that `cids` train this round (their share of the available clients is
        the sampling rate the strategy sees) and tell the observer."""
        self.record.selected = list(cids)
        population = max(len(self.available), len(cids))
        self.context = dataclasses.replace(self.context, population=population, selected=len(cids))
        self.coordinator.observer.round_started(self.number, len(cids))

    def fit(self, cids: Sequence[int]) -> Weights | None:
        """The fit stage: train `cids` from the global model and fold their validated
        updates in client-id order; the aggregate, or None without quorum."""
        record, strategy = self.record, self.strategy
        self.select(cids)
        base = self.fit_config()
        tasks = self.tasks(
            FIT,
            cids,
            config=base,
            expects=self.coordinator.spec,
            partial_work=strategy.accept_partial_work,
        )
        aggregator = strategy.aggregator(self.context)
        metrics = WeightedMetrics()
        order = InOrder(sorted(t.cid for t in tasks))  # whatever order `cids` came in
        received = 0
        with self.stage(tasks) as outcomes:
            for outcome in outcomes:
                received += 1
                for ready in order.push(outcome.task.cid, outcome):
                    self._fold(ready, aggregator, metrics)
                self.coordinator.observer.result_received(self.number, received, len(tasks))
            for ready in order.rest():
                self._fold(ready, aggregator, metrics)
        for task in tasks:
            if task.cid not in record.participants and task.cid not in record.failures:
                record.failures[task.cid] = NO_RESULT
        record.fit_metrics = metrics.mean()
        if aggregator.count < strategy.min_results:
            return None
        try:
            return aggregator.result()
        except ValueError as exc:  # e.g. a robust rule with too few results for its f
            record.reason = f"{strategy.name} could not aggregate: {exc}"
            return None

    def _fold(self, outcome: Outcome, aggregator: Any, metrics: WeightedMetrics) -> None:
        accepted = self.accept_fit(outcome)
        if accepted is None:
            return
        weights, num_examples, found = accepted
        weight = self.coordinator.example_weights(num_examples)
        aggregator.add(weights, weight, outcome.task.cid)
        self.record.participants.append(outcome.task.cid)
        self.record.num_examples += num_examples
        metrics.add(found, weight)

    def accept_fit(
        self, outcome: Outcome, base: Mapping[str, Array] | None = None
    ) -> tuple[Mapping[str, Array], int, Metrics] | None:
        """A fit outcome's validated (weights, example count, metrics), or None after
        recording in the round why it cannot be used. An encoded update is decoded on
        `base`, the weights its task sent (default: the round's; a stale asynchronous
        result was trained on older ones)."""
        cid, result = outcome.task.cid, outcome.result
        try:
            if outcome.error is not None:
                raise WeightsError(outcome.error)
            if not isinstance(result, FitResult):
                raise WeightsError(
                    f"client {cid}: expected a FitResult, got {type(result).__name__}"
                )
            num_examples = self.coordinator.check_examples(result.num_examples, cid)
            if not isinstance(result.metrics, Mapping):
                raise WeightsError(
                    f"client {cid}: metrics must be a dict, got {type(result.metrics).__name__}"
                )
            weights = result.weights
            if result.encoding:  # an encoded update: the same decoding for every fleet
                weights = decode(
                    weights, result.encoding, self.weights if base is None else base,
                    self.coordinator.spec, source=f"client {cid}",
                )  # fmt: skip
            if isinstance(weights, Mapping) and not hasattr(weights, "checked"):
                weights = CheckedWeights(weights)  # so validation measures it only once
            validate(weights, self.coordinator.spec, source=f"client {cid}")
        except WeightsError as exc:
            self.record.failures[cid] = str(exc)
            log.warning("round %d: rejected result of client %d: %s", self.number, cid, exc)
            return None
        return weights, num_examples, normalize(result.metrics, source=f"client {cid}")

    def evaluate(self, weights: Weights) -> Metrics:
        """The federated evaluation stage on the new global `weights`: a sample of the
        clients available at the start of the round, except those that failed to fit."""
        count = self.strategy.num_evaluate_clients(len(self.available))
        if count == 0:
            return {}
        if self.deadline is not None and time.time() >= self.deadline:
            log.warning("round %d: no time left for federated evaluation", self.number)
            return {}
        healthy = [c for c in self.available if c not in self.record.failures]
        cids = self.sample(healthy, min(count, len(healthy)))
        config = _resolve(self.coordinator.evaluate_config, self.number)
        metrics = WeightedMetrics()
        answered: set[int] = set()
        with self.stage(self.tasks(EVALUATE, cids, config=config, model=weights)) as outcomes:
            for outcome in sorted(outcomes, key=lambda o: o.task.cid):  # the same sums anywhere
                cid, result = outcome.task.cid, outcome.result
                answered.add(cid)
                problem = outcome.error or _evaluation_problem(result, self.coordinator, cid)
                if problem is not None:
                    self.record.evaluate_failures[cid] = problem
                    log.warning(
                        "round %d: no usable evaluation from client %d: %s",
                        self.number,
                        cid,
                        problem,
                    )
                    continue
                assert isinstance(result, EvaluateResult)
                found = normalize({"loss": result.loss, **result.metrics}, source=f"client {cid}")
                metrics.add(found, self.coordinator.example_weights(int(result.num_examples)))
        for cid in set(cids) - answered:
            self.record.evaluate_failures[cid] = NO_RESULT
        return metrics.mean()


class InOrder:
    """Releases items in a fixed order of keys as soon as every earlier key has arrived;
    `rest()` gives what is left (in order) once no more will come."""

    def __init__(self, keys: Iterable[int]) -> None:
        self._order = list(keys)
        self._next = 0
        self._waiting: dict[int, Outcome] = {}

    def push(self, key: int, item: Outcome) -> Iterator[Outcome]:
        self._waiting[key] = item
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            yield self._waiting.pop(self._order[self._next])
            self._next += 1

    def rest(self) -> Iterator[Outcome]:
        for key in self._order[self._next :]:
            if key in self._waiting:
                yield self._waiting.pop(key)
        self._next = len(self._order)


def _resolve(config: RoundConfig | None, server_round: int) -> Mapping[str, Any]:
    if config is None:
        return {}
    return config(server_round) if callable(config) else config


def _evaluation_problem(result: object, coordinator: Coordinator, cid: int) -> str | None:
    """Why an evaluation cannot be used, or None: a finite loss over a valid example
    count, with dict metrics."""
    if not isinstance(result, EvaluateResult):
        return f"expected an EvaluateResult, got {type(result).__name__}"
    if as_float(result.loss) is None or isinstance(result.loss, bool):
        return f"loss must be a finite number, got {result.loss!r}"
    if not isinstance(result.metrics, Mapping):
        return f"metrics must be a dict, got {type(result.metrics).__name__}"
    try:
        coordinator.check_examples(result.num_examples, cid)
    except WeightsError as exc:
        return str(exc)
    return None


def _conform(weights: Weights, spec: Spec) -> Weights:
    """Keep the global model's dtypes stable whatever the server optimizer computed."""
    return {name: np.asarray(weights[name], dtype=s.dtype) for name, s in spec.items()}


__all__ = [
    "Coordinator",
    "EvaluateFn",
    "Fleet",
    "InOrder",
    "Observer",
    "Outcome",
    "Recorder",
    "Round",
    "RoundConfig",
    "Task",
    "Workflow",
    "client_seed",
    "fit_round",
]
