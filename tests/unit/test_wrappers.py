"""Extension points: strategy and client wrappers, round workflows, and the guarantees the
coordinator keeps whatever they do (a non-finite model is never applied; updates are folded
in client-id order, however they arrive). Numbers are chosen so results are exact."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedge
from fedge.aggregate import WeightedMean
from fedge.app import load_app
from fedge.client import (
    Client,
    ClientWrapper,
    ClipClient,
    Config,
    FitResult,
    Message,
    Reply,
    UnsupportedTask,
)
from fedge.config import build_strategy, load_config
from fedge.coordinator import Coordinator, InOrder, Outcome, Round, client_seed
from fedge.errors import ConfigError
from fedge.history import History, RoundRecord
from fedge.sim import LocalFleet
from fedge.strategy import (
    WRAPPERS,
    ClipUpdates,
    FedAvg,
    FedMedian,
    RoundContext,
    StrategyWrapper,
)
from fedge.strategy.clip import ClippingAggregator
from fedge.weights import State, TensorSpec, Weights

INITIAL: Weights = {"w": np.zeros(4, np.float64), "step": np.array(0, np.int64)}

HONEST = 0.25  # honest clients add 0.25 to every coordinate: a delta of norm 0.5
ATTACK = float(2**20)  # the attacker adds 2^20: norm 2^21, clipped to 1 by a scale of 2^-21


def ctx(weights: Weights) -> RoundContext:
    return RoundContext(1, 0, weights, np.random.default_rng(0))


class Adds(Client):
    """Adds `delta` to every coordinate of ``w`` and 1 to the ``step`` counter."""

    def __init__(self, delta: float, examples: int = 10) -> None:
        self.delta, self.examples = delta, examples

    def fit(self, weights: Weights, config: Config) -> FitResult:
        new = {"w": weights["w"] + self.delta, "step": np.asarray(weights["step"] + 1)}
        return FitResult(new, self.examples, {"delta": self.delta})


def attacked(cid: int) -> Client:
    """Clients 0-2 are honest; client 3 sends a huge (finite) update."""
    return Adds(ATTACK if cid == 3 else HONEST)


def w_of(history: History) -> list[float]:
    assert history.weights is not None
    return [float(v) for v in history.weights["w"]]


# --- ClipUpdates: server-side clipping of update deltas ------------------------------------


def test_clip_updates_scales_long_deltas_to_max_norm_around_the_reference() -> None:
    reference = {"w": np.array([1.0, -1.0], np.float32), "n": np.array([5], np.int64)}
    strategy = ClipUpdates(FedAvg(), max_norm=2.5)
    agg = strategy.aggregator(ctx(reference))
    assert isinstance(agg, ClippingAggregator)
    # delta (3, 4), norm 5 > 2.5: scaled by 0.5 to (1.5, 2) -> (2.5, 1.0); counter kept
    agg.add({"w": np.array([4.0, 3.0], np.float32), "n": np.array([9], np.int64)}, 2, 0)
    # delta (0.5, 0), norm 0.5 <= 2.5: kept as it is
    agg.add({"w": np.array([1.5, -1.0], np.float32), "n": np.array([1], np.int64)}, 2, 1)
    assert agg.clipped == 1
    assert (agg.count, agg.total_examples) == (2, 4)
    out = agg.result()
    # ((2.5, 1.0) + (1.5, -1.0)) / 2 = (2, 0); counters (9 + 1) / 2 = 5
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["w"], np.array([2.0, 0.0], np.float32))
    np.testing.assert_array_equal(out["n"], [5])


def test_clip_updates_feeds_clipped_updates_to_a_robust_inner_rule() -> None:
    reference = {"w": np.array([0.0, 0.0])}
    agg = ClipUpdates(FedMedian(), max_norm=1.0).aggregator(ctx(reference))
    agg.add({"w": np.array([0.0, 0.5])}, 1, 0)  # kept
    agg.add({"w": np.array([300.0, 400.0])}, 1, 1)  # norm 500 -> (0.6, 0.8)
    agg.add({"w": np.array([0.2, 0.0])}, 1, 2)  # kept
    np.testing.assert_allclose(agg.result()["w"], [0.2, 0.5], rtol=0, atol=1e-15)


def test_clip_updates_keeps_a_finite_float16_update_finite() -> None:
    # 60000 - (-60000) overflows float16 (max 65504): the delta must not be formed in it
    reference = {"w": np.array([-60000.0, 2.0], np.float16)}
    agg = ClipUpdates(FedAvg(), max_norm=1.0).aggregator(ctx(reference))
    agg.add({"w": np.array([60000.0, 2.0], np.float16)}, 1, 0)
    out = agg.result()["w"]
    assert out.dtype == np.float16
    # the reference moved by at most 1: -59999 rounds to -60000 in float16 (spacing 32)
    np.testing.assert_array_equal(out, np.array([-60000.0, 2.0], np.float16))


def test_a_wrapper_samples_and_applies_as_the_strategy_it_wraps() -> None:
    inner = FedAvg(fraction_fit=0.5, min_results=2, fraction_evaluate=0.25)
    strategy = ClipUpdates(inner, max_norm=1.0)
    assert isinstance(strategy, StrategyWrapper)
    assert strategy.name == "ClipUpdates(FedAvg)"
    assert (strategy.fraction_fit, strategy.min_results) == (0.5, 2)
    assert strategy.num_fit_clients(10) == 5
    assert strategy.num_evaluate_clients(10) == 3
    strategy.min_results = 4  # a setting of the wrapper is the inner strategy's
    assert inner.min_results == 4


@pytest.mark.parametrize("max_norm", [0, -1.0, float("inf"), float("nan"), "1.0", None, True])
def test_clip_updates_refuses_a_max_norm_that_is_not_a_positive_number(max_norm: Any) -> None:
    with pytest.raises(ConfigError, match=r"^clip_updates\.max_norm must be a number > 0, got "):
        ClipUpdates(FedAvg(), max_norm=max_norm)


# --- configured from the TOML file ---------------------------------------------------------

CLIPPED_CONFIG = """
[app]
target = "app:create_app"

[run]
num_clients = 4
rounds = 2

[strategy]
name = "fedavg"
min_results = 3
wrap = [{ name = "clip_updates", max_norm = 1.0 }]
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedge.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_strategy_wrap_in_the_config_wraps_the_named_strategy(tmp_path: Path) -> None:
    strategy = load_config(write_config(tmp_path, CLIPPED_CONFIG)).build_strategy()
    assert isinstance(strategy, ClipUpdates)
    assert type(strategy.inner) is FedAvg
    assert strategy.max_norm == 1.0
    assert strategy.min_results == 3
    assert WRAPPERS["clip_updates"] is ClipUpdates


def test_wrappers_apply_inside_out() -> None:
    strategy = build_strategy(
        {
            "name": "fedmedian",
            "wrap": [
                {"name": "clip_updates", "max_norm": 1.0},
                {"name": "clip_updates", "max_norm": 2},
            ],
        }
    )
    assert isinstance(strategy, ClipUpdates) and strategy.max_norm == 2.0
    assert isinstance(strategy.inner, ClipUpdates) and strategy.inner.max_norm == 1.0
    assert type(strategy.inner.inner) is FedMedian


def test_a_simulation_clips_the_huge_update_of_one_client(tmp_path: Path) -> None:
    strategy = load_config(write_config(tmp_path, CLIPPED_CONFIG)).build_strategy()
    history = fedge.simulate(attacked, 4, 2, strategy=strategy, initial_weights=INITIAL)
    # each round: (3 * 0.25 + 0.5) / 4 = 0.3125, the attacker's 2^20 clipped to 0.5
    assert w_of(history) == [0.625] * 4
    assert history.weights is not None and int(history.weights["step"]) == 2  # not clipped
    assert [r.participants for r in history.rounds] == [[0, 1, 2, 3]] * 2
    unclipped = fedge.simulate(attacked, 4, 1, strategy=FedAvg(), initial_weights=INITIAL)
    assert w_of(unclipped) == [(3 * HONEST + ATTACK) / 4] * 4  # what the clip prevented


@pytest.mark.parametrize(
    ("wrap", "message"),
    [
        (
            '[{ name = "clip_updates", max_norm = 1.0 }, { name = "clip_update", max_norm = 1.0 }]',
            "'strategy.wrap[1].name' = 'clip_update': unknown wrapper; "
            "expected one of ['clip_updates', 'differential_privacy']",
        ),
        (
            "[{ max_norm = 1.0 }]",
            "'strategy.wrap[0].name' = '': unknown wrapper; "
            "expected one of ['clip_updates', 'differential_privacy']",
        ),
        (
            '[{ name = "clip_updates", max_norm = 1.0, norm = 2 }]',
            "strategy.wrap[0] (clip_updates): ClipUpdates.__init__() got an unexpected "
            "keyword argument 'norm'",
        ),
        (
            '[{ name = "clip_updates" }]',
            "strategy.wrap[0] (clip_updates): ClipUpdates.__init__() missing 1 required "
            "keyword-only argument: 'max_norm'",
        ),
        (
            '[{ name = "clip_updates", max_norm = -2 }]',
            "clip_updates.max_norm must be a number > 0, got -2",
        ),
        (
            '{ name = "clip_updates", max_norm = 1.0 }',
            "'strategy.wrap' must be a list of tables, got {'name': 'clip_updates', "
            "'max_norm': 1.0}",
        ),
    ],
    ids=[
        "unknown-name",
        "no-name",
        "unknown-parameter",
        "missing-max-norm",
        "bad-max-norm",
        "not-a-list",
    ],
)
def test_a_bad_wrapper_in_the_config_is_a_precise_error(
    tmp_path: Path, wrap: str, message: str
) -> None:
    text = CLIPPED_CONFIG.replace(
        'wrap = [{ name = "clip_updates", max_norm = 1.0 }]', f"wrap = {wrap}"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, text))
    assert str(raised.value) == message


# --- ClipClient: clipping on the node, before the update is sent -----------------------------


class Fixed(Client):
    """Returns `new` (float32 ``w`` and an int counter), optionally training in place."""

    def __init__(self, new: list[float], in_place: bool = False) -> None:
        self.new, self.in_place = np.array(new, np.float32), in_place

    def fit(self, weights: Weights, config: Config) -> FitResult:
        if self.in_place:  # trains on the arrays it was given, as torch code may
            weights["w"][...] = self.new
            weights["n"] += 1
            return FitResult(weights, 7, {"loss": 0.5})
        return FitResult({"w": self.new.copy(), "n": weights["n"] + 1}, 7, {"loss": 0.5})

    def handle(self, message: Message) -> Any:
        if message.kind == "probe":
            return Reply({"echo": message.payload["nonce"]}, {"probed": 1.0})
        return super().handle(message)


def received() -> Weights:
    return {"w": np.array([1.0, -1.0], np.float32), "n": np.array(4, np.int64)}


@pytest.mark.parametrize("in_place", [False, True], ids=["new-arrays", "in-place"])
def test_clip_client_scales_its_delta_to_max_norm(in_place: bool) -> None:
    client = ClipClient(Fixed([4.0, 3.0], in_place), max_norm=2.5)
    result = client.handle(Message("fit", {"round": 1, "seed": 0}, received()))
    assert isinstance(result, FitResult)
    # delta (3, 4) from what it received, norm 5: scaled by 0.5 -> (1.5, 2)
    assert result.weights["w"].dtype == np.float32
    np.testing.assert_array_equal(result.weights["w"], np.array([2.5, 1.0], np.float32))
    assert int(result.weights["n"]) == 5  # integer tensors are not clipped
    assert (result.num_examples, result.metrics) == (7, {"loss": 0.5})


def test_clip_client_passes_a_short_update_and_other_task_kinds_through() -> None:
    inner = Fixed([1.5, -1.0])  # delta (0.5, 0)
    client = ClipClient(inner, max_norm=2.5)
    result = client.fit(received(), {})
    np.testing.assert_array_equal(result.weights["w"], np.array([1.5, -1.0], np.float32))
    nonce = np.arange(4, dtype=np.uint8)
    reply = client.handle(Message("probe", {}, payload={"nonce": nonce}))
    assert isinstance(reply, Reply) and reply.arrays["echo"] is nonce
    with pytest.raises(UnsupportedTask, match="cannot run tasks of kind 'secagg'"):
        client.handle(Message("secagg", {}))
    with pytest.raises(ValueError, match=r"^ClipClient: max_norm must be a number > 0, got 0$"):
        ClipClient(inner, max_norm=0)
    with pytest.raises(ValueError, match=r"^ClipClient: max_norm must be a number > 0, got True$"):
        ClipClient(inner, max_norm=True)


def test_clip_clients_bound_the_update_in_a_simulation() -> None:
    history = fedge.simulate(
        lambda cid: ClipClient(attacked(cid), max_norm=1.0), 4, 2, initial_weights=INITIAL
    )
    assert w_of(history) == [0.625] * 4  # as with ClipUpdates on the server


# --- a workflow of its own: a probe stage, then fit ---------------------------------------

ECHO = {"echo": TensorSpec(np.dtype(np.uint8), (4,))}


class Probed(ClientWrapper):
    """Answers ``probe`` tasks by echoing the nonce reversed; client 2 gets it wrong and
    client 1 sends an array of the wrong shape."""

    def __init__(self, cid: int, calls: list[tuple[str, int, Message]]) -> None:
        super().__init__(Adds(float(cid + 1), examples=10 * (cid + 1)))
        self.cid, self.calls = cid, calls

    def handle(self, message: Message) -> Any:
        self.calls.append((message.kind, self.cid, message))
        if message.kind != "probe":
            return super().handle(message)
        echo = message.payload["nonce"][::-1].copy()
        if self.cid == 2:
            echo[0] ^= 1
        if self.cid == 1:
            echo = echo[:3]
        return Reply({"echo": echo}, {"probed": 1.0})


@dataclass
class ProbeThenFit:
    """Stage 1 sends each available client a nonce of its own (no model); stage 2 trains
    the clients that echoed it back correctly."""

    seen: list[Outcome] = field(default_factory=list)

    def __call__(self, rnd: Round) -> Weights | None:
        available = rnd.wait_available(rnd.strategy.min_available_clients)
        nonces = {cid: rnd.rng.integers(0, 256, 4, dtype=np.uint8) for cid in available}
        tasks = rnd.tasks(
            "probe",
            available,
            payload=lambda cid: {"nonce": nonces[cid]},
            send_model=False,
            expects=ECHO,
        )
        passed = []
        with rnd.stage(tasks) as outcomes:
            for outcome in outcomes:
                self.seen.append(outcome)
                reply = outcome.result
                if isinstance(reply, Reply) and np.array_equal(
                    reply.arrays["echo"], nonces[outcome.task.cid][::-1]
                ):
                    passed.append(outcome.task.cid)
                else:
                    rnd.record.failures[outcome.task.cid] = outcome.error or "wrong echo"
        return rnd.fit(sorted(passed))


def test_a_two_stage_workflow_with_its_own_task_kind_runs_in_simulation() -> None:
    calls: list[tuple[str, int, Message]] = []
    workflow = ProbeThenFit()
    history = fedge.simulate(
        lambda cid: Probed(cid, calls), 4, 2, initial_weights=INITIAL, workflow=workflow
    )
    assert [r.status for r in history.rounds] == ["ok", "ok"]
    assert [r.selected for r in history.rounds] == [[0, 3], [0, 3]]
    assert [r.participants for r in history.rounds] == [[0, 3], [0, 3]]
    assert history.rounds[0].failures[2] == "wrong echo"
    # each round: (10 * 1 + 40 * 4) / 50 = 3.4 added to w
    np.testing.assert_allclose(w_of(history), [6.8] * 4, rtol=1e-15)
    probes = [m for kind, _, m in calls if kind == "probe"]
    assert len(probes) == 8
    assert all(m.weights is None for m in probes)  # send_model=False
    assert {m.config["round"] for m in probes} == {1, 2} and all("seed" in m.config for m in probes)
    assert len({m.payload["nonce"].tobytes() for m in probes}) == 8  # one nonce per client
    fits = [(cid, m.config["round"]) for kind, cid, m in calls if kind == "fit"]
    assert fits == [(0, 1), (3, 1), (0, 2), (3, 2)]


def test_a_reply_that_does_not_match_what_the_stage_expects_is_an_error_outcome() -> None:
    # as over the fleet, where the upload is checked against `expects` before use
    workflow = ProbeThenFit()
    history = fedge.simulate(
        lambda cid: Probed(cid, []), 4, 1, initial_weights=INITIAL, workflow=workflow
    )
    by_cid = {o.task.cid: o for o in workflow.seen}
    assert by_cid[1].result is None
    assert by_cid[1].error == "client 1: tensor 'echo' has shape [3], expected [4]"
    assert history.rounds[0].failures[1] == "client 1: tensor 'echo' has shape [3], expected [4]"
    assert isinstance(by_cid[2].result, Reply)  # well formed, just wrong: the workflow's call


PROBE_APP = '''
import numpy as np

import fedge
from fedge.client import Client, ClientWrapper, FitResult, Reply


class Adds(Client):
    def __init__(self, delta):
        self.delta = delta

    def fit(self, weights, config):
        return FitResult({"w": weights["w"] + self.delta}, 10)


class Ready(ClientWrapper):
    """Answers "ready" tasks with a metric and no arrays: client 1 has no data today."""

    def __init__(self, inner, cid):
        super().__init__(inner)
        self.cid = cid

    def handle(self, message):
        if message.kind == "ready":
            return Reply({}, {"ready": float(self.cid != 1)})
        return super().handle(message)


def ready_then_fit(rnd):
    available = rnd.wait_available(rnd.strategy.min_available_clients)
    ready = []
    with rnd.stage(rnd.tasks("ready", available, send_model=False)) as outcomes:
        for outcome in outcomes:
            if outcome.result is not None and outcome.result.metrics["ready"] == 1.0:
                ready.append(outcome.task.cid)
    return rnd.fit(ready)


def create_app(num_clients, seed, attacker):
    return fedge.App(
        lambda cid: Ready(Adds(2.0**20 if cid == attacker else 0.25), cid),
        {"w": np.zeros(4)},
        workflow=ready_then_fit,
    )
'''


def test_an_apps_workflow_and_the_configs_wrapper_run_together_as_the_cli_runs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    text = CLIPPED_CONFIG.replace('target = "app:create_app"', 'target = "probe_app:create_app"')
    config = load_config(write_config(tmp_path, text + "\n[app.options]\nattacker = 3\n"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app adds the config's directory
    try:
        app = load_app(
            config.app.target,
            config.base_dir,
            num_clients=config.run.num_clients,
            seed=config.run.seed,
            **config.app.options,
        )
        assert app.workflow is not None
        history = fedge.simulate(
            app.client_fn,
            config.run.num_clients,
            config.run.rounds,
            strategy=config.build_strategy(),
            initial_weights=app.initial_weights,
            workflow=app.workflow,
        )
    finally:
        sys.modules.pop("probe_app", None)
    assert [r.selected for r in history.rounds] == [[0, 2, 3], [0, 2, 3]]
    assert [r.participants for r in history.rounds] == [[0, 2, 3], [0, 2, 3]]
    # per round (0.25 + 0.25 + 0.5) / 3 = 1/3: the attacker's 2^20 is clipped to norm 1
    np.testing.assert_allclose(w_of(history), [2 / 3] * 4, rtol=1e-12)


# --- a non-finite aggregate fails the round and leaves the model where it was -------------


@dataclass(kw_only=True)
class Exploding(FedAvg):
    """FedAvg with a step counter in its state, whose first attempt at round 1 gives Inf."""

    def init_state(self, weights: Weights) -> State:
        return {"steps": np.array(0, np.int64)}

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        new = dict(aggregate)
        if (ctx.round, ctx.attempt) == (1, 0):
            new["w"] = np.array([1.0, np.inf, -np.inf, 2.0])
        return new, {"steps": state["steps"] + 1}


@dataclass
class Recorded:
    """A `Recorder` keeping what it is given for every attempt."""

    attempts: list[tuple[RoundRecord, Weights, State]] = field(default_factory=list)

    def on_start(self, initial_metrics: Mapping[str, float]) -> None:
        pass

    def on_round(self, record: RoundRecord, weights: Weights, state: State) -> None:
        self.attempts.append((record, weights, state))


def test_a_non_finite_aggregate_fails_the_round_and_the_model_does_not_move() -> None:
    evaluated: list[Weights] = []

    def evaluate_fn(weights: Weights) -> dict[str, float]:
        evaluated.append(weights)
        return {"w0": float(weights["w"][0])}

    coordinator = Coordinator(
        strategy=Exploding(),
        weights=dict(INITIAL),
        rounds=2,
        evaluate_fn=evaluate_fn,
    )
    recorder = Recorded()
    with LocalFleet(attacked, 4) as fleet:
        coordinator.run(fleet, recorder)
    (failed, w1, s1), (retry, w2, s2), (second, _, s3) = recorder.attempts
    assert (failed.round, failed.attempt, failed.status) == (1, 0, "failed")
    assert failed.reason == (
        "the aggregated model is not finite (tensor 'w' has 2 NaN or Inf value(s)); "
        "it was not applied"
    )
    assert failed.metrics == {}  # the Inf model was never evaluated
    assert failed.participants == [0, 1, 2, 3]  # the results were fine; the model was not
    np.testing.assert_array_equal(w1["w"], INITIAL["w"])
    assert int(w1["step"]) == 0
    assert int(s1["steps"]) == 0  # nor did the strategy state move
    assert (retry.round, retry.attempt, retry.status) == (1, 1, "ok")
    assert (second.round, second.attempt, second.status) == (2, 0, "ok")
    assert w2["w"][0] == (3 * HONEST + ATTACK) / 4  # the retry's FedAvg model was applied
    assert int(s2["steps"]) == 1 and int(s3["steps"]) == 2
    assert all(np.isfinite(w["w"]).all() for w in evaluated)
    assert len(evaluated) == 3  # the initial model and the two successful rounds


def test_a_non_finite_aggregate_without_retries_raises_with_the_history() -> None:
    with pytest.raises(fedge.QuorumError, match=r"round 1 failed 1 time\(s\); last: the aggr"):
        fedge.simulate(
            attacked, 4, 1, strategy=Exploding(), initial_weights=INITIAL, max_round_retries=0
        )


# --- updates are folded in client-id order, whatever order they arrive in -----------------


def pushed(order: InOrder, key: int) -> list[str | None]:
    """What pushing the item of `key` releases (each item is tagged with its key)."""
    item = Outcome(task=None, error=f"#{key}")  # type: ignore[arg-type]
    return [o.error for o in order.push(key, item)]


def test_in_order_releases_each_item_once_every_earlier_key_has_arrived() -> None:
    order = InOrder([2, 5, 7, 9])
    assert pushed(order, 7) == []
    assert pushed(order, 2) == ["#2"]
    assert pushed(order, 9) == []
    assert pushed(order, 5) == ["#5", "#7", "#9"]
    assert list(order.rest()) == []
    # what never came is skipped at the end; what did is still released in key order
    order = InOrder([1, 2, 3, 4])
    assert pushed(order, 4) == [] and pushed(order, 3) == []
    assert [o.error for o in order.rest()] == ["#3", "#4"]


class Noisy(Client):
    """A float32 update whose sum depends on the order it is added in: large and small
    values of both signs, different for every client, round and weight."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        return FitResult(noisy(self.cid, config["seed"], weights), 1 + 3 * self.cid)


def noisy(cid: int, seed: int, weights: Weights) -> Weights:
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0 ** (cid % 4 * 2))
    return {"w": (weights["w"] + scale * rng.standard_normal(64)).astype(np.float32)}


class ShuffledFleet(LocalFleet):
    """A `LocalFleet` whose outcomes arrive in a seeded random order, as over a network."""

    def __init__(self, *args: Any, arrival_seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals = np.random.default_rng(arrival_seed)
        self.arrived: list[list[int]] = []

    def outcomes(self, deadline: float | None = None) -> Iterator[Outcome]:
        outcomes = list(super().outcomes(deadline))
        shuffled = [outcomes[i] for i in self.arrivals.permutation(len(outcomes))]
        self.arrived.append([o.task.cid for o in shuffled])
        yield from shuffled


def train(fleet: LocalFleet, rounds: int = 2) -> Weights:
    initial = {"w": np.zeros(64, np.float32)}
    coordinator = Coordinator(strategy=FedAvg(), weights=initial, rounds=rounds, seed=3)
    with fleet:
        coordinator.run(fleet, History())
    return coordinator.weights


def test_updates_arriving_in_any_order_give_the_same_model_bit_for_bit() -> None:
    cids = list(range(8))
    # the premise: folded in arrival order, these updates give different float32 sums
    initial = {"w": np.zeros(64, np.float32)}
    updates = {c: noisy(c, client_seed(3, 1, c), initial) for c in cids}
    sums = set()
    for seed in range(6):
        agg = WeightedMean()
        for c in np.random.default_rng(seed).permutation(cids):
            agg.add(updates[int(c)], 1 + 3 * int(c), int(c))
        sums.add(agg.result()["w"].tobytes())
    assert len(sums) > 1
    # through the coordinator, every arrival order gives the model of the in-order fleet
    expected = train(LocalFleet(Noisy, 8))["w"].tobytes()
    fleets = [ShuffledFleet(Noisy, 8, arrival_seed=s) for s in range(6)]
    for fleet in fleets:
        assert train(fleet)["w"].tobytes() == expected
    arrivals = {tuple(order) for fleet in fleets for order in fleet.arrived}
    assert len(arrivals) > 6  # the orders really differed


def test_a_workflow_that_lists_clients_out_of_order_still_folds_in_client_id_order() -> None:
    def listed(order: list[int]) -> Any:
        def workflow(rnd: Round) -> Weights | None:
            rnd.wait_available(len(order))
            return rnd.fit(order)

        return workflow

    models = set()
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 7, 4, 2, 5]):
        history = fedge.simulate(
            Noisy,
            8,
            1,
            initial_weights={"w": np.zeros(64, np.float32)},
            seed=3,
            workflow=listed(order),
        )
        assert history.weights is not None
        models.add(history.weights["w"].tobytes())
    assert len(models) == 1
