"""The round loop, driven through simulated fleets of small scripted clients.

Every client here trains "to" a known value, so the expected global model of each round
can be written down by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import fedge
from fedge import (
    Client,
    Config,
    EvaluateResult,
    FitResult,
    History,
    QuorumError,
    RoundRecord,
    Weights,
)
from fedge.asynchronous import workflow_for
from fedge.coordinator import Coordinator, Observer, client_seed
from fedge.sim import LocalFleet
from fedge.strategy import FedAvg, FedBuff, FedProx

INITIAL: Weights = {"w": np.zeros(3, np.float64), "b": np.zeros((), np.float64)}


@dataclass
class Call:
    kind: str
    cid: int
    config: Config
    weights: Weights


@dataclass
class Clients:
    """A client factory for in-process fleets that records every call it serves.

    Client ``cid`` holds ``10 * (cid + 1)`` examples and trains to ``w = b = cid + 1``,
    reports ``train_loss = cid``, and evaluates to ``loss = cid`` and ``accuracy = cid / 10``.
    `fit` may be replaced per client to script misbehaviour.
    """

    calls: list[Call] = field(default_factory=list)
    fit: dict[int, Callable[[int, Weights, Config], Any]] = field(default_factory=dict)

    def __call__(self, cid: int) -> Client:
        return _Scripted(self, cid)

    def fits(self, round: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.kind == "fit" and (round is None or c.config["round"] == round)
        ]

    def evaluations(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "evaluate"]


def examples(cid: int) -> int:
    return 10 * (cid + 1)


def trained(cid: int) -> Weights:
    value = float(cid + 1)
    return {"w": np.full(3, value), "b": np.array(value)}


class _Scripted(Client):
    def __init__(self, clients: Clients, cid: int) -> None:
        self.clients, self.cid = clients, cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        self.clients.calls.append(Call("fit", self.cid, dict(config), weights))
        script = self.clients.fit.get(self.cid)
        if script is not None:
            return script(self.cid, weights, config)  # type: ignore[no-any-return]
        return FitResult(trained(self.cid), examples(self.cid), {"train_loss": float(self.cid)})

    def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
        self.clients.calls.append(Call("evaluate", self.cid, dict(config), weights))
        return EvaluateResult(float(self.cid), examples(self.cid), {"accuracy": self.cid / 10})


def weighted_mean_of(cids: list[int]) -> float:
    """The FedAvg model when exactly these clients answer: sum(n_i * (i+1)) / sum(n_i)."""
    return sum(examples(c) * (c + 1) for c in cids) / sum(examples(c) for c in cids)


def simulate(clients: Clients, num_clients: int = 4, rounds: int = 2, **kwargs: Any) -> Any:
    kwargs.setdefault("initial_weights", INITIAL)
    return fedge.simulate(clients, num_clients, rounds, **kwargs)


# --- what every client is told -----------------------------------------------------------


def test_config_carries_the_round_from_one_and_a_seed_derived_from_run_round_and_client() -> None:
    clients = Clients()
    simulate(clients, num_clients=3, rounds=3, seed=42)

    assert [(c.config["round"], c.cid) for c in clients.fits()] == [
        (r, cid) for r in (1, 2, 3) for cid in (0, 1, 2)
    ]
    for call in clients.fits():
        assert call.config["seed"] == client_seed(42, call.config["round"], call.cid)
    seeds = [c.config["seed"] for c in clients.fits()]
    assert len(set(seeds)) == len(seeds), "every (round, client) pair gets its own seed"


def test_client_seed_depends_on_every_input() -> None:
    base = client_seed(0, 1, 0)
    assert client_seed(0, 1, 0) == base
    assert len({base, client_seed(1, 1, 0), client_seed(0, 2, 0), client_seed(0, 1, 1)}) == 4


def test_strategy_settings_reach_the_clients() -> None:
    clients = Clients()
    simulate(clients, strategy=FedProx(proximal_mu=0.3))
    assert {c.config["proximal_mu"] for c in clients.fits()} == {0.3}


def test_user_fit_config_as_a_dict_reaches_every_client() -> None:
    clients = Clients()
    simulate(clients, fit_config={"lr": 0.05, "local_epochs": 2})
    assert all(c.config["lr"] == 0.05 and c.config["local_epochs"] == 2 for c in clients.fits())


def test_user_fit_config_as_a_function_is_called_per_round() -> None:
    clients = Clients()
    simulate(clients, rounds=3, fit_config=lambda r: {"lr": 1.0 / r})
    assert {c.config["round"]: c.config["lr"] for c in clients.fits()} == {
        1: 1.0,
        2: 0.5,
        3: 1.0 / 3,
    }


def test_user_settings_override_the_strategy_but_never_round_and_seed() -> None:
    clients = Clients()
    simulate(
        clients,
        seed=5,
        strategy=FedProx(proximal_mu=0.3),
        fit_config={"proximal_mu": 0.7, "round": 99, "seed": 99},
    )
    for call in clients.fits():
        assert call.config["proximal_mu"] == 0.7
        assert call.config["round"] in (1, 2)
        assert call.config["seed"] == client_seed(5, call.config["round"], call.cid)


def test_evaluate_config_reaches_evaluating_clients_with_round_and_seed() -> None:
    clients = Clients()
    simulate(
        clients,
        seed=3,
        strategy=FedAvg(fraction_evaluate=1.0),
        fit_config={"lr": 0.1},
        evaluate_config=lambda r: {"batch_size": 8 * r},
    )
    evaluations = clients.evaluations()
    assert len(evaluations) == 8  # 4 clients x 2 rounds
    for call in evaluations:
        r = call.config["round"]
        assert call.config["batch_size"] == 8 * r
        assert call.config["seed"] == client_seed(3, r, call.cid)
        assert "lr" not in call.config  # fit settings are for fit tasks only


def test_clients_receive_the_current_global_model() -> None:
    clients = Clients()
    simulate(clients, num_clients=2, rounds=2)
    for call in clients.fits(round=1):
        np.testing.assert_array_equal(call.weights["w"], INITIAL["w"])
    for call in clients.fits(round=2):
        np.testing.assert_allclose(call.weights["w"], np.full(3, weighted_mean_of([0, 1])))


def test_an_evaluated_aggregate_is_published_once_for_evaluation_and_the_next_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[Weights] = []
    tasks: list[tuple[str, int, str | None]] = []
    publish, open_ = LocalFleet.publish, LocalFleet.open

    def counting_publish(fleet: LocalFleet, weights: Weights) -> str:
        published.append(weights)
        return publish(fleet, weights)

    def recording_open(fleet: LocalFleet, opened: Any) -> None:
        tasks.extend((t.kind, t.round, t.model) for t in opened)
        open_(fleet, opened)

    monkeypatch.setattr(LocalFleet, "publish", counting_publish)
    monkeypatch.setattr(LocalFleet, "open", recording_open)
    clients = Clients()
    simulate(clients, num_clients=2, rounds=3, strategy=FedAvg(fraction_evaluate=1.0))
    assert len(published) == 4, "the initial model and each round's aggregate, once each"
    for rnd in (1, 2):
        evaluated = {m for kind, r, m in tasks if kind == "evaluate" and r == rnd}
        fitted = {m for kind, r, m in tasks if kind == "fit" and r == rnd + 1}
        assert evaluated == fitted and len(fitted) == 1
    for call in clients.fits(round=2):
        np.testing.assert_allclose(call.weights["w"], np.full(3, weighted_mean_of([0, 1])))


# --- who trains --------------------------------------------------------------------------


def selections(history: fedge.History) -> list[list[int]]:
    return [r.selected for r in history.rounds]


@pytest.mark.parametrize(
    ("strategy", "per_round"),
    [
        (FedAvg(fraction_fit=0.3), 3),  # ceil(0.3 * 10)
        (FedAvg(clients_per_round=4), 4),
        (FedAvg(fraction_fit=0.1, min_fit_clients=5), 5),  # max(ceil(1.0), 5)
    ],
    ids=["fraction", "count", "minimum"],
)
def test_sampling_is_sized_by_the_strategy_and_deterministic_per_seed(
    strategy: FedAvg, per_round: int
) -> None:
    runs = {}
    for label, seed in [("first", 1), ("again", 1), ("other", 2)]:
        clients = Clients()
        history = simulate(clients, num_clients=10, rounds=4, strategy=strategy, seed=seed)
        runs[label] = selections(history)
        for record in history.rounds:
            assert len(record.selected) == per_round
            assert record.selected == sorted(set(record.selected))
            assert record.participants == record.selected
            trained_cids = sorted(c.cid for c in clients.fits(round=record.round))
            assert trained_cids == record.selected, "only selected clients are asked to train"

    assert runs["first"] == runs["again"]
    assert runs["first"] != runs["other"]
    assert len({tuple(s) for s in runs["first"]}) > 1, "the sample changes from round to round"


def test_all_clients_train_when_the_fraction_is_one() -> None:
    history = simulate(Clients(), num_clients=5, rounds=2)
    assert selections(history) == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_a_fleet_too_small_for_min_available_clients_fails_at_once() -> None:
    with pytest.raises(QuorumError, match="5 clients are required but the simulation has only 4"):
        simulate(Clients(), num_clients=4, strategy=FedAvg(min_available_clients=5))


# --- evaluation --------------------------------------------------------------------------


def test_central_evaluation_runs_before_round_one_and_after_every_round() -> None:
    seen: list[Weights] = []

    def evaluate_fn(weights: Weights) -> dict[str, float]:
        seen.append({k: v.copy() for k, v in weights.items()})
        return {"mean_w": float(weights["w"].mean()), "calls": np.int64(len(seen))}  # type: ignore[dict-item]

    history = simulate(Clients(), num_clients=2, rounds=3, evaluate_fn=evaluate_fn)

    assert len(seen) == 4
    np.testing.assert_array_equal(seen[0]["w"], INITIAL["w"])
    assert history.initial_metrics == {"mean_w": 0.0, "calls": 1.0}
    expected = weighted_mean_of([0, 1])  # every round averages to the same model
    assert [r.metrics for r in history.rounds] == [
        {"mean_w": pytest.approx(expected), "calls": 2.0},
        {"mean_w": pytest.approx(expected), "calls": 3.0},
        {"mean_w": pytest.approx(expected), "calls": 4.0},
    ]
    assert all(type(v) is float for r in history.rounds for v in r.metrics.values())


def test_without_evaluate_fn_no_central_metrics_are_recorded() -> None:
    history = simulate(Clients())
    assert history.initial_metrics == {}
    assert all(r.metrics == {} for r in history.rounds)


def test_federated_evaluation_samples_a_fraction_and_weights_by_examples() -> None:
    clients = Clients()
    history = simulate(
        clients, num_clients=4, rounds=3, seed=9, strategy=FedAvg(fraction_evaluate=0.5)
    )
    for record in history.rounds:
        evaluated = [c.cid for c in clients.evaluations() if c.config["round"] == record.round]
        assert len(evaluated) == 2  # ceil(0.5 * 4)
        n = sum(examples(c) for c in evaluated)
        assert record.evaluate_metrics == pytest.approx(
            {
                "loss": sum(examples(c) * c for c in evaluated) / n,
                "accuracy": sum(examples(c) * c / 10 for c in evaluated) / n,
            }
        )
        for call in clients.evaluations():
            if call.config["round"] == record.round:  # clients evaluate the new global model
                np.testing.assert_array_equal(call.weights["w"], history.weights["w"])


def test_federated_evaluation_is_off_by_default() -> None:
    clients = Clients()
    history = simulate(clients)
    assert clients.evaluations() == []
    assert all(r.evaluate_metrics == {} for r in history.rounds)


def test_unusable_evaluations_are_left_out_of_the_federated_metrics() -> None:
    class Evaluator(_Scripted):
        def evaluate(self, weights: Weights, config: Config) -> EvaluateResult:
            if self.cid == 0:
                return EvaluateResult(float("nan"), 10)
            if self.cid == 1:
                return EvaluateResult(1.0, 0)
            if self.cid == 2:
                raise RuntimeError("disk full")
            return EvaluateResult(4.0, 40, {"accuracy": 0.5})

    clients = Clients()
    history = fedge.simulate(
        lambda cid: Evaluator(clients, cid),
        4,
        1,
        initial_weights=INITIAL,
        strategy=FedAvg(fraction_evaluate=1.0),
    )
    assert history.rounds[0].evaluate_metrics == {"loss": 4.0, "accuracy": 0.5}


# --- bad results -------------------------------------------------------------------------


def nan_update(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult({"w": np.array([0.0, np.nan, 0.0]), "b": np.array(0.0)}, 10)


def wrong_shape(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult({"w": np.zeros(4), "b": np.array(0.0)}, 10)


def wrong_dtype(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult({"w": np.zeros(3, np.float32), "b": np.array(0.0)}, 10)


def missing_tensor(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult({"w": np.zeros(3)}, 10)


def unexpected_tensor(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult({"w": np.zeros(3), "b": np.array(0.0), "extra": np.zeros(1)}, 10)


def no_examples(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(trained(cid), 0)


def negative_examples(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(trained(cid), -5)


def fractional_examples(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(trained(cid), 2.5)  # type: ignore[arg-type]


def boolean_examples(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(trained(cid), True)


def raises(cid: int, weights: Weights, config: Config) -> FitResult:
    raise RuntimeError("out of memory")


def returns_a_dict(cid: int, weights: Weights, config: Config) -> dict[str, Any]:
    return {"weights": trained(cid), "num_examples": 10}


def returns_none(cid: int, weights: Weights, config: Config) -> None:
    return None


def weights_not_a_mapping(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(list(trained(cid).values()), 10)  # type: ignore[arg-type]


def metrics_not_a_mapping(cid: int, weights: Weights, config: Config) -> FitResult:
    return FitResult(trained(cid), 10, None)  # type: ignore[arg-type]


COUNT_RULE = "client 3: num_examples must be an integer in 1..1000000 (limits.max_examples)"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (nan_update, "client 3: tensor 'w' has 1 NaN or Inf value(s)"),
        (wrong_shape, "client 3: tensor 'w' has shape [4], expected [3]"),
        (wrong_dtype, "client 3: tensor 'w' has dtype float32, expected float64"),
        (missing_tensor, "client 3: missing tensor(s) ['b']; expected ['w', 'b']"),
        (unexpected_tensor, "client 3: unexpected tensor(s) ['extra']; expected ['w', 'b']"),
        (no_examples, f"{COUNT_RULE}, got 0"),
        (negative_examples, f"{COUNT_RULE}, got -5"),
        (fractional_examples, f"{COUNT_RULE}, got 2.5"),
        (boolean_examples, f"{COUNT_RULE}, got True"),
        (raises, "client 3 raised RuntimeError: out of memory"),
        (returns_a_dict, "client 3: expected a FitResult, got dict"),
        (returns_none, "client 3: expected a FitResult, got NoneType"),
        (weights_not_a_mapping, "client 3: weights must map tensor names to arrays, got list"),
        (metrics_not_a_mapping, "client 3: metrics must be a dict, got NoneType"),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_a_bad_result_is_rejected_and_the_round_goes_on_without_it(
    script: Callable[[int, Weights, Config], Any], reason: str
) -> None:
    clients = Clients(fit={3: script})
    history = simulate(clients, num_clients=4, rounds=2)

    assert [r.status for r in history.rounds] == ["ok", "ok"]
    for record in history.rounds:
        assert record.selected == [0, 1, 2, 3]
        assert record.participants == [0, 1, 2]
        assert record.failures == {3: reason}
        assert record.num_examples == examples(0) + examples(1) + examples(2)
    expected = weighted_mean_of([0, 1, 2])
    np.testing.assert_allclose(history.weights["w"], np.full(3, expected), rtol=1e-12)
    np.testing.assert_allclose(history.weights["b"], expected, rtol=1e-12)
    assert history.weights["w"].dtype == np.float64


def test_several_bad_clients_each_get_their_own_reason() -> None:
    clients = Clients(fit={0: raises, 2: nan_update, 4: wrong_shape})
    history = simulate(clients, num_clients=5, rounds=1)
    record = history.rounds[0]
    assert record.participants == [1, 3]
    assert record.failures == {
        0: "client 0 raised RuntimeError: out of memory",
        2: "client 2: tensor 'w' has 1 NaN or Inf value(s)",
        4: "client 4: tensor 'w' has shape [4], expected [3]",
    }
    np.testing.assert_allclose(history.weights["w"], np.full(3, weighted_mean_of([1, 3])))


def test_numpy_integer_example_counts_are_accepted() -> None:
    clients = Clients(fit={1: lambda cid, w, c: FitResult(trained(cid), np.int64(examples(cid)))})
    history = simulate(clients, num_clients=2, rounds=1)
    assert history.rounds[0].participants == [0, 1]
    assert history.rounds[0].num_examples == 30
    assert type(history.rounds[0].num_examples) is int
    np.testing.assert_allclose(history.weights["w"], np.full(3, weighted_mean_of([0, 1])))


# --- quorum ------------------------------------------------------------------------------


def test_a_round_without_quorum_is_retried_then_raises_with_the_history() -> None:
    clients = Clients(fit={2: raises, 3: raises})
    with pytest.raises(QuorumError) as raised:
        simulate(
            clients,
            num_clients=4,
            rounds=3,
            strategy=FedAvg(min_results=3),
            max_round_retries=2,
        )

    assert str(raised.value) == (
        "round 1 failed 3 time(s); last: only 2 of the required 3 results arrived"
    )
    history = raised.value.history
    assert isinstance(history, fedge.History)
    assert [(r.round, r.attempt, r.status) for r in history.rounds] == [
        (1, 0, "failed"),
        (1, 1, "failed"),
        (1, 2, "failed"),
    ]
    for record in history.rounds:
        assert record.participants == [0, 1]
        assert record.failures == {
            2: "client 2 raised RuntimeError: out of memory",
            3: "client 3 raised RuntimeError: out of memory",
        }
        assert record.reason == "only 2 of the required 3 results arrived"
        assert record.metrics == {}
    assert history.completed == []


def test_a_failed_round_does_not_move_the_model_and_its_retry_can_succeed() -> None:
    failed_once: set[int] = set()

    def flaky(cid: int, weights: Weights, config: Config) -> FitResult:
        if config["round"] == 1 and cid not in failed_once:
            failed_once.add(cid)
            raise ConnectionError("link down")
        return FitResult(trained(cid), examples(cid))

    calls = []
    clients = Clients(fit={3: flaky})

    def evaluate_fn(weights: Weights) -> dict[str, float]:
        calls.append(float(weights["w"][0]))
        return {"w0": float(weights["w"][0])}

    history = simulate(
        clients,
        num_clients=4,
        rounds=2,
        strategy=FedAvg(min_results=4),
        evaluate_fn=evaluate_fn,
    )

    assert [(r.round, r.attempt, r.status) for r in history.rounds] == [
        (1, 0, "failed"),
        (1, 1, "ok"),
        (2, 0, "ok"),
    ]
    assert history.rounds[0].failures == {3: "client 3 raised ConnectionError: link down"}
    assert [r.round for r in history.completed] == [1, 2]
    # the retry trains from the same global model as the failed attempt did
    attempts = clients.fits(round=1)
    assert len(attempts) == 8  # 4 clients, twice
    assert all(np.array_equal(c.weights["w"], INITIAL["w"]) for c in attempts)
    # central evaluation runs for the initial model and completed rounds only
    expected = weighted_mean_of([0, 1, 2, 3])
    assert calls == pytest.approx([0.0, expected, expected])
    assert history.rounds[0].metrics == {}


def test_zero_retries_means_the_first_failure_raises() -> None:
    clients = Clients(fit={0: raises, 1: raises})
    with pytest.raises(QuorumError, match="round 1 failed 1 time"):
        simulate(clients, num_clients=2, max_round_retries=0)


# --- metrics and history -----------------------------------------------------------------


def test_fit_metrics_are_the_example_weighted_mean_of_numeric_metrics() -> None:
    def reporting(cid: int, weights: Weights, config: Config) -> FitResult:
        metrics: dict[str, Any] = {"train_loss": float(cid), "steps": np.int32(cid * 2)}
        metrics["note"] = "text is ignored"
        metrics["flag"] = True  # booleans are not numbers to average
        metrics["broken"] = float("nan")  # nor are non-finite values
        if cid == 2:
            metrics["only_two"] = 7.0  # averaged over the clients that report it
        return FitResult(trained(cid), examples(cid), metrics)

    clients = Clients(fit=dict.fromkeys(range(3), reporting))
    history = simulate(clients, num_clients=3, rounds=1)
    n = examples(0) + examples(1) + examples(2)
    assert history.rounds[0].fit_metrics == pytest.approx(
        {
            "train_loss": (10 * 0 + 20 * 1 + 30 * 2) / n,
            "steps": (10 * 0 + 20 * 2 + 30 * 4) / n,
            "only_two": 7.0,
        }
    )


def test_fit_metrics_leave_out_rejected_clients() -> None:
    clients = Clients(fit={1: nan_update})
    history = simulate(clients, num_clients=3, rounds=1)
    assert history.rounds[0].fit_metrics == pytest.approx(
        {"train_loss": (10 * 0 + 30 * 2) / (10 + 30)}
    )


def test_history_to_dict_is_plain_json() -> None:
    clients = Clients(fit={1: raises, 2: lambda cid, w, c: FitResult(trained(cid), np.int64(5))})
    history = simulate(
        clients,
        num_clients=4,
        rounds=2,
        strategy=FedAvg(fraction_evaluate=0.5),
        evaluate_fn=lambda w: {"mean": np.float32(w["w"].mean())},  # type: ignore[dict-item]
    )
    data = json.loads(json.dumps(history.to_dict()))

    assert set(data) == {"initial_metrics", "rounds", "wall_time", "ended_early"}
    assert data["initial_metrics"] == {"mean": 0.0}
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    first = data["rounds"][0]
    assert first["status"] == "ok"
    assert first["participants"] == [0, 2, 3]
    assert first["failures"] == {"1": "client 1 raised RuntimeError: out of memory"}
    assert first["num_examples"] == 10 + 5 + 40
    assert set(first["evaluate_metrics"]) == {"loss", "accuracy"}
    assert first["wall_time"] >= first["fit_time"] >= 0
    assert data["wall_time"] >= sum(r["wall_time"] for r in data["rounds"])


# --- the coordinator without the simulate() wrapper --------------------------------------


class RecordingObserver(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def round_started(self, round: int, selected: int) -> None:
        self.events.append(("started", round, selected))

    def result_received(self, round: int, received: int, selected: int) -> None:
        self.events.append(("result", round, received, selected))

    def round_finished(self, record: RoundRecord) -> None:
        self.events.append(("finished", record.round, record.status))


def test_coordinator_and_local_fleet_report_progress_to_the_observer() -> None:
    observer = RecordingObserver()
    coordinator = Coordinator(strategy=FedAvg(), weights=dict(INITIAL), rounds=2, observer=observer)
    history = History()
    with LocalFleet(Clients(fit={1: raises}), 3) as fleet:
        coordinator.run(fleet, history)

    assert observer.events == [  # every arrival counts, the rejected one too
        ("started", 1, 3),
        ("result", 1, 1, 3),
        ("result", 1, 2, 3),
        ("result", 1, 3, 3),
        ("finished", 1, "ok"),
        ("started", 2, 3),
        ("result", 2, 1, 3),
        ("result", 2, 2, 3),
        ("result", 2, 3, 3),
        ("finished", 2, "ok"),
    ]
    assert [r.participants for r in history.rounds] == [[0, 2], [0, 2]]
    np.testing.assert_allclose(coordinator.weights["w"], np.full(3, weighted_mean_of([0, 2])))


def test_a_run_resumes_from_a_saved_history_and_start_round() -> None:
    clients = Clients()
    first = Coordinator(strategy=FedAvg(), weights=dict(INITIAL), rounds=2, seed=4)
    history = History()
    with LocalFleet(clients, 2) as fleet:
        first.run(fleet, history)

    resumed = Coordinator(strategy=FedAvg(), weights=first.weights, rounds=4, seed=4)
    with LocalFleet(clients, 2) as fleet:
        resumed.run(fleet, history, start_round=3)

    assert [r.round for r in history.rounds] == [1, 2, 3, 4]
    assert history.initial_metrics == {}  # a resumed run does not evaluate round 0 again
    assert sorted({c.config["round"] for c in clients.fits()}) == [1, 2, 3, 4]
    for call in clients.fits(round=3):
        assert call.config["seed"] == client_seed(4, 3, call.cid)


def test_in_place_training_cannot_change_the_global_model() -> None:
    def in_place(cid: int, weights: Weights, config: Config) -> FitResult:
        weights["w"] += 1.0  # a client that trains on the arrays it was given
        weights["b"] += 1.0
        return FitResult(weights, 10)

    clients = Clients(fit=dict.fromkeys(range(4), in_place))
    history = simulate(clients, num_clients=4, rounds=3)
    # each round: every client adds 1 to the same global model, so the mean is +1
    np.testing.assert_array_equal(history.weights["w"], np.full(3, 3.0))
    np.testing.assert_array_equal(INITIAL["w"], np.zeros(3))


class _LateFleet(LocalFleet):
    """Its clients become available 50 ms after a round first asks for them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.late = True

    def wait_available(self, count: int, deadline: float | None = None) -> list[int]:
        if self.late and count > 0:
            time.sleep(0.05)
            self.late = False
        return super().wait_available(count, deadline)


@pytest.mark.parametrize("strategy", [FedAvg(), FedBuff(buffer_size=2, concurrency=2)])
def test_a_round_records_how_long_it_waited_for_clients(strategy: fedge.Strategy) -> None:
    coordinator = Coordinator(strategy, INITIAL, rounds=1, workflow=workflow_for(strategy))
    fleet = _LateFleet(Clients(), 4)
    first, _, _ = coordinator.run_round(fleet, 1)
    assert first.status == "ok"
    assert 0.05 <= first.wait_time <= first.fit_time <= first.wall_time
    assert RoundRecord.from_dict(json.loads(json.dumps(first.to_dict()))) == first
