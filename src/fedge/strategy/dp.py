"""DifferentialPrivacy: central DP-FedAvg with fixed or adaptive clipping, and ε accounted.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (https://arxiv.org/abs/1710.06963); adaptive clipping from Andrew,
Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021 (https://arxiv.org/abs/1905.03871).

Each client's delta is clipped to L2 norm ``C``; the server sums the clipped deltas, adds
Gaussian noise of standard deviation ``z · C`` to the sum and divides by the number of
clients sampled (not the number that answered: a dropout must not raise any one client's
weight). Clients count equally, as in DP-FedAvg: an example-weighted mean would let one
client's reported count scale its influence past ``C``. The wrapped strategy then applies
the noised mean as its own aggregate (FedAvgM's momentum, FedAdam's optimizer are
post-processing and cost no privacy).

With adaptive clipping, the clients whose delta was within ``C`` are counted, the count is
noised with standard deviation ``σ_b``, and ``C ← C · exp(−η (b̃ − γ))`` moves the norm
towards the ``γ`` quantile of the update norms. The noise is split so the whole round
stays a Gaussian mechanism of multiplier ``z``: ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``.

ε at ``delta`` is accounted after every round (`fedge.privacy.accounting`) and kept in the state,
so a resumed run goes on counting; with ``epsilon_budget`` the run ends before a round
that would spend more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.aggregate import Aggregator
from fedge.errors import ConfigError
from fedge.privacy import accounting
from fedge.strategy.base import RoundContext, State, Strategy, StrategyWrapper
from fedge.strategy.clip import delta_norm
from fedge.weights import Array, Weights, blocks

CLIP_NORM, RATES = "dp.clip_norm", "dp.rates"
CLIENT_CLIP = "dp_clip_norm"
"""The fit config key that tells clients to clip their own delta to this L2 norm."""
WHERE = "strategy.wrap differential_privacy"


class DifferentialPrivacy(StrategyWrapper):
    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        delta: float = 1e-5,
        accountant: str = "rdp",
        epsilon_budget: float | None = None,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        clipping: str = "server",
    ) -> None:
        super().__init__(inner)
        if isinstance(inner, StrategyWrapper) or type(inner).aggregator is not Strategy.aggregator:
            raise ConfigError(
                f"{WHERE}: cannot wrap {inner.name}, which aggregates in its own way; the "
                "noise is calibrated to a sum of clipped updates, so wrap a FedAvg-family "
                "strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad) directly"
            )
        z = noise_multiplier
        _need("noise_multiplier", z, _number(z) and z >= 0, "a number >= 0")
        _need("clip_norm", clip_norm, _number(clip_norm) and clip_norm > 0, "a number > 0")
        _need("delta", delta, _number(delta) and 0 < delta < 1, "in (0, 1)")
        _need("accountant", accountant, accountant in accounting.KINDS, str(accounting.KINDS))
        budget = epsilon_budget
        ok = budget is None or (_number(budget) and budget > 0)
        _need("epsilon_budget", budget, ok, "a number > 0")
        _need("adaptive", adaptive, isinstance(adaptive, bool), "true or false")
        q = target_quantile
        _need("target_quantile", q, _number(q) and 0 < q < 1, "in (0, 1)")
        eta = clip_learning_rate
        _need("clip_learning_rate", eta, _number(eta) and eta > 0, "a number > 0")
        sb = clipped_count_stddev
        ok = sb is None or (_number(sb) and 2 * sb > z)
        _need("clipped_count_stddev", sb, ok, f"a number > noise_multiplier / 2 = {z / 2:g}")
        _need("clipping", clipping, clipping in ("server", "client"), "'server' or 'client'")
        ok = not (adaptive and clipping == "client")
        _need(
            "clipping",
            clipping,
            ok,
            "'server' with adaptive = true (the server counts the updates its norm clips)",
        )
        accounting.check_installed()
        self.noise_multiplier, self.clip_norm, self.delta = float(z), float(clip_norm), float(delta)
        self.accountant: accounting.Kind = accountant  # type: ignore[assignment]
        self.epsilon_budget = None if epsilon_budget is None else float(epsilon_budget)
        self.adaptive, self.target_quantile = adaptive, float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev
        self.clipping = clipping
        self._sums: dict[tuple[int, int], NoisedSum] = {}

    def count_stddev(self, selected: int) -> float:
        """σ_b: as configured, else Andrew et al.'s m/20, raised to z so the split is valid."""
        if self.clipped_count_stddev is not None:
            return float(self.clipped_count_stddev)
        return max(selected / 20, self.noise_multiplier)

    def delta_noise_multiplier(self, selected: int) -> float:
        """z_Δ: the share of the noise left for the sum of deltas."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        return float((z**-2 - (2 * self.count_stddev(selected)) ** -2) ** -0.5)

    def fit_config(self, server_round: int) -> dict[str, Any]:
        """With client-side clipping the clients are told the norm (under secure
        aggregation only they can apply it; the server clips whatever it sees too)."""
        config = self.inner.fit_config(server_round)
        return {**config, CLIENT_CLIP: self.clip_norm} if self.clipping == "client" else config

    def noised_mean(self, delta_sum: npt.NDArray[np.float64], ctx: RoundContext) -> Array:
        """The mean the clients sampled released: ``(sum + N(0, (z C)^2)) / selected``,
        for a sum of clipped deltas the server never saw apart (secure aggregation)."""
        stddev = self.noise_multiplier * self.clip_norm
        noised = delta_sum + ctx.rng.normal(0.0, stddev, delta_sum.shape) if stddev else delta_sum
        return np.divide(noised, max(ctx.selected, 1))

    def init_state(self, weights: Weights) -> State:
        state = dict(self.inner.init_state(weights))
        state[CLIP_NORM] = np.array(self.clip_norm)
        state[RATES] = np.zeros(0)
        return state

    def aggregator(self, ctx: RoundContext) -> Aggregator:
        clip = float(ctx.state.get(CLIP_NORM, self.clip_norm))
        selected = max(ctx.selected, 1)
        total = NoisedSum(
            ctx.weights, clip, self.delta_noise_multiplier(selected) * clip, selected, ctx.rng
        )
        self._sums = {(ctx.round, ctx.attempt): total}  # read back by `apply`
        return total

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        inner_state = {k: v for k, v in state.items() if not k.startswith("dp.")}
        weights, inner_state = self.inner.apply(weights, aggregate, inner_state, ctx)
        new = dict(inner_state)
        clip = float(state.get(CLIP_NORM, self.clip_norm))
        total = self._sums.pop((ctx.round, ctx.attempt), None)
        if self.adaptive and total is not None:
            noise = ctx.rng.normal(0.0, self.count_stddev(total.selected))
            below = (total.unclipped + noise) / total.selected
            clip *= math.exp(-self.clip_learning_rate * (below - self.target_quantile))
        new[CLIP_NORM] = np.array(clip)
        rate = min(1.0, ctx.selected / ctx.population) if ctx.population else 1.0
        new[RATES] = np.append(state.get(RATES, np.zeros(0)), rate)
        return weights, new

    def epsilon(self, rates: Array, extra: int = 0) -> float:
        """ε spent after rounds at `rates`, plus `extra` more at the last rate."""
        listed = [float(r) for r in rates] + [float(rates[-1])] * extra if len(rates) else []
        return accounting.epsilon(
            self.noise_multiplier, self.delta, self.accountant, accounting.runs(listed)
        )

    def report(self, state: State) -> dict[str, float]:
        found = dict(self.inner.report(state))
        found["epsilon"] = self.epsilon(state.get(RATES, np.zeros(0)))
        found["delta"] = self.delta
        found["clip_norm"] = float(state.get(CLIP_NORM, self.clip_norm))
        return found

    def stop_reason(self, state: State) -> str:
        rates = state.get(RATES, np.zeros(0))
        if self.epsilon_budget is None or not len(rates):
            return self.inner.stop_reason(state)
        spent, next_round = self.epsilon(rates), self.epsilon(rates, extra=1)
        if next_round > self.epsilon_budget:
            return (
                f"privacy budget: ε = {spent:.4g} spent after {len(rates)} rounds, another "
                f"round would reach {next_round:.4g} > epsilon_budget {self.epsilon_budget:g} "
                f"(δ = {self.delta:g})"
            )
        return self.inner.stop_reason(state)


class NoisedSum(Aggregator):
    """Sums clipped float deltas in float64; `result` adds the noise and divides by the
    number sampled. Integer tensors (counters) stay those of the reference."""

    def __init__(
        self,
        reference: Weights,
        clip_norm: float,
        stddev: float,
        selected: int,
        rng: np.random.Generator,
    ) -> None:
        super().__init__()
        self.reference, self.clip_norm, self.stddev = reference, clip_norm, stddev
        self.selected, self.rng = selected, rng
        self.unclipped = 0
        """Updates of this round whose delta was within the clipping norm."""
        self._sum = {name: np.zeros(a.size) for name, a in reference.items() if _is_float(a)}

    def _add(self, weights: Mapping[str, Array], num_examples: int, cid: int | None) -> None:
        norm = delta_norm(weights, self.reference)
        scale = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
        self.unclipped += norm <= self.clip_norm
        for name, total in self._sum.items():
            flat, start = self.reference[name].reshape(-1), 0
            for block in blocks(weights, name):
                part = total[start : start + block.size]
                part += (
                    np.subtract(block, flat[start : start + block.size], dtype=np.float64) * scale
                )
                start += block.size

    def result(self) -> Weights:
        if not self.count:
            raise ValueError("no updates were aggregated")
        out = dict(self.reference)
        for name, total in self._sum.items():
            ref = self.reference[name]
            if self.stddev:
                total += self.rng.normal(0.0, self.stddev, total.size)
            mean = total.reshape(ref.shape) / self.selected
            out[name] = np.add(ref, mean).astype(ref.dtype)
        return out


def _is_float(a: Array) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need(key: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{WHERE}: {key} must be {expected}, got {value!r}")
