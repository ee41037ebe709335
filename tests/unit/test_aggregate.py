"""Accumulators: the streaming WeightedMean must equal the textbook weighted mean."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.aggregate import Buffered, WeightedMean, stacked
from fedge.weights import CheckedWeights, Weights, spec_of, validate

COUNTS = [1, 7, 3, 12]


def random_updates(dtype: type[np.generic], rng: np.random.Generator) -> list[Weights]:
    # "big" spans three scratch blocks of 65536 elements (the last one partial)
    shapes = {"big": (300, 500), "bias": (7,), "scalar_row": (1,)}
    return [
        {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
        for _ in COUNTS
    ]


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_weighted_mean_matches_np_average(dtype: type[np.generic], rtol: float) -> None:
    updates = random_updates(dtype, np.random.default_rng(1))
    agg = WeightedMean()
    for weights, n in zip(updates, COUNTS, strict=True):
        agg.add(weights, n)
    out = agg.result()
    assert list(out) == list(updates[0])
    for name in updates[0]:
        expected = np.average(
            np.stack([u[name] for u in updates]).astype(np.float64), axis=0, weights=COUNTS
        )
        assert out[name].dtype == dtype
        assert out[name].shape == updates[0][name].shape
        np.testing.assert_allclose(out[name], expected, rtol=rtol, atol=rtol)
    assert agg.count == 4
    assert agg.total_examples == sum(COUNTS)


def test_weighted_mean_does_not_modify_updates() -> None:
    updates = random_updates(np.float32, np.random.default_rng(2))
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    agg = WeightedMean()
    for weights, n in zip(updates, COUNTS, strict=True):
        agg.add(weights, n)
    agg.result()
    for u, c in zip(updates, copies, strict=True):
        for name in u:
            np.testing.assert_array_equal(u[name], c[name])


def test_integer_tensors_average_in_float_and_round_back() -> None:
    agg = WeightedMean()
    agg.add({"n": np.array([1, 2], dtype=np.int64)}, 1)
    agg.add({"n": np.array([3, 4], dtype=np.int64)}, 2)
    out = agg.result()
    # (1*1 + 2*3) / 3 = 2.33 -> 2; (1*2 + 2*4) / 3 = 3.33 -> 3
    np.testing.assert_array_equal(out["n"], [2, 3])
    assert out["n"].dtype == np.int64


def test_large_integer_tensor_matches_rounded_np_average() -> None:
    rng = np.random.default_rng(3)
    updates = [rng.integers(0, 1000, size=70_000, dtype=np.int32) for _ in COUNTS]
    agg = WeightedMean()
    for a, n in zip(updates, COUNTS, strict=True):
        agg.add({"n": a}, n)
    out = agg.result()["n"]
    expected = np.rint(np.average(np.stack(updates), axis=0, weights=COUNTS))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected.astype(np.int32))


def test_unweighted_mean_ignores_example_counts() -> None:
    agg = WeightedMean(weighted=False)
    agg.add({"w": np.array([0.0, 4.0])}, 1)
    agg.add({"w": np.array([2.0, 8.0])}, 1000)
    np.testing.assert_array_equal(agg.result()["w"], [1.0, 6.0])  # plain (a + b) / 2


def test_weighted_mean_of_scalar_tensors() -> None:
    agg = WeightedMean()
    agg.add({"t": np.array(1.0, dtype=np.float32)}, 1)
    agg.add({"t": np.array(3.0, dtype=np.float32)}, 1)
    out = agg.result()["t"]
    assert isinstance(out, np.ndarray)
    assert float(out) == 2.0


def test_weighted_mean_errors_without_weight() -> None:
    with pytest.raises(ValueError, match="no updates with a positive weight"):
        WeightedMean().result()
    with pytest.raises(ValueError, match="num_examples must be positive, got 0"):
        WeightedMean().add({"w": np.array([1.0])}, 0)


def test_buffered_hands_all_updates_to_reduce_in_order() -> None:
    seen: list[list[tuple[Weights, int]]] = []

    def reduce(updates: list[tuple[Weights, int]]) -> Weights:
        seen.append(updates)
        return {"w": stacked(updates, "w").max(axis=0)}

    agg = Buffered(reduce)
    agg.add({"w": np.array([1.0, 5.0])}, 2)
    agg.add({"w": np.array([4.0, 0.0])}, 3)
    np.testing.assert_array_equal(agg.result()["w"], [4.0, 5.0])
    assert [n for _, n in seen[0]] == [2, 3]
    assert agg.total_examples == 5
    with pytest.raises(ValueError, match="no updates were aggregated"):
        agg.result()  # the buffer is emptied by result()


def test_stacked_adds_a_leading_axis() -> None:
    updates = [({"w": np.full((2, 3), float(i))}, 1) for i in range(4)]
    s = stacked(updates, "w")
    assert s.shape == (4, 2, 3)
    np.testing.assert_array_equal(s[:, 0, 0], [0.0, 1.0, 2.0, 3.0])


# --- precision and overflow --------------------------------------------------------------


def test_float16_ones_from_3000_clients_average_to_exactly_one() -> None:
    # A float16 sum stops growing at 2048 (2048 + 1 rounds back to 2048): accumulated in
    # float16 the mean would be 2048 / 3000 = 0.68.
    agg = WeightedMean()
    ones = {"w": np.ones(5, dtype=np.float16)}
    for cid in range(3000):
        agg.add(ones, 1, cid)
    out = agg.result()["w"]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.ones(5, dtype=np.float16))


def test_float16_sum_above_its_range_does_not_overflow() -> None:
    # 200 * 1000 = 200,000 > float16's largest finite value, 65,504.
    agg = WeightedMean()
    update = {"w": np.full(4, 1000.0, dtype=np.float16)}
    for cid in range(200):
        agg.add(update, 3, cid)
    out = agg.result()["w"]
    assert out.dtype == np.float16
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.full(4, 1000.0, dtype=np.float16))


@pytest.mark.parametrize("checked", [False, True], ids=["measured", "validated"])
def test_float32_updates_near_the_top_of_the_range_average_without_overflow(
    checked: bool,
) -> None:
    # finite float32 values near 3e38 (max 3.4e38): any weighted sum of two overflows
    values = [3.0e38, 2.9e38, 3.3e38, -1.0e38, 3.2e38, 3.4e38]
    counts = [1, 2, 3, 4, 5, 6]
    spec = spec_of({"w": np.zeros(3, np.float32), "b": np.zeros((), np.float32)})
    agg = WeightedMean()
    for cid, (value, n) in enumerate(zip(values, counts, strict=True)):
        update = {"w": np.full(3, value, np.float32), "b": np.array(value / 2, np.float32)}
        if checked:  # as the coordinator folds: validate measured the magnitude already
            update = CheckedWeights(update)
            validate(update, spec, source=f"client {cid}")
        agg.add(update, n, cid)
    out = agg.result()
    expected = np.average(np.float64(values), weights=counts)  # 2.25e38
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32
    assert np.isfinite(out["w"]).all() and np.isfinite(out["b"])
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["b"], expected / 2, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.uint8])
def test_the_mean_has_the_dtype_of_the_updates(dtype: type[np.generic]) -> None:
    agg = WeightedMean()
    agg.add({"w": np.array([2, 4], dtype=dtype)}, 1)
    agg.add({"w": np.array([4, 8], dtype=dtype)}, 1)
    out = agg.result()["w"]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.array([3, 6], dtype=dtype))
