"""FedAvg: the example-weighted mean of client models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from dataclasses import dataclass

from fedge.strategy.base import Strategy


@dataclass(kw_only=True)
class FedAvg(Strategy):
    """Streaming example-weighted average; stragglers' partial work is dropped."""
