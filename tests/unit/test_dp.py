"""Central differential privacy: clipping, noise calibrated to the clip, adaptive clipping,
and ε accounted exactly as Google's dp-accounting accounts it."""

from __future__ import annotations

from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

import fedge
from fedge.client import Client, Config, FitResult
from fedge.config import build_strategy
from fedge.errors import ConfigError
from fedge.privacy import accounting
from fedge.strategy import WRAPPERS, DifferentialPrivacy, FedAdam, FedAvg, RoundContext
from fedge.strategy.dp import CLIP_NORM, RATES, NoisedSum
from fedge.weights import Weights


class Adds(Client):
    """Adds `delta` to every coordinate of ``w`` and 1 to the ``step`` counter."""

    def __init__(self, delta: float, examples: int = 10) -> None:
        self.delta, self.examples = delta, examples

    def fit(self, weights: Weights, config: Config) -> FitResult:
        new = {"w": weights["w"] + self.delta, "step": np.asarray(weights["step"] + 1)}
        return FitResult(new, self.examples, {})


INITIAL: Weights = {"w": np.zeros(4), "step": np.array(0, np.int64)}


def reference_epsilon(kind: str, rate: float, z: float, rounds: int, delta: float) -> float:
    """dp-accounting's own number, composed the way its documentation shows."""
    accountant = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def dp(**kwargs: Any) -> DifferentialPrivacy:
    params: dict[str, Any] = {"noise_multiplier": 1.0, "clip_norm": 1.0, **kwargs}
    return DifferentialPrivacy(params.pop("inner", FedAvg()), **params)


def sum_of(
    reference: Weights,
    updates: list[Weights],
    *,
    selected: int,
    stddev: float = 0.0,
    clip: float = 1.0,
) -> Weights:
    total = NoisedSum(reference, clip, stddev, selected, np.random.default_rng(0))
    for cid, update in enumerate(updates):
        total.add(update, 10 + cid, cid)
    return total.result()


# --- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_the_known_case_gives_dp_accountings_epsilon_exactly(kind: str) -> None:
    # sampling rate 0.1, noise multiplier 1.0, 100 rounds, delta 1e-5
    found = accounting.epsilon(1.0, 1e-5, kind, accounting.runs([0.1] * 100))  # type: ignore[arg-type]
    assert found == reference_epsilon(kind, 0.1, 1.0, 100, 1e-5)
    if kind == "rdp":
        assert found == pytest.approx(7.9038, abs=1e-4)


def test_rounds_at_different_rates_compose_and_no_noise_is_no_privacy() -> None:
    assert accounting.runs([0.1, 0.1, 0.2, 0.1]) == ((0.1, 2), (0.2, 1), (0.1, 1))
    mixed = accounting.epsilon(1.0, 1e-5, "rdp", ((0.1, 50), (0.2, 50)))
    assert accounting.epsilon(1.0, 1e-5, "rdp", ((0.1, 100),)) < mixed
    assert mixed < accounting.epsilon(1.0, 1e-5, "rdp", ((0.2, 100),))
    assert accounting.epsilon(0.0, 1e-5, "rdp", ((0.1, 1),)) == float("inf")
    assert accounting.epsilon(1.0, 1e-5, "rdp", ()) == 0.0


def test_a_simulated_run_records_epsilon_after_every_round() -> None:
    strategy = dp(inner=FedAvg(clients_per_round=2), noise_multiplier=1.1)
    history = fedge.simulate(
        lambda cid: Adds(0.25), 20, 3, strategy=strategy, initial_weights=INITIAL
    )
    spent = [r.strategy_metrics["epsilon"] for r in history.rounds]
    assert spent == [reference_epsilon("rdp", 0.1, 1.1, n, 1e-5) for n in (1, 2, 3)]
    assert history.to_dict()["rounds"][2]["strategy_metrics"]["epsilon"] == spent[2]
    assert history.rounds[0].strategy_metrics["clip_norm"] == 1.0


def test_a_run_ends_before_the_round_that_would_spend_more_than_the_budget() -> None:
    after = [reference_epsilon("rdp", 0.25, 1.0, n, 1e-5) for n in (1, 2, 3, 4)]
    budget = (after[2] + after[3]) / 2  # three rounds fit, the fourth would not
    strategy = dp(inner=FedAvg(clients_per_round=1), epsilon_budget=budget)
    history = fedge.simulate(
        lambda cid: Adds(0.25), 4, 10, strategy=strategy, initial_weights=INITIAL
    )
    assert len(history.rounds) == 3
    assert history.rounds[-1].strategy_metrics["epsilon"] == after[2]
    assert history.ended_early.startswith("privacy budget: ε = ")
    assert f"> epsilon_budget {budget:g}" in history.ended_early
    assert fedge.History.from_dict(history.to_dict()).ended_early == history.ended_early


def test_a_resumed_run_goes_on_counting_from_its_state() -> None:
    strategy = dp()
    state = strategy.init_state(INITIAL)
    state[RATES] = np.array([0.5, 0.5])  # two rounds before the restart, as checkpointed
    ctx = RoundContext(3, 0, INITIAL, np.random.default_rng(0), state, population=4, selected=1)
    strategy.aggregator(ctx)
    _, state = strategy.apply(INITIAL, INITIAL, state, ctx)
    assert list(state[RATES]) == [0.5, 0.5, 0.25]
    want = accounting.epsilon(1.0, 1e-5, "rdp", ((0.5, 2), (0.25, 1)))
    assert strategy.report(state)["epsilon"] == want


# --- clipping and noise ----------------------------------------------------------------------


def test_clipped_deltas_are_summed_and_divided_by_the_clients_sampled() -> None:
    reference = {"w": np.array([1.0, 1.0]), "step": np.array([7], np.int64)}
    updates = [
        {"w": np.array([4.0, 5.0]), "step": np.array([99], np.int64)},  # delta (3, 4) -> (0.6, 0.8)
        {"w": np.array([1.5, 1.0]), "step": np.array([1], np.int64)},  # delta (0.5, 0), kept
    ]
    # four sampled, two answered: each still weighs 1/4, whatever its example count
    out = sum_of(reference, updates, selected=4)
    np.testing.assert_allclose(out["w"], [1.0 + 1.1 / 4, 1.0 + 0.8 / 4], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(out["step"], [7])  # counters stay the reference's


def test_the_noise_on_the_sum_has_standard_deviation_z_times_the_clip() -> None:
    reference = {"w": np.zeros(200_000, np.float32)}
    out = sum_of(reference, [reference] * 5, selected=5, stddev=1.5 * 0.1, clip=0.1)
    assert out["w"].dtype == np.float32
    assert float(np.std(out["w"])) == pytest.approx(1.5 * 0.1 / 5, rel=0.01)
    assert abs(float(np.mean(out["w"]))) < 1e-3


def test_a_configured_wrapper_noises_each_round_reproducibly() -> None:
    def run() -> Weights:
        strategy = dp(inner=FedAvg(clients_per_round=3), noise_multiplier=0.5, clip_norm=0.2)
        history = fedge.simulate(
            lambda cid: Adds(0.25), 6, 2, strategy=strategy, initial_weights=INITIAL, seed=3
        )
        assert history.weights is not None
        return history.weights

    first, second = run(), run()
    np.testing.assert_array_equal(first["w"], second["w"])
    # each round moves w by at most C = 0.2 in norm plus noise; unclipped it would be 0.25 * 2
    assert not np.allclose(first["w"], 0.5)
    assert int(first["step"]) == 0


def test_the_noised_mean_is_the_inner_strategys_aggregate() -> None:
    strategy = dp(inner=FedAdam(eta=0.1), noise_multiplier=0.0)
    state = strategy.init_state(INITIAL)
    assert {CLIP_NORM, RATES} <= set(state) and any(not k.startswith("dp.") for k in state)
    history = fedge.simulate(
        lambda cid: Adds(0.25), 2, 1, strategy=strategy, initial_weights=INITIAL
    )
    assert history.weights is not None
    np.testing.assert_allclose(history.weights["w"], 0.1, rtol=1e-6)  # Adam's first step: eta
    assert history.rounds[0].strategy_metrics["epsilon"] == float("inf")


# --- adaptive clipping -----------------------------------------------------------------------


def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile() -> None:
    strategy = dp(adaptive=True, noise_multiplier=0.0, clipped_count_stddev=1e-12)
    history = fedge.simulate(
        lambda cid: Adds(0.25 if cid else 5.0), 4, 2, strategy=strategy, initial_weights=INITIAL
    )
    clips = [r.strategy_metrics["clip_norm"] for r in history.rounds]
    # 3 of 4 deltas within C: b = 0.75 > 0.5, so C shrinks by exp(-0.2 * 0.25) each round
    assert clips[0] == pytest.approx(np.exp(-0.05), rel=1e-9)
    assert clips[1] == pytest.approx(np.exp(-0.10), rel=1e-9)


def test_adaptive_clipping_splits_the_noise_so_the_round_keeps_its_multiplier() -> None:
    strategy = dp(adaptive=True, noise_multiplier=1.0, clipped_count_stddev=2.0)
    z_delta = strategy.delta_noise_multiplier(100)
    assert z_delta**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)
    # without a count noise configured: max(m / 20, z), so 2 sigma_b > z always holds
    assert dp(adaptive=True).count_stddev(100) == 5.0
    assert dp(adaptive=True).count_stddev(10) == 1.0


# --- configuration ---------------------------------------------------------------------------


def test_it_is_configured_as_a_wrapper() -> None:
    assert WRAPPERS["differential_privacy"] is DifferentialPrivacy
    strategy = build_strategy(
        {
            "name": "fedavg",
            "wrap": [
                {
                    "name": "differential_privacy",
                    "noise_multiplier": 1.2,
                    "clip_norm": 0.5,
                    "accountant": "pld",
                    "epsilon_budget": 8.0,
                }
            ],
        }
    )
    assert isinstance(strategy, DifferentialPrivacy)
    assert (strategy.noise_multiplier, strategy.accountant, strategy.epsilon_budget) == (
        1.2,
        "pld",
        8.0,
    )


@pytest.mark.parametrize("inner", ["fedmedian", "krum", "fedtrimmedavg", "bulyan", "multikrum"])
def test_strategies_that_need_individual_updates_are_refused(inner: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot wrap .*which aggregates in its own way"):
        build_strategy(
            {
                "name": inner,
                "wrap": [
                    {"name": "differential_privacy", "noise_multiplier": 1.0, "clip_norm": 1.0}
                ],
            }
        )


def test_a_wrapped_strategy_is_refused() -> None:
    spec = [
        {"name": "clip_updates", "max_norm": 1.0},
        {"name": "differential_privacy", "noise_multiplier": 1.0, "clip_norm": 1.0},
    ]
    with pytest.raises(ConfigError, match=r"cannot wrap ClipUpdates\(FedAvg\)"):
        build_strategy({"name": "fedavg", "wrap": spec})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("noise_multiplier", -1.0, "a number >= 0"),
        ("noise_multiplier", "1", "a number >= 0"),
        ("clip_norm", 0.0, "a number > 0"),
        ("clip_norm", float("inf"), "a number > 0"),
        ("delta", 1.0, "in (0, 1)"),
        ("accountant", "gdp", "('rdp', 'pld')"),
        ("epsilon_budget", 0, "a number > 0"),
        ("adaptive", "yes", "true or false"),
        ("target_quantile", 1.0, "in (0, 1)"),
        ("clip_learning_rate", 0, "a number > 0"),
        ("clipped_count_stddev", 0.5, "a number > noise_multiplier / 2 = 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(key: str, value: Any, expected: str) -> None:
    kwargs: dict[str, Any] = {"noise_multiplier": 2.0, "clip_norm": 1.0, key: value}
    with pytest.raises(ConfigError) as err:
        DifferentialPrivacy(FedAvg(), **kwargs)
    assert str(err.value) == (
        f"strategy.wrap differential_privacy: {key} must be {expected}, got {value!r}"
    )
