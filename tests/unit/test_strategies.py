"""Strategies against hand-computed values; the arithmetic is in the comments."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.strategy import (
    STRATEGIES,
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    RoundContext,
    Strategy,
)
from fedge.strategy.bulyan import bulyan, mean_around_median
from fedge.strategy.krum import krum, multi_krum, pairwise_sq_distances
from fedge.strategy.trimmed_mean import trimmed_mean
from fedge.weights import Weights


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def ctx(weights: Weights | None = None, round: int = 1) -> RoundContext:
    return RoundContext(round, 0, weights or {}, np.random.default_rng(0))


def run_round(strategy: Strategy, updates: list[tuple[Weights, int]]) -> Weights:
    agg = strategy.aggregator(ctx())
    for cid, (weights, n) in enumerate(updates):
        agg.add(weights, n, cid)
    return agg.result()


def points(*rows: tuple[float, float]) -> list[tuple[Weights, int]]:
    """2-D updates split over two tensors, so distances must be summed across tensors."""
    return [({"x": f64(x), "y": f64(y)}, 10) for x, y in rows]


# --- sampling and configuration ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "available", "expected"),
    [
        ({}, 10, 10),  # fraction_fit = 1.0
        ({"fraction_fit": 0.1}, 25, 3),  # ceil(2.5) = 3
        ({"fraction_fit": 0.1, "min_fit_clients": 5}, 25, 5),  # max(3, 5)
        ({"fraction_fit": 0.1, "min_fit_clients": 5}, 3, 3),  # never more than available
        ({"clients_per_round": 7, "fraction_fit": 0.1}, 100, 7),  # count wins over fraction
        ({"clients_per_round": 7}, 4, 4),
    ],
)
def test_num_fit_clients(kwargs: dict[str, float], available: int, expected: int) -> None:
    assert FedAvg(**kwargs).num_fit_clients(available) == expected  # type: ignore[arg-type]


def test_num_fit_clients_exact_fraction() -> None:
    assert FedAvg(fraction_fit=0.07).num_fit_clients(100) == 7


def test_num_evaluate_clients() -> None:
    assert FedAvg().num_evaluate_clients(50) == 0  # fraction_evaluate = 0 disables it
    assert FedAvg(fraction_evaluate=0.5, min_evaluate_clients=2).num_evaluate_clients(3) == 2
    assert FedAvg(fraction_evaluate=0.5).num_evaluate_clients(9) == 5  # ceil(4.5)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (FedAvg, {"fraction_fit": 0.0}, "fraction_fit"),
        (FedAvg, {"fraction_evaluate": 1.5}, "fraction_evaluate"),
        (FedAvg, {"min_fit_clients": 0}, "min_fit_clients"),
        (FedAvg, {"clients_per_round": 0}, "clients_per_round"),
        (FedProx, {"proximal_mu": -1.0}, "proximal_mu"),
        (FedAvgM, {"server_momentum": 1.0}, "server_momentum"),
        (FedAvgM, {"server_learning_rate": 0.0}, "server_learning_rate"),
        (FedAdam, {"tau": 0.0}, "tau"),
        (FedYogi, {"beta_2": 1.0}, "beta_2"),
        (FedAdagrad, {"eta": -0.1}, "eta"),
        (FedTrimmedAvg, {"beta": 0.5}, "beta"),
        (Krum, {"num_malicious": -1}, "num_malicious"),
        (MultiKrum, {"num_selected": 0}, "num_selected"),
        (Bulyan, {"num_malicious": 1.5}, "num_malicious"),
    ],
)
def test_invalid_config_names_the_key(
    cls: type[Strategy], kwargs: dict[str, float], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^strategy\.{key} must be"):
        cls(**kwargs)


def test_registry_maps_lower_case_names_to_classes() -> None:
    assert set(STRATEGIES) == {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "centeredclip",
        "fedbuff",
    }
    for key, cls in STRATEGIES.items():
        assert cls().name.lower() == key


# --- FedAvg / FedProx ------------------------------------------------------------------


def test_fedavg_weighted_mean_of_three() -> None:
    updates = [
        ({"w": f64(1, 2), "b": f64(0)}, 1),
        ({"w": f64(3, 6), "b": f64(3)}, 3),
        ({"w": f64(5, 0), "b": f64(1)}, 4),
    ]
    strategy = FedAvg()
    new, state = strategy.apply(
        {"w": f64(0, 0), "b": f64(0)}, run_round(strategy, updates), {}, ctx()
    )
    # w = (1*1 + 3*3 + 4*5) / 8 = 30/8, (1*2 + 3*6 + 4*0) / 8 = 20/8; b = (0 + 9 + 4) / 8
    np.testing.assert_allclose(new["w"], [3.75, 2.5])
    np.testing.assert_allclose(new["b"], [1.625])
    assert state == {}


def test_fedprox_sends_mu_and_keeps_partial_work() -> None:
    strategy = FedProx(proximal_mu=0.5)
    assert strategy.fit_config(3) == {"proximal_mu": 0.5}
    assert strategy.accept_partial_work is True
    assert FedAvg().accept_partial_work is False


# --- FedAvgM ---------------------------------------------------------------------------


def test_fedavgm_two_rounds_of_momentum() -> None:
    strategy = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    w0 = {"w": f64(1.0, 2.0), "steps": np.array([5], dtype=np.int64)}
    state = strategy.init_state(w0)
    assert list(state) == ["momentum/w"]  # counters get no momentum
    np.testing.assert_array_equal(state["momentum/w"], [0.0, 0.0])

    # round 1: delta = w - agg = [0.5, -0.5]; m = delta; w1 = w0 - 0.5 m = [0.75, 2.25]
    w1, state = strategy.apply(w0, {"w": f64(0.5, 2.5), "steps": np.array([7])}, state, ctx())
    np.testing.assert_allclose(w1["w"], [0.75, 2.25])
    np.testing.assert_array_equal(w1["steps"], [7])  # the aggregate, as it is
    # round 2: delta = [0.75 - 0.25, 2.25 - 2.5] = [0.5, -0.25]
    #          m = 0.9 [0.5, -0.5] + [0.5, -0.25] = [0.95, -0.7]
    #          w2 = w1 - 0.5 m = [0.75 - 0.475, 2.25 + 0.35] = [0.275, 2.6]
    w2, state = strategy.apply(w1, {"w": f64(0.25, 2.5), "steps": np.array([9])}, state, ctx())
    np.testing.assert_allclose(state["momentum/w"], [0.95, -0.7])
    np.testing.assert_allclose(w2["w"], [0.275, 2.6])


def test_fedavgm_without_momentum_is_fedavg_and_keeps_float32() -> None:
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    w = {"w": np.array([1.0, -3.0], dtype=np.float32)}
    agg = {"w": np.array([0.25, 4.0], dtype=np.float32)}
    new, state = strategy.apply(w, agg, strategy.init_state(w), ctx())
    np.testing.assert_array_equal(new["w"], agg["w"])  # w - (w - agg) = agg, exactly here
    assert new["w"].dtype == np.float32
    assert state["momentum/w"].dtype == np.float32


# --- FedAdam / FedYogi / FedAdagrad ----------------------------------------------------


def test_fedopt_initial_state() -> None:
    state = FedAdam(tau=1e-3).init_state({"w": np.zeros(3, dtype=np.float32)})
    assert sorted(state) == ["m/w", "v/w"]
    np.testing.assert_array_equal(state["m/w"], np.zeros(3))
    np.testing.assert_allclose(state["v/w"], np.full(3, 1e-6))  # tau**2
    assert state["v/w"].dtype == np.float32


def test_fedadam_one_step() -> None:
    strategy = FedAdam()  # eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-9
    w = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    new, state = strategy.apply(
        w, {"w": np.array([3.0, 0.0], dtype=np.float32)}, strategy.init_state(w), ctx()
    )
    # delta = [2, -1]; m = 0.1 delta = [0.2, -0.1]
    # v = 0.99 tau^2 + 0.01 delta^2 ~= [0.04, 0.01]; sqrt(v) = [0.2, 0.1]
    # w + 0.1 * m / sqrt(v) = [1 + 0.1, 1 - 0.1]
    np.testing.assert_allclose(state["m/w"], [0.2, -0.1], rtol=1e-6)
    np.testing.assert_allclose(state["v/w"], [0.04, 0.01], rtol=1e-6)
    np.testing.assert_allclose(new["w"], [1.1, 0.9], rtol=1e-6)
    assert new["w"].dtype == np.float32


def test_fedyogi_one_step_from_given_state() -> None:
    strategy = FedYogi(eta=0.1, beta_1=0.5, beta_2=0.75)
    w = {"w": f64(1.0, 1.0)}
    state = {"m/w": f64(0.0, 0.0), "v/w": f64(5.0, 0.75)}
    new, state = strategy.apply(w, {"w": f64(3.0, 0.0)}, state, ctx())
    # delta = [2, -1], delta^2 = [4, 1]; sign(v - delta^2) = [+1, -1]
    # v = [5 - 0.25*4, 0.75 + 0.25*1] = [4, 1]  (Adam would give [4.75, 0.8125])
    # m = 0.5 delta = [1, -0.5]; step = 0.1 * [1/2, -0.5/1] = [0.05, -0.05]
    np.testing.assert_allclose(state["v/w"], [4.0, 1.0])
    np.testing.assert_allclose(state["m/w"], [1.0, -0.5])
    np.testing.assert_allclose(new["w"], [1.05, 0.95])


def test_fedadagrad_one_step() -> None:
    strategy = FedAdagrad()
    w = {"w": f64(1.0, 1.0)}
    new, state = strategy.apply(w, {"w": f64(3.0, 0.0)}, strategy.init_state(w), ctx())
    # v = tau^2 + delta^2 ~= [4, 1]; m = 0.1 delta = [0.2, -0.1]
    # step = 0.1 * [0.2/2, -0.1/1] = [0.01, -0.01]
    np.testing.assert_allclose(state["v/w"], [4.0, 1.0])
    np.testing.assert_allclose(new["w"], [1.01, 0.99])


def test_fedopt_float16_stays_finite_and_int_tensors_pass_through() -> None:
    strategy = FedAdagrad()
    w = {"w": np.array([0.5, -2.0], dtype=np.float16), "n": np.array([3], dtype=np.int32)}
    agg = {"w": w["w"].copy(), "n": np.array([4], dtype=np.int32)}
    new, state = strategy.apply(w, agg, strategy.init_state(w), ctx())
    # a zero update leaves float16 weights unchanged: 0 / (sqrt(tau^2) + tau) = 0, not NaN
    np.testing.assert_array_equal(new["w"], w["w"])
    assert new["w"].dtype == np.float16
    assert state["v/w"].dtype == np.float32  # tau^2 = 1e-18 would underflow in float16
    np.testing.assert_array_equal(new["n"], [4])
    assert "m/n" not in state


# --- FedMedian / FedTrimmedAvg ---------------------------------------------------------


def test_median_odd_and_even_counts() -> None:
    rows = [f64(1, 10), f64(5, -2), f64(3, 4)]
    odd = run_round(FedMedian(), [({"w": r}, 1) for r in rows])
    np.testing.assert_array_equal(odd["w"], [3, 4])
    # add [100, 0]: sorted [1, 3, 5, 100] -> (3+5)/2 = 4; [-2, 0, 4, 10] -> (0+4)/2 = 2
    even = run_round(FedMedian(), [({"w": r}, 1) for r in [*rows, f64(100, 0)]])
    np.testing.assert_array_equal(even["w"], [4, 2])


def test_median_ignores_claimed_example_counts_and_keeps_dtypes() -> None:
    updates = [
        ({"w": np.array([1.0], dtype=np.float32), "n": np.array([1])}, 1),
        ({"w": np.array([2.0], dtype=np.float32), "n": np.array([2])}, 1),
        ({"w": np.array([9.0], dtype=np.float32), "n": np.array([5])}, 10_000),
        ({"w": np.array([3.0], dtype=np.float32), "n": np.array([8])}, 1),
    ]
    out = run_round(FedMedian(), updates)
    np.testing.assert_array_equal(out["w"], [2.5])  # (2 + 3) / 2, the 10 000 is no vote
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["n"], [4])  # (2 + 5) / 2 = 3.5, rounded half to even
    assert out["n"].dtype == np.int64


def test_median_of_scalar_tensor() -> None:
    out = run_round(FedMedian(), [({"t": np.array(v)}, 1) for v in (1.0, 7.0, 2.0)])
    assert isinstance(out["t"], np.ndarray)
    assert out["t"].shape == ()
    assert float(out["t"]) == 2.0


def test_trimmed_mean_drops_extremes() -> None:
    # n = 5, beta = 0.2 -> int(1.0) = 1 value cut from each end
    cols = [(1, -50), (2, 0), (3, 10), (4, 20), (100, 30)]
    out = run_round(FedTrimmedAvg(beta=0.2), [({"w": f64(a, b)}, 1) for a, b in cols])
    # [2, 3, 4] -> 3 and [0, 10, 20] -> 10
    np.testing.assert_allclose(out["w"], [3.0, 10.0])


def test_trimmed_mean_rounds_cut_down() -> None:
    # n = 4, beta = 0.2 -> int(0.8) = 0: the plain mean (1 + 2 + 3 + 10) / 4
    out = run_round(FedTrimmedAvg(beta=0.2), [({"w": f64(v)}, 1) for v in (1, 2, 3, 10)])
    np.testing.assert_allclose(out["w"], [4.0])
    # n = 5, beta = 0.4 -> 2 cut per side: the median
    out = run_round(FedTrimmedAvg(beta=0.4), [({"w": f64(v)}, 1) for v in (1, 2, 3, 10, 99)])
    np.testing.assert_allclose(out["w"], [3.0])


def test_trimmed_mean_errors_when_nothing_remains() -> None:
    with pytest.raises(ValueError, match="removes 1 of 2 updates from each end"):
        trimmed_mean([({"w": f64(1)}, 1), ({"w": f64(2)}, 1)], beta=0.5)


# --- Krum / MultiKrum ------------------------------------------------------------------

# An outlier first, then four honest points. Squared distances:
#   a-b 4, a-c 4, a-d 2, b-c 8, b-d 2, c-d 2; o-a 200, o-b 164, o-c 164, o-d 162.
# With f = 1 each score sums the n - f - 2 = 2 nearest:
#   a 2+4 = 6, b 2+4 = 6, c 2+4 = 6, d 2+2 = 4, o 162+164 = 326.
KRUM_POINTS = [(10, 10), (0, 0), (2, 0), (0, 2), (1, 1)]  # o, a, b, c, d


def test_krum_picks_the_most_central_honest_update() -> None:
    out = run_round(Krum(num_malicious=1, min_results=5), points(*KRUM_POINTS))
    assert (float(out["x"][0]), float(out["y"][0])) == (1.0, 1.0)  # d


def test_multikrum_averages_the_best_scored() -> None:
    # m = n - f = 4: d, a, b, c (the outlier has the worst score)
    out = run_round(MultiKrum(num_malicious=1, min_results=5), points(*KRUM_POINTS))
    np.testing.assert_allclose([out["x"][0], out["y"][0]], [0.75, 0.75])  # (0+2+0+1)/4
    # m = 2: d (4), then a (first of the ties at 6): mean of (1, 1) and (0, 0)
    out = run_round(MultiKrum(num_malicious=1, num_selected=2, min_results=5), points(*KRUM_POINTS))
    np.testing.assert_allclose([out["x"][0], out["y"][0]], [0.5, 0.5])


def test_krum_needs_2f_plus_3_updates() -> None:
    # a round that somehow reaches the rule with too few updates fails loudly ...
    with pytest.raises(ValueError, match=r"at least 2f \+ 3 = 5 updates, got 4"):
        krum(points(*KRUM_POINTS[1:]), num_malicious=1)
    with pytest.raises(ValueError, match=r"at least 2f \+ 3 = 7 updates, got 5"):
        multi_krum(points(*KRUM_POINTS), num_malicious=2, num_selected=None)
    # ... and a quorum too small for f is refused when the strategy is configured
    with pytest.raises(ConfigError, match=r"^strategy\.min_results must be >= .* = 5 .*got 4"):
        Krum(num_malicious=1, min_results=4)
    with pytest.raises(ConfigError, match=r"^strategy\.min_results must be >= .* = 7 .*got 5"):
        MultiKrum(num_malicious=2, min_results=5)


def test_multikrum_refuses_to_select_more_than_n_minus_f() -> None:
    with pytest.raises(ValueError, match=r"num_selected=5 exceeds n - f = 5 - 1 = 4"):
        run_round(MultiKrum(num_malicious=1, num_selected=5, min_results=5), points(*KRUM_POINTS))


def test_pairwise_distances_survive_large_offsets_and_span_blocks() -> None:
    rng = np.random.default_rng(0)
    # three models near 1000, 1e-3 apart, one tensor larger than a distance block
    base = 1000 + rng.standard_normal(400_000)
    models = [base + 1e-3 * rng.standard_normal(base.size) for _ in range(3)]
    updates = [({"big": m.astype(np.float32)[:399_990], "small": m[399_990:]}, 1) for m in models]
    flat = [np.concatenate([w["big"].astype(np.float64), w["small"]]) for w, _ in updates]
    brute = np.array([[np.sum((p - q) ** 2) for q in flat] for p in flat])
    np.testing.assert_allclose(pairwise_sq_distances(updates), brute, rtol=1e-9)


# --- Bulyan ----------------------------------------------------------------------------


def test_bulyan_excludes_outlier_then_averages_around_median() -> None:
    # n = 7, f = 1: theta = 5 chosen by repeated Krum, beta = 3 values per coordinate.
    # Honest 0..5 on a line, outlier 100. Krum picks (neighbours r-f-2, ties -> first):
    #   r=7, k=4: scores 0:30 1:15 2:10 3:10 4:15 5:30 -> 2
    #   r=6, k=3: 0:26 1:14 3:9 4:11 5:21              -> 3
    #   r=5, k=2: 0:17 1:10 4:10 5:17                  -> 1
    #   r=4, k=1: 0:16 4:1 5:1                         -> 4
    #   r=3, k=1: 0:25 5:25 100:9025                   -> 0
    # chosen {0, 1, 2, 3, 4}: median 2, the 3 closest are 2, 1, 3 -> mean 2
    updates = [({"w": f64(v)}, 1) for v in (100, 0, 1, 2, 3, 4, 5)]
    out = run_round(Bulyan(num_malicious=1, min_results=7), updates)
    np.testing.assert_allclose(out["w"], [2.0])


def test_bulyan_trims_each_coordinate_around_its_median() -> None:
    # f = 1, n = 7: theta = 5, beta = 3. A cluster of five within 10 of each other, then
    # two far outliers. Repeated Krum takes cluster points while any remain: their
    # neighbour distances are <= 117, an outlier's >= 990^2. The last pick (r = 3, k = 1)
    # is a tie between the last cluster point and its nearest outlier (mutual nearest
    # neighbours), which goes to the earlier index: the cluster point.
    cluster = [(0, 0), (1, 0), (2, 4), (3, 5), (9, 6)]
    out = run_round(Bulyan(num_malicious=1, min_results=7), points(*cluster, (1000, 0), (-1000, 0)))
    # x: [0, 1, 2, 3, 9], median 2, the 3 closest 1, 2, 3 -> 2  (the mean would be 3)
    # y: [0, 0, 4, 5, 6], median 4, the 3 closest 4, 5, 6 -> 5  (the median is 4)
    np.testing.assert_allclose([out["x"][0], out["y"][0]], [2.0, 5.0])


def test_mean_around_median_even_count_and_ties() -> None:
    x = np.array([[1, 1, 5], [2, 3, 0], [4, 5, 2], [10, 3, 1]])  # 4 updates, 3 coordinates
    # col 0: median 3, distances [2, 1, 1, 7] -> 2, 4 -> 3
    # col 1: [1, 3, 5, 3] median 3, distances [2, 0, 2, 0] -> 3, 3 -> 3
    # col 2: [5, 0, 2, 1] median 1.5, distances [3.5, 1.5, 0.5, 0.5] -> 2, 1 -> 1.5
    np.testing.assert_allclose(mean_around_median(x, beta=2), [3.0, 3.0, 1.5])
    # [1, 3, 5]: median 3, 1 and 5 tie at distance 2; the smaller is kept -> (1 + 3) / 2
    np.testing.assert_allclose(mean_around_median(np.array([[1.0], [3.0], [5.0]]), beta=2), [2.0])


def test_bulyan_with_no_malicious_is_the_mean() -> None:
    out = run_round(Bulyan(), [({"w": f64(v)}, 1) for v in (1, 2, 6)])
    np.testing.assert_allclose(out["w"], [3.0])


def test_bulyan_needs_4f_plus_3_updates() -> None:
    with pytest.raises(ValueError, match=r"at least 4f \+ 3 = 7 updates, got 6"):
        bulyan([({"w": f64(v)}, 1) for v in range(6)], num_malicious=1)
    with pytest.raises(ConfigError, match=r"^strategy\.min_results must be >= .* = 7 .*got 6"):
        Bulyan(num_malicious=1, min_results=6)


# --- ties are broken by client id, whatever the arrival order ------------------------------

Placed = dict[int, tuple[float, float]]
"""Client id -> its 2-D update."""

# Four corners of a diamond: each is at squared distance 2 from two others and 4 from the
# third, so every Krum score (f = 0, the n - f - 2 = 2 nearest) is exactly 4: a four-way tie.
DIAMOND: Placed = {9: (1, 0), 3: (0, 1), 14: (-1, 0), 6: (0, -1)}

# For Bulyan (f = 1, n = 7 = 4f + 3, theta = 5, beta = 3): a centre, the diamond and two
# outliers; every column sums to 7, so the centred distances are exact integers. In client-id
# order repeated Krum takes (r = updates left, k = neighbours):
#   r=7 k=4: centre 4 (ring 9)                             -> 4
#   r=6 k=3: ring 2+2+4 = 8 each, four-way tie               -> 2 (0, 1)
#   r=5 k=2: 6 (-1,0) 6, 9 (1,0) 6, 13 (0,-1) 2+2 = 4          -> 13
#   r=4 k=1: 6 and 9 tie at 4                                 -> 6
#   r=3 k=1: 9 (1,0) and outlier 1 (7,0) tie at 36            -> 1
# chosen x = [0, 0, 0, -1, 7], y = [0, 1, -1, 0, 0]: the 3 values closest to each median 0
# are 0, 0, 0. Other tie-breaks choose another set and give (-1/3, 0) or (0, -1/3).
RING: Placed = {4: (0, 0), 9: (1, 0), 2: (0, 1), 6: (-1, 0), 13: (0, -1), 1: (7, 0), 8: (0, 7)}


def arrival_orders(cids: list[int], count: int = 24) -> list[list[int]]:
    """Client-id order, its reverse and seeded shuffles."""
    rng = np.random.default_rng(5)
    shuffled = [[cids[i] for i in rng.permutation(len(cids))] for _ in range(count - 2)]
    return [sorted(cids), sorted(cids, reverse=True), *shuffled]


def as_update(point: tuple[float, float]) -> tuple[Weights, int]:
    return {"x": f64(point[0]), "y": f64(point[1])}, 10


def aggregated_in_order(strategy: Strategy, placed: Placed, order: list[int]) -> Weights:
    agg = strategy.aggregator(ctx())
    for cid in order:
        weights, n = as_update(placed[cid])
        agg.add(weights, n, cid)
    return agg.result()


def as_bytes(weights: Weights) -> tuple[bytes, ...]:
    return tuple(weights[name].tobytes() for name in ("x", "y"))


@pytest.mark.parametrize(
    ("strategy", "rule", "placed", "expected"),
    [
        # the lowest client id among the tied four: 3 at (0, 1)
        (Krum(min_results=3), lambda u: krum(u, 0), DIAMOND, (0.0, 1.0)),
        # the three lowest ids, 3 (0, 1), 6 (0, -1) and 9 (1, 0)
        (
            MultiKrum(num_selected=3, min_results=3),
            lambda u: multi_krum(u, 0, 3),
            DIAMOND,
            (1 / 3, 0.0),
        ),
        (Bulyan(num_malicious=1, min_results=7), lambda u: bulyan(u, 1), RING, (0.0, 0.0)),
    ],
    ids=["krum", "multikrum", "bulyan"],
)
def test_robust_rules_break_exact_ties_by_client_id_whatever_the_arrival_order(
    strategy: Strategy, rule: Any, placed: Placed, expected: tuple[float, float]
) -> None:
    orders = arrival_orders(list(placed))
    # the ties are real: applied in arrival order, the rule itself gives several models
    raw = {as_bytes(rule([as_update(placed[cid]) for cid in order])) for order in orders}
    assert len(raw) > 1
    # the strategy's aggregator gives one model, bit for bit: the rule in client-id order
    models = {as_bytes(aggregated_in_order(strategy, placed, order)) for order in orders}
    assert len(models) == 1
    in_id_order = rule([as_update(placed[cid]) for cid in sorted(placed)])
    assert models == {as_bytes(in_id_order)}
    out = aggregated_in_order(strategy, placed, orders[-1])
    np.testing.assert_allclose([out["x"][0], out["y"][0]], expected, rtol=0, atol=1e-15)
