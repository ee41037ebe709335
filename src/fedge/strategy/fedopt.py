"""FedAdam, FedYogi and FedAdagrad: adaptive server optimisers on the FedAvg pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
https://arxiv.org/abs/2003.00295

Each round, with ``delta = aggregate - weights`` (Algorithm 2 of the paper)::

    m = beta_1 * m + (1 - beta_1) * delta
    v = <Adagrad | Yogi | Adam update of v with delta**2>
    weights = weights + eta * m / (sqrt(v) + tau)

``m`` starts at 0 and ``v`` at ``tau**2``; defaults follow the paper and Flower. State is
kept in the weights' dtype, except that float16 is widened to float32 (``tau**2`` would
underflow to 0 and ``m / (sqrt(v) + tau)`` divide by zero). Integer tensors (counters) are
not optimised: they take the aggregate as it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from fedge.strategy.base import RoundContext, State, Strategy, _check
from fedge.weights import Array, Weights


@dataclass(kw_only=True)
class FedOpt(Strategy, ABC):
    """Shared server step; subclasses say how the second moment ``v`` is updated."""

    eta: float = 1e-1
    eta_l: float = 1e-1
    """The paper's client learning rate; clients own their optimiser, so unused here."""
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.eta > 0, "eta", self.eta, "> 0")
        _check(self.eta_l > 0, "eta_l", self.eta_l, "> 0")
        _check(0.0 <= self.beta_1 < 1.0, "beta_1", self.beta_1, "in [0, 1)")
        _check(0.0 <= self.beta_2 < 1.0, "beta_2", self.beta_2, "in [0, 1)")
        _check(self.tau > 0, "tau", self.tau, "> 0")

    @abstractmethod
    def _second_moment(self, v: Array, delta_sq: Array) -> Array: ...

    def init_state(self, weights: Weights) -> State:
        state: State = {}
        for name, a in weights.items():
            if np.issubdtype(a.dtype, np.floating):
                dtype = _state_dtype(a)
                state[f"m/{name}"] = np.zeros(a.shape, dtype=dtype)
                state[f"v/{name}"] = np.full(a.shape, self.tau**2, dtype=dtype)
        return state

    def apply(
        self, weights: Weights, aggregate: Weights, state: State, ctx: RoundContext
    ) -> tuple[Weights, State]:
        new_weights: Weights = {}
        new_state: State = dict(state)
        for name, w in weights.items():
            if not np.issubdtype(w.dtype, np.floating):
                new_weights[name] = aggregate[name]
                continue
            dtype = _state_dtype(w)
            m_key, v_key = f"m/{name}", f"v/{name}"
            if m_key in state and v_key in state:
                m_prev, v_prev = state[m_key], state[v_key]
            else:  # no state yet for this tensor: start from the initial m and v
                initial = self.init_state({name: w})
                m_prev, v_prev = initial[m_key], initial[v_key]
            delta: Array = np.subtract(aggregate[name], w, dtype=dtype)
            m: Array = np.add(
                np.multiply(self.beta_1, m_prev), np.multiply(1.0 - self.beta_1, delta), dtype=dtype
            )
            v = self._second_moment(v_prev, np.square(delta)).astype(dtype, copy=False)
            step = np.divide(np.multiply(self.eta, m), np.add(np.sqrt(v), self.tau))
            new_state[m_key], new_state[v_key] = m, v
            new_weights[name] = np.add(w, step).astype(w.dtype, copy=False)
        return new_weights, new_state


@dataclass(kw_only=True)
class FedAdagrad(FedOpt):
    """``v = v + delta**2``: per-coordinate steps shrink as squared updates accumulate."""

    def _second_moment(self, v: Array, delta_sq: Array) -> Array:
        out: Array = np.add(v, delta_sq)
        return out


@dataclass(kw_only=True)
class FedYogi(FedOpt):
    """``v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)``: v grows additively, not
    multiplicatively, so a burst of large updates cannot blow up the step size."""

    def _second_moment(self, v: Array, delta_sq: Array) -> Array:
        change = np.multiply(1.0 - self.beta_2, delta_sq)
        out: Array = np.subtract(v, np.multiply(change, np.sign(np.subtract(v, delta_sq))))
        return out


@dataclass(kw_only=True)
class FedAdam(FedOpt):
    """``v = beta_2 * v + (1 - beta_2) * delta**2``: an exponential moving average."""

    def _second_moment(self, v: Array, delta_sq: Array) -> Array:
        out: Array = np.add(np.multiply(self.beta_2, v), np.multiply(1.0 - self.beta_2, delta_sq))
        return out


def _state_dtype(a: Array) -> np.dtype[np.generic]:
    return np.result_type(a.dtype, np.float32)
