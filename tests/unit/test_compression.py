"""Update compression: each encoding round-trips, q8 is unbiased and seeded, topk keeps
what it does not send, auto follows the uplink, and every malformed encoded payload is
refused with a message that says what was expected."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge import rice
from fedge.client import Client, Config, FitResult
from fedge.compression import (
    CompressClient,
    Compressor,
    PackedFile,
    Throughput,
    check,
    check_size,
    choose,
    decode,
    encoded_bytes,
    layout,
    max_entries,
    pack,
    pack_to,
    unpack,
)
from fedge.config import CompressionSection, parse_config
from fedge.errors import ConfigError, WeightsError
from fedge.sim import simulate
from fedge.weights import TensorSpec, Weights, spec_of, to_bytes

RNG = np.random.default_rng(0)
BASE: Weights = {
    "conv": RNG.normal(size=(4, 3, 5)).astype(np.float32),
    "steps": np.array(7, dtype=np.int64),
    "head": RNG.normal(size=(60, 10)).astype(np.float32),
    "bias": RNG.normal(size=10).astype(np.float64),
}
SPEC = spec_of(BASE)
UPDATE: Weights = {
    "conv": RNG.normal(scale=0.1, size=(4, 3, 5)).astype(np.float32),
    "steps": np.array(8, dtype=np.int64),
    "head": RNG.normal(scale=0.01, size=(60, 10)).astype(np.float32),
    "bias": RNG.normal(scale=1.0, size=10),
}
TRAINED: Weights = {
    name: (base + UPDATE[name]).astype(base.dtype) if base.dtype.kind == "f" else UPDATE[name]
    for name, base in BASE.items()
}


def settings(mode: str, **options: Any) -> CompressionSection:
    return CompressionSection(mode=mode, **options)  # type: ignore[arg-type]


def encode(mode: str, seed: int = 3, **options: Any) -> FitResult:
    result = FitResult({k: v.copy() for k, v in TRAINED.items()}, 10, {"loss": 0.5})
    return Compressor(settings(mode, **options)).compress(BASE, result, {"seed": seed})


def floats_delta(weights: Weights) -> dict[str, np.ndarray]:
    return {n: np.subtract(weights[n], BASE[n], dtype=np.float64) for n in BASE if n != "steps"}


TRUE = floats_delta(TRAINED)
"""The update as the client made it (UPDATE, rounded where it was added in float32)."""


# --- round trips -------------------------------------------------------------------------


def test_fp16_sends_each_update_in_float16_and_decodes_close_to_the_trained_weights() -> None:
    encoded = encode("fp16")
    assert encoded.encoding == "fp16" and (encoded.num_examples, encoded.metrics) == (
        10,
        {"loss": 0.5},
    )
    assert {n: a.dtype for n, a in encoded.weights.items()} == {
        "conv": np.float16, "steps": np.int64, "head": np.float16, "bias": np.float16,
    }  # fmt: skip
    decoded = decode(encoded.weights, "fp16", BASE, SPEC)
    assert spec_of(decoded) == SPEC and decoded["steps"] == 8
    for name, delta in floats_delta(decoded).items():
        np.testing.assert_allclose(delta, UPDATE[name], rtol=1e-3, atol=1e-6)


def test_q8_packs_every_float_tensor_into_one_byte_per_entry() -> None:
    encoded = encode("q8")
    assert sorted(encoded.weights) == ["q8.ranges", "q8.values", "steps"]
    assert encoded.weights["q8.values"].dtype == np.uint8
    assert encoded.weights["q8.values"].shape == (60 + 600 + 10,)
    assert encoded.weights["q8.ranges"].shape == (3, 2)
    decoded = decode(encoded.weights, "q8", BASE, SPEC)
    for (name, delta), (low, step) in zip(
        floats_delta(decoded).items(), encoded.weights["q8.ranges"], strict=True
    ):  # every entry is within one step of the truth, and the range covers the update
        assert low <= TRUE[name].min() and TRUE[name].max() <= low + 255 * float(step)
        assert np.max(np.abs(delta - TRUE[name])) <= float(step) * (1 + 1e-5)
    payload = pack(encoded.weights)  # the arrays end to end: no header on the wire
    assert len(payload) == 3 * 8 + 670 + 8 == encoded_bytes(SPEC, "q8")
    assert len(to_bytes(TRAINED)) / len(payload) > 3.9  # 4 bytes (8 for the bias) -> 1


def test_q8_rounding_is_seeded_by_the_task_so_every_fleet_sends_the_same_bytes() -> None:
    assert to_bytes(encode("q8", seed=5).weights) == to_bytes(encode("q8", seed=5).weights)
    assert to_bytes(encode("q8", seed=5).weights) != to_bytes(encode("q8", seed=6).weights)


def test_q8_is_unbiased_the_mean_over_many_seeds_is_the_true_update() -> None:
    decoded = [
        floats_delta(decode(encode("q8", seed=s).weights, "q8", BASE, SPEC)) for s in range(400)
    ]
    for name in ("conv", "head", "bias"):
        mean = np.mean([d[name] for d in decoded], axis=0)
        step = (TRUE[name].max() - TRUE[name].min()) / 255
        # one draw errs by up to a step; the mean of 400 by ~ step / (2 sqrt(400)) = step/40
        assert np.max(np.abs(mean - TRUE[name])) < step / 8, name
        single = decoded[0][name]
        assert np.max(np.abs(single - TRUE[name])) > step / 8  # a single draw is noisy


def test_q8_of_a_constant_update_is_exact() -> None:
    base = {"w": np.zeros(5, np.float32)}
    result = FitResult({"w": np.full(5, 0.25, np.float32)}, 1)
    encoded = Compressor(settings("q8")).compress(base, result, {"seed": 0})
    np.testing.assert_array_equal(encoded.weights["q8.ranges"], [[0.25, 1.0]])
    np.testing.assert_array_equal(decode(encoded.weights, "q8", base, spec_of(base))["w"], 0.25)


def test_topk_keeps_the_largest_entries_of_each_tensor_and_at_least_one() -> None:
    encoded = encode("topk", topk_fraction=0.05)
    index, values = encoded.weights["topk.indices"], encoded.weights["topk.values"]
    assert (index.dtype, values.dtype) == (np.uint16, np.float32)  # 670 entries: 16 bits
    assert len(index) == max_entries(60, 0.05) + max_entries(600, 0.05) + max_entries(10, 0.05)
    assert len(index) == 3 + 30 + 1 and np.all(np.diff(index.astype(np.int64)) > 0)
    decoded = floats_delta(decode(encoded.weights, "topk", BASE, SPEC))
    for name, k in (("conv", 3), ("head", 30), ("bias", 1)):
        sent = np.flatnonzero(np.abs(decoded[name]) > 1e-6)  # base + update - base, in float32
        largest = np.argsort(-np.abs(UPDATE[name].ravel()))[:k]
        assert sorted(sent) == sorted(largest), name


def test_topk_with_every_entry_is_lossless_in_float32() -> None:
    decoded = decode(encode("topk", topk_fraction=1.0).weights, "topk", BASE, SPEC)
    for name in ("conv", "head"):
        np.testing.assert_array_equal(decoded[name], TRAINED[name])


def test_topk_error_feedback_sends_what_it_held_back_later() -> None:
    """Over rounds, what was sent plus what is held equals the sum of the true updates."""
    compressor = Compressor(settings("topk", topk_fraction=0.02))
    sent = {n: np.zeros(BASE[n].shape) for n in ("conv", "head", "bias")}
    total = {n: np.zeros(BASE[n].shape) for n in sent}
    rng = np.random.default_rng(1)
    for round in range(1, 6):
        trained = {n: (a + rng.normal(size=a.shape)).astype(a.dtype) for n, a in BASE.items()}
        trained["steps"] = BASE["steps"]
        result = compressor.compress(BASE, FitResult(trained, 1), {"seed": round})
        for name, delta in floats_delta(decode(result.weights, "topk", BASE, SPEC)).items():
            sent[name] += delta
            total[name] += np.subtract(trained[name], BASE[name], dtype=np.float64)
        assert compressor.residual, "topk holds back what it does not send"
    for name in sent:  # decoding adds in the tensor's dtype: float32 rounding only
        np.testing.assert_allclose(sent[name] + compressor.residual[name], total[name], atol=1e-4)
    assert np.abs(compressor.residual["head"]).sum() > 0


def test_a_switch_away_from_topk_sends_the_held_residual_with_the_next_update() -> None:
    rates = iter([0.5, 1000.0])  # slow: topk; then fast: plain weights
    compressor = Compressor(settings("auto", topk_fraction=0.02), uplink=lambda: next(rates))
    first = compressor.compress(BASE, FitResult(dict(TRAINED), 1), {"seed": 1})
    held = dict(compressor.residual)
    second = compressor.compress(BASE, FitResult(dict(TRAINED), 1), {"seed": 2})
    assert (first.encoding, second.encoding) == ("topk", "") and not compressor.residual
    for name in ("conv", "head"):
        expected = (BASE[name] + UPDATE[name].astype(np.float64) + held[name]).astype(np.float32)
        np.testing.assert_allclose(second.weights[name], expected, rtol=1e-6)


def test_none_passes_the_result_through_untouched() -> None:
    result = FitResult(dict(TRAINED), 10)
    assert Compressor(settings("none")).compress(BASE, result, {"seed": 0}) is result


def test_fp16_refuses_an_update_beyond_its_range_on_the_node() -> None:
    base = {"w": np.zeros(2, np.float32)}
    with pytest.raises(WeightsError, match="exceeds float16's range"):
        Compressor(settings("fp16")).compress(
            base, FitResult({"w": np.full(2, 1e6, np.float32)}, 1), {}
        )


def test_a_fit_result_that_does_not_match_the_model_is_named_before_encoding() -> None:
    with pytest.raises(WeightsError, match="fit\\(\\) result: missing tensor"):
        Compressor(settings("q8")).compress(BASE, FitResult({"conv": BASE["conv"]}, 1), {})


def test_encoded_bytes_bound_what_each_encoding_can_take() -> None:
    floats = 60 + 600 + 10
    assert encoded_bytes(SPEC, "fp16") == 8 + 2 * floats
    assert encoded_bytes(SPEC, "q8") == 8 + floats + 3 * 8
    assert encoded_bytes(SPEC, "topk", 0.01) == 8 + 6 * (1 + 6 + 1)  # uint16 indices
    for mode in ("fp16", "q8", "topk"):
        data = sum(a.nbytes for a in encode(mode, topk_fraction=0.01).weights.values())
        assert data <= encoded_bytes(SPEC, mode, 0.01)


# --- the packed wire form ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp16", "q8", "topk", "stc"])
def test_a_packed_update_unpacks_to_the_same_arrays_from_bytes_and_from_a_file(
    mode: str, tmp_path: Path
) -> None:
    encoded = encode(mode, topk_fraction=0.05, stc_fraction=0.05).weights
    payload = pack(encoded)
    assert len(payload) == sum(a.nbytes for a in encoded.values())  # no header at all
    path = tmp_path / "update"
    pack_to(encoded, path)
    assert path.read_bytes() == payload and path.stat().st_mode & 0o777 == 0o600
    for unpacked in (
        unpack(payload, mode, SPEC, fraction=0.05),
        PackedFile(path, mode, SPEC, fraction=0.05),
    ):
        assert list(unpacked) == list(encoded)  # the encoder's order is the layout's
        for name, array in encoded.items():
            np.testing.assert_array_equal(unpacked[name], array)
            assert unpacked[name].dtype == array.dtype and unpacked[name].shape == array.shape
        check(unpacked, mode, SPEC, fraction=0.05)
        decoded = decode(unpacked, mode, BASE, SPEC)
        for name, want in decode(encoded, mode, BASE, SPEC).items():
            np.testing.assert_array_equal(decoded[name], want)


def test_a_packed_payload_of_a_size_the_model_does_not_allow_is_refused_precisely() -> None:
    q8 = pack(encode("q8").weights)  # 24 bytes of ranges, 670 codes, 8 of 'steps'
    with pytest.raises(WeightsError) as raised:
        unpack(q8[:-1], "q8", SPEC, source="client 3")
    assert str(raised.value) == (
        "client 3: a q8 payload of this model is exactly 702 bytes (3 float tensors of 670 "
        "entries, 8 bytes of integer tensors); got 701"
    )
    with pytest.raises(WeightsError, match="fp16 payload of this model is exactly 1348 bytes"):
        unpack(q8, "fp16", SPEC)
    topk = pack(encode("topk", topk_fraction=0.05).weights)  # 34 entries of 6 bytes, + 8
    assert len(topk) == 34 * 6 + 8 and len(unpack(topk, "topk", SPEC, fraction=0.05)) == 3
    expected = (
        "a topk payload of this model is 8 bytes of integer tensors plus 6 bytes (a float32 "
        "value and a uint16 index) for each of at most {} entries (topk_fraction {} of each "
        "of the 3 float tensors, at least one each); got {} bytes"
    )
    for data, fraction, most in ((topk[:-1], 0.05, 34), (topk, 0.01, 8), (b"1234", 0.05, 34)):
        with pytest.raises(WeightsError) as raised:
            unpack(data, "topk", SPEC, fraction=fraction)
        assert expected.format(most, fraction, len(data)) in str(raised.value)
    with pytest.raises(WeightsError, match="encoding 'gzip' is not one of"):
        layout("gzip", SPEC, 10)


def test_topk_indexes_a_model_of_more_than_65536_float_entries_in_uint32() -> None:
    spec = {"w": TensorSpec(np.dtype(np.float32), (65537,))}
    assert layout("topk", spec, 8 * 656, fraction=0.01)["topk.indices"].dtype == np.uint32
    base = {"w": np.zeros(65537, np.float32)}
    trained = {"w": np.arange(65537, dtype=np.float32)}
    encoded = Compressor(settings("topk")).compress(base, FitResult(trained, 1), {}).weights
    assert encoded["topk.indices"].dtype == np.uint32 and encoded["topk.indices"][-1] == 65536
    assert len(pack(encoded)) == encoded_bytes(spec, "topk", 0.01) == 8 * 656


# --- stc ---------------------------------------------------------------------------------


def test_stc_sends_the_top_entries_of_each_tensor_as_plus_or_minus_their_mean_magnitude() -> None:
    compressor = Compressor(settings("stc", stc_fraction=0.1))
    result = compressor.compress(BASE, FitResult(dict(TRAINED), 1), {"seed": 0})
    assert result.encoding == "stc" and int(result.weights["stc.count"][0]) == 6 + 60 + 1
    decoded = floats_delta(decode(result.weights, "stc", BASE, SPEC))
    for (name, k), scale in zip(
        (("conv", 6), ("head", 60), ("bias", 1)), result.weights["stc.scales"], strict=True
    ):
        flat, true = decoded[name].ravel(), TRUE[name].ravel()
        sent = np.flatnonzero(np.abs(flat) > 1e-7)
        largest = np.sort(np.argsort(-np.abs(true))[:k])
        np.testing.assert_array_equal(sent, largest)
        np.testing.assert_allclose(scale, np.mean(np.abs(true[largest])), rtol=1e-6)
        np.testing.assert_allclose(np.abs(flat[sent]), scale, rtol=1e-4)  # added in float32
        assert np.all(np.sign(flat[sent]) == np.sign(true[sent]))
        # what was not sent, or ternarizing changed, is held back: nothing is lost
        np.testing.assert_allclose(flat + compressor.residual[name].ravel(), true, atol=1e-5)
    # 67 entries of 6 bytes each as topk; Rice-coded with 1-bit values, ~6x fewer
    assert len(pack(result.weights)) * 5 < 67 * 6 + 8


@pytest.mark.parametrize(
    "positions", [[], [0], [669], [0, 1, 2, 3], list(range(670)), [5, 300, 301, 669]]
)
def test_rice_coding_round_trips_any_strictly_increasing_positions(positions: list[int]) -> None:
    index = np.array(positions, np.int64)
    negative = np.arange(len(index)) % 3 == 0
    fixed, unary = rice.encode(index, negative, 670)
    assert len(fixed) == rice.fixed_bytes(670, len(index))
    low, high = rice.unary_bytes(670, len(index))
    assert low <= len(unary) <= high
    found, signs = rice.decode(fixed, unary, len(index), 670, source="client 3")
    np.testing.assert_array_equal(found, index)
    np.testing.assert_array_equal(signs, negative)


def test_rice_random_positions_take_about_log2_of_their_density_plus_two_bits() -> None:
    index = np.sort(np.random.default_rng(0).choice(100_000, 1_000, replace=False))
    fixed, unary = rice.encode(index, np.zeros(1000, bool), 100_000)
    assert rice.rice_bits(100_000, 1000) == 6  # mean gap 99: 2**6 <= 99 ln 2 < 2**7
    bits = 8 * (len(fixed) + len(unary)) / 1000  # log2(100) = 6.6, + 1 sign bit
    assert 7.5 < bits < 9.5, bits


def test_every_malformed_stc_payload_is_refused_precisely() -> None:
    good = encode("stc", stc_fraction=0.05).weights  # 3 + 30 + 1 entries
    check(good, "stc", SPEC, fraction=0.05)
    count = int(good["stc.count"][0])
    fixed, unary = good["stc.fixed"], good["stc.unary"]

    def stc(fraction: float = 0.05, **arrays: Any) -> str:
        changed = {**good, **{k.replace("__", "."): v for k, v in arrays.items()}}
        with pytest.raises(WeightsError) as raised:
            unpacked = unpack(pack(changed), "stc", SPEC, fraction=fraction, source="client 3")
            check(unpacked, "stc", SPEC, fraction=fraction, source="client 3")
        message = str(raised.value)
        assert message.startswith("client 3: "), message
        return message

    assert "34 stc entries; at most 8 (stc_fraction 0.01" in stc(0.01)
    assert "35 stc entries; at most 34" in stc(stc__count=np.array([35], np.uint32))
    short = stc(stc__count=np.array([5], np.uint32))  # the streams are far too long for 5
    assert (
        f"an stc payload of 5 entries of this model takes 30..31 bytes; got {len(pack(good))}"
        in short
    )
    assert "takes" in stc(stc__unary=np.concatenate([unary, np.zeros(99, np.uint8)]))
    extra = np.concatenate([unary, np.zeros(1, np.uint8)])
    assert "the unary stream must end with its 34th gap" in stc(stc__unary=extra)
    ones = unary.copy()
    ones[-1] = 0xFF  # no 0-bit ends the last gap any more
    assert "the unary stream holds 33 gaps; expected 34" in stc(stc__unary=ones)
    padded = fixed.copy()
    padded[-1] |= 1
    if len(fixed) * 8 > count * (rice.rice_bits(670, count) + 1):  # there are padding bits
        assert "the fixed stream's padding bits must be 0" in stc(stc__fixed=padded)
    beyond = rice.encode(np.array([*range(33), 670]), np.zeros(34, bool), 670)
    assert "position 670 is out of range; the float tensors have 670 entries (0..669)" in stc(
        stc__fixed=beyond[0], stc__unary=beyond[1]
    )
    scales = good["stc.scales"].copy()
    scales[1] = -1.0
    assert "the stc scale of tensor 'head' is -1.0; expected >= 0" in stc(stc__scales=scales)
    scales[1] = np.nan
    assert "'stc.scales' has 1 NaN or Inf value(s)" in stc(stc__scales=scales)
    streams = rice.encode(np.arange(34), np.zeros(34, bool), 670)  # 34 in conv's 60
    crowded = {**good, "stc.fixed": streams[0], "stc.unary": streams[1]}
    with pytest.raises(WeightsError, match="34 stc entries in tensor 'conv'; at most 3"):
        check(unpack(pack(crowded), "stc", SPEC, fraction=0.05), "stc", SPEC, fraction=0.05)
    with pytest.raises(WeightsError, match="an stc payload starts with its 4-byte entry count"):
        unpack(b"\x01", "stc", SPEC)
    with pytest.raises(WeightsError, match=r"an stc payload of this model \(stc_fraction 0.05\)"):
        check_size("stc", SPEC, encoded_bytes(SPEC, "stc", 0.05) + 1, fraction=0.05)


# --- auto --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mbps", "expected"),
    [
        (None, ""),
        (0.1, "topk"),
        (0.99, "topk"),
        (1.0, "q8"),
        (50.0, "fp16"),
        (100.0, ""),
        (1e4, ""),
    ],
)
def test_auto_picks_the_most_compressing_encoding_the_uplink_is_below(
    mbps: float | None, expected: str
) -> None:
    assert choose(settings("auto"), mbps) == expected  # defaults: topk 1, q8 10, fp16 100


def test_auto_uses_only_the_encodings_given_thresholds() -> None:
    only_q8 = settings("auto", auto_thresholds={"q8": 5.0})
    assert [choose(only_q8, m) for m in (0.01, 4.9, 5.0)] == ["q8", "q8", ""]
    assert only_q8.encodings() == ("q8",) and settings("auto").encodings() == ("topk", "q8", "fp16")
    assert settings("none").encodings() == () and settings("fp16").encodings() == ("fp16",)


def test_throughput_is_the_last_uploads_bytes_over_seconds() -> None:
    uplink = Throughput()
    assert uplink() is None
    uplink.record(2_000_000, 0.5)
    assert uplink() == 4.0
    uplink.record(0, 0.1)  # nothing sent: no measure
    uplink.record(10, 0.0)
    assert uplink() == 4.0


def test_the_client_wrapper_switches_encoding_as_the_measured_uplink_changes() -> None:
    class Trainer(Client):
        def fit(self, weights: Weights, config: Config) -> FitResult:
            for name in ("conv", "head", "bias"):
                weights[name] += UPDATE[name]  # in place: the wrapper kept its own copy
            weights["steps"] = UPDATE["steps"]
            return FitResult(weights, 10)

    uplink = Throughput()
    client = CompressClient(Trainer(), settings("auto"), uplink=uplink)
    chosen = []
    for size, seconds in [(0, 0), (1_000, 0.01), (10**8, 2.0), (10**9, 1.0)]:
        uplink.record(size, seconds)
        result = client.fit({k: v.copy() for k, v in BASE.items()}, {"seed": 1})
        chosen.append(result.encoding)
        weights = (
            decode(result.weights, result.encoding, BASE, SPEC)
            if result.encoding
            else result.weights
        )
        assert spec_of(weights) == SPEC
    assert chosen == ["", "topk", "fp16", ""]  # unmeasured; 0.1 MB/s; 50 MB/s; 1000 MB/s


# --- config ------------------------------------------------------------------------------


def test_the_compression_section_is_validated_and_names_the_key() -> None:
    def load(section: dict[str, Any]) -> CompressionSection:
        return parse_config({"app": {"target": "a:b"}, "compression": section}).compression

    assert load({}).mode == "none"
    assert load({"mode": "topk", "topk_fraction": 0.05}).topk_fraction == 0.05
    assert load({"mode": "stc"}).fraction("stc") == 0.1 and load({}).fraction("q8") == 1.0
    cases = [
        ({"stc_fraction": 0}, "'compression.stc_fraction' = 0"),
        ({"mode": "zip"}, "'compression.mode' = 'zip'"),
        ({"topk_fraction": 0}, "'compression.topk_fraction' = 0"),
        ({"topk_fraction": 1.5}, "'compression.topk_fraction' = 1.5"),
        ({"level": 3}, "unknown key 'compression.level'"),
        ({"auto_thresholds": {"gzip": 1.0}}, "Invalid enum value 'gzip' (as a key)"),
        (
            {"auto_thresholds": {"q8": -1.0}},
            "'compression.auto_thresholds' = {'q8': -1.0}: Expected `float` > 0.0",
        ),
        ({"auto_thresholds": {"topk": 5.0, "q8": 1.0}}, "must grow from the strongest"),
    ]
    for section, fragment in cases:
        with pytest.raises(ConfigError) as raised:
            load(section)
        assert fragment in str(raised.value), str(raised.value)


# --- malformed payloads ------------------------------------------------------------------


def refused(arrays: Weights, encoding: str, fragment: str, **options: Any) -> None:
    with pytest.raises(WeightsError) as raised:
        check(arrays, encoding, SPEC, source="client 3", **options)
    message = str(raised.value)
    assert message.startswith("client 3: ") and fragment in message, message


def changed(result: FitResult, **arrays: Any) -> Weights:
    out = dict(result.weights)
    for name, value in arrays.items():
        name = name.replace("__", ".")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def test_every_malformed_fp16_payload_is_refused_precisely() -> None:
    good = encode("fp16")
    check(good.weights, "fp16", SPEC)
    nan = good.weights["head"].copy()
    nan[0, 0] = np.nan
    refused(changed(good, head=good.weights["head"].astype(np.float32)), "fp16",
            "tensor 'head' has dtype float32, expected float16")  # fmt: skip
    refused(changed(good, head=nan), "fp16", "tensor 'head' has 1 NaN or Inf value(s)")
    refused(
        changed(good, conv=good.weights["conv"][:2]), "fp16", "tensor 'conv' has shape [2, 3, 5]"
    )
    refused(changed(good, steps=None), "fp16", "missing tensor(s) ['steps']")
    refused(
        changed(good, steps=np.array(1, np.int32)),
        "fp16",
        "'steps' has dtype int32, expected int64",
    )
    refused(
        dict(good.weights),
        "gzip",
        "encoding 'gzip' is not one of ['safetensors', 'stc', 'topk', 'q8', 'fp16']",
    )


def test_every_malformed_q8_payload_is_refused_precisely() -> None:
    good = encode("q8")
    check(good.weights, "q8", SPEC)
    ranges = good.weights["q8.ranges"]

    def with_range(row: int, col: int, value: float) -> np.ndarray:
        out = ranges.copy()
        out[row, col] = value
        return out

    refused(
        changed(good, q8__ranges=with_range(1, 1, np.nan)), "q8", "tensor 'q8.ranges' has 1 NaN"
    )
    refused(
        changed(good, q8__ranges=with_range(2, 0, np.inf)),
        "q8",
        "tensor 'q8.ranges' has 1 NaN or Inf",
    )
    refused(
        changed(good, q8__ranges=with_range(1, 1, 0.0)),
        "q8",
        "q8 step of tensor 'head' is 0.0; expected > 0",
    )
    refused(
        changed(good, q8__ranges=with_range(0, 1, -2.0)), "q8", "q8 step of tensor 'conv' is -2.0"
    )
    refused(
        changed(good, q8__ranges=ranges[:2]),
        "q8",
        "tensor 'q8.ranges' has shape [2, 2], expected [3, 2]",
    )
    refused(
        changed(good, q8__ranges=ranges.astype(np.float64)),
        "q8",
        "'q8.ranges' has dtype float64, expected float32",
    )
    refused(
        changed(good, q8__values=good.weights["q8.values"].astype(np.int8)),
        "q8",
        "'q8.values' has dtype int8, expected uint8",
    )
    refused(
        changed(good, q8__values=good.weights["q8.values"][:-1]),
        "q8",
        "'q8.values' has shape [669], expected [670]",
    )
    refused(changed(good, q8__values=None), "q8", "missing tensor(s) ['q8.values']")
    refused(changed(good, head=BASE["head"]), "q8", "unexpected tensor(s) ['head']")
    refused(dict(encode("fp16").weights), "q8", "missing tensor(s)")  # fmt: skip


def test_every_malformed_topk_payload_is_refused_precisely() -> None:
    good = encode("topk", topk_fraction=0.05)
    check(good.weights, "topk", SPEC, fraction=0.05)
    index, values = good.weights["topk.indices"], good.weights["topk.values"]

    def at(position: int, value: int) -> np.ndarray:
        out = index.copy()
        out[position] = value
        return out

    refused(
        changed(good, topk__indices=at(-1, 670)),
        "topk",
        "topk index 670 is out of range; the float tensors have 670 entries (0..669)",
    )
    refused(
        changed(good, topk__indices=at(1, int(index[0]))),
        "topk",
        f"strictly increasing (unique, in order); entry 1 is {index[0]} after {index[0]}",
    )
    refused(changed(good, topk__indices=index[::-1].copy()), "topk", "strictly increasing")
    refused(
        changed(good, topk__indices=index.astype(np.int64)),
        "topk",
        "'topk.indices' has dtype int64, expected uint16",
    )
    refused(
        changed(good, topk__indices=index.reshape(2, -1)),
        "topk",
        "'topk.indices' has shape [2, 17], expected a 1-D array of at most 34 entries",
        fraction=0.05,
    )
    refused(
        changed(good, topk__values=values[:-1]),
        "topk",
        "'topk.values' has shape [33], expected [34]",
    )
    refused(
        changed(good, topk__values=values.astype(np.float16)),
        "topk",
        "'topk.values' has dtype float16, expected float32",
    )
    nan = values.copy()
    nan[3] = np.nan
    refused(
        changed(good, topk__values=nan), "topk", "tensor 'topk.values' has 1 NaN or Inf value(s)"
    )
    # more entries than the fraction allows: in all, then in one tensor
    refused(good.weights, "topk", "34 topk entries; at most 8 (topk_fraction 0.01", fraction=0.01)
    crowded = np.arange(34, dtype=np.uint16)  # 34 entries all in 'conv' (60 entries, 3 allowed)
    refused(
        changed(good, topk__indices=crowded),
        "topk",
        "34 topk entries in tensor 'conv'; at most 3 (topk_fraction 0.05 of 60)",
        fraction=0.05,
    )
    refused(changed(good, steps=np.array(1.5)), "topk", "'steps' has dtype float64, expected int64")
    refused(changed(good, extra=np.zeros(1)), "topk", "unexpected tensor(s) ['extra']")


def test_an_empty_topk_update_is_accepted_and_decodes_to_the_base() -> None:
    empty = {
        "topk.indices": np.empty(0, np.uint16),
        "topk.values": np.empty(0, np.float32),
        "steps": BASE["steps"],
    }
    decoded = decode(empty, "topk", BASE, SPEC)
    for name in ("conv", "head", "bias"):
        np.testing.assert_array_equal(decoded[name], BASE[name])


def test_a_model_whose_counter_is_named_like_an_encoded_tensor_cannot_use_that_encoding() -> None:
    spec = {"w": SPEC["head"], "q8.values": SPEC["steps"]}
    with pytest.raises(WeightsError, match=r"tensor 'q8\.values' has a name the q8 encoding uses"):
        check({}, "q8", spec, source="client 1")


# --- simulation --------------------------------------------------------------------------


class Drift(Client):
    """Moves every weight by a seeded step of its own: a client with data of its own."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        rng = np.random.default_rng(config["seed"])
        moved = {
            k: v + rng.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in weights.items()
        }
        return FitResult(moved, 10 + self.cid)


@pytest.mark.parametrize("mode", ["fp16", "q8", "topk", "stc"])
def test_a_compressed_simulation_is_the_same_on_every_backend(mode: str) -> None:
    """Encoding happens in the simulator's own process, with one residual per client that
    lives across rounds, whichever worker process trained the client."""
    initial = {"w": np.zeros((20, 5), np.float32), "b": np.zeros(5, np.float32)}
    runs = [
        simulate(Drift, 4, 3, initial_weights=initial, backend=backend, workers=2,
                 compression=settings(mode, topk_fraction=0.1, stc_fraction=0.1))
        for backend in ("inprocess", "process")
    ]  # fmt: skip
    models = [to_bytes(h.weights or {}) for h in runs]
    assert models[0] == models[1]
    assert all(r.status == "ok" and r.participants == [0, 1, 2, 3] for r in runs[0].rounds)
    plain = simulate(Drift, 4, 3, initial_weights=initial)
    assert plain.weights is not None and runs[0].weights is not None
    moved = np.abs(runs[0].weights["w"]).sum()
    assert moved > 0 and not math.isclose(moved, np.abs(plain.weights["w"]).sum(), rel_tol=1e-9)
