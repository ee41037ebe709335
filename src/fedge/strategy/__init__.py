"""Aggregation strategies, one module per algorithm, each citing its paper.

`STRATEGIES` maps the lower-case name used in configuration to the class; `WRAPPERS`
maps a wrapper's configuration name to the wrapper, which wraps any strategy.
"""

from __future__ import annotations

from fedge.strategy.base import RoundContext, Strategy, StrategyWrapper
from fedge.strategy.bulyan import Bulyan
from fedge.strategy.centered_clip import CenteredClip
from fedge.strategy.clip import ClipUpdates
from fedge.strategy.dp import DifferentialPrivacy
from fedge.strategy.fedavg import FedAvg
from fedge.strategy.fedavgm import FedAvgM
from fedge.strategy.fedbuff import FedBuff
from fedge.strategy.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from fedge.strategy.fedprox import FedProx
from fedge.strategy.krum import Krum, MultiKrum
from fedge.strategy.median import FedMedian
from fedge.strategy.trimmed_mean import FedTrimmedAvg

STRATEGIES: dict[str, type[Strategy]] = {
    cls.__name__.lower(): cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        FedTrimmedAvg,
        Krum,
        MultiKrum,
        Bulyan,
        CenteredClip,
        FedBuff,
    )
}
WRAPPERS: dict[str, type[StrategyWrapper]] = {
    "clip_updates": ClipUpdates,
    "differential_privacy": DifferentialPrivacy,
}

__all__ = [
    "STRATEGIES",
    "WRAPPERS",
    "Bulyan",
    "CenteredClip",
    "ClipUpdates",
    "DifferentialPrivacy",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "RoundContext",
    "Strategy",
    "StrategyWrapper",
]
