"""The codec's numerical rules on both backends: round-trip error bounds, stochastic rounding, ties to even,
the scale floor and ceiling, the packed sub-byte payloads, fp16 and fp32."""

from __future__ import annotations

import codec_helpers
import numpy as np
import pytest
from codec_helpers import (
    BACKENDS, FLT_MIN, HYPOTHESIS, INT_CODECS, LEVELS, SCALE_CEILINGS, SCALE_MAX, bits, finite_float32, int8_parts,
    int_parts, require_native, scale_per_value,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebll import codec
from edgebll.codec import reference
from edgebll.codec.frame import FrameHeader
from edgebll.errors import CodecError

backend = codec_helpers.backend  # a pytest fixture: each test that names it runs on both backends


@HYPOTHESIS
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=6), elements=finite_float32),
    codec_name=st.sampled_from(INT_CODECS),
    granularity=st.sampled_from(codec.GRANULARITIES),
    group_size=st.integers(1, 40),
    rounding=st.sampled_from(codec.ROUNDINGS),
    backend=st.sampled_from(BACKENDS),
)
def test_int_round_trip_error_is_at_most_half_a_scale_or_one_when_stochastic(
    x: np.ndarray, codec_name: str, granularity: str, group_size: int, rounding: str, backend: str
) -> None:
    if backend == "c":
        require_native()
    frame = codec.encode(x, codec_name, granularity=granularity, group_size=group_size, rounding=rounding,
                         seed=7, backend=backend)
    header, scales, q = int_parts(frame)
    levels = LEVELS[codec_name]
    per_value = scale_per_value(frame)
    # every scale is amax / L over exactly the values that use it (clipped to [FLT_MIN, ceiling])
    amax = np.zeros(header.num_scales, np.float32)
    flat_scale_index = {"tensor": np.zeros(x.size, np.int64),
                        "channel": np.indices(x.shape)[1].reshape(-1),
                        "group": np.arange(x.size) // group_size}[granularity]
    np.maximum.at(amax, flat_scale_index, np.abs(x).reshape(-1))
    np.testing.assert_array_equal(scales, np.clip(amax / np.float32(levels), FLT_MIN, SCALE_CEILINGS[codec_name]))
    assert np.abs(q).max(initial=0) <= levels
    decoded = codec.decode(frame, backend=backend).astype(np.float64)
    error = np.abs(decoded - x.astype(np.float64))
    # scale/2 from rounding (a whole scale for stochastic rounding), plus the float32 rounding of
    # x/scale and of q*scale (a few ulps)
    step = 0.5 if rounding == "nearest" else 1.0
    bound = per_value.astype(np.float64) * (step + 1e-5) + np.spacing(np.abs(x).astype(np.float64)) * 2**29
    assert (error <= bound).all()


@pytest.mark.parametrize("codec_name", INT_CODECS)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(backend: str, codec_name: str) -> None:
    """Averaged over seeds, stochastic rounding recovers values between two levels; nearest does not."""
    levels = LEVELS[codec_name]
    x = np.linspace(-1, 1, 41, dtype=np.float32)  # amax 1: scale 1/L, most values between levels
    frames = [codec.encode(x, codec_name, rounding="stochastic", seed=seed, backend=backend) for seed in range(400)]
    scale = int_parts(frames[0])[1][0]
    below = np.floor(x / scale)
    for frame in frames:  # every draw is one of the two levels around x
        q = int_parts(frame)[2]
        assert ((q == below) | (q == np.minimum(below + 1, levels))).all()
    decoded = np.stack([codec.decode(frame, backend=backend) for frame in frames])
    # the mean of 400 draws is within 4 standard errors (<= 0.5 / sqrt(400) / L) of x
    assert np.abs(decoded.mean(axis=0) - x).max() < 4 * 0.5 / 20 / levels
    nearest = codec.decode(codec.encode(x, codec_name, backend=backend))
    assert np.abs(nearest - x).max() > 0.3 / levels  # one draw is far, and always the same one


def test_stochastic_rounding_depends_on_seed_and_index_only(backend: str) -> None:
    x = np.random.default_rng(3).standard_normal((8, 3, 5), dtype=np.float32)
    frame = codec.encode(x, "int4", rounding="stochastic", seed=11, backend=backend)
    assert frame == codec.encode(x, "int4", rounding="stochastic", seed=11, backend=backend)
    assert frame != codec.encode(x, "int4", rounding="stochastic", seed=12, backend=backend)
    # the noise of value i is u(seed, i) whatever the layout: floor(x / scale + u) spelled out
    _, scales, q = int_parts(frame)
    u = reference.stochastic_offsets(11, 0, x.size).reshape(x.shape)
    np.testing.assert_array_equal(q, np.clip(np.floor(x / scales[0] + u), -7, 7))


def test_splitmix64_matches_its_published_outputs() -> None:
    """Rosetta Code "Pseudo-random numbers/Splitmix64" (seed 1234567) and splitmix64.c from state 0."""
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                16408922859458223821]
    assert reference.splitmix64(1234567, np.arange(5)).tolist() == expected
    assert int(reference.splitmix64(0, np.arange(1))[0]) == 0xE220A8397B1DCDAF
    # counter-based: value i does not depend on the ones before it
    assert reference.splitmix64(1234567, np.array([3])).tolist() == [expected[3]]
    offsets = reference.stochastic_offsets(1234567, 0, 5)
    assert offsets.dtype == np.float32
    assert offsets.tolist() == [(v >> 40) / 2**24 for v in expected]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5], [127, 0, 2, 2, 0, -2, -2]),  # scale 1: ties go to even
        ([-254.0, 3.0, 1.0, -1.0], [-127, 2, 0, 0]),  # scale 2: 1.5 -> 2, +-0.5 -> 0
    ],
)
def test_int8_rounds_half_to_even(backend: str, values: list[float], expected: list[int]) -> None:
    _, _, q = int8_parts(codec.encode(np.array(values, np.float32), "int8", backend=backend))
    assert q.tolist() == expected


def test_int8_all_zero_channels_decode_to_zeros(backend: str) -> None:
    x = np.zeros((4, 3, 2, 2), np.float32)
    x[:, 2] = np.arange(16, dtype=np.float32).reshape(4, 2, 2) - 8
    x[0, 1, 0, 0] = -0.0
    frame = codec.encode(x, "int8", granularity="channel", backend=backend)
    _, scales, _ = int8_parts(frame)
    assert scales.tolist() == [FLT_MIN, FLT_MIN, np.float32(8) / np.float32(127)]
    decoded = codec.decode(frame, backend=backend)
    assert (decoded[:, :2] == 0).all()
    np.testing.assert_allclose(decoded[:, 2], x[:, 2], atol=float(scales[2]) / 2)
    all_zero = codec.encode(np.zeros((5,), np.float32), "int8", backend=backend)
    assert int8_parts(all_zero)[1].tolist() == [FLT_MIN]
    assert (codec.decode(all_zero, backend=backend) == 0).all()


@pytest.mark.parametrize("codec_name", INT_CODECS)
def test_int_tiny_and_huge_tensors_keep_the_bound(backend: str, codec_name: str) -> None:
    """amax/L subnormal (the FLT_MIN floor) and amax = FLT_MAX (no overflow in x/scale or q*scale)."""
    tiny = np.array([1e-45, -3e-44, 1e-38, 0.0], np.float32)
    huge = np.array([np.finfo(np.float32).max, -1e38, 1.0], np.float32)
    for x in (tiny, huge):
        frame = codec.encode(x, codec_name, backend=backend)
        scale = int_parts(frame)[1][0]
        decoded = codec.decode(frame, backend=backend).astype(np.float64)
        assert np.isfinite(decoded).all()
        assert (np.abs(decoded - x.astype(np.float64)) <= float(scale) * (0.5 + 1e-6)).all()
    assert int_parts(codec.encode(tiny, codec_name, backend=backend))[1][0] == FLT_MIN
    huge_scale = int_parts(codec.encode(huge, codec_name, backend=backend))[1][0]
    assert huge_scale == min(np.finfo(np.float32).max / np.float32(LEVELS[codec_name]), SCALE_CEILINGS[codec_name])
    assert (huge_scale == SCALE_MAX) == (codec_name == "int8")  # only int8 needs the ceiling


@pytest.mark.parametrize("codec_name", INT_CODECS)
def test_scale_ceiling_is_the_largest_scale_that_decodes_every_level_finitely(codec_name: str) -> None:
    levels, ceiling = np.float32(LEVELS[codec_name]), SCALE_CEILINGS[codec_name]
    assert reference.SCALE_CEILINGS[codec_name] == ceiling
    with np.errstate(over="ignore"):
        assert np.isfinite(levels * ceiling)
        assert ceiling == np.finfo(np.float32).max or np.isinf(levels * np.nextafter(ceiling, np.float32(np.inf)))
    if codec_name == "int8":
        assert np.finfo(np.float32).max / levels > ceiling  # why the ceiling exists


@pytest.mark.parametrize("codec_name, values, expected_payload", [
    # int4: 7 levels, value i in bits 4*(i%2).., two's complement; the last byte's high nibble is 0
    ("int4", [7, -7, 1, 0, -1], [0x97, 0x01, 0x0F]),
    ("int4", [7, 0.5, 1.5, 2.5, -0.5, -1.5], [0x07, 0x22, 0xE0]),  # scale 1: ties to even, 7 0 2 2 0 -2
    # int2: ternary, value i in bits 2*(i%4)..: -1 = 0b11, 1 = 0b01, 0 = 0b00
    ("int2", [1, -1, 0, 1, -1, 0.4, -0.6], [0b01_00_11_01, 0b00_11_00_11]),
])
def test_sub_byte_payload_layout_is_pinned(backend: str, codec_name: str, values: list[float],
                                           expected_payload: list[int]) -> None:
    x = np.array(values, np.float32)
    frame = codec.encode(x, codec_name, backend=backend)
    header = FrameHeader.from_bytes(frame)
    assert list(frame[header.payload_offset :]) == expected_payload


FP16_CASES = [
    # (float32 input, expected float16 bits)
    (2.0**-24, 0x0001),  # smallest subnormal
    (2.0**-25, 0x0000),  # exactly half of it: tie -> even (0)
    (3 * 2.0**-25, 0x0002),  # 1.5 units: tie -> even (2)
    (5 * 2.0**-25, 0x0002),  # 2.5 units: tie -> even (2)
    (np.float32(2.0**-25) * np.float32(1 + 2**-23), 0x0001),  # just above the tie rounds up
    (2.0**-14 - 2.0**-25, 0x0400),  # the largest subnormal tie rounds up to the smallest normal
    (2.0**-14, 0x0400),
    (1 + 2.0**-11, 0x3C00),  # tie between 1 and 1+2^-10 -> even (1)
    (1 + 3 * 2.0**-11, 0x3C02),  # tie -> even (1 + 2^-9)
    (65504.0, 0x7BFF),  # fp16 max
    (65519.99, 0x7BFF),  # still rounds down to max
    (-65504.0, 0xFBFF),
    (-0.0, 0x8000),
    (1e-30, 0x0000),
]


@pytest.mark.parametrize("value, expected_bits", FP16_CASES)
def test_fp16_edge_cases_match_ieee_and_numpy(backend: str, value: float, expected_bits: int) -> None:
    x = np.array([value], np.float32)
    frame = codec.encode(x, "fp16", backend=backend)
    payload = np.frombuffer(frame, np.uint16, 1, len(frame) - 2)
    assert int(payload[0]) == expected_bits == int(x.astype(np.float16).view(np.uint16)[0])
    np.testing.assert_array_equal(codec.decode(frame, backend=backend), x.astype(np.float16).astype(np.float32))


def test_fp16_matches_numpy_on_a_sweep_of_bit_patterns(backend: str) -> None:
    """Every float32 exponent that fp16 can represent, with random mantissas (2^18 values)."""
    rng = np.random.default_rng(16)
    exponents = rng.integers(0, 143, 1 << 18, dtype=np.uint32)  # biased 0..142: |x| < 2^16
    mantissas = rng.integers(0, 1 << 23, 1 << 18, dtype=np.uint32)
    mantissas[::7] &= ~np.uint32(0xFFF)  # exact ties and near-ties in the dropped bits
    mantissas[::7] |= np.uint32(0x1000)
    signs = rng.integers(0, 2, 1 << 18, dtype=np.uint32) << 31
    x = (signs | exponents << 23 | mantissas).view(np.float32)
    x = x[np.abs(x) < 65520]
    frame = codec.encode(x, "fp16", backend=backend)
    payload = np.frombuffer(frame, np.uint16, x.size, len(frame) - 2 * x.size)
    np.testing.assert_array_equal(payload, x.astype(np.float16).view(np.uint16))
    decoded = codec.decode(frame, backend=backend)
    np.testing.assert_array_equal(bits(decoded), bits(x.astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("value", [65520.0, -65520.0, 1e6, np.finfo(np.float32).max])
def test_fp16_overflow_is_refused(backend: str, value: float) -> None:
    x = np.ones((2, 3), np.float32)
    x[1, 2] = value
    with pytest.raises(CodecError, match=r"1 values beyond the float16 range \(first at index \(1, 2\).*hint: use codec='int8'"):
        codec.encode(x, "fp16", backend=backend)


def test_fp32_is_a_bit_exact_copy(backend: str) -> None:
    x = np.array([[1e-45, -0.0], [np.finfo(np.float32).max, 0.1]], np.float32)
    frame = codec.encode(x, "fp32", backend=backend)
    assert frame.endswith(x.tobytes())
    np.testing.assert_array_equal(bits(codec.decode(frame, backend=backend)), bits(x))
