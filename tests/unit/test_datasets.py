"""fedge.datasets: partitions are exact and reproducible; loaders give what they promise."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from fedge.datasets import (
    by_group,
    dirichlet,
    iid,
    load_digits,
    load_mnist1d,
    shards,
    synthetic,
    train_test_split_devices,
)

Partition = list[NDArray[np.int64]]


def balanced_labels(num_classes: int = 10, per_class: int = 100) -> NDArray[np.int64]:
    """Labels 0..num_classes-1, each `per_class` times, in a shuffled order."""
    y = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(123).permutation(y)


def assert_exact_cover(parts: Partition, num_samples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "indices within a client are sorted and unique"
    joined = np.concatenate(parts)
    assert joined.size == num_samples, "no index is lost or given to two clients"
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))


def same_partition(a: Partition, b: Partition) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def mean_label_entropy(labels: NDArray[np.int64], parts: Partition) -> float:
    """Average over clients of the entropy (nats) of the client's label histogram."""
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part]).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# ---------------------------------------------------------------------------- iid


def test_iid_covers_all_indices_with_near_equal_sizes() -> None:
    parts = iid(1003, 10, seed=0)
    assert len(parts) == 10
    assert_exact_cover(parts, 1003)
    assert sorted(p.size for p in parts) == [100] * 7 + [101] * 3


def test_iid_is_shuffled_not_contiguous() -> None:
    parts = iid(1000, 10, seed=0)
    # A contiguous split would give client 0 exactly 0..99.
    assert not np.array_equal(parts[0], np.arange(100))
    assert parts[0].max() - parts[0].min() > 500


def test_iid_is_deterministic_per_seed() -> None:
    assert same_partition(iid(500, 7, seed=3), iid(500, 7, seed=3))
    assert not same_partition(iid(500, 7, seed=3), iid(500, 7, seed=4))


@settings(max_examples=50, deadline=None)
@given(
    num_samples=st.integers(1, 400),
    num_clients=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_property_exact_cover(num_samples: int, num_clients: int, seed: int) -> None:
    if num_samples < num_clients:
        with pytest.raises(ValueError, match="num_samples >= num_clients"):
            iid(num_samples, num_clients, seed)
        return
    parts = iid(num_samples, num_clients, seed)
    assert len(parts) == num_clients
    assert_exact_cover(parts, num_samples)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------- dirichlet


def test_dirichlet_covers_all_indices_and_respects_min_size() -> None:
    y = balanced_labels()
    parts = dirichlet(y, 20, alpha=0.5, seed=1, min_size=10)
    assert len(parts) == 20
    assert_exact_cover(parts, y.size)
    assert min(p.size for p in parts) >= 10


def test_dirichlet_is_deterministic_per_seed() -> None:
    y = balanced_labels()
    assert same_partition(dirichlet(y, 10, 0.5, 7), dirichlet(y, 10, 0.5, 7))
    assert not same_partition(dirichlet(y, 10, 0.5, 7), dirichlet(y, 10, 0.5, 8))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    y = balanced_labels(num_classes=10, per_class=200)
    skewed = mean_label_entropy(y, dirichlet(y, 10, alpha=0.1, seed=0))
    near_iid = mean_label_entropy(y, dirichlet(y, 10, alpha=100.0, seed=0))
    uniform = float(np.log(10))
    assert near_iid > 0.95 * uniform, "large alpha: every client sees nearly all classes"
    assert skewed < 0.6 * uniform, "small alpha: clients are dominated by few classes"
    assert skewed < near_iid


def test_dirichlet_accepts_non_integer_labels() -> None:
    y = np.array(["cat", "dog", "bird"] * 20)
    parts = dirichlet(y, 3, alpha=1.0, seed=0)
    assert_exact_cover(parts, y.size)


@settings(max_examples=30, deadline=None)
@given(
    num_classes=st.integers(1, 8),
    per_class=st.integers(5, 40),
    num_clients=st.integers(1, 6),
    alpha=st.floats(0.5, 50.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_property_exact_cover(
    num_classes: int, per_class: int, num_clients: int, alpha: float, seed: int
) -> None:
    y = np.repeat(np.arange(num_classes), per_class)
    parts = dirichlet(y, num_clients, alpha, seed, min_size=0)
    assert len(parts) == num_clients
    assert_exact_cover(parts, y.size)


def test_dirichlet_gives_up_with_a_clear_message() -> None:
    # 2 classes, 50 clients, tiny alpha: many clients get nothing in every draw.
    y = np.repeat([0, 1], 100)
    with pytest.raises(ValueError, match=r"min_size=1.*after 5 draws.*increase alpha"):
        dirichlet(y, 50, alpha=0.01, seed=0, max_tries=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"expected alpha > 0 \(finite\), got alpha=0\.0"),
        ({"alpha": -1.0}, r"expected alpha > 0 \(finite\), got alpha=-1\.0"),
        ({"alpha": float("nan")}, r"expected alpha > 0 \(finite\), got alpha=nan"),
        ({"num_clients": 0}, r"expected num_clients >= 1, got num_clients=0"),
        ({"num_clients": 2.5}, r"expected num_clients to be an integer, got 2\.5"),
        ({"min_size": 60}, r"at least min_size \* num_clients = 60 \* 2 = 120 samples, got 100"),
        ({"seed": -1}, r"expected seed >= 0, got seed=-1"),
    ],
)
def test_dirichlet_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "labels": balanced_labels(num_classes=2, per_class=50),
        "num_clients": 2,
        "alpha": 1.0,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dirichlet(**args)  # type: ignore[arg-type]


def test_partitioners_reject_malformed_labels() -> None:
    with pytest.raises(ValueError, match=r"dirichlet: expected labels as a 1-D array, got shape"):
        dirichlet(np.zeros((4, 2)), 2, 1.0, 0)
    with pytest.raises(ValueError, match=r"shards: expected at least one label, got an empty"):
        shards(np.array([], dtype=np.int64), 2)


# ------------------------------------------------------------------------- shards


def test_shards_each_client_sees_at_most_shards_per_client_labels() -> None:
    # 10 classes x 100 samples, 10 clients x 2 shards of 50: shards never straddle.
    y = balanced_labels(num_classes=10, per_class=100)
    parts = shards(y, 10, shards_per_client=2, seed=0)
    assert len(parts) == 10
    assert_exact_cover(parts, y.size)
    labels_seen = [np.unique(y[p]).size for p in parts]
    assert all(n <= 2 for n in labels_seen)
    assert all(p.size == 100 for p in parts)
    # Pathological indeed: far fewer labels per client than an IID split gives.
    assert max(np.unique(y[p]).size for p in iid(y.size, 10, seed=0)) == 10


def test_shards_with_one_shard_per_client_is_single_label() -> None:
    y = balanced_labels(num_classes=5, per_class=40)
    parts = shards(y, 5, shards_per_client=1, seed=2)
    assert sorted(int(np.unique(y[p])[0]) for p in parts) == [0, 1, 2, 3, 4]
    assert all(np.unique(y[p]).size == 1 for p in parts)


def test_shards_is_deterministic_per_seed() -> None:
    y = balanced_labels()
    assert same_partition(shards(y, 10, 2, seed=5), shards(y, 10, 2, seed=5))
    assert not same_partition(shards(y, 10, 2, seed=5), shards(y, 10, 2, seed=6))


def test_shards_covers_all_indices_with_uneven_sizes() -> None:
    y = np.random.default_rng(0).integers(0, 7, size=997)
    parts = shards(y, 13, shards_per_client=3, seed=1)
    assert_exact_cover(parts, 997)


def test_shards_rejects_bad_arguments() -> None:
    y = balanced_labels(num_classes=2, per_class=5)
    with pytest.raises(
        ValueError,
        match=r"num_clients \* shards_per_client = 6 \* 2 = 12 "
        r"samples \(one per shard\), got 10",
    ):
        shards(y, 6, shards_per_client=2)
    with pytest.raises(
        ValueError,
        match=r"expected shards_per_client >= 1, got "
        r"shards_per_client=0",
    ):
        shards(y, 2, shards_per_client=0)
    with pytest.raises(
        ValueError,
        match=r"shards: expected num_clients to be an integer, "
        r"got True",
    ):
        shards(y, True)


# ----------------------------------------------------------------------- by_group


def test_by_group_one_client_per_sorted_group() -> None:
    writers = np.array(["w3", "w1", "w3", "w2", "w1", "w3"])
    parts = by_group(writers)
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2, 5]]  # w1, w2, w3
    assert_exact_cover(parts, writers.size)


def test_by_group_with_integer_ids() -> None:
    groups = np.array([7, 7, 2, 9, 2, 7])
    parts = by_group(groups)
    assert [np.unique(groups[p]).tolist() for p in parts] == [[2], [7], [9]]
    assert [p.size for p in parts] == [2, 3, 1]


def test_by_group_rejects_bad_input() -> None:
    with pytest.raises(
        ValueError,
        match=r"by_group: expected a 1-D array of group ids, "
        r"got shape \(2, 2\)",
    ):
        by_group(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="by_group: expected at least one sample, got an empty"):
        by_group([])


def test_iid_rejects_bad_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=r"num_samples >= num_clients.*got num_samples=5 < "
        r"num_clients=10",
    ):
        iid(5, 10, seed=0)
    with pytest.raises(ValueError, match=r"iid: expected num_clients >= 1, got num_clients=0"):
        iid(5, 0, seed=0)
    with pytest.raises(ValueError, match=r"iid: expected seed to be an integer, got 'x'"):
        iid(5, 1, seed="x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ loaders


def test_load_digits_shapes_dtypes_and_range() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64)
    assert x.dtype == np.float32
    assert y.shape == (1797,)
    assert y.dtype == np.int64
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert sorted(np.unique(y).tolist()) == list(range(10))


def test_load_digits_matches_scikit_learns_loader() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = load_digits()
    reference = sklearn_digits()
    np.testing.assert_array_equal(x * 16, reference.data.astype(np.float32))
    np.testing.assert_array_equal(y, reference.target)


def test_load_mnist1d_default_shapes_and_dtypes() -> None:
    x_train, y_train, x_test, y_test = load_mnist1d()
    assert x_train.shape == (4000, 40)
    assert x_test.shape == (1000, 40)
    assert y_train.shape == (4000,)
    assert y_test.shape == (1000,)
    assert x_train.dtype == np.float32
    assert x_test.dtype == np.float32
    assert y_train.dtype == np.int64
    assert y_test.dtype == np.int64
    assert sorted(np.unique(np.concatenate([y_train, y_test])).tolist()) == list(range(10))


def test_load_mnist1d_is_seeded_and_leaves_global_rngs_alone() -> None:
    np.random.seed(2024)
    random.seed(2024)
    expected_np = np.random.random()
    expected_py = random.random()
    np.random.seed(2024)
    random.seed(2024)

    a = load_mnist1d(num_samples=200, seed=1)
    assert np.random.random() == expected_np, "NumPy's global stream is unchanged"
    assert random.random() == expected_py, "Python's global stream is unchanged"

    b = load_mnist1d(num_samples=200, seed=1)
    c = load_mnist1d(num_samples=200, seed=2)
    assert a[0].shape == (160, 40)
    assert a[2].shape == (40, 40)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


def test_load_mnist1d_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match=r"expected num_samples >= 10 \(one per class\), got 5"):
        load_mnist1d(num_samples=5)


def test_loaders_explain_how_to_install_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import` fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    with pytest.raises(ImportError, match=r"pip install 'fedge\[sklearn\]'"):
        load_digits()
    with pytest.raises(ImportError, match=r"pip install 'fedge\[mnist1d\]'"):
        load_mnist1d()


# ---------------------------------------------------------------------- synthetic


def feature_mean_spread(devices: list[tuple[NDArray[np.float32], NDArray[np.int64]]]) -> float:
    """Std over devices of each device's mean feature value: how far devices drift."""
    return float(np.std([x.mean() for x, _ in devices]))


def label_distance(devices: list[tuple[NDArray[np.float32], NDArray[np.int64]]]) -> float:
    """Mean total-variation distance between each device's label mix and the pooled one."""
    pooled = np.bincount(np.concatenate([y for _, y in devices]), minlength=10)
    pooled = pooled / pooled.sum()
    dists = [0.5 * np.abs(np.bincount(y, minlength=10) / y.size - pooled).sum() for _, y in devices]
    return float(np.mean(dists))


def test_synthetic_shapes_dtypes_and_sizes() -> None:
    devices = synthetic(1.0, 1.0, seed=0)
    assert len(devices) == 30
    for x, y in devices:
        assert x.dtype == np.float32
        assert y.dtype == np.int64
        assert x.ndim == 2
        assert x.shape[1] == 60
        assert y.shape == (x.shape[0],)
        assert x.shape[0] >= 50
        assert y.min() >= 0
        assert y.max() < 10
    all_labels = np.concatenate([y for _, y in devices])
    assert np.unique(all_labels).size >= 5, "labels span several of the 10 classes"
    sizes = [y.size for _, y in devices]
    assert len(set(sizes)) > 10, "device sizes are drawn (lognormal), not constant"


def test_synthetic_respects_custom_dimensions() -> None:
    devices = synthetic(0.5, 0.5, num_devices=4, num_classes=3, dim=7, seed=1)
    assert len(devices) == 4
    assert all(x.shape[1] == 7 for x, _ in devices)
    assert np.concatenate([y for _, y in devices]).max() < 3


def test_synthetic_is_deterministic_per_seed() -> None:
    a = synthetic(1.0, 1.0, seed=3)
    b = synthetic(1.0, 1.0, seed=3)
    c = synthetic(1.0, 1.0, seed=4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0][:50], c[0][0][:50])


def test_synthetic_beta_moves_device_feature_distributions() -> None:
    calm = feature_mean_spread(synthetic(0.0, 0.0, seed=0))
    drifting = feature_mean_spread(synthetic(0.0, 1.0, seed=0))
    wild = feature_mean_spread(synthetic(0.0, 3.0, seed=0))
    # With beta=0 only v_k's 60 independent N(0,1) entries vary: spread ~ 1/sqrt(60).
    assert calm < 0.3
    assert drifting > 3 * calm
    assert wild > 2 * drifting


def test_synthetic_alpha_shifts_all_logits_equally_so_labels_do_not_change() -> None:
    # u_k is added to every entry of W_k and b_k, so every class logit moves by the
    # same u_k * (sum(x) + 1); the argmax is unchanged. This pins the published
    # generator's behaviour: alpha must not silently start altering the data.
    low = synthetic(0.0, 1.0, seed=0)
    high = synthetic(10.0, 1.0, seed=0)
    for (x_low, y_low), (x_high, y_high) in zip(low, high, strict=True):
        np.testing.assert_array_equal(x_low, x_high)
        np.testing.assert_array_equal(y_low, y_high)


def test_synthetic_iid_is_less_heterogeneous_than_non_iid() -> None:
    iid_devices = synthetic(0.0, 0.0, seed=0, iid=True)
    non_iid_devices = synthetic(1.0, 1.0, seed=0)
    assert feature_mean_spread(iid_devices) < 0.05, "same feature distribution everywhere"
    assert label_distance(iid_devices) < 0.2
    assert label_distance(non_iid_devices) > 2 * label_distance(iid_devices)


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=r"synthetic: expected alpha >= 0 \(finite\), "
        r"got alpha=-1\.0",
    ):
        synthetic(-1.0, 0.0)
    with pytest.raises(
        ValueError,
        match=r"synthetic: expected num_classes >= 2, got "
        r"num_classes=1",
    ):
        synthetic(0.0, 0.0, num_classes=1)
    with pytest.raises(
        ValueError,
        match=r"synthetic: expected beta to be a number >= 0, "
        r"got 'high'",
    ):
        synthetic(0.0, "high")  # type: ignore[arg-type]


def test_train_test_split_devices_splits_each_device() -> None:
    devices = synthetic(0.5, 0.5, num_devices=5, seed=2)
    train, test = train_test_split_devices(devices, test_fraction=0.2, seed=0)
    assert len(train) == len(test) == 5
    for (x, y), (x_tr, y_tr), (x_te, y_te) in zip(devices, train, test, strict=True):
        assert x_tr.shape[0] + x_te.shape[0] == x.shape[0]
        assert y_te.size == round(0.2 * y.size)
        # The two parts are disjoint rows of the original, together all of them.
        rows = np.concatenate([x_tr, x_te])
        order = np.lexsort(rows.T)
        np.testing.assert_array_equal(rows[order], x[np.lexsort(x.T)])
        labels = np.concatenate([y_tr, y_te])
        np.testing.assert_array_equal(np.sort(labels), np.sort(y))
    again_train, _ = train_test_split_devices(devices, test_fraction=0.2, seed=0)
    other_train, _ = train_test_split_devices(devices, test_fraction=0.2, seed=1)
    np.testing.assert_array_equal(again_train[0][0], train[0][0])
    assert not np.array_equal(other_train[0][0], train[0][0])


def test_train_test_split_devices_rejects_bad_arguments() -> None:
    devices = synthetic(0.0, 0.0, num_devices=2, seed=0)
    with pytest.raises(ValueError, match=r"expected 0 < test_fraction < 1, got 1\.5"):
        train_test_split_devices(devices, test_fraction=1.5)
    tiny = [(np.zeros((1, 3), dtype=np.float32), np.zeros(1, dtype=np.int64))]
    with pytest.raises(
        ValueError,
        match=r"device 0: expected at least 2 samples to split, "
        r"got 1",
    ):
        train_test_split_devices(tiny)
