"""FedBuff: the staleness weight, the buffer fold, the asynchronous workflow in simulation
(accuracy, determinism, staleness, resuming a buffer) and its config refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.asynchronous import BufferedAsync, workflow_for
from fedge.checkpoint import Checkpoint
from fedge.config import CompressionSection, build_strategy
from fedge.coordinator import Coordinator, fit_round
from fedge.errors import ConfigError
from fedge.history import History
from fedge.sim import LocalFleet, simulate, spread_task_times
from fedge.strategy import STRATEGIES, FedAvg, FedBuff
from fedge.strategy.base import RoundContext
from fedge.strategy.fedbuff import Buffer, staleness_weight
from fedge.weights import Weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "digits"))
from app import create_app


def test_staleness_weight_is_one_over_sqrt_one_plus_s() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    assert staleness_weight(8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        staleness_weight(-1)


def test_the_buffer_folds_example_and_staleness_weighted_deltas() -> None:
    base0 = {"w": np.zeros(2, np.float32), "n": np.array([7], np.int64)}
    base1 = {"w": np.ones(2, np.float32), "n": np.array([7], np.int64)}
    buffer = Buffer(round=2)
    buffer.fold("a", {"w": np.array([2, 4], np.float32), "n": np.array([9])}, base0, 10, 3)
    buffer.fold("b", {"w": np.array([2, 2], np.float32), "n": np.array([9])}, base1, 30, 0)
    # (10 * 0.5 * [2, 4] + 30 * 1 * [1, 1]) / (10 + 30): staleness discounts, n normalises
    np.testing.assert_allclose(buffer.mean()["w"], [(10 + 30) / 40, (20 + 30) / 40])
    assert "n" not in buffer.mean()  # counters are not averaged
    assert buffer.count == 2 and buffer.tasks == ["a", "b"]
    with pytest.raises(ValueError, match="task 'a' is in the buffer already"):
        buffer.fold("a", {"w": np.zeros(2, np.float32), "n": np.array([9])}, base0, 1, 0)
    with pytest.raises(ValueError, match="empty"):
        Buffer(round=1).mean()


def test_scalar_tensors_are_buffered_and_stepped_as_arrays() -> None:
    base = {"t": np.array(1.0, np.float32)}  # a 0-d tensor, e.g. a temperature
    buffer = Buffer(round=1)
    buffer.fold("a", {"t": np.array(3.0, np.float32)}, base, 1, 0)
    buffer.fold("b", {"t": np.array(2.0, np.float32)}, base, 1, 0)
    mean = buffer.mean()
    assert isinstance(mean["t"], np.ndarray) and mean["t"].shape == () and mean["t"] == 1.5
    new, _ = FedBuff().apply(base, mean, {}, RoundContext(1, 0, base, np.random.default_rng(0)))
    assert isinstance(new["t"], np.ndarray) and new["t"].dtype == np.float32 and new["t"] == 2.5


def test_apply_steps_by_the_server_learning_rate_and_keeps_counters() -> None:
    strategy = FedBuff(server_learning_rate=0.5)
    weights = {"w": np.array([1.0, 1.0], np.float32), "n": np.array([3], np.int64)}
    ctx = RoundContext(1, 0, weights, np.random.default_rng(0))
    new, _ = strategy.apply(weights, {"w": np.array([2.0, -4.0])}, {}, ctx)
    np.testing.assert_array_equal(new["w"], [2.0, -1.0])
    assert new["w"].dtype == np.float32 and new["n"] is weights["n"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("buffer_size", 0, "strategy.buffer_size must be an integer >= 1, got 0"),
        ("concurrency", 0, "strategy.concurrency must be an integer >= 1, got 0"),
        ("server_learning_rate", 0.0, "strategy.server_learning_rate must be > 0, got 0.0"),
        ("server_learning_rate", -1.0, "strategy.server_learning_rate must be > 0, got -1.0"),
        ("max_staleness", -1, "strategy.max_staleness must be an integer >= 0, got -1"),
        ("fraction_evaluate", 0.5, "strategy.fraction_evaluate must be 0 under FedBuff"),
    ],
)
def test_bad_fedbuff_settings_are_refused_naming_the_key(
    key: str, value: object, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        build_strategy({"name": "FedBuff", key: value})


def test_fedbuff_is_configured_by_name_and_gets_the_asynchronous_workflow() -> None:
    strategy = build_strategy({"name": "FedBuff", "buffer_size": 4, "concurrency": 8})
    assert isinstance(strategy, FedBuff) and STRATEGIES["fedbuff"] is FedBuff
    assert (strategy.buffer_size, strategy.concurrency) == (4, 8)
    assert isinstance(workflow_for(strategy), BufferedAsync)
    assert workflow_for(FedAvg()) is fit_round


def test_a_server_side_wrapper_around_fedbuff_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ConfigError) as raised:
        build_strategy({"name": "fedbuff", "wrap": [{"name": "clip_updates", "max_norm": 1.0}]})
    assert str(raised.value) == (
        "strategy.wrap: ClipUpdates cannot wrap FedBuff: a server-side wrapper changes the "
        "synchronous aggregation, which FedBuff does not use (node-side wrappers such as "
        "ClipClient do apply)"
    )


def test_speeds_spread_exactly_and_bad_task_times_are_refused() -> None:
    times = spread_task_times(20, 10.0, seed=0)
    assert min(times) == 1.0 and max(times) == pytest.approx(10.0)
    assert times == spread_task_times(20, 10.0, seed=0) != spread_task_times(20, 10.0, seed=1)
    with pytest.raises(ConfigError, match="speed_spread must be >= 1"):
        spread_task_times(3, 0.5)
    with pytest.raises(ConfigError, match="task_times must be 3 positive numbers"):
        LocalFleet(lambda cid: None, 3, task_times=[1.0, 0.0, 1.0])  # type: ignore[arg-type, return-value]


def _digits(num_clients: int = 20):  # type: ignore[no-untyped-def]
    return create_app(num_clients, 0, partition="iid", epochs=5, batch_size=16, lr=0.5)


def _run(strategy: FedBuff, rounds: int, **kwargs: object) -> History:
    app = _digits()
    return simulate(
        app.client_fn,
        20,
        rounds,
        strategy=strategy,
        initial_weights=app.initial_weights,
        evaluate_fn=app.evaluate_fn,
        **kwargs,  # type: ignore[arg-type]
    )


def test_fedbuff_reaches_the_accuracy_of_fedavg_sooner_on_the_simulated_clock() -> None:
    buff = _run(FedBuff(buffer_size=5, concurrency=20), 24, speed_spread=10.0)
    app = _digits()
    sync = simulate(
        app.client_fn, 20, 4, initial_weights=app.initial_weights,
        evaluate_fn=app.evaluate_fn, speed_spread=10.0,
    )  # fmt: skip
    assert all(r.status == "ok" for r in buff.rounds)
    assert buff.rounds[-1].metrics["accuracy"] >= 0.92
    # one synchronous round waits for the slowest client (10 s); FedBuff does not
    assert [r.sim_time for r in sync.rounds] == pytest.approx([10.0, 20.0, 30.0, 40.0])
    first = next(r for r in buff.rounds if r.metrics["accuracy"] >= 0.92)
    assert first.sim_time < 20.0
    # each result counts once, and fast clients contribute more of them than slow ones
    tasks = [t for r in buff.rounds for t in r.tasks]
    assert len(tasks) == len(set(tasks)) == 24 * 5
    times = spread_task_times(20, 10.0)
    done = [sum(r.participants.count(c) for r in buff.rounds) for c in range(20)]
    assert done[times.index(1.0)] > 3 * done[times.index(max(times))]


def test_the_same_seed_gives_the_same_asynchronous_model() -> None:
    a = _run(FedBuff(buffer_size=3, concurrency=7), 6, speed_spread=10.0, seed=3)
    b = _run(FedBuff(buffer_size=3, concurrency=7), 6, speed_spread=10.0, seed=3)
    c = _run(FedBuff(buffer_size=3, concurrency=7), 6, speed_spread=10.0, seed=4)
    assert a.weights is not None and b.weights is not None and c.weights is not None
    for name in a.weights:
        assert a.weights[name].tobytes() == b.weights[name].tobytes()
    assert [r.tasks for r in a.rounds] == [r.tasks for r in b.rounds]
    assert [r.tasks for r in a.rounds] != [r.tasks for r in c.rounds]


def test_results_older_than_max_staleness_are_dropped_and_counted() -> None:
    times = [1.0] * 19 + [50.0]  # client 19 is far behind everyone else
    history = _run(FedBuff(buffer_size=4, concurrency=20, max_staleness=2), 8, task_times=times)
    assert sum(r.stale for r in history.rounds) >= 1
    dropped = [r for r in history.rounds if 19 in r.failures]
    assert dropped and "max_staleness = 2" in dropped[0].failures[19]
    assert all(19 not in r.participants for r in history.rounds)


class MemoryStore:
    """A buffer store that 'kills the server' once the buffer of `kill_round` holds
    `kill_after` results (that write done: it reached the store)."""

    def __init__(self, kill_round: int, kill_after: int) -> None:
        self.saved: Checkpoint | None = None
        self.kill_round, self.kill_after = kill_round, kill_after

    def save_buffer(self, ckpt: Checkpoint) -> None:
        self.saved = Checkpoint(ckpt.round, {k: v.copy() for k, v in ckpt.weights.items()},
                                {}, dict(ckpt.meta))  # fmt: skip
        if ckpt.round == self.kill_round and len(ckpt.meta["tasks"]) == self.kill_after:
            raise Killed

    def load_buffer(self) -> Checkpoint | None:
        return self.saved


class Killed(Exception):
    pass


class Weighed(History):
    def on_round(self, record, weights: Weights, state) -> None:  # type: ignore[no-untyped-def]
        super().on_round(record, weights, state)
        self.by_round = {**getattr(self, "by_round", {}), record.round: weights}


def test_a_resumed_buffer_keeps_its_results_and_counts_none_twice() -> None:
    app, strategy = _digits(), FedBuff(buffer_size=4, concurrency=6)
    store = MemoryStore(kill_round=3, kill_after=2)
    times = spread_task_times(20, 10.0)
    before = Weighed()
    coordinator = Coordinator(strategy, dict(app.initial_weights or {}), 5,
                              workflow=BufferedAsync(store))  # fmt: skip
    with pytest.raises(Killed):
        coordinator.run(LocalFleet(app.client_fn, 20, task_times=times), before)
    assert [r.round for r in before.rounds] == [1, 2] and store.saved is not None
    kept = list(store.saved.meta["tasks"])
    reopened = [t["id"] for t in store.saved.meta["outstanding"]]
    assert len(kept) == 2 and reopened

    after, store.kill_round = History(), 0
    resumed = Coordinator(strategy, before.by_round[2], 5, evaluate_fn=app.evaluate_fn,
                          workflow=BufferedAsync(store))  # fmt: skip
    resumed.run(LocalFleet(app.client_fn, 20, task_times=times), after, start_round=3)
    round3 = after.rounds[0]
    assert round3.round == 3 and round3.tasks[:2] == kept
    assert set(reopened) & set(round3.tasks[2:])  # a reopened task was delivered once
    tasks = [t for r in [*before.rounds, *after.rounds] for t in r.tasks]
    assert len(tasks) == len(set(tasks)) == 5 * 4
    assert after.rounds[-1].metrics["accuracy"] > 0.85


def test_simulation_speed_keys_are_validated_naming_the_key() -> None:
    from fedge.config import parse_config

    app = {"target": "app:create_app"}
    config = parse_config({"app": app, "simulation": {"speed_spread": 10, "task_times": [1, 2]}})
    assert (config.simulation.speed_spread, config.simulation.task_times) == (10.0, [1.0, 2.0])
    with pytest.raises(
        ConfigError, match=r"'simulation.speed_spread' = 0.5: Expected `float` >= 1"
    ):
        parse_config({"app": app, "simulation": {"speed_spread": 0.5}})
    with pytest.raises(ConfigError, match=r"'simulation.task_times.1' = 0: Expected `float` > 0"):
        parse_config({"app": app, "simulation": {"task_times": [1, 0]}})


def test_a_stale_compressed_update_is_decoded_on_the_model_its_client_trained() -> None:
    """An encoded update is relative to the weights its task sent; a stale one must not be
    decoded on the newer global model (that would add the global's drift once more)."""
    strategy = FedBuff(buffer_size=3, concurrency=7)
    plain = _run(strategy, 8, speed_spread=10.0, seed=3)
    half = _run(strategy, 8, speed_spread=10.0, seed=3,
                compression=CompressionSection(mode="fp16"))  # fmt: skip
    sent = [(r.round, int(t.split("/")[1].split(".")[0])) for r in half.rounds for t in r.tasks]
    assert any(folded > trained for folded, trained in sent), "the test needs stale results"
    assert plain.weights is not None and half.weights is not None
    for name, want in plain.weights.items():  # fp16 rounding of each update, no more
        np.testing.assert_allclose(half.weights[name], want, atol=2e-3)
