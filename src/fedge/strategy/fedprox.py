"""FedProx: FedAvg whose clients minimise ``loss + mu/2 * ||w - w_global||^2``.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
https://arxiv.org/abs/1812.06127

The proximal term is applied by the client adapters, which read ``config["proximal_mu"]``.
Unlike FedAvg, the partial work of stragglers is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedge.strategy.base import Strategy, _check


@dataclass(kw_only=True)
class FedProx(Strategy):
    proximal_mu: float = 0.01
    accept_partial_work: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.proximal_mu >= 0, "proximal_mu", self.proximal_mu, ">= 0")

    def fit_config(self, server_round: int) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
