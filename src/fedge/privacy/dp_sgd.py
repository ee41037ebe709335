"""Local DP-SGD for the PyTorch adapter: per-sample clipping and Gaussian noise on the
device, with Opacus (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
https://arxiv.org/abs/1607.00133; Yousefpour et al., "Opacus", 2021).

Each fit trains on Poisson-sampled batches (Opacus's `DPDataLoader`); each example's
gradient is clipped to `max_grad_norm` and the summed gradient gets noise of standard
deviation ``noise_multiplier · max_grad_norm``. ε of the fit at `delta` comes from the same
accountant as central DP (`fedge.privacy.accounting`, dp-accounting's RDP): the sampled
Gaussian mechanism at rate ``1 / batches`` for every step taken. It is reported in the
fit's metrics as ``dp_sgd_epsilon``; it covers one round's training, and a client that
trains in R rounds spends the composition of R such fits.

The noise comes from a torch generator seeded by the task's seed, so a fit is
reproducible (as every fedge fit is); it is not a cryptographic generator, which Opacus's
`secure_mode` would need (torchcsprng) for a guarantee against an adversary who can
predict the generator's state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedge.errors import ConfigError
from fedge.privacy import accounting


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        checks = [
            ("noise_multiplier", self.noise_multiplier >= 0, "a number >= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "a number > 0"),
            ("delta", 0 < self.delta < 1, "in (0, 1)"),
        ]
        for key, ok, expected in checks:
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ConfigError(f"dp_sgd.{key} must be {expected}, got {value!r}")
        try:
            import opacus  # noqa: F401
        except ImportError:
            raise ConfigError("local DP-SGD needs Opacus: pip install 'fedge[dp-sgd]'") from None
        accounting.check_installed()

    def attach(
        self, model: Any, optimizer: Any, data: Any, seed: int
    ) -> tuple[Any, Any, Callable[[], None]]:
        """(Poisson-sampled data, a clipping and noising optimizer, cleanup) for one fit;
        `model` stays the caller's (no wrapper, so its state_dict keeps its names)."""
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        if not isinstance(data, DataLoader):
            raise ConfigError(
                f"DP-SGD samples its own batches: train_data must be a torch DataLoader, "
                f"got {type(data).__name__}"
            )
        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():  # the seeded generator is the documented choice
            warnings.filterwarnings("ignore", "Secure RNG turned off")
            hooks, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=data,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                noise_generator=torch.Generator().manual_seed(seed),
                wrap_model=False,
            )
        return loader, optimizer, hooks.cleanup

    def epsilon(self, sample_rate: float, steps: int) -> float:
        """ε of `steps` noisy steps at Poisson `sample_rate`."""
        if steps == 0:
            return 0.0
        return accounting.epsilon(
            self.noise_multiplier, self.delta, "rdp", ((float(sample_rate), int(steps)),)
        )
