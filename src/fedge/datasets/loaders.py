"""Benchmark data that works offline: bundled with a package or generated.

Edge fleets and CI machines often have no internet, so nothing here downloads:

* ``load_digits`` — the 8x8 handwritten digits bundled with scikit-learn (UCI
  "Optical Recognition of Handwritten Digits"); small enough for unit tests.
* ``load_mnist1d`` — MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020),
  generated procedurally by the ``mnist1d`` package; hard enough to separate models.
* ``synthetic`` — Synthetic(α, β) of FedProx (Li et al., "Federated Optimization in
  Heterogeneous Networks", MLSys 2020, after Shamir et al. 2014), whose knobs set how
  different devices' data are.
"""

from __future__ import annotations

import importlib.util
import numbers
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.datasets.partition import check_int

__all__ = [
    "Device",
    "load_digits",
    "load_mnist1d",
    "synthetic",
    "train_test_split_devices",
]

Features = NDArray[np.float32]
Labels = NDArray[np.int64]
Device = tuple[Features, Labels]
"""One device's data: features ``x`` (float32, [n, dim]) and labels ``y`` (int64, [n])."""


def load_digits() -> tuple[Features, Labels]:
    """scikit-learn's bundled 8x8 digits: ``X`` float32 [1797, 64] in [0, 1], ``y`` int64.

    Pixels are 0..16 in the source; dividing by 16 puts them on the unit scale that
    gradient-based models expect. The bundled CSV is read directly: importing
    scikit-learn would cost a second of start-up for a 300 KB file.
    """
    try:
        spec = importlib.util.find_spec("sklearn")
    except ValueError:  # sys.modules["sklearn"] is None: treated as not installed
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(
            "fedge.datasets.load_digits needs scikit-learn, which is not installed: "
            "run `pip install 'fedge[sklearn]'`"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 5x faster to parse than floats
    x = data[:, :-1].astype(np.float32) / np.float32(16.0)
    y = data[:, -1].astype(np.int64)
    return x, y


def load_mnist1d(
    num_samples: int = 5000, seed: int = 42
) -> tuple[Features, Labels, Features, Labels]:
    """Generate MNIST-1D: ``(x_train, y_train, x_test, y_test)``, 40 features, 10 classes.

    Uses ``mnist1d.data.make_dataset`` (generation only, never the download path) with
    the package's default arguments, so ``seed=42`` and ``num_samples=5000`` reproduce
    the published dataset: 4000 training and 1000 test samples. ``num_samples`` is
    rounded down to a multiple of 10 (equal samples per class) and split 80/20.

    ``mnist1d`` seeds Python's and NumPy's *global* generators; their states are saved
    and restored so that calling this does not change anyone else's random stream.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ValueError(
            f"load_mnist1d: expected num_samples to be an integer, got {num_samples!r}"
        )
    if num_samples < 10:
        raise ValueError(
            f"load_mnist1d: expected num_samples >= 10 (one per class), got {num_samples}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"load_mnist1d: expected seed to be an integer >= 0, got {seed!r}")
    try:
        from mnist1d import data as mnist1d_data
    except ImportError as exc:
        raise ImportError(
            "fedge.datasets.load_mnist1d needs the mnist1d package, which could not be "
            f"imported ({exc}): run `pip install 'fedge[mnist1d]'`"
        ) from exc

    args: Any = mnist1d_data.get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        ds: Any = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return (
        np.ascontiguousarray(ds["x"], dtype=np.float32),
        np.asarray(ds["y"], dtype=np.int64),
        np.ascontiguousarray(ds["x_test"], dtype=np.float32),
        np.asarray(ds["y_test"], dtype=np.int64),
    )


def synthetic(
    alpha: float,
    beta: float,
    num_devices: int = 30,
    num_classes: int = 10,
    dim: int = 60,
    seed: int = 0,
    iid: bool = False,
) -> list[Device]:
    """FedProx's Synthetic(α, β): one ``(x, y)`` per device, with tunable heterogeneity.

    Following Li et al. (MLSys 2020, §5.1) and the generator the authors released, for
    each device k::

        u_k ~ N(0, α),  W_k ~ N(u_k, 1) [dim x classes],  b_k ~ N(u_k, 1) [classes]
        B_k ~ N(0, β),  v_k[j] ~ N(B_k, 1),  Σ = diag(j^-1.2), j = 1..dim
        x ~ N(v_k, Σ),  y = argmax(softmax(x W_k + b_k))
        n_k = int(lognormal(4, 2)) + 50

    As in the authors' code, α and β are passed to the normal draws as the *scale*
    (standard deviation). β moves each device's feature distribution (covariate shift)
    and thereby its label mix. α shifts every entry of W_k and b_k by the same u_k,
    which adds the same amount to every class's logit, so the argmax — the labels — do
    not depend on α at all; this is a property of the published generator, kept so that
    results stay comparable with the paper.

    ``iid=True`` is the paper's Synthetic-IID: one W, b ~ N(0, 1) shared by all devices
    and v_k = 0 for every device; ``alpha`` and ``beta`` are then ignored. Sizes are
    drawn the same way. All randomness comes from ``numpy.random.default_rng(seed)``.
    """
    alpha = _check_scale("alpha", alpha)
    beta = _check_scale("beta", beta)
    num_devices = check_int("synthetic", "num_devices", num_devices, minimum=1)
    num_classes = check_int("synthetic", "num_classes", num_classes, minimum=2)
    dim = check_int("synthetic", "dim", dim, minimum=1)
    seed = check_int("synthetic", "seed", seed, minimum=0)

    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    if iid:
        model_means = np.zeros(num_devices)
        feature_means = np.zeros((num_devices, dim))
        shared_w = rng.normal(0.0, 1.0, (dim, num_classes))
        shared_b = rng.normal(0.0, 1.0, num_classes)
    else:
        model_means = rng.normal(0.0, alpha, num_devices)
        device_shift = rng.normal(0.0, beta, num_devices)
        feature_means = rng.normal(device_shift[:, None], 1.0, (num_devices, dim))

    devices: list[Device] = []
    for k in range(num_devices):
        if iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(model_means[k], 1.0, (dim, num_classes))
            b = rng.normal(model_means[k], 1.0, num_classes)
        n = int(sizes[k])
        x = feature_means[k] + rng.standard_normal((n, dim)) * std_x
        # softmax is monotone, so its argmax is the argmax of the logits.
        y = np.argmax(x @ w + b, axis=1)
        devices.append((x.astype(np.float32), y.astype(np.int64)))
    return devices


def train_test_split_devices(
    devices: Sequence[Device], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Device], list[Device]]:
    """Split each device's data into its own train and test part (``train, test`` lists).

    Federated evaluation tests every device on its own distribution, so the split is
    made per device, not over the pooled data. Each device keeps at least one training
    and one test sample (it must hold at least two).
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(
            f"train_test_split_devices: expected test_fraction to be a number, "
            f"got {test_fraction!r}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"train_test_split_devices: expected 0 < test_fraction < 1, got {test_fraction}"
        )
    seed = check_int("train_test_split_devices", "seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    train: list[Device] = []
    test: list[Device] = []
    for k, (x, y) in enumerate(devices):
        n = len(y)
        if len(x) != n:
            raise ValueError(
                f"train_test_split_devices: device {k}: expected as many rows in x as "
                f"labels in y, got {len(x)} and {n}"
            )
        if n < 2:
            raise ValueError(
                f"train_test_split_devices: device {k}: expected at least 2 samples to "
                f"split, got {n}"
            )
        n_test = min(max(round(n * float(test_fraction)), 1), n - 1)
        order = rng.permutation(n)
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        train.append((x[train_idx], y[train_idx]))
        test.append((x[test_idx], y[test_idx]))
    return train, test


def _check_scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"synthetic: expected {name} to be a number >= 0, got {value!r}")
    number = float(value)
    if not (np.isfinite(number) and number >= 0):
        raise ValueError(f"synthetic: expected {name} >= 0 (finite), got {name}={number}")
    return number
