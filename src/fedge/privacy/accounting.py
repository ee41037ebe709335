"""Privacy accounting: the ε a run has spent, from Google's `dp-accounting`.

Each round of central DP-FedAvg is a sampled Gaussian mechanism: the clients sampled with
rate ``q = selected / population``, noise multiplier ``z``. Rounds compose; ε at a chosen
δ comes from the RDP accountant (Mironov 2017; the one DP-FedAvg and TFF report) or the
tighter privacy-loss-distribution accountant (PLD). Consecutive rounds with the same rate
form one self-composed event, so a run of 100 rounds at q = 0.1 is accounted exactly as
dp-accounting accounts ``SelfComposedDpEvent(PoissonSampledDpEvent(0.1, ...), 100)``.

Sampling is analysed as Poisson sampling, as in DP-FedAvg: fedge samples a fixed number
of clients without replacement, for which dp-accounting's RDP accountant has no bound;
`docs/architecture.md` says what that means.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Literal

from fedge.errors import ConfigError

Kind = Literal["rdp", "pld"]
KINDS: tuple[Kind, ...] = ("rdp", "pld")


def runs(rates: Sequence[float]) -> tuple[tuple[float, int], ...]:
    """Consecutive equal sampling rates as (rate, rounds) pairs."""
    return tuple((rate, len(list(group))) for rate, group in itertools.groupby(rates))


@functools.lru_cache(maxsize=64)
def epsilon(
    noise_multiplier: float, delta: float, kind: Kind, rounds: tuple[tuple[float, int], ...]
) -> float:
    """ε at `delta` after `rounds` ((sampling rate, count) runs) of the sampled Gaussian
    mechanism with `noise_multiplier`; 0 before any round, inf without noise."""
    if not rounds:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting import pld, rdp

    # the RDP accountant logs a warning for each fractional order it cannot evaluate
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    for rate, count in rounds:
        event = dp_accounting.PoissonSampledDpEvent(rate, gaussian)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return float(accountant.get_epsilon(delta))


def check_installed() -> None:
    """A precise error at configuration time, not after the first round."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ConfigError(
            "differential privacy needs Google's dp-accounting: pip install 'fedge[privacy]'"
        ) from None
