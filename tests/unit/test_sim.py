"""Simulation: backends that agree bit for bit, seeded faults, and the digits example."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import threadpoolctl

import fedge
from fedge import Client, Config, FitResult, QuorumError, Weights
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_loss, softmax_weights
from fedge.app import load_app
from fedge.config import load_config
from fedge.errors import ConfigError
from fedge.sim import THREAD_VARIABLES, Faults, LocalFleet, batch_size
from fedge.strategy import FedAvg, FedProx

ROOT = Path(__file__).resolve().parents[2]
NUM_CLIENTS, FEATURES, CLASSES = 6, 5, 3


def _make_data() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Small linearly separable-ish data: a random linear teacher labels Gaussian points."""
    rng = np.random.default_rng(1234)
    teacher = rng.normal(size=(FEATURES, CLASSES))
    xs, ys = [], []
    for cid in range(NUM_CLIENTS):
        x = rng.normal(loc=0.3 * cid, size=(30 + 5 * cid, FEATURES)).astype(np.float32)
        xs.append(x)
        ys.append((x @ teacher).argmax(axis=1))
    x_test = rng.normal(size=(60, FEATURES)).astype(np.float32)
    return xs, ys, x_test, (x_test @ teacher).argmax(axis=1)


XS, YS, X_TEST, Y_TEST = _make_data()
INITIAL = softmax_weights(FEATURES, CLASSES)


def softmax_client(cid: int) -> SoftmaxRegressionClient:
    return SoftmaxRegressionClient(
        XS[cid], YS[cid], XS[cid][:10], YS[cid][:10], epochs=2, batch_size=8, lr=0.1
    )


def evaluate_fn(weights: Weights) -> dict[str, float]:
    loss, accuracy = softmax_loss(weights, X_TEST, Y_TEST)
    return {"loss": loss, "accuracy": accuracy}


def run(**kwargs: Any) -> fedge.History:
    options: dict[str, Any] = {
        "num_clients": NUM_CLIENTS,
        "rounds": 3,
        "initial_weights": INITIAL,
        "evaluate_fn": evaluate_fn,
        "seed": 7,
    }
    options.update(kwargs)
    client_fn = options.pop("client_fn", softmax_client)
    return fedge.simulate(client_fn, options.pop("num_clients"), options.pop("rounds"), **options)


def outcome(history: fedge.History) -> list[dict[str, Any]]:
    """Everything a history records except timings."""
    timings = {"fit_time", "wait_time", "evaluate_time", "wall_time", "cpu_time"}
    return [
        {k: v for k, v in record.items() if k not in timings}
        for record in history.to_dict()["rounds"]
    ]


def assert_same_weights(a: Weights, b: Weights) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


# --- backends ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        FedAvg(fraction_fit=0.5, fraction_evaluate=0.5),
        FedProx(proximal_mu=0.1, fraction_evaluate=1.0),
    ],
    ids=["fedavg", "fedprox"],
)
def test_process_backend_gives_the_same_model_and_history_as_in_process(strategy: Any) -> None:
    in_process = run(strategy=strategy)
    processes = run(strategy=strategy, backend="process", workers=2)

    assert_same_weights(in_process.weights, processes.weights)
    assert in_process.initial_metrics == processes.initial_metrics
    assert outcome(in_process) == outcome(processes)
    assert in_process.rounds[-1].metrics["accuracy"] > in_process.initial_metrics["accuracy"]


def test_backends_also_agree_under_simulated_faults() -> None:
    faults = {"stragglers": 0.4, "dropouts": 0.2, "strategy": FedProx(proximal_mu=0.1)}
    in_process = run(rounds=4, **faults)
    processes = run(rounds=4, backend="process", workers=2, **faults)
    assert_same_weights(in_process.weights, processes.weights)
    assert outcome(in_process) == outcome(processes)
    assert any(r.failures for r in in_process.rounds), "the seed should produce some dropouts"


def test_the_same_seed_reproduces_the_model_and_another_seed_changes_it() -> None:
    first, again, other = run(seed=1), run(seed=1), run(seed=2)
    assert_same_weights(first.weights, again.weights)
    assert outcome(first) == outcome(again)
    assert first.weights["weight"].tobytes() != other.weights["weight"].tobytes()


def test_a_lambda_client_fn_works_with_the_process_backend() -> None:
    scale = 0.05  # captured by the closure: the workers inherit it, nothing is pickled

    def build(cid: int) -> Client:
        return SoftmaxRegressionClient(XS[cid], YS[cid], lr=scale)

    with_lambda = run(client_fn=lambda cid: build(cid), backend="process", workers=2)
    in_process = run(client_fn=lambda cid: build(cid))
    assert_same_weights(with_lambda.weights, in_process.weights)
    assert [r.participants for r in with_lambda.rounds] == [list(range(NUM_CLIENTS))] * 3


class CrashesOnOddClients(Client):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        if self.cid % 2:
            raise ValueError(f"sensor {self.cid} unplugged")
        return FitResult({k: v + 1 for k, v in weights.items()}, 10)


@pytest.mark.parametrize("backend", ["inprocess", "process"])
def test_a_client_exception_is_reported_the_same_way_by_both_backends(backend: str) -> None:
    history = fedge.simulate(
        CrashesOnOddClients, 4, 1, initial_weights=INITIAL, backend=backend, workers=2
    )  # type: ignore[arg-type]
    record = history.rounds[0]
    assert record.participants == [0, 2]
    assert record.failures == {
        1: "client 1 raised ValueError: sensor 1 unplugged",
        3: "client 3 raised ValueError: sensor 3 unplugged",
    }
    np.testing.assert_array_equal(history.weights["bias"], np.ones(CLASSES, np.float32))


class TrainsInPlace(Client):
    """Updates the weights it was given in place: a client must get its own copy."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        for array in weights.values():
            array += self.cid + 1
        return FitResult(weights, 10 + self.cid)


def test_chunks_of_tasks_give_each_client_its_own_model_and_keep_task_order() -> None:
    clients = 40  # chunks of 5 tasks, each chunk's model unpickled once in a worker
    assert batch_size(clients, 2) == 5
    kwargs: dict[str, Any] = {"initial_weights": INITIAL, "workers": 2}
    processes = fedge.simulate(TrainsInPlace, clients, 2, backend="process", **kwargs)
    in_process = fedge.simulate(TrainsInPlace, clients, 2, **kwargs)
    assert_same_weights(processes.weights, in_process.weights)
    assert processes.rounds[-1].participants == list(range(clients))


def test_batch_size_spreads_small_rounds_over_every_worker_and_caps_large_ones() -> None:
    assert [batch_size(n, 2) for n in (1, 10, 100, 10_000)] == [1, 2, 13, 64]
    assert batch_size(10, 4) == 1


class ReportsThreads(Client):
    """Reports the largest thread pool (BLAS, OpenMP) of the process it fits in."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        pools = [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]
        threads = {"threads": float(max(pools, default=0))}
        environment = {name: float(os.environ.get(name, 0)) for name in THREAD_VARIABLES}
        return FitResult(weights, 1, {**threads, **environment})


def test_process_pool_workers_run_one_blas_thread_and_the_driver_keeps_its_own() -> None:
    with threadpoolctl.threadpool_limits(2):  # what a worker would inherit without its limit
        before = threadpoolctl.threadpool_info()
        assert max(pool["num_threads"] for pool in before) == 2
        history = fedge.simulate(
            ReportsThreads, 4, 1, initial_weights=INITIAL, backend="process", workers=2
        )
        assert threadpoolctl.threadpool_info() == before
    assert history.rounds[0].participants == [0, 1, 2, 3]
    assert history.rounds[0].fit_metrics == dict.fromkeys(("threads", *THREAD_VARIABLES), 1.0)


# --- simulated faults --------------------------------------------------------------------


class Recording(Client):
    """Remembers, in this process, the config of every fit it was asked to do."""

    configs: list[Config] = []  # noqa: RUF012

    def __init__(self, cid: int) -> None:
        self.client = softmax_client(cid)
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        Recording.configs.append({**config, "cid": self.cid})
        return self.client.fit(weights, config)


@pytest.fixture
def recording() -> Iterator[list[Config]]:
    Recording.configs = []
    yield Recording.configs
    Recording.configs = []


def test_every_client_dropping_out_fails_the_round_after_its_retries() -> None:
    with pytest.raises(QuorumError) as raised:
        run(dropouts=1.0, max_round_retries=2)
    assert str(raised.value) == (
        "round 1 failed 3 time(s); last: only 0 of the required 1 results arrived"
    )


def test_dropouts_are_recorded_with_their_reason() -> None:
    with pytest.raises(QuorumError) as raised:
        run(dropouts=1.0, max_round_retries=0)
    history = raised.value.history
    assert isinstance(history, fedge.History)
    assert history.rounds[0].failures == dict.fromkeys(
        range(NUM_CLIENTS), "dropped out (simulated)"
    )


def test_stragglers_are_dropped_by_fedavg(recording: list[Config]) -> None:
    history = run(client_fn=Recording, stragglers=0.5, strategy=FedAvg())
    stragglers = {
        (r.round, cid): reason for r in history.rounds for cid, reason in r.failures.items()
    }
    assert stragglers, "with p = 0.5 over 18 draws the seed yields some stragglers"
    assert set(stragglers.values()) == {"straggler missed the round deadline (simulated)"}
    for record in history.rounds:
        assert sorted(record.participants + list(record.failures)) == list(range(NUM_CLIENTS))
    trained = {(c["round"], c["cid"]) for c in recording}
    assert trained.isdisjoint(stragglers), "a dropped straggler's work never reaches the server"
    assert all("work_fraction" not in c for c in recording)


def test_stragglers_keep_partial_work_under_fedprox(recording: list[Config]) -> None:
    dropped = run(stragglers=0.5, strategy=FedAvg())
    stragglers = {(r.round, cid) for r in dropped.rounds for cid in r.failures}

    history = run(client_fn=Recording, stragglers=0.5, strategy=FedProx(proximal_mu=0.1))

    for record in history.rounds:
        assert record.failures == {}
        assert record.participants == list(range(NUM_CLIENTS))
    partial = {
        (c["round"], c["cid"]): c["work_fraction"] for c in recording if "work_fraction" in c
    }
    assert set(partial) == stragglers, "the same clients straggle: faults depend on the seed only"
    assert all(0.0 < fraction < 1.0 for fraction in partial.values())
    assert len(set(partial.values())) == len(partial), "each straggler gets its own fraction"


def test_faults_are_deterministic_per_seed() -> None:
    def faults(seed: int) -> list[dict[int, str]]:
        history = run(seed=seed, rounds=5, stragglers=0.3, dropouts=0.3, max_round_retries=5)
        return [r.failures for r in history.rounds]

    assert faults(11) == faults(11)
    assert faults(11) != faults(12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LocalFleet(softmax_client, 0), "num_clients must be >= 1, got 0"),
        (
            lambda: LocalFleet(softmax_client, 2, backend="threads"),  # type: ignore[arg-type]
            "backend must be 'inprocess', 'process' or 'ray', got 'threads'",
        ),
        (
            lambda: Faults(stragglers=2.0),
            r"simulation.stragglers must be a probability in \[0, 1\]",
        ),
        (lambda: Faults(dropouts=-0.1), r"simulation.dropouts must be a probability in \[0, 1\]"),
        (lambda: run(rounds=0), "rounds must be >= 1, got 0"),
    ],
    ids=["no-clients", "unknown-backend", "stragglers", "dropouts", "no-rounds"],
)
def test_bad_simulation_settings_raise_config_errors(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_initial_weights_come_from_client_zero_when_not_given() -> None:
    history = run(initial_weights=None, rounds=1)
    assert list(history.weights) == ["weight", "bias"]
    assert history.weights["weight"].shape == (FEATURES, CLASSES)


# --- the digits example ------------------------------------------------------------------


@pytest.fixture
def digits_app() -> Iterator[tuple[Any, Any]]:
    """The example's app as its config builds it; sys.path and the `app` module are
    restored afterwards, since every example names its module `app`."""
    saved_path, saved_app = list(sys.path), sys.modules.pop("app", None)
    config = load_config(ROOT / "examples" / "digits" / "fedge.toml")
    app = load_app(
        config.app.target,
        config.base_dir,
        num_clients=config.run.num_clients,
        seed=config.run.seed,
        **config.app.options,
    )
    yield config, app
    sys.path[:] = saved_path
    sys.modules.pop("app", None)
    if saved_app is not None:
        sys.modules["app"] = saved_app


def test_digits_example_reaches_92_percent_in_five_rounds(digits_app: tuple[Any, Any]) -> None:
    config, app = digits_app
    assert config.run.rounds == 5
    history = fedge.simulate(
        app.client_fn,
        config.run.num_clients,
        config.run.rounds,
        strategy=config.build_strategy(),
        initial_weights=app.initial_weights,
        evaluate_fn=app.evaluate_fn,
        seed=config.run.seed,
        fit_config=config.fit,
    )
    assert [r.status for r in history.rounds] == ["ok"] * 5
    assert history.initial_metrics["accuracy"] < 0.2  # zero weights: one class for all
    assert history.rounds[-1].metrics["accuracy"] >= 0.92
    assert history.rounds[-1].evaluate_metrics["accuracy"] >= 0.9
    assert all(len(r.participants) == 10 for r in history.rounds)
