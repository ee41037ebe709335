"""Weights on the wire: safetensors bytes that round-trip exactly, and checks that reject
anything a peer could send that does not match the global model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.errors import WeightsError
from fedge.weights import Weights, from_bytes, spec_of, to_bytes, validate

DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
]

# Any text is a tensor name, except the key safetensors reserves for its own metadata.
names = st.text(max_size=12).filter(lambda name: name != "__metadata__")

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)


def assert_bit_identical(got: Weights, expected: Weights) -> None:
    assert list(got) == list(expected), "tensor order must be preserved"
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert have.tobytes() == want.tobytes(), name  # bit-exact: NaN payloads, -0.0, ...


def safetensors_payload(header: dict[str, object], data: bytes = b"") -> bytes:
    """A payload assembled by hand, to send exactly the header a test needs."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def one_tensor_payload(order: str) -> bytes:
    header = {
        "__metadata__": {"fedge.order": order},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    return safetensors_payload(header, np.float32(1.5).tobytes())


# --- round trips -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(names, arrays, max_size=6))
def test_any_weights_round_trip_bit_exactly_and_in_order(weights: Weights) -> None:
    assert_bit_identical(from_bytes(to_bytes(weights)), weights)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_tensors_keep_their_zero_dimensional_shape(dtype: type[np.generic]) -> None:
    # e.g. BatchNorm's num_batches_tracked is a 0-d int64 tensor
    weights = {"scalar": np.array(1, dtype=dtype)}
    decoded = from_bytes(to_bytes(weights))
    assert decoded["scalar"].shape == ()
    assert decoded["scalar"].dtype == dtype


def test_empty_tensors_and_an_empty_model_round_trip() -> None:
    weights = {"none": np.zeros((0,), np.float32), "rows": np.zeros((0, 3), np.int64)}
    assert_bit_identical(from_bytes(to_bytes(weights)), weights)
    assert from_bytes(to_bytes({})) == {}


def test_order_is_the_insertion_order_not_the_alphabetical_one() -> None:
    weights = {name: np.arange(3, dtype=np.float32) for name in ["z", "a", "m", "b"]}
    assert list(from_bytes(to_bytes(weights))) == ["z", "a", "m", "b"]


def test_unicode_names_round_trip() -> None:
    weights = {"poids.é": np.ones(2, np.float32), "层.权重": np.zeros(1, np.int8), "": np.ones(1)}
    assert_bit_identical(from_bytes(to_bytes(weights)), weights)


def test_non_contiguous_arrays_are_written_as_their_values() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    weights = {"transposed": base.T, "strided": base[:, ::2]}
    decoded = from_bytes(to_bytes(weights))
    np.testing.assert_array_equal(decoded["transposed"], base.T)
    np.testing.assert_array_equal(decoded["strided"], base[:, ::2])


def test_decoding_accepts_bytearray_and_memoryview() -> None:
    weights = {"w": np.arange(4, dtype=np.float32)}
    data = to_bytes(weights)
    assert_bit_identical(from_bytes(bytearray(data)), weights)
    assert_bit_identical(from_bytes(memoryview(data)), weights)


def test_a_payload_without_fedge_metadata_decodes_in_name_order() -> None:
    # safetensors files written by other tools carry no order; names are sorted then
    header = {
        "b": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
        "a": {"dtype": "I8", "shape": [1], "data_offsets": [1, 2]},
    }
    decoded = from_bytes(safetensors_payload(header, b"\x02\x01"))
    assert list(decoded) == ["a", "b"]
    assert decoded["a"].tolist() == [1]
    assert decoded["b"].tolist() == [2]


# --- malformed payloads ------------------------------------------------------------------


def test_every_truncation_of_a_payload_is_rejected() -> None:
    data = to_bytes({"w": np.arange(6, dtype=np.float32), "b": np.ones(2, np.int64)})
    for length in range(len(data)):
        with pytest.raises(WeightsError, match="not a valid safetensors payload"):
            from_bytes(data[:length])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="shorter-than-the-length-prefix"),
        pytest.param(b"\x00" * 8, id="zero-length-header"),
        pytest.param((12).to_bytes(8, "little") + b"not json at!", id="header-not-json"),
        pytest.param((1000).to_bytes(8, "little") + b"{}", id="header-length-past-the-end"),
        pytest.param(b"\xff" * 8 + b"{}", id="absurd-header-length"),
        pytest.param(
            safetensors_payload({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
            id="tensor-data-missing",
        ),
        pytest.param(
            safetensors_payload(
                {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\x00" * 8
            ),
            id="data-size-disagrees-with-shape",
        ),
        pytest.param(
            safetensors_payload(
                {"a": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4
            ),
            id="unknown-dtype",
        ),
    ],
)
def test_malformed_payloads_are_rejected_with_the_source_named(data: bytes) -> None:
    with pytest.raises(WeightsError, match=r"^client 4: not a valid safetensors payload"):
        from_bytes(data, source="client 4")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_escape_as_anything_but_weights_error(data: bytes) -> None:
    try:
        decoded = from_bytes(data)
    except WeightsError:
        return
    assert isinstance(decoded, dict)  # the rare valid payload (e.g. an empty model) decodes


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ("[not json", "metadata 'fedge.order' is not JSON"),
        ('{"a": 1}', "metadata 'fedge.order' must be a list of tensor names"),
        ("[1]", "metadata 'fedge.order' must be a list of tensor names"),
        ('["a", "b"]', r"metadata names \['a', 'b'\] do not match tensors \['a'\]"),
        ("[]", r"metadata names \[\] do not match tensors \['a'\]"),
        ('["a", "a"]', r"metadata names \['a', 'a'\] do not match tensors \['a'\]"),
    ],
)
def test_bad_order_metadata_is_rejected(order: str, message: str) -> None:
    with pytest.raises(WeightsError, match=f"^client 2: {message}"):
        from_bytes(one_tensor_payload(order), source="client 2")


def test_well_formed_order_metadata_written_by_hand_is_accepted() -> None:
    decoded = from_bytes(one_tensor_payload('["a"]'))
    assert decoded["a"].tolist() == [1.5]


# --- validation against the global model -------------------------------------------------


GLOBAL = {
    "layer.weight": np.zeros((2, 3), np.float32),
    "layer.bias": np.zeros(3, np.float32),
    "steps": np.array(0, np.int64),
}
SPEC = spec_of(GLOBAL)


def update(**changes: object) -> dict[str, object]:
    weights: dict[str, object] = {name: a.copy() for name, a in GLOBAL.items()}
    for name, value in changes.items():
        weights[name.replace("__", ".")] = value
    return weights


def test_spec_of_records_dtype_and_shape_of_every_tensor() -> None:
    assert list(SPEC) == ["layer.weight", "layer.bias", "steps"]
    assert SPEC["layer.weight"].dtype == np.float32
    assert SPEC["layer.weight"].shape == (2, 3)
    assert SPEC["steps"].shape == ()
    assert str(SPEC["layer.weight"]) == "float32[2, 3]"


def test_a_matching_finite_update_is_accepted_in_any_order() -> None:
    validate(update(), SPEC, source="client 1")
    validate(dict(reversed(update().items())), SPEC, source="client 1")


def test_a_matching_update_survives_the_wire_and_validates() -> None:
    validate(from_bytes(to_bytes(GLOBAL), source="client 1"), SPEC, source="client 1")


def test_missing_tensor_is_rejected() -> None:
    weights = update()
    del weights["layer.bias"]
    with pytest.raises(WeightsError) as raised:
        validate(weights, SPEC, source="client 3")
    assert str(raised.value) == (
        "client 3: missing tensor(s) ['layer.bias']; "
        "expected ['layer.weight', 'layer.bias', 'steps']"
    )


def test_unexpected_tensor_is_rejected() -> None:
    with pytest.raises(WeightsError) as raised:
        validate(update(extra=np.zeros(1, np.float32)), SPEC, source="client 3")
    assert str(raised.value) == (
        "client 3: unexpected tensor(s) ['extra']; expected ['layer.weight', 'layer.bias', 'steps']"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"layer__weight": np.zeros((2, 3), np.float64)},
            "client 3: tensor 'layer.weight' has dtype float64, expected float32",
        ),
        (
            {"steps": np.array(0, np.int32)},
            "client 3: tensor 'steps' has dtype int32, expected int64",
        ),
        (
            {"layer__weight": np.zeros((3, 2), np.float32)},
            "client 3: tensor 'layer.weight' has shape [3, 2], expected [2, 3]",
        ),
        (
            {"steps": np.zeros(1, np.int64)},
            "client 3: tensor 'steps' has shape [1], expected []",
        ),
        (
            {"layer__bias": np.array([0.0, np.nan, 1.0], np.float32)},
            "client 3: tensor 'layer.bias' has 1 NaN or Inf value(s)",
        ),
        (
            {"layer__weight": np.array([[np.inf, 0, -np.inf], [0, np.nan, 0]], np.float32)},
            "client 3: tensor 'layer.weight' has 3 NaN or Inf value(s)",
        ),
        (
            {"layer__bias": [0.0, 0.0, 0.0]},
            "client 3: tensor 'layer.bias' is a list, expected a numpy array",
        ),
        (
            {"steps": 0},
            "client 3: tensor 'steps' is a int, expected a numpy array",
        ),
    ],
    ids=[
        "wrong-float-dtype",
        "wrong-int-dtype",
        "wrong-shape",
        "scalar-sent-as-vector",
        "nan",
        "inf",
        "list",
        "python-int",
    ],
)
def test_mismatching_tensor_is_rejected_naming_source_and_tensor(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(WeightsError) as raised:
        validate(update(**changes), SPEC, source="client 3")
    assert str(raised.value) == message


def test_nan_in_float16_is_caught_too() -> None:
    spec = spec_of({"h": np.zeros(2, np.float16)})
    with pytest.raises(WeightsError, match="'h' has 1 NaN or Inf"):
        validate({"h": np.array([1.0, np.nan], np.float16)}, spec, source="client 0")


# --- view_bytes: zero-copy decoding of received payloads ---------------------------------


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(names, arrays, max_size=5))
def test_views_decode_exactly_what_the_library_decodes(weights: Weights) -> None:
    from fedge.weights import view_bytes

    data = to_bytes(weights)
    viewed = view_bytes(data, source="node 3")
    assert_bit_identical(viewed, from_bytes(data))
    for array in viewed.values():
        assert not array.flags.writeable  # an update is read, never written


F32 = np.float32(1.0).tobytes()


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        (
            {"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}},
            F32,
            "invalid header entry",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            F32,
            "invalid header entry",
        ),
        (
            {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            F32,
            "invalid header entry",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, F32, "invalid header entry"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, F32, "needs 8"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            F32,
            "does not start where the last ended",  # overlapping tensors
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32 * 2, "does not start"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, F32 * 2, "holds 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, F32, "holds 4"),
        ([1, 2], b"", "header is not an object"),
    ],
)
def test_views_refuse_a_forged_header_precisely(header: object, data: bytes, fragment: str) -> None:
    from fedge.weights import view_bytes

    payload = safetensors_payload(header, data)  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="node 3") as info:
        view_bytes(payload, source="node 3")
    assert fragment in str(info.value)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, (10**9).to_bytes(8, "little") + b"{}"])
def test_views_refuse_a_header_length_out_of_bounds(payload: bytes) -> None:
    from fedge.weights import view_bytes

    with pytest.raises(WeightsError, match="not a valid safetensors payload"):
        view_bytes(payload, source="node 3")


def test_hostile_metadata_is_a_weights_error_not_a_crash(tmp_path: Path) -> None:
    from safetensors.numpy import save

    from fedge.weights import FileWeights, view_bytes

    arrays = {"a": np.zeros(3, np.float32)}
    nested = save(arrays, metadata={"fedge.order": "[" * 5000 + "]" * 5000})
    with pytest.raises(WeightsError, match="nested too deeply"):
        view_bytes(nested)
    (tmp_path / "n.safetensors").write_bytes(nested)
    with pytest.raises(WeightsError, match="nested too deeply"):
        FileWeights(tmp_path / "n.safetensors")
    header = b'{"__metadata__":[1],"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    with pytest.raises(WeightsError, match="__metadata__ must be an object"):
        view_bytes(len(header).to_bytes(8, "little") + header)


def test_an_error_about_many_tensors_names_a_few_and_counts_the_rest() -> None:
    spec = spec_of({"w": np.zeros(2, np.float32)})
    flood = {
        "w": np.zeros(2, np.float32),
        **{f"t{i}": np.zeros(0, np.float32) for i in range(10**4)},
    }
    with pytest.raises(WeightsError) as err:
        validate(flood, spec, source="upload")
    assert "and 9995 more" in str(err.value) and len(str(err.value)) < 300
