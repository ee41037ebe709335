"""Centered clipping: hand-computed steps, resistance to a poisoned minority across rounds,
the streaming path equal to the buffered one, and its center surviving a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedge
from fedge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedge.config import build_strategy
from fedge.errors import ConfigError
from fedge.strategy import CenteredClip, FedAvg, RoundContext, Strategy
from fedge.strategy.centered_clip import centered_clip
from fedge.weights import State, Weights


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def ctx(weights: Weights, state: State | None = None) -> RoundContext:
    return RoundContext(1, 0, weights, np.random.default_rng(0), state or {})


def one_round(
    strategy: Strategy, weights: Weights, updates: list[Weights], state: State
) -> tuple[Weights, State]:
    agg = strategy.aggregator(ctx(weights, state))
    for cid, update in enumerate(updates):
        agg.add(update, 10 if cid else 10**6, cid)  # client 0 claims a million examples
    return strategy.apply(weights, agg.result(), state, ctx(weights, state))


def test_one_step_by_hand() -> None:
    w0 = {"w": f64(0.0, 0.0)}
    updates = [{"w": f64(1.0, 0.0)}, {"w": f64(0.0, 1.0)}, {"w": f64(30.0, 40.0)}]
    strategy = CenteredClip(radius=2.0)
    new, state = one_round(strategy, w0, updates, strategy.init_state(w0))
    # center 0: the first two are within 2 and count as they are; (30, 40) is at 50 and is
    # scaled to 2 / 50 of itself, (1.2, 1.6). v = ((1, 0) + (0, 1) + (1.2, 1.6)) / 3
    np.testing.assert_allclose(new["w"], [2.2 / 3, 2.6 / 3])
    # the center is the aggregated delta; counts are ignored (client 0 claimed 1e6)
    np.testing.assert_allclose(state["centered_clip/w"], [2.2 / 3, 2.6 / 3])


def test_radius_unset_is_the_median_distance_and_iterations_move_the_center() -> None:
    ref = {"w": f64(0.0)}
    updates = [({"w": f64(x)}, 1) for x in (1.0, 2.0, 3.0, 100.0)]
    center = {"w": f64(0.0)}
    # distances 1, 2, 3, 100: median 2.5; scales 1, 1, 2.5/3, 2.5/100
    once = centered_clip(updates, ref, center, None, 1)
    np.testing.assert_allclose(once["w"], [(1 + 2 + 2.5 + 2.5) / 4])
    # a second step starts at v = 2: distances 1, 0, 1, 98, median 1: (-1 + 0 + 1 + 1) / 4
    twice = centered_clip(updates, ref, center, None, 2)
    np.testing.assert_allclose(twice["w"], [2.0 + 0.25])


def test_streaming_path_equals_the_buffered_rule() -> None:
    rng = np.random.default_rng(3)
    w0 = {"a": rng.standard_normal((4, 3)).astype(np.float32), "n": np.array([4], np.int64)}
    state = {"centered_clip/a": (0.1 * rng.standard_normal((4, 3))).astype(np.float32)}
    updates = [
        {"a": w0["a"] + rng.standard_normal((4, 3)).astype(np.float32) * s, "n": np.array([k])}
        for k, s in enumerate((0.5, 1.0, 2.0, 8.0, 0.1))
    ]
    streamed, _ = one_round(CenteredClip(radius=1.5), w0, updates, state)
    expected = centered_clip([(u, 1) for u in updates], w0, {"a": state["centered_clip/a"]}, 1.5, 1)
    assert streamed["a"].dtype == np.float32
    np.testing.assert_allclose(streamed["a"], expected["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(streamed["n"], [2])  # counters: the mean, rounded
    np.testing.assert_array_equal(expected["n"], [2])


@pytest.mark.parametrize("strategy", [CenteredClip(), CenteredClip(radius=0.1, iterations=3)])
def test_a_scaled_and_poisoned_minority_does_not_move_it(strategy: CenteredClip) -> None:
    """Ten rounds of 16 honest clients stepping towards (1, -1) around a noisy mean, and 4
    attackers (20%) that send the honest direction flipped and scaled x10 (and claim a
    million examples). FedAvg is driven the wrong way; centered clipping keeps going."""
    target, rng = f64(1.0, -1.0), np.random.default_rng(0)

    def run(rule: Strategy) -> Weights:
        w, state = {"w": f64(0.0, 0.0)}, rule.init_state({"w": f64(0.0, 0.0)})
        for _ in range(10):
            honest = [0.2 * (target - w["w"]) + 0.01 * rng.standard_normal(2) for _ in range(16)]
            bad = -10 * np.mean(honest, axis=0)
            updates = [{"w": w["w"] + bad} for _ in range(4)] + [{"w": w["w"] + h} for h in honest]
            w, state = one_round(rule, w, updates, state)
        return w

    assert np.linalg.norm(run(FedAvg())["w"] - target) > 10  # client 0 dictates, away
    got = run(strategy)["w"]
    # honest alone reach 1 - 0.8^10 = 0.89 of the way; clipping costs a few steps
    assert np.linalg.norm(got - target) < 0.35 * np.linalg.norm(target)


def test_center_checkpoints_as_plain_data_and_a_resumed_run_is_identical(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    strategy = CenteredClip(radius=0.3)
    w = {"w": np.zeros(6, np.float32), "steps": np.array([0], np.int64)}
    state = strategy.init_state(w)
    assert list(state) == ["centered_clip/w"]  # counters have no center

    def updates(w: Weights) -> list[Weights]:
        return [
            {"w": w["w"] + rng.standard_normal(6).astype(np.float32), "steps": w["steps"] + 1}
            for _ in range(5)
        ]

    w, state = one_round(strategy, w, updates(w), state)
    save_checkpoint(tmp_path, Checkpoint(1, w, state))
    loaded = load_checkpoint(tmp_path / "round-000001.safetensors")
    np.testing.assert_array_equal(loaded.state["centered_clip/w"], state["centered_clip/w"])
    assert loaded.state["centered_clip/w"].dtype == np.float32
    nxt = updates(w)
    direct, _ = one_round(strategy, w, nxt, state)
    resumed, _ = one_round(CenteredClip(radius=0.3), loaded.weights, nxt, loaded.state)
    np.testing.assert_array_equal(direct["w"], resumed["w"])
    np.testing.assert_array_equal(direct["steps"], [2])


def test_configured_by_name_and_bad_values_name_the_key() -> None:
    strategy = build_strategy({"name": "centeredclip", "radius": 2.0, "iterations": 2})
    assert isinstance(strategy, CenteredClip)
    assert (strategy.radius, strategy.iterations) == (2.0, 2)
    with pytest.raises(ConfigError, match=r"^strategy\.radius must be a number > 0"):
        CenteredClip(radius=0.0)
    with pytest.raises(ConfigError, match=r"^strategy\.iterations must be an integer >= 1"):
        CenteredClip(iterations=0)


def test_in_simulation_a_scaling_attacker_cannot_steer_it() -> None:
    """Clients pull a one-tensor model towards 1 (20% pull towards -50, scaled): under
    centered clipping the model still ends near 1."""

    class Pull(fedge.Client):
        def __init__(self, goal: float) -> None:
            self.goal = goal

        def fit(self, weights: Weights, config: dict[str, object]) -> fedge.FitResult:
            w = weights["w"]
            return fedge.FitResult({"w": w + np.float32(0.5) * (self.goal - w)}, 10)

    def client_fn(cid: int) -> fedge.Client:
        return Pull(-50.0 if cid < 2 else 1.0)

    init = {"w": np.zeros(3, np.float32)}
    kwargs = {"initial_weights": init, "seed": 0}
    plain = fedge.simulate(client_fn, 10, 8, strategy=FedAvg(), **kwargs)  # type: ignore[arg-type]
    robust = fedge.simulate(client_fn, 10, 8, strategy=CenteredClip(), **kwargs)  # type: ignore[arg-type]
    assert plain.weights is not None and robust.weights is not None
    assert float(plain.weights["w"][0]) < -5
    np.testing.assert_allclose(robust.weights["w"], 1.0, atol=0.1)
