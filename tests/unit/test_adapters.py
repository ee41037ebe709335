"""Framework adapters: PyTorch modules, the NumPy softmax-regression client and
scikit-learn linear models, each turned into Weights and trained the way fedge expects."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import fedge
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_loss, softmax_weights
from fedge.weights import Weights, from_bytes, spec_of, to_bytes, validate

torch = pytest.importorskip("torch")
sklearn_linear = pytest.importorskip("sklearn.linear_model")

from torch import nn  # noqa: E402

from fedge.adapters import sklearn as sk  # noqa: E402
from fedge.adapters import torch as ta  # noqa: E402
from fedge.errors import ConfigError  # noqa: E402
from fedge.privacy import accounting  # noqa: E402
from fedge.privacy.dp_sgd import DPSGD  # noqa: E402


def config(**settings: object) -> dict[str, object]:
    return {"round": 1, "seed": 0, **settings}


def distance(a: Weights, b: Weights, names: list[str]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in names))


# --- PyTorch -----------------------------------------------------------------------------


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by the sign of the first feature, with a margin."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    x[:, 0] += torch.where(x[:, 0] >= 0, 1.0, -1.0)
    return x, (x[:, 0] > 0).long()


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_torch_weights_round_trip_bit_exactly_with_buffers() -> None:
    model = small_net(0)
    model.train()
    model(torch.randn(16, 4))  # moves BatchNorm's running statistics and its counter
    weights = ta.get_weights(model)

    assert list(weights) == list(model.state_dict())
    assert weights["1.num_batches_tracked"].shape == ()
    assert weights["1.num_batches_tracked"].dtype == np.int64
    assert int(weights["1.num_batches_tracked"]) == 1

    decoded = from_bytes(to_bytes(weights), source="node a")
    validate(decoded, spec_of(weights), source="node a")
    other = small_net(1)
    ta.set_weights(other, decoded)
    for name, tensor in model.state_dict().items():
        loaded = other.state_dict()[name]
        assert loaded.dtype == tensor.dtype, name
        assert loaded.shape == tensor.shape, name
        assert torch.equal(loaded, tensor), name


def test_torch_weights_are_copies_not_views() -> None:
    model = small_net(0)
    weights = ta.get_weights(model)
    weights["0.weight"][:] = 0.0
    assert model.state_dict()["0.weight"].abs().sum() > 0

    ta.set_weights(model, weights)
    weights["0.weight"][:] = 1.0
    assert model.state_dict()["0.weight"].abs().sum() == 0


def test_set_weights_rejects_a_mismatching_state() -> None:
    weights = ta.get_weights(small_net(0))
    del weights["3.bias"]
    with pytest.raises(RuntimeError, match=r"3\.bias"):
        ta.set_weights(small_net(0), weights)


def linear_client(**kwargs: object) -> ta.TorchClient:
    torch.manual_seed(0)
    x, y = separable(64, seed=1)
    x_test, y_test = separable(40, seed=2)
    return ta.TorchClient(nn.Linear(4, 2), batches(x, y, 8), batches(x_test, y_test, 10), **kwargs)  # type: ignore[arg-type]


def test_torch_client_fit_reduces_the_loss_and_evaluate_reports_accuracy() -> None:
    client = linear_client(epochs=5)
    initial = client.get_weights({})
    before = client.evaluate(initial, config())

    result = client.fit(initial, config(lr=0.5))
    after = client.evaluate(result.weights, config())

    assert isinstance(result, fedge.FitResult)
    assert result.num_examples == 64
    assert result.metrics["train_loss"] < before.loss
    assert after.loss < before.loss / 2
    assert after.num_examples == 40
    assert after.metrics["accuracy"] >= 0.95
    assert list(result.weights) == ["weight", "bias"]


def test_torch_evaluate_computes_loss_and_accuracy_exactly() -> None:
    x = torch.tensor([[2.0, 0, 0, 0], [-2.0, 0, 0, 0], [1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    y = torch.tensor([1, 0, 1, 1])  # the last point is labelled against the rule
    client = ta.TorchClient(nn.Linear(4, 2), [], [(x[:2], y[:2]), (x[2:], y[2:])])
    weights = {
        "weight": np.array([[-1, 0, 0, 0], [1, 0, 0, 0]], np.float32),  # class 1 iff x0 > 0
        "bias": np.zeros(2, np.float32),
    }
    result = client.evaluate(weights, config())

    logits = x @ torch.from_numpy(weights["weight"]).T
    expected_loss = nn.functional.cross_entropy(logits, y).item()
    assert result.num_examples == 4
    assert result.metrics["accuracy"] == 0.75
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)


def test_torch_fit_is_reproducible_for_a_seed() -> None:
    x, y = separable(64, seed=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    client = ta.TorchClient(nn.Linear(4, 2), loader)
    start = client.get_weights({})
    first = client.fit(start, config(seed=3, lr=0.1))
    again = client.fit(start, config(seed=3, lr=0.1))
    other = client.fit(start, config(seed=4, lr=0.1))

    assert first.num_examples == 64  # a DataLoader's size is its dataset's
    assert first.weights["weight"].tobytes() == again.weights["weight"].tobytes()
    assert first.weights["weight"].tobytes() != other.weights["weight"].tobytes()


def test_torch_proximal_term_keeps_weights_closer_to_the_global_model() -> None:
    client = linear_client(epochs=5)
    start = client.get_weights({})
    free = client.fit(start, config(lr=0.5, seed=7)).weights
    prox = client.fit(start, config(lr=0.5, seed=7, proximal_mu=1.0)).weights
    names = ["weight", "bias"]
    assert distance(prox, start, names) < 0.8 * distance(free, start, names)


class CountingClient(ta.TorchClient):
    steps = 0

    def train_step(self, batch: ta.Batch) -> tuple[torch.Tensor, int]:
        self.steps += 1
        return super().train_step(batch)


@pytest.mark.parametrize(
    ("fraction", "steps"),
    [(None, 16), (1.0, 16), (0.5, 8), (0.3, 5), (0.01, 1), (0.0, 1)],
)
def test_torch_work_fraction_trains_that_share_of_the_steps(
    fraction: float | None, steps: int
) -> None:
    x, y = separable(64, seed=1)
    client = CountingClient(nn.Linear(4, 2), batches(x, y, 8), epochs=2)  # 2 x 8 batches
    settings = {} if fraction is None else {"work_fraction": fraction}
    result = client.fit(client.get_weights({}), config(**settings))
    assert client.steps == steps  # ceil(16 * fraction), at least one
    assert result.num_examples == 64


def test_torch_client_trains_a_federation_to_high_accuracy() -> None:
    shards = [separable(48, seed=10 + cid) for cid in range(4)]
    x_test, y_test = separable(100, seed=99)

    def client_fn(cid: int) -> fedge.Client:
        torch.manual_seed(0)
        x, y = shards[cid]
        return ta.TorchClient(nn.Linear(4, 2), batches(x, y, 8), batches(x_test, y_test, 50))

    history = fedge.simulate(
        client_fn,
        4,
        3,
        strategy=fedge.strategy.FedAvg(fraction_evaluate=1.0),
        fit_config={"lr": 0.3},
    )
    assert history.rounds[-1].evaluate_metrics["accuracy"] >= 0.95


# --- NumPy softmax regression ------------------------------------------------------------


def numpy_client(**kwargs: object) -> SoftmaxRegressionClient:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3))).argmax(axis=1)
    return SoftmaxRegressionClient(x[:100], y[:100], x[100:], y[100:], **kwargs)  # type: ignore[arg-type]


def test_softmax_client_fit_reduces_the_loss() -> None:
    client = numpy_client(epochs=3, lr=0.5)
    start = client.get_weights({})
    assert {k: v.shape for k, v in start.items()} == {"weight": (6, 3), "bias": (3,)}
    result = client.fit(start, config())
    before, _ = softmax_loss(start, client.x_train, client.y_train)
    assert result.metrics["train_loss"] < before / 2
    assert result.num_examples == 100
    evaluation = client.evaluate(result.weights, config())
    assert evaluation.num_examples == 20
    assert evaluation.metrics["accuracy"] >= 0.8


def test_softmax_client_keeps_the_global_dtypes_and_does_not_modify_its_input() -> None:
    client = numpy_client()
    start = softmax_weights(6, 3)
    result = client.fit(start, config())
    assert result.weights["weight"].dtype == np.float32
    assert result.weights["bias"].dtype == np.float32
    assert not start["weight"].any()
    validate(result.weights, spec_of(start), source="client 0")


def test_softmax_proximal_term_keeps_weights_closer_to_the_global_model() -> None:
    client = numpy_client(epochs=5, lr=0.5)
    start = client.fit(softmax_weights(6, 3), config(seed=1)).weights  # a non-zero anchor
    free = client.fit(start, config(seed=2)).weights
    prox = client.fit(start, config(seed=2, proximal_mu=2.0)).weights
    names = ["weight", "bias"]
    assert distance(prox, start, names) < 0.8 * distance(free, start, names)


def test_softmax_work_fraction_moves_the_model_less() -> None:
    client = numpy_client(epochs=2, lr=0.5, batch_size=10)  # 2 x 10 steps
    start = softmax_weights(6, 3)
    full = client.fit(start, config()).weights
    partial = client.fit(start, config(work_fraction=0.1)).weights  # 2 steps
    names = ["weight", "bias"]
    assert 0 < distance(partial, start, names) < distance(full, start, names)


def test_softmax_fit_settings_come_from_config_first() -> None:
    client = numpy_client(lr=0.5)
    start = softmax_weights(6, 3)
    default = client.fit(start, config()).weights
    same = client.fit(start, config(lr=0.5)).weights
    slower = client.fit(start, config(lr=0.01)).weights
    assert default["weight"].tobytes() == same["weight"].tobytes()
    names = ["weight", "bias"]
    assert distance(slower, start, names) < distance(default, start, names)


# --- scikit-learn ------------------------------------------------------------------------


def classification(classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(classes)
    x = rng.normal(size=(150, 5))
    return x, (x @ rng.normal(size=(5, classes))).argmax(axis=1)


MODELS = [
    lambda: sklearn_linear.LogisticRegression(max_iter=500),
    lambda: sklearn_linear.SGDClassifier(random_state=0),
]


@pytest.mark.parametrize("make", MODELS, ids=["logistic", "sgd"])
@pytest.mark.parametrize("classes", [2, 3])
def test_sklearn_init_linear_gives_zero_weights_a_model_can_predict_with(
    make: object, classes: int
) -> None:
    x, y = classification(classes)
    model = make()  # type: ignore[operator]
    weights = sk.init_linear(model, 5, np.unique(y))
    rows = 1 if classes == 2 else classes
    assert {k: v.shape for k, v in weights.items()} == {"coef_": (rows, 5), "intercept_": (rows,)}
    assert not any(a.any() for a in weights.values())
    assert model.predict(x).shape == (150,)  # unfitted, yet usable: classes_ is set


@pytest.mark.parametrize("make", MODELS, ids=["logistic", "sgd"])
@pytest.mark.parametrize("classes", [2, 3])
def test_sklearn_weights_move_a_trained_model_into_a_fresh_one(make: object, classes: int) -> None:
    x, y = classification(classes)
    trained = make().fit(x, y)  # type: ignore[operator]
    weights = sk.get_weights(trained)
    decoded = from_bytes(to_bytes(weights))

    fresh = make()  # type: ignore[operator]
    sk.init_linear(fresh, 5, np.unique(y))
    sk.set_weights(fresh, decoded)

    np.testing.assert_array_equal(fresh.predict(x), trained.predict(x))
    assert (fresh.predict(x) == y).mean() >= 0.8


def test_sklearn_weights_are_copies() -> None:
    x, y = classification(3)
    model = sklearn_linear.LogisticRegression(max_iter=500).fit(x, y)
    weights = sk.get_weights(model)
    weights["coef_"][:] = 0
    assert model.coef_.any()
    sk.set_weights(model, weights)
    weights["coef_"][:] = 1
    assert not model.coef_.any()


def test_sklearn_sgd_continues_training_from_set_weights() -> None:
    x, y = classification(3)
    model = sklearn_linear.SGDClassifier(random_state=0)
    start = sk.init_linear(model, 5, np.unique(y))
    sk.set_weights(model, start)
    model.partial_fit(x, y)
    assert (model.predict(x) == y).mean() >= 0.7
    assert sk.get_weights(model)["coef_"].any()


# --- local DP-SGD (Opacus) ---------------------------------------------------------------


def dp_client(z: float, clip: float, **kwargs: Any) -> ta.TorchClient:
    x, y = separable(64, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    return ta.TorchClient(nn.Linear(4, 2), loader, dp_sgd=DPSGD(z, clip), **kwargs)


def test_dp_sgd_reports_the_epsilon_of_its_steps_and_keeps_the_models_names() -> None:
    client = dp_client(1.0, 1.0, epochs=2)
    start = client.get_weights({})
    result = client.fit(start, config(lr=0.1))
    assert set(result.weights) == {"weight", "bias"}  # no Opacus wrapper left behind
    # 2 epochs of 8 Poisson batches at rate 1/8: 16 sampled Gaussian steps
    want = accounting.epsilon(1.0, 1e-5, "rdp", ((1 / 8, 16),))
    assert result.metrics["dp_sgd_epsilon"] == want
    again = client.fit(start, config(lr=0.1))  # hooks removed: a second fit is the same
    assert again.weights["weight"].tobytes() == result.weights["weight"].tobytes()
    other = client.fit(start, config(lr=0.1, seed=5))
    assert other.weights["weight"].tobytes() != result.weights["weight"].tobytes()


def test_dp_sgd_clips_each_examples_gradient() -> None:
    # one step, no noise: the update is lr times a mean of gradients of norm <= clip
    client = dp_client(0.0, 0.01, epochs=1)
    start = client.get_weights({})
    result = client.fit(start, config(lr=1.0, work_fraction=1 / 8))
    plain = ta.TorchClient(nn.Linear(4, 2), client.train_data).fit(
        start, config(lr=1.0, work_fraction=1 / 8)
    )
    moved = distance(result.weights, start, ["weight", "bias"])
    assert 0 < moved <= 0.01 * 3  # a Poisson batch may hold more than its expected 8
    assert distance(plain.weights, start, ["weight", "bias"]) > 10 * moved


def test_dp_sgd_refuses_a_proximal_term_and_bad_settings() -> None:
    client = dp_client(1.0, 1.0)
    with pytest.raises(ValueError, match=r"proximal_mu must be 0 with dp_sgd, got 0\.1"):
        client.fit(client.get_weights({}), config(proximal_mu=0.1))
    with pytest.raises(ConfigError, match=r"dp_sgd.max_grad_norm must be a number > 0, got 0"):
        DPSGD(1.0, 0)
    with pytest.raises(ConfigError, match=r"train_data must be a torch DataLoader, got list"):
        x, y = separable(16, seed=0)
        listed = ta.TorchClient(nn.Linear(4, 2), batches(x, y, 8), dp_sgd=DPSGD(1.0, 1.0))
        listed.fit(listed.get_weights({}), config())
