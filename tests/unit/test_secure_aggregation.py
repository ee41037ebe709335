"""SecAgg+: the server learns the sum of the quantized updates and nothing else, dropouts
up to the threshold still give that sum, and each kind of bad input is named."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import fedge
from fedge.app import App
from fedge.client import Client, ClientWrapper, Config, FitResult, Message, Reply, Result
from fedge.config import parse_config
from fedge.coordinator import Outcome
from fedge.errors import ConfigError
from fedge.privacy import accounting
from fedge.secure_aggregation import (
    MASKED,
    SHARES,
    UNMASK,
    SecAggClient,
    SecureRound,
    Settings,
    check,
    flat_delta,
    quantized,
    secured,
)
from fedge.security import secagg
from fedge.sim import LocalFleet
from fedge.strategy import ClipUpdates, DifferentialPrivacy, FedAvg, FedMedian, Krum
from fedge.weights import Weights

INITIAL: Weights = {"w": np.zeros(1000, np.float32), "step": np.array(0, np.int64)}


class Adds(Client):
    """Adds a delta of its own (seeded by its client id) to ``w``."""

    def __init__(self, cid: int) -> None:
        self.delta = np.random.default_rng(cid).normal(0, 0.3, 1000).astype(np.float32)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        return FitResult({"w": weights["w"] + self.delta, "step": weights["step"] + 1}, 5, {})


class Faulty(ClientWrapper):
    """Fails one stage, or corrupts its reply, as a dropout or an attacker would."""

    def __init__(self, inner: Client, fail: str = "", corrupt: str = "") -> None:
        super().__init__(inner)
        self.fail, self.corrupt = fail, corrupt

    def handle(self, message: Message) -> Result:
        if message.kind == self.fail:
            raise ConnectionError("link lost")
        reply = self.inner.handle(message)
        if message.kind == self.corrupt == MASKED and isinstance(reply, Reply):
            return Reply({**reply.arrays, "masked": reply.arrays["masked"][:-1]})
        if message.kind == self.corrupt == SHARES and isinstance(reply, Reply):
            return Reply({"sealed": np.roll(reply.arrays["sealed"], 1, axis=0)})  # wrong peers
        return reply


class Watched:
    """A fleet whose every outcome the test can inspect afterwards."""

    def __init__(self, inner: LocalFleet, seen: list[Outcome]) -> None:
        self.inner, self.seen = inner, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def outcomes(self, deadline: float | None) -> Iterator[Outcome]:
        for outcome in self.inner.outcomes(deadline):
            self.seen.append(outcome)
            yield outcome


def run(
    num_clients: int = 10,
    rounds: int = 1,
    settings: Settings | None = None,
    faults: dict[int, dict[str, str]] | None = None,
    seen: list[Outcome] | None = None,
) -> tuple[fedge.History, SecureRound]:
    faults = faults or {}

    app = secured(App(Adds, INITIAL), settings or Settings(), FedAvg())

    def client_fn(cid: int) -> Client:  # the faults act on what the server receives
        return Faulty(app.client_fn(cid), **faults.get(cid, {}))

    workflow = app.workflow
    assert isinstance(workflow, SecureRound)
    if seen is not None:
        original = LocalFleet.__enter__

        def watched(self: LocalFleet) -> Any:
            return Watched(original(self), seen)

        LocalFleet.__enter__ = watched  # type: ignore[method-assign]
    try:
        history = fedge.simulate(
            client_fn,
            num_clients,
            rounds,
            initial_weights=INITIAL,
            workflow=workflow,
            strategy=FedAvg(clients_per_round=num_clients),
            max_round_retries=0,
        )
    finally:
        if seen is not None:
            LocalFleet.__enter__ = original  # type: ignore[method-assign]
    return history, workflow


def expected(cids: list[int], settings: Settings, num_clients: int = 10) -> np.ndarray:
    """Plain FedAvg (equal weights) of the quantized deltas the clients sent."""
    config = {
        "secagg_clipping_range": settings.clipping_range,
        "secagg_bits": settings.bits,
    }
    total = np.zeros(1000, np.uint32)
    for cid in cids:
        seed = fedge.coordinator.client_seed(0, 1, cid)
        delta = flat_delta({"w": INITIAL["w"] + Adds(cid).delta}, INITIAL)
        total += quantized(delta, {**config, "seed": seed})
    mean = secagg.dequantize(total, len(cids), settings.clipping_range, settings.bits)
    return (INITIAL["w"] + mean).astype(np.float32)


# --- the building blocks ---------------------------------------------------------------------


def test_any_threshold_of_shares_rebuilds_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = secagg.split(secret, 3, 5)
    assert all(len(s) == secagg.SHARE for s in shares)
    assert (
        secagg.combine(shares[2:5]) == secret == secagg.combine([shares[0], shares[3], shares[4]])
    )
    assert secagg.combine(shares[:2] + shares[:1][:0] + [shares[4]]) == secret
    try:  # two points do not fix a degree-2 polynomial
        assert secagg.combine(shares[:2]) != secret
    except secagg.SecAggError as exc:
        assert "do not rebuild a 32-byte secret" in str(exc)
    with pytest.raises(secagg.SecAggError, match="distinct"):
        secagg.combine([shares[0], shares[0], shares[1]])


def test_sealed_shares_open_only_for_their_pair() -> None:
    a = secagg.private_key(secagg.derive(b"a" * 32, "c"))
    b = secagg.private_key(secagg.derive(b"b" * 32, "c"))
    key = secagg.agree(a, secagg.public_bytes(b), "run/1.0")
    assert key == secagg.agree(b, secagg.public_bytes(a), "run/1.0")
    assert key != secagg.agree(b, secagg.public_bytes(a), "run/1.1")  # bound to the round
    x, y = b"x" * secagg.SHARE, b"y" * secagg.SHARE
    box = secagg.seal(key, 3, 7, x, y)
    assert secagg.unseal(key, box, 3, 7) == (x, y)
    with pytest.raises(secagg.SecAggError, match="sealed for another pair"):
        secagg.unseal(key, box, 3, 8)
    with pytest.raises(secagg.SecAggError, match="do not open"):
        secagg.unseal(bytes(32), box, 3, 7)
    with pytest.raises(secagg.SecAggError, match=r"low-order|unusable"):
        secagg.agree(a, bytes(32), "run/1.0")


def test_the_graph_is_regular_symmetric_and_logarithmic() -> None:
    cids = list(range(100))
    k = secagg.default_neighbours(100)
    assert k == 14
    graph = secagg.neighbours(cids, k, np.random.default_rng(0))
    assert all(len(peers) == k and c not in peers for c, peers in graph.items())
    assert all(c in graph[p] for c, peers in graph.items() for p in peers)
    assert secagg.neighbours([1, 2, 3], 2, np.random.default_rng(0)) == {
        1: [2, 3],
        2: [1, 3],
        3: [1, 2],
    }


def test_quantization_is_unbiased_and_masks_cancel_in_the_ring() -> None:
    values = np.full(200_000, 0.123)
    q = secagg.quantize(values, 1.0, 8, np.random.default_rng(0))
    assert q.min() >= 0 and q.max() <= 255
    assert secagg.dequantize(q, 1, 1.0, 8).mean() == pytest.approx(0.123, abs=1e-3)
    m = secagg.mask(b"k" * 32, 10)
    total = q[:10].copy()
    secagg.fold(total, m)
    assert not np.array_equal(total, q[:10])
    secagg.fold(total, m, -1)
    np.testing.assert_array_equal(total, q[:10])


# --- whole rounds in simulation --------------------------------------------------------------


def test_the_aggregate_is_fedavg_of_the_quantized_updates_exactly() -> None:
    settings = Settings(clipping_range=2.0)
    history, _ = run(settings=settings)
    assert [r.status for r in history.rounds] == ["ok"]
    assert history.rounds[0].participants == list(range(10))
    assert history.weights is not None
    np.testing.assert_array_equal(history.weights["w"], expected(list(range(10)), settings))
    assert int(history.weights["step"]) == 0  # integer tensors stay the global model's
    plain = np.mean([Adds(c).delta for c in range(10)], axis=0)
    np.testing.assert_allclose(history.weights["w"], plain, atol=2 * 2.0 / 2**16)


def test_the_server_holds_no_individual_update() -> None:
    seen: list[Outcome] = []
    settings = Settings()
    _, workflow = run(seen=seen, settings=settings)
    config = {"secagg_clipping_range": 1.0, "secagg_bits": 16}
    masked = {o.task.cid: o.result.arrays["masked"] for o in seen if o.task.kind == MASKED}  # type: ignore[union-attr]
    assert len(masked) == 10
    for cid, vector in masked.items():
        seed = fedge.coordinator.client_seed(0, 1, cid)
        mine = quantized(flat_delta({"w": Adds(cid).delta}, INITIAL), {**config, "seed": seed})
        assert np.mean(vector == mine) < 0.01  # masked: no coordinate is its own
        assert abs(float(np.mean(vector / 2.0**32)) - 0.5) < 0.05  # uniform over the ring
    assert set(workflow.held) == {"sums", "sent"}  # a running sum, no per-client vector
    assert len(workflow.held["sums"]) == 1


def test_dropouts_after_sharing_up_to_the_threshold_still_give_the_exact_sum() -> None:
    # client 2 never sends its masked input; client 5 sends it, then leaves before unmasking
    settings = Settings(neighbours=6)
    faults = {2: {"fail": MASKED}, 5: {"fail": UNMASK}}
    history, _ = run(settings=settings, faults=faults)
    (record,) = history.rounds
    assert record.status == "ok"
    assert record.participants == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert "link lost" in record.failures[2] and "link lost" in record.failures[5]
    assert history.weights is not None
    np.testing.assert_array_equal(history.weights["w"], expected(record.participants, settings))


def test_too_many_dropouts_fail_the_round_with_the_reason() -> None:
    # with 4 neighbours a secret needs 3 shares: 3 of them leaving before unmasking is too many
    settings = Settings(neighbours=4)
    faults = {c: {"fail": UNMASK} for c in range(6)}
    with pytest.raises(fedge.QuorumError):
        run(settings=settings, faults=faults)


def test_a_wrong_length_masked_vector_is_named_and_the_rest_is_summed() -> None:
    settings = Settings(neighbours=6)
    history, _ = run(settings=settings, faults={4: {"corrupt": MASKED}})
    (record,) = history.rounds
    assert record.status == "ok"
    assert "tensor 'masked' has shape [999], expected [1000]" in record.failures[4]
    assert history.weights is not None
    np.testing.assert_array_equal(
        history.weights["w"], expected([c for c in range(10) if c != 4], settings)
    )


def test_shares_sent_to_the_wrong_peers_are_named_and_the_round_fails_cleanly() -> None:
    with pytest.raises(fedge.QuorumError) as err:
        run(settings=Settings(neighbours=4), faults={3: {"corrupt": SHARES}})
    record = err.value.history.rounds[-1]  # type: ignore[attr-defined]
    assert record.failures[3].endswith("could not open the shares it sent")
    assert record.reason.startswith("secure aggregation: cannot unmask client 3")


def test_a_client_masks_a_round_once() -> None:
    client = SecAggClient(Adds(0), 0, b"s" * 32)
    payload = {k: np.zeros(1, np.int64) for k in ("c_pk", "sealed", "survived")}
    message = Message(
        UNMASK,
        {"secagg_label": "r/1.0", "secagg_threshold": 2},
        None,
        {"peers": np.array([-1]), **payload},
    )
    with pytest.raises(secagg.SecAggError):
        client.handle(message)  # too few survivors
    with pytest.raises(secagg.SecAggError, match="answered already: never twice"):
        client.handle(message)


# --- secure and robust: SecAgg+ inside groups, a robust rule across the group sums --------


class Small(Client):
    """Honest: a small delta around 0.05. Client 0 pushes every coordinate up by 1000."""

    def __init__(self, cid: int) -> None:
        noise = np.random.default_rng(cid).normal(0, 0.01, 1000)
        self.delta = (np.full(1000, 1000.0) if cid == 0 else 0.05 + noise).astype(np.float32)

    def fit(self, weights: Weights, config: Config) -> FitResult:
        return FitResult({"w": weights["w"] + self.delta, "step": weights["step"]}, 5, {})


def secure_run(strategy: Any, groups: int) -> np.ndarray:
    app = secured(App(Small, INITIAL), Settings(groups=groups), strategy)
    history = fedge.simulate(
        app.client_fn,
        15,
        1,
        initial_weights=INITIAL,
        workflow=app.workflow,
        strategy=strategy,
        max_round_retries=0,
    )
    assert history.rounds[0].participants == list(range(15))
    assert history.weights is not None
    return np.asarray(history.weights["w"], np.float64)


def test_a_median_across_group_sums_resists_a_poisoned_client_that_moves_the_mean() -> None:
    honest = float(np.mean([Small(c).delta for c in range(1, 15)]))
    # the attacker's input is clipped to +1 per coordinate by the quantization range
    plain = secure_run(FedAvg(clients_per_round=15), groups=1)
    robust = secure_run(FedMedian(clients_per_round=15), groups=5)
    assert float(np.mean(plain)) - honest == pytest.approx((1.0 - honest) / 15, abs=2e-3)
    assert abs(float(np.mean(robust)) - honest) < 0.005  # the poisoned group is outvoted


def test_a_group_that_cannot_be_unmasked_is_named() -> None:
    app = secured(App(Adds, INITIAL), Settings(groups=4), FedMedian())
    with pytest.raises(fedge.QuorumError, match=r"cannot form 4 groups of at least 3"):
        fedge.simulate(
            app.client_fn,
            10,
            1,
            initial_weights=INITIAL,
            workflow=app.workflow,
            strategy=FedMedian(),
            max_round_retries=0,
        )


# --- differential privacy on the secure sum: clients clip, the server noises the sum -------


def dp_run(**dp: Any) -> fedge.History:
    strategy = DifferentialPrivacy(FedAvg(clients_per_round=10), clipping="client", **dp)
    app = secured(App(Adds, INITIAL), Settings(), strategy)
    return fedge.simulate(
        app.client_fn,
        10,
        1,
        initial_weights=INITIAL,
        workflow=app.workflow,
        strategy=strategy,
        max_round_retries=0,
    )


def test_clients_clip_and_the_server_noises_the_secure_sum_with_epsilon_accounted() -> None:
    # no noise, a norm above every delta: the secure mean itself
    loose = dp_run(noise_multiplier=0.0, clip_norm=1e6)
    secure, _ = run()
    assert loose.weights is not None and secure.weights is not None
    np.testing.assert_allclose(loose.weights["w"], secure.weights["w"], rtol=0, atol=1e-6)
    # each client's delta (norm ~9.5) clipped to 0.1 on the device: so is their mean
    tight = dp_run(noise_multiplier=0.0, clip_norm=0.1)
    assert tight.weights is not None
    assert float(np.linalg.norm(tight.weights["w"])) < 0.1 + 1e-3
    noised = dp_run(noise_multiplier=1.0, clip_norm=0.1)
    assert noised.weights is not None
    assert float(np.std(noised.weights["w"] - tight.weights["w"])) == pytest.approx(0.01, rel=0.1)
    assert noised.rounds[0].strategy_metrics["epsilon"] == accounting.epsilon(
        1.0, 1e-5, "rdp", ((1.0, 1),)
    )


def test_privacy_under_secure_aggregation_needs_client_clipping() -> None:
    server_side = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ConfigError, match=r"for differential privacy set clipping = 'client'"):
        check(server_side)
    client_side = DifferentialPrivacy(
        FedAvg(), noise_multiplier=1.0, clip_norm=1.0, clipping="client"
    )
    check(client_side)
    with pytest.raises(ConfigError, match=r"cannot run across groups"):
        check(client_side, groups=3)
    with pytest.raises(ConfigError, match=r"clipping must be 'server' with adaptive = true"):
        DifferentialPrivacy(
            FedAvg(), noise_multiplier=1.0, clip_norm=1.0, adaptive=True, clipping="client"
        )


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [FedMedian(), Krum(num_malicious=1, min_results=5), ClipUpdates(FedAvg(), max_norm=1.0)],
)
def test_strategies_that_need_individual_updates_are_refused(strategy: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"secure_aggregation: cannot run with .*sees only (the )?sums? of"
    ):
        check(strategy)


def test_a_robust_rule_runs_across_groups_only() -> None:
    with pytest.raises(ConfigError, match=r"for a robust rule set secure_aggregation.groups > 1"):
        check(FedMedian())
    check(FedMedian(), groups=3)
    with pytest.raises(ConfigError, match=r"server-side wrappers"):
        check(ClipUpdates(FedAvg(), max_norm=1.0), groups=3)


def test_an_app_with_its_own_workflow_is_refused() -> None:
    app = App(Adds, INITIAL, workflow=lambda rnd: None)
    with pytest.raises(ConfigError, match="brings its own workflow"):
        secured(app, Settings(), FedAvg())


def test_the_config_section_is_checked() -> None:
    base = {"app": {"target": "app:create_app"}}
    cfg = parse_config({**base, "secure_aggregation": {"enabled": True, "neighbours": 8}})
    assert cfg.secure_aggregation.enabled and cfg.secure_aggregation.neighbours == 8
    assert "secure_aggregation" in cfg.settings()
    assert "secure_aggregation" not in parse_config(base).settings()
    for bad in ({"threshold": 0.4}, {"bits": 40}, {"neighbours": 1}, {"clipping_range": 0}):
        with pytest.raises(ConfigError, match=r"secure_aggregation\."):
            parse_config({**base, "secure_aggregation": bad})
