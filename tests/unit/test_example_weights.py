"""The example-count policy ([limits] example_weights): a client that over-reports its
count buys no influence under "capped" or "uniform", whatever the strategy, in the
aggregate and in the means of clients' metrics; the round still records what it said."""

from __future__ import annotations

import numpy as np
import pytest

import fedge
from fedge.config import parse_config
from fedge.errors import ConfigError
from fedge.limits import ExampleWeights
from fedge.strategy import ClipUpdates, FedAvg, FedAvgM, FedBuff, Strategy
from fedge.weights import Weights

LIAR = 3
HONEST_COUNT = 10
CLAIMED = 1_000_000


class Step(fedge.Client):
    """Moves the model by +1 (honest) or +5 (the liar), and reports accuracy 1 or 0."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: fedge.Config) -> fedge.FitResult:
        step = np.float32(5.0 if self.cid == LIAR else 1.0)
        count = CLAIMED if self.cid == LIAR else HONEST_COUNT
        return fedge.FitResult({"w": weights["w"] + step}, count, {"acc": float(self.cid != LIAR)})

    def evaluate(self, weights: Weights, config: fedge.Config) -> fedge.EvaluateResult:
        count = CLAIMED if self.cid == LIAR else HONEST_COUNT
        return fedge.EvaluateResult(0.0, count, {"acc": float(self.cid != LIAR)})


def one_round(strategy: Strategy, policy: ExampleWeights) -> fedge.History:
    return fedge.simulate(
        Step,
        4,
        1,
        strategy=strategy,
        initial_weights={"w": np.zeros(2, np.float32)},
        example_weights=policy,
    )


STRATEGIES = {
    "fedavg": lambda: FedAvg(fraction_evaluate=1.0),
    "fedavgm": lambda: FedAvgM(server_momentum=0.0, fraction_evaluate=1.0),
    "clip_updates": lambda: ClipUpdates(FedAvg(fraction_evaluate=1.0), max_norm=100.0),
    "fedbuff": lambda: FedBuff(buffer_size=4, concurrency=4),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize(
    "policy", [ExampleWeights("capped", HONEST_COUNT), ExampleWeights("uniform")], ids=str
)
def test_an_over_reported_count_buys_nothing(name: str, policy: ExampleWeights) -> None:
    history = one_round(STRATEGIES[name](), policy)
    assert history.weights is not None
    # every client weighs as an honest one: (1 + 1 + 1 + 5) / 4 = 2
    np.testing.assert_allclose(history.weights["w"], [2.0, 2.0], rtol=1e-6)
    record = history.rounds[-1]
    assert record.num_examples == 3 * HONEST_COUNT + CLAIMED  # what they said, recorded
    assert record.fit_metrics["acc"] == pytest.approx(0.75)
    if name != "fedbuff":  # FedBuff evaluates centrally only
        assert record.evaluate_metrics["acc"] == pytest.approx(0.75)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_reported_counts_let_the_liar_dictate(name: str) -> None:
    history = one_round(STRATEGIES[name](), ExampleWeights())
    assert history.weights is not None
    liar_share = CLAIMED / (CLAIMED + 3 * HONEST_COUNT)
    np.testing.assert_allclose(history.weights["w"], 1 + 4 * liar_share, rtol=1e-5)
    assert history.rounds[-1].fit_metrics["acc"] < 1e-3


def test_a_cap_above_a_count_leaves_it_as_reported() -> None:
    policy = ExampleWeights("capped", 50)
    assert (policy(7), policy(50), policy(CLAIMED)) == (7, 50, 50)
    assert ExampleWeights("uniform")(CLAIMED) == 1
    assert ExampleWeights()(CLAIMED) == CLAIMED


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"example_weights": "capped"}, "example_cap is required with example_weights = 'capped'"),
        (
            {"example_weights": "uniform", "example_cap": 5},
            "example_cap = 5 is used only with example_weights = 'capped', not 'uniform'",
        ),
        (
            {"example_weights": "capped", "example_cap": 20, "max_examples": 10},
            "example_cap = 20 exceeds max_examples = 10",
        ),
        ({"example_weights": "all"}, "'limits.example_weights' = 'all': Invalid enum value"),
        ({"example_weights": "capped", "example_cap": 0}, "'limits.example_cap' = 0"),
    ],
)
def test_bad_policies_are_refused_with_the_key(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^config: .*" + message.replace("(", r"\(")):
        parse_config({"app": {"target": "app:create_app"}, "limits": limits})


def test_the_policy_is_a_setting_of_the_run_only_when_set() -> None:
    """Runs recorded before the policy existed keep their settings (and resume)."""
    plain = parse_config({"app": {"target": "app:create_app"}})
    assert set(plain.settings()["limits"]) == {"max_examples", "max_upload_mb"}
    capped = parse_config(
        {"app": {"target": "app:create_app"}, "limits": {"example_weights": "capped",
                                                         "example_cap": 100}}
    )  # fmt: skip
    assert capped.settings()["limits"]["example_cap"] == 100
    assert capped.limits.weights() == ExampleWeights("capped", 100)
