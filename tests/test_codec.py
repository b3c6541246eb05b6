"""The message codec: C kernel vs numpy reference byte for byte, error bounds, and every bad frame."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebll import codec
from edgebll.codec import buffer, native, reference
from edgebll.codec.frame import FIXED_NBYTES, MAGIC, FrameHeader
from edgebll.errors import CodecError, NativeLibraryError

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("numpy", "c")
INT_CODECS = ("int8", "int4", "int2")
LEVELS = {"int8": 127, "int4": 7, "int2": 1}
FLT_MIN = np.finfo(np.float32).tiny
SCALE_MAX = np.float32(float.fromhex("0x1.020406p+121"))
SCALE_CEILINGS = {"int8": SCALE_MAX, "int4": np.float32(float.fromhex("0x1.249248p+125")),
                  "int2": np.finfo(np.float32).max}
HYPOTHESIS = settings(
    derandomize=True, max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def require_native() -> None:
    """The C library; in CI its absence is a failure, elsewhere a skip."""
    if native.available():
        return
    message = "libedgebll_codec is not built; `pip install --no-build-isolation -e .` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "c":
        require_native()
    return request.param


@pytest.fixture
def fresh_loader() -> Iterator[None]:
    """Forget the loaded library before and after the test, so monkeypatched searches take effect."""
    native._load.cache_clear()
    yield
    native._load.cache_clear()


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


def int8_parts(frame: bytes) -> tuple[FrameHeader, np.ndarray, np.ndarray]:
    """Header, scales and int8 payload of a frame, read by hand (independently of decode)."""
    header = FrameHeader.from_bytes(frame)
    scales = np.frombuffer(frame, np.float32, header.num_scales, header.scales_offset)
    q = np.frombuffer(frame, np.int8, header.payload_nbytes, header.payload_offset)
    return header, scales, q.reshape(header.shape)


def int_parts(frame: bytes) -> tuple[FrameHeader, np.ndarray, np.ndarray]:
    """Header, scales and values of an int8/int4/int2 frame, unpacked by hand (independently of decode)."""
    header = FrameHeader.from_bytes(frame)
    scales = np.frombuffer(frame, np.float32, header.num_scales, header.scales_offset)
    payload = np.frombuffer(frame, np.uint8, header.payload_nbytes, header.payload_offset)
    bits = {"int8": 8, "int4": 4, "int2": 2}[header.codec]
    values = [(int(byte) >> shift) & ((1 << bits) - 1) for byte in payload for shift in range(0, 8, bits)]
    signed = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in values]
    return header, scales, np.array(signed[: int(np.prod(header.shape))], np.int16).reshape(header.shape)


FIXED_FIELDS = ("magic", "version", "codec", "granularity", "ndim", "num_scales", "payload_nbytes", "crc32", "group_size")


def reframe(frame: bytes, **fixed_fields: int) -> bytes:
    """`frame` (version 2) with fields of its fixed header replaced (by name), CRC left as it was."""
    values = dict(zip(FIXED_FIELDS, struct.unpack_from("<4sBBBBIQII", frame)))
    values.update(fixed_fields)
    return struct.pack("<4sBBBBIQII", *values.values()) + frame[FIXED_NBYTES:]


def with_valid_crc(frame: bytes | bytearray) -> bytes:
    """Recompute the CRC of a (tampered) frame so that only the tampering is wrong."""
    ndim = frame[7]
    body = bytes(frame[FIXED_NBYTES + 4 * ndim :])
    return reframe(bytes(frame), crc32=zlib.crc32(body))


def scale_per_value(frame: bytes) -> np.ndarray:
    """The float32 scale each value of an int frame was quantized with, in the message's shape."""
    header = FrameHeader.from_bytes(frame)
    scales = np.frombuffer(frame, np.float32, header.num_scales, header.scales_offset)
    size = int(np.prod(header.shape))
    if header.granularity == "channel":
        return np.broadcast_to(scales.reshape((1, -1) + (1,) * (len(header.shape) - 2)), header.shape)
    if header.granularity == "group":
        return scales[np.arange(size) // header.group_size].reshape(header.shape)
    return np.full(header.shape, scales[0], np.float32)


# ---------------------------------------------------------------------------------------------
# C vs numpy parity

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)
finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(HYPOTHESIS, max_examples=200)
@given(
    x=hnp.arrays(np.float32, shapes, elements=finite_float32),
    codec_name=st.sampled_from(codec.CODECS),
    granularity=st.sampled_from(codec.GRANULARITIES),
    group_size=st.integers(1, 70),
    rounding=st.sampled_from(codec.ROUNDINGS),
    seed=st.integers(0, 2**64 - 1),
)
def test_c_frame_equals_numpy_frame_for_any_finite_input(
    x: np.ndarray, codec_name: str, granularity: str, group_size: int, rounding: str, seed: int
) -> None:
    """Adversarial values (subnormals, FLT_MAX, -0.0, mixed magnitudes), every codec, layout and
    rounding, group sizes that split bytes and channels: same bytes, same decoded bits."""
    require_native()
    if granularity == "channel" and x.ndim < 2:
        granularity = "tensor"
    if codec_name not in INT_CODECS:
        rounding = "nearest"
    options = {"granularity": granularity, "group_size": group_size, "rounding": rounding, "seed": seed}
    if codec_name == "fp16" and x.size and np.abs(x).max() >= 65520:
        for backend in BACKENDS:  # both refuse the same way
            with pytest.raises(CodecError, match="beyond the float16 range"):
                codec.encode(x, codec_name, backend=backend, **options)
        return
    frame_c = codec.encode(x, codec_name, backend="c", **options)
    frame_numpy = codec.encode(x, codec_name, backend="numpy", **options)
    assert frame_c == frame_numpy
    assert len(frame_c) == codec.frame_nbytes(x.shape, codec_name, granularity, group_size)
    decoded_c = codec.decode(frame_c, backend="c")
    decoded_numpy = codec.decode(frame_c, backend="numpy")
    assert decoded_c.shape == x.shape and decoded_c.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded_c), bits(decoded_numpy))


ACTIVATION_SHAPES = [(64, 32, 14, 14), (256, 10), (3, 5, 7), (1, 1), (0, 4, 2), (2, 0, 3)]


LAYOUTS = [
    *((shape, granularity, 64) for shape in ACTIVATION_SHAPES for granularity in ("tensor", "channel", "group")),
    ((1000,), "tensor", 64),  # channel needs ndim >= 2: test_channel_granularity_needs_two_dims
    ((1001,), "group", 64),  # a short last group
    ((3, 5, 7), "group", 3),  # odd groups: int4/int2 bytes straddle groups
    ((64, 32, 7, 7), "channel", 64),  # 49 values per channel map: bytes straddle channels
    ((64, 32, 7, 7), "group", 49),
]


@pytest.mark.parametrize("shape, granularity, group_size", LAYOUTS)
@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_c_equals_numpy_on_activation_like_messages(
    shape: tuple[int, ...], codec_name: str, granularity: str, group_size: int
) -> None:
    """Realistic messages: per-channel magnitudes spanning 1e-3..1e3, ReLU zeros, an all-zero channel."""
    require_native()
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2 and shape[1] > 1:
        x *= np.logspace(-3, 3, shape[1], dtype=np.float32).reshape((1, -1) + (1,) * (len(shape) - 2))
        x[:, 1] = 0.0
    x = np.maximum(x, 0, where=rng.random(shape) < 0.3, out=x)
    roundings = codec.ROUNDINGS if codec_name in INT_CODECS else ("nearest",)
    for rounding in roundings:
        options = {"granularity": granularity, "group_size": group_size, "rounding": rounding, "seed": sum(shape)}
        frame_c = codec.encode(x, codec_name, backend="c", **options)
        assert frame_c == codec.encode(x, codec_name, backend="numpy", **options)
        np.testing.assert_array_equal(bits(codec.decode(frame_c, backend="c")), bits(codec.decode(frame_c, backend="numpy")))


def build_library(folder: Path, *defines: str) -> Path:
    """Compile csrc/ into `folder` with the flags CMakeLists.txt uses plus `defines`; skips without cc."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    library = folder / native.LIBRARY_FILENAMES[0]
    sources = [str(REPO / "csrc" / name) for name in ("codec.c", "crc32.c")]
    subprocess.run([compiler, "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-shared", "-fPIC",
                    *defines, f"-I{REPO / 'csrc'}", *sources, "-o", str(library)], check=True)
    return library


# The x86-64 builds below the installed one: (define, CRC-32 code it must run). The installed library
# picks AVX-512 or AVX2 kernels and the widest CRC this CPU has; these check the others on it too.
X86_BUILDS = {
    "no AVX-512": ("-DEDGEBLL_CODEC_NO_AVX512", "pclmulqdq"),
    "baseline": ("-DEDGEBLL_CODEC_NO_CLONES", "slice-by-8"),
}


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 copies exist on x86-64 only")
@pytest.mark.parametrize("build", X86_BUILDS)
def test_builds_without_the_wide_copies_give_the_same_frames(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None, build: str
) -> None:
    """The installed library runs this machine's widest kernels; build the narrower ones too and compare.

    Random bit patterns (subnormals, huge values, ties) and every layout of test_c_equals_numpy_...
    """
    define, crc_implementation = X86_BUILDS[build]
    if crc_implementation == "pclmulqdq" and "pclmulqdq" not in cpu_flags():
        crc_implementation = "slice-by-8"
    library = build_library(tmp_path, define)
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    assert native.find_library(native.search_dirs()) == library and codec.native_available()
    assert native.crc32_implementation() == crc_implementation
    check_crc32_against_zlib()
    rng = np.random.default_rng(42)
    cases = []
    for _ in range(30):
        shape = tuple(rng.integers(1, 12, rng.integers(1, 5)))
        raw = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
        scale = np.float32(2.0 ** rng.integers(-20, 20))
        cases.append(np.where(np.isfinite(raw), raw, 0) if rng.random() < 0.3 else (rng.standard_normal(shape) * scale).astype(np.float32))
    for levels in LEVELS.values():  # exact ties at scale 1: every x.5 between -L and L
        cases.append(np.arange(-levels, levels + 0.5, 0.5, dtype=np.float32).reshape(1, -1))
    for x in cases:
        for codec_name in codec.CODECS:
            for granularity in ("tensor", "channel", "group") if x.ndim >= 2 else ("tensor", "group"):
                for rounding in codec.ROUNDINGS if codec_name in INT_CODECS else ("nearest",):
                    options = {"granularity": granularity, "group_size": int(rng.integers(1, 70)),
                               "rounding": rounding, "seed": int(rng.integers(0, 2**63))}
                    if codec_name == "fp16" and np.abs(x).max() >= 65520:
                        continue
                    frame = codec.encode(x, codec_name, backend="c", **options)
                    assert frame == codec.encode(x, codec_name, backend="numpy", **options)
                    np.testing.assert_array_equal(bits(codec.decode(frame, backend="c")),
                                                  bits(codec.decode(frame, backend="numpy")))


def test_auto_backend_uses_c_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    calls: list[str] = []
    original = native.encode_int8

    def spy(*args: object) -> None:
        calls.append("c")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(native, "encode_int8", spy)
    codec.encode(np.linspace(-1, 1, 50, dtype=np.float32))
    assert calls == ["c"]


# ---------------------------------------------------------------------------------------------
# round trips and numerical rules


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


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_messages_are_refused_with_count_and_index(backend: str, codec_name: str, bad: float) -> None:
    x = np.zeros((2, 3, 4), np.float32)
    x[1, 0, 2] = bad
    x[1, 2, 3] = bad
    with pytest.raises(CodecError, match=r"message contains 2 non-finite values \(first at index \(1, 0, 2\)"):
        codec.encode(x, codec_name, granularity="channel", backend=backend)


@pytest.mark.parametrize("array, expected", [
    (np.zeros(3, np.float64), "expected float32, got float64"),
    (np.zeros(3, np.int8), "expected float32, got int8"),
    (np.zeros(3, ">f4"), "expected float32, got >f4"),
    ([1.0, 2.0], "expected a numpy.ndarray of float32, got list"),
])
def test_other_dtypes_are_refused(array: object, expected: str) -> None:
    with pytest.raises(CodecError, match=expected):
        codec.encode(array)  # type: ignore[arg-type]


def test_non_contiguous_input_is_encoded_as_its_contiguous_copy(backend: str) -> None:
    x = np.random.default_rng(1).standard_normal((4, 6, 5)).astype(np.float32)
    view = x[:, ::2].transpose(0, 2, 1)
    assert not view.flags.c_contiguous
    for codec_name in codec.CODECS:
        expected = codec.encode(np.ascontiguousarray(view), codec_name, granularity="channel", backend=backend)
        assert codec.encode(view, codec_name, granularity="channel", backend=backend) == expected


def test_unaligned_input_is_accepted(backend: str) -> None:
    raw = np.zeros(4 * 10 + 1, np.uint8)
    x = raw[1:].view(np.float32)
    x[:] = np.arange(10, dtype=np.float32)
    assert not x.flags.aligned
    assert codec.encode(x, "int8", backend=backend) == codec.encode(x.copy(), "int8", backend="numpy")


def test_channel_granularity_needs_two_dims() -> None:
    for call in (lambda: codec.encode(np.ones(4, np.float32), "fp16", granularity="channel"),
                 lambda: codec.frame_nbytes((4,), "int8", "channel")):
        with pytest.raises(CodecError, match=r"expected ndim >= 2, got shape \(4,\); hint: use granularity='tensor'"):
            call()


@pytest.mark.parametrize("argument, value", [
    ("codec", "int3"), ("granularity", "row"), ("rounding", "up"), ("backend", "cuda"),
])
def test_unknown_choices_are_refused_listing_the_options(argument: str, value: str) -> None:
    kwargs = {"codec": "int8", "granularity": "tensor", "rounding": "nearest", "backend": "auto", argument: value}
    with pytest.raises(CodecError, match=rf"{argument}: expected one of \(.*\), got '{value}'"):
        codec.encode(np.ones(3, np.float32), kwargs.pop("codec"), **kwargs)
    if argument == "backend":
        with pytest.raises(CodecError, match="backend: expected one of"):
            codec.decode(codec.encode(np.ones(3, np.float32)), backend=value)


@pytest.mark.parametrize("argument, value, expected", [
    ("group_size", 0, r"group_size: expected an int in \[1, 4294967295\], got 0"),
    ("group_size", 2**32, r"group_size: expected an int in \[1, 4294967295\], got 4294967296"),
    ("group_size", 64.0, "group_size: expected an int, got float"),
    ("seed", -1, r"seed: expected an int in \[0, 2\*\*64 - 1\], got -1; hint: reduce it modulo 2\*\*64"),
    ("seed", 2**64, r"seed: expected an int in \[0, 2\*\*64 - 1\], got 18446744073709551616"),
    ("seed", "1", "seed: expected an int, got str"),
])
def test_bad_group_sizes_and_seeds_are_refused(argument: str, value: object, expected: str) -> None:
    with pytest.raises(CodecError, match=expected):
        codec.encode(np.ones(3, np.float32), "int4", granularity="group", rounding="stochastic", **{argument: value})
    assert codec.encode(np.ones(3, np.float32), "int4", group_size=np.int64(2), seed=np.uint64(2**64 - 1))  # numpy ints do


@pytest.mark.parametrize("codec_name", ["fp32", "fp16"])
def test_stochastic_rounding_of_a_float_codec_is_refused(codec_name: str) -> None:
    with pytest.raises(CodecError, match=rf"rounding 'stochastic': expected one of the int codecs .*, got codec '{codec_name}'.*hint: use rounding='nearest'"):
        codec.encode(np.ones(3, np.float32), codec_name, rounding="stochastic")


@pytest.mark.parametrize("shape", [(), (5,), (64, 32, 14, 14), (7, 0), (3, 129, 1, 1, 2), (3, 5, 7)])
@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
def test_frame_nbytes_is_the_length_of_encode(shape: tuple[int, ...], codec_name: str, granularity: str) -> None:
    if granularity == "channel" and len(shape) < 2:
        return
    x = np.ones(shape, np.float32)
    for group_size in (1, 7, 64):
        options = {"granularity": granularity, "group_size": group_size}
        assert codec.frame_nbytes(shape, codec_name, **options) == len(codec.encode(x, codec_name, **options))


@pytest.mark.parametrize("codec_name, bits_per_value", [("fp32", 32), ("fp16", 16), ("int8", 8), ("int4", 4), ("int2", 2)])
def test_frames_shrink_with_the_codec(codec_name: str, bits_per_value: int) -> None:
    """What the bandwidth buys: payload bits per value, plus 4 bytes per scale and the header."""
    shape = (64, 32, 14, 14)
    header = 28 + 4 * len(shape)
    scales = {"tensor": 1, "channel": 32, "group": 64 * 32 * 14 * 14 // 64}
    for granularity, count in scales.items():
        count = count if codec_name in INT_CODECS else 0
        expected = header + 4 * count + 64 * 32 * 14 * 14 * bits_per_value // 8
        assert codec.frame_nbytes(shape, codec_name, granularity) == expected


def test_encode_returns_one_new_bytes_object_per_message(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame is built in place as bytes (edgebll/codec/buffer.py); without that, by a copy. Same frame."""
    x = np.random.default_rng(5).standard_normal((4, 8, 3), dtype=np.float32)
    frames = [codec.encode(x, name, granularity="group", group_size=5, backend=backend) for name in codec.CODECS]
    assert all(type(frame) is bytes for frame in frames)
    again = codec.encode(x, "int4", granularity="group", group_size=5, backend=backend)
    assert again == frames[3] and again is not frames[3]
    hash(again)
    monkeypatch.setattr(buffer, "_ALLOCATE", None)
    for name, frame in zip(codec.CODECS, frames):
        assert codec.encode(x, name, granularity="group", group_size=5, backend=backend) == frame


@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_c_path_allocates_nothing_the_size_of_the_message(codec_name: str) -> None:
    """Encode allocates the frame it returns and decode nothing beyond `out`: no staging copies."""
    require_native()
    x = np.random.default_rng(6).standard_normal((16, 64, 16, 16), dtype=np.float32)  # 1 MiB
    out = np.empty_like(x)
    codec.decode(codec.encode(x, codec_name, granularity="group", backend="c"), out, backend="c")  # warm up
    tracemalloc.start()
    try:
        frame = codec.encode(x, codec_name, granularity="group", group_size=16, backend="c")  # 64 KiB of scales
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        codec.decode(frame, out, backend="c")
        decode_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # a few KiB of Python objects (header, ctypes arguments); a staged payload would be >= 64 KiB
    assert encode_peak - len(frame) < 16384
    assert decode_peak < 16384


# ---------------------------------------------------------------------------------------------
# the frame


def test_frame_layout_is_pinned() -> None:
    """The byte table of edgebll/codec/frame.py, spelled out: a format change must fail here."""
    x = np.array([[1.0, -2.0], [0.0, 4.0]], np.float32)
    frame = codec.encode(x, "int8", granularity="channel", backend="numpy")
    scales = np.array([1 / 127, 4 / 127], np.float32).tobytes()
    payload = np.array([127, -64, 0, 127], np.int8).tobytes()
    expected_header = (
        b"EBLM" + bytes([2, 2, 1, 2]) + struct.pack("<I", 2) + struct.pack("<Q", 4)
        + struct.pack("<I", zlib.crc32(scales + payload)) + struct.pack("<I", 0) + struct.pack("<2I", 2, 2)
    )
    assert frame == expected_header + scales + payload
    header = FrameHeader.from_bytes(frame)
    assert header == FrameHeader("int8", "channel", (2, 2), 2, 4, zlib.crc32(scales + payload))
    assert header.to_bytes() == expected_header and header.frame_nbytes == len(frame)


def test_group_frame_layout_is_pinned() -> None:
    """int4 per group of 3 over 5 values: the group size in the header, ceil(5 / 3) scales, 3 bytes."""
    x = np.array([7.0, -7.0, 3.5, 1.0, -2.0], np.float32)
    frame = codec.encode(x, "int4", granularity="group", group_size=3, backend="numpy")
    scales = np.array([1.0, 2 / 7], np.float32).tobytes()
    # q = 7 -7 4 | 3 -7: 3.5 / 1 is a tie (to even: 4); 1 / float32(2/7) = 3.4999998 rounds to 3
    payload = bytes([0x97, 0x34, 0x09])
    expected_header = (
        b"EBLM" + bytes([2, 3, 2, 1]) + struct.pack("<I", 2) + struct.pack("<Q", 3)
        + struct.pack("<I", zlib.crc32(scales + payload)) + struct.pack("<I", 3) + struct.pack("<I", 5)
    )
    assert frame == expected_header + scales + payload
    assert FrameHeader.from_bytes(frame) == FrameHeader("int4", "group", (5,), 2, 3, zlib.crc32(scales + payload), 3)


def test_version_1_frames_still_decode(backend: str) -> None:
    """A frame from edgebll before int4 (24-byte fixed header, no group size) decodes as it did."""
    scales = np.array([1 / 127, 4 / 127], np.float32).tobytes()
    payload = np.array([127, -64, 0, 127], np.int8).tobytes()
    v1_frame = (
        b"EBLM" + bytes([1, 2, 1, 2]) + struct.pack("<I", 2) + struct.pack("<Q", 4)
        + struct.pack("<I", zlib.crc32(scales + payload)) + struct.pack("<2I", 2, 2) + scales + payload
    )
    header = FrameHeader.from_bytes(v1_frame)
    assert (header.version, header.codec, header.granularity, header.nbytes) == (1, "int8", "channel", 32)
    assert header.to_bytes() == v1_frame[:32]
    expected = np.array([[1, -64 * 4 / 127], [0, 127 * 4 / 127]], np.float32)
    expected[0, 0] = np.float32(127) * np.float32(1 / 127)
    np.testing.assert_array_equal(codec.decode(v1_frame, backend=backend), expected)
    fp16 = np.array([1.5, -2.0], np.float16).tobytes()
    v1_fp16 = b"EBLM" + bytes([1, 1, 0, 1]) + struct.pack("<IQI", 0, 4, zlib.crc32(fp16)) + struct.pack("<I", 2) + fp16
    np.testing.assert_array_equal(codec.decode(v1_fp16, backend=backend), [1.5, -2.0])
    # version 1 knew only fp32 / fp16 / int8 per tensor / channel: anything else in one is corruption
    with pytest.raises(CodecError, match=r"frame codec id: expected one of \{0: 'fp32', 1: 'fp16', 2: 'int8'\}, got 3"):
        codec.decode(v1_frame[:5] + bytes([3]) + v1_frame[6:], backend=backend)
    with pytest.raises(CodecError, match=r"frame granularity id: expected one of \{0: 'tensor', 1: 'channel'\}, got 2"):
        codec.decode(v1_frame[:6] + bytes([2]) + v1_frame[7:], backend=backend)


@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_decode_accepts_bytes_bytearray_and_memoryview(backend: str, codec_name: str) -> None:
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    frame = codec.encode(x, codec_name, granularity="channel")
    expected = codec.decode(frame, backend="numpy")
    padded = bytearray(b"\x00" + frame + b"\x00")  # memoryview at an odd offset: unaligned views
    for variant in (frame, bytearray(frame), memoryview(frame), memoryview(padded)[1:-1]):
        np.testing.assert_array_equal(bits(codec.decode(variant, backend=backend)), bits(expected))


def test_decode_into_out(backend: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.full((3, 4), np.nan, np.float32)
    for codec_name in codec.CODECS:
        out[:] = np.nan
        result = codec.decode(codec.encode(x, codec_name), out=out, backend=backend)
        assert result is out
        np.testing.assert_allclose(out, x, atol=11 / LEVELS.get(codec_name, 127) / 2 * 1.0001)


@pytest.mark.parametrize("out, expected", [
    (np.empty((4, 3), np.float32), r"out shape: expected \(3, 4\) \(from the frame\), got \(4, 3\)"),
    (np.empty(12, np.float32), r"out shape: expected \(3, 4\) \(from the frame\), got \(12,\)"),
    (np.empty((3, 4), np.float64), "out dtype: expected float32, got float64"),
    (np.empty((3, 8), np.float32)[:, ::2], "out: expected a C-contiguous"),
    (np.frombuffer(bytes(48), np.float32).reshape(3, 4), "out: expected a writeable array"),
    ([[0.0] * 4] * 3, "out: expected a numpy.ndarray, got list"),
])
def test_decode_refuses_an_unusable_out(backend: str, out: object, expected: str) -> None:
    frame = codec.encode(np.ones((3, 4), np.float32))
    with pytest.raises(CodecError, match=expected):
        codec.decode(frame, out=out, backend=backend)  # type: ignore[arg-type]


def test_decode_refuses_out_inside_the_frame() -> None:
    frame = bytearray(codec.encode(np.ones((4, 4), np.float32), "fp32"))
    inside = np.frombuffer(frame, np.float32, 16, len(frame) - 64).reshape(4, 4)
    with pytest.raises(CodecError, match="out: expected memory apart from the frame"):
        codec.decode(frame, out=inside)


def _good_frame() -> bytes:
    return codec.encode(np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4), "int8", granularity="channel")


def _flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def _nan_scale(frame: bytes) -> bytes:
    tampered = bytearray(frame)
    tampered[FIXED_NBYTES + 12 : FIXED_NBYTES + 16] = np.float32(np.nan).tobytes()  # scale 0
    return with_valid_crc(tampered)


def _with_scale_0(frame: bytes, value: float) -> bytes:
    """`frame` (of ndim 3) with its first scale replaced and a valid CRC."""
    return with_valid_crc(frame[:40] + np.float32(value).tobytes() + frame[44:])


def _int4_frame(x: np.ndarray, **options: object) -> bytes:
    return codec.encode(x.astype(np.float32), "int4", backend="numpy", **options)  # type: ignore[arg-type]


BAD_FRAMES = {
    "empty": (lambda f: b"", r"truncated frame: expected at least 28 bytes \(the fixed header\), got 0"),
    "short header": (lambda f: f[:20], r"truncated frame: expected at least 28 bytes \(the fixed header of version 2\), got 20"),
    "short v1 header": (lambda f: f[:4] + bytes([1]) + f[5:20], r"expected at least 24 bytes \(the fixed header of version 1\), got 20"),
    "short shape": (lambda f: f[:30], r"truncated frame: expected at least 40 bytes \(the header with ndim=3\), got 30"),
    "magic": (lambda f: b"EBLX" + f[4:], r"frame magic: expected b'EBLM', got b'EBLX'"),
    "version": (lambda f: reframe(f, version=3), r"frame format version: expected one of \(1, 2\), got 3; hint"),
    "version 0": (lambda f: reframe(f, version=0), r"frame format version: expected one of \(1, 2\), got 0"),
    "group size without groups": (lambda f: reframe(f, group_size=64), "frame group size: expected 0 with granularity 'channel', got 64"),
    "groups without a size": (lambda f: reframe(f, granularity=2, group_size=0), "frame group size: expected at least 1 with granularity 'group', got 0"),
    "group scale count": (lambda f: reframe(f, granularity=2, group_size=5), r"frame scale count for int8 per group of 5 of shape \(2, 3, 4\): expected 5, got 3"),
    "int4 payload size": (lambda f: reframe(f, codec=3), r"frame payload size for int4 of shape .*: expected 12 bytes, got 24"),
    "int4 padding": (lambda f: with_valid_crc(_int4_frame(np.ones((1, 3, 5)))[:-1] + bytes([0x77])),
                     "frame payload padding: expected the 4 unused high bits of the last byte to be zero, got 0x7"),
    "codec id": (lambda f: reframe(f, codec=7), "frame codec id: expected one of .*, got 7"),
    "granularity id": (lambda f: reframe(f, granularity=9), "frame granularity id: expected one of .*, got 9"),
    "ndim": (lambda f: reframe(f, ndim=40), "frame ndim: expected at most 32, got 40"),
    "scale count": (lambda f: reframe(f, num_scales=1), r"frame scale count for int8 per channel of shape \(2, 3, 4\): expected 3, got 1"),
    "payload size": (lambda f: reframe(f, payload_nbytes=25), "frame payload size for int8 of shape .*: expected 24 bytes, got 25"),
    "channel with ndim 1": (lambda f: reframe(f[:FIXED_NBYTES] + f[FIXED_NBYTES + 8 :], ndim=1), "expected ndim >= 2"),
    "truncated payload": (lambda f: f[:-1], r"truncated frame: expected 76 bytes for int8 of shape \(2, 3, 4\), got 75"),
    "extra bytes": (lambda f: f + b"\x00", "extra bytes after frame: expected 76 bytes .*, got 77"),
    "crc": (_flip_last_byte, r"frame CRC32 of scales and payload: expected 0x[0-9a-f]{8}, got 0x[0-9a-f]{8}"),
    "nan scale": (_nan_scale, r"frame scale 0: expected a float32 in \[1.17549e-38, 2.67939e\+36\], got nan"),
    "huge scale": (lambda f: _with_scale_0(f, 3e38), r"frame scale 0: expected a float32 in \[.*\], got 3e\+38"),
    "zero scale": (lambda f: _with_scale_0(f, 0.0), r"frame scale 0: expected a float32 in \[.*\], got 0.0"),
    "int4 huge scale": (lambda f: _with_scale_0(_int4_frame(np.ones((2, 3, 4)), granularity="channel"), 3e38),
                        r"frame scale 0: expected a float32 in \[1.17549e-38, 4.86118e\+37\], got 3e\+38"),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_bad_frames_are_refused_before_any_data_is_written(backend: str, case: str) -> None:
    tamper, expected = BAD_FRAMES[case]
    frame = tamper(_good_frame())
    out = np.full((2, 3, 4), 7.0, np.float32)
    with pytest.raises(CodecError, match=expected):
        codec.decode(frame, out=out, backend=backend)
    assert (out == 7.0).all()


def test_good_frame_decodes() -> None:
    """The control of the table above: untampered, the same frame decodes."""
    assert codec.decode(_good_frame()).shape == (2, 3, 4)
    assert codec.decode(with_valid_crc(_good_frame())).shape == (2, 3, 4)


def test_decode_refuses_non_buffers_and_strided_views() -> None:
    with pytest.raises(CodecError, match="frame: expected bytes, bytearray or memoryview, got str"):
        codec.decode("EBLM")  # type: ignore[arg-type]
    strided = memoryview(np.frombuffer(_good_frame(), np.uint8)[::2])
    with pytest.raises(CodecError, match="expected a contiguous buffer"):
        codec.decode(strided)


def test_header_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(CodecError, match="frame ndim: expected at most 32, got 33"):
        FrameHeader.for_message("fp32", "tensor", (1,) * 33).to_bytes()
    with pytest.raises(CodecError, match=r"frame shape \(4294967296,\): expected every dimension in \[0, 4294967295\] \(uint32\), got 4294967296"):
        FrameHeader.for_message("fp32", "tensor", (2**32,)).to_bytes()
    assert MAGIC == b"EBLM"


# ---------------------------------------------------------------------------------------------
# the native library: loading and its own argument checks


def test_backend_c_without_the_library_raises_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None
) -> None:
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    assert not codec.native_available()
    x = np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6)
    with pytest.raises(NativeLibraryError, match=r"native codec library not found: .*hint: build it with `pip install"):
        codec.encode(x, backend="c")
    with pytest.raises(NativeLibraryError):
        codec.decode(codec.encode(x, backend="numpy"), backend="c")
    frame = codec.encode(x, "int8", granularity="channel")  # auto: silently numpy
    assert frame == codec.encode(x, "int8", granularity="channel", backend="numpy")
    np.testing.assert_array_equal(codec.decode(frame), codec.decode(frame, backend="numpy"))


def test_a_broken_library_file_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None) -> None:
    (tmp_path / native.LIBRARY_FILENAMES[0]).write_bytes(b"not an ELF file")
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    with pytest.raises(NativeLibraryError, match="cannot be loaded: .*hint: build it"):
        native.load_library()
    assert codec.encode(np.ones(3, np.float32)) == codec.encode(np.ones(3, np.float32), backend="numpy")


def test_the_loader_finds_the_installed_library(fresh_loader: None) -> None:
    require_native()
    import edgebll

    found = native.find_library(native.search_dirs())
    assert found is not None and found.parent in {Path(p).resolve() for p in edgebll.__path__}
    assert native.load_library().edgebll_codec_abi_version() == native.ABI_VERSION


def test_c_checks_its_arguments() -> None:
    require_native()
    lib = native.load_library()
    x = np.zeros(8, np.float32)
    payload = np.zeros(8, np.float32)
    scales = np.zeros(2, np.float32)
    q = np.zeros(8, np.int8)
    addr = lambda a: a.ctypes.data  # noqa: E731
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(payload)) == 0
    assert lib.edgebll_encode_int4(addr(x), 8, 4, addr(scales), 2, 0, 0, addr(q)) == 0
    assert lib.edgebll_encode_fp32(None, 8, addr(payload)) == 1  # NULL
    assert lib.edgebll_decode_fp16(addr(q), 2, None) == 1
    assert lib.edgebll_encode_int2(addr(x), 8, 4, None, 2, 0, 0, addr(q)) == 1
    assert lib.edgebll_encode_fp32(addr(x) + 1, 4, addr(payload)) == 2  # misaligned
    assert lib.edgebll_decode_int8(addr(q), 8, 4, addr(scales) + 2, 2, addr(x)) == 2
    assert lib.edgebll_decode_int4(addr(q) + 1, 8, 4, addr(scales), 2, addr(x)) == 0  # byte payloads: any address
    # layouts: runs must be a multiple of n_scales; a short last run only with a scale per run
    assert lib.edgebll_encode_int8(addr(x), 8, 1, addr(scales), 3, 0, 0, addr(q)) == 3  # 8 runs, 3 scales
    assert lib.edgebll_encode_int8(addr(x), 8, 4, addr(scales), 1, 0, 0, addr(q)) == 0  # 2 runs, 1 scale
    assert lib.edgebll_encode_int8(addr(x), 7, 3, addr(scales), 3, 0, 0, addr(q)) == 0  # 3 groups, the last short
    assert lib.edgebll_encode_int8(addr(x), 7, 3, addr(scales), 1, 0, 0, addr(q)) == 3  # short last run, shared scale
    assert lib.edgebll_encode_int8(addr(x), 8, 0, addr(scales), 1, 0, 0, addr(q)) == 3  # empty runs
    assert lib.edgebll_encode_int8(addr(x), 8, 8, addr(scales), 0, 0, 0, addr(q)) == 3  # no scales
    assert lib.edgebll_decode_int2(addr(q), 8, 1, addr(scales), 3, addr(x)) == 3
    assert lib.edgebll_encode_int8(addr(x), 0, 0, addr(scales), 2, 0, 0, addr(q)) == 0  # nothing to do
    assert scales.tolist() == [FLT_MIN, FLT_MIN]
    assert lib.edgebll_encode_int8(addr(x), 2**62, 1, addr(scales), 1, 0, 0, addr(q)) == 3  # n * 4 overflows
    assert lib.edgebll_encode_fp16(addr(x), 2**63, addr(q)) == 3
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(scales), 1, 2, 0, addr(q)) == 7  # no such rounding
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(x) + 16) == 4  # output overlaps input
    assert lib.edgebll_decode_int8(addr(q), 8, 4, addr(scales), 2, addr(q)) == 4
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(scales), 1, 0, 0, addr(x) + 28) == 4  # 4 payload bytes
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(x) + 28, 1, 0, 0, addr(q)) == 4  # scales inside x
    x[3] = np.inf
    assert lib.edgebll_encode_int8(addr(x), 8, 1, addr(scales), 2, 0, 0, addr(q)) == 5  # non-finite
    assert lib.edgebll_encode_int2(addr(x), 8, 3, addr(np.zeros(3, np.float32)), 3, 1, 5, addr(q)) == 5
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(payload)) == 5
    assert lib.edgebll_encode_fp16(addr(x), 8, addr(np.zeros(8, np.uint16))) == 6  # Inf out


def test_an_unexpected_c_status_becomes_a_codec_error() -> None:
    with pytest.raises(CodecError, match="edgebll_decode_fp32 returned EDGEBLL_ERR_OVERLAP; this is a bug"):
        native._check(4, "edgebll_decode_fp32")
    with pytest.raises(CodecError, match="returned 99"):
        native._check(99, "edgebll_encode_fp32")


def test_ctypes_signatures_are_declared() -> None:
    require_native()
    lib = native.load_library()
    special = {"edgebll_crc32": ctypes.c_uint32, "edgebll_crc32_implementation": ctypes.c_char_p}
    for name, (argtypes, restype) in native._SIGNATURES.items():
        function = getattr(lib, name)
        assert function.argtypes == argtypes and function.restype is restype is special.get(name, ctypes.c_int)


# ---------------------------------------------------------------------------------------------
# CRC-32: the C one must be zlib's, bit for bit, on every path (tables, PCLMULQDQ, ARMv8 CRC32)

# Every length up to 600 (the fast paths switch at 64 and 256 bytes and fold 16 at a time), a
# sweep to several KiB, sizes around the 256-byte steps, and large ones.
CRC_LENGTHS = [*range(601), *range(601, 9000, 37), *(k * 256 + d for k in (4, 16, 64) for d in (-17, -1, 0, 1, 15, 16, 17)),
               65_537, 1 << 20, (1 << 20) + 13, (3 << 20) + 7]


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo ("flags" on x86, "Features" on arm64; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def check_crc32_against_zlib() -> None:
    """edgebll_crc32 of the loaded library equals zlib.crc32 on every length, at odd addresses, chained."""
    lib = native.load_library()
    data = np.random.default_rng(7).integers(0, 256, max(CRC_LENGTHS) + 16, dtype=np.uint8)
    raw = data.tobytes()
    base = data.ctypes.data
    for length in CRC_LENGTHS:
        for offset in (0, 1, 3, 8, 13) if length < 20_000 else (0, 5):
            expected = zlib.crc32(raw[offset : offset + length])
            assert lib.edgebll_crc32(0, base + offset, length) == expected, (length, offset)
    for length in (0, 1, 63, 64, 255, 256, 4099, 1 << 20):  # continuing a crc, as zlib.crc32(data, value)
        for start in (0, 0xFFFFFFFF, 0x12345678):
            assert lib.edgebll_crc32(start, base + 3, length) == zlib.crc32(raw[3 : 3 + length], start), (length, start)
    assert lib.edgebll_crc32(0x1234, None, 0) == 0x1234  # NULL is fine with n == 0


def test_c_crc32_equals_zlib() -> None:
    require_native()
    check_crc32_against_zlib()
    assert native.crc32(memoryview(b"123456789")) == zlib.crc32(b"123456789") == 0xCBF43926  # the check value


def test_c_crc32_uses_the_fastest_code_the_cpu_has() -> None:
    require_native()
    flags = cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and "pclmulqdq" in flags:
        expected = "vpclmulqdq-avx512" if {"vpclmulqdq", "avx512f"} <= flags else "pclmulqdq"
    elif platform.machine() == "aarch64" and "crc32" in flags:
        expected = "armv8-crc32"
    else:
        expected = "slice-by-8"
    assert native.crc32_implementation() == expected


def test_both_backends_checksum_frames_with_zlib_crc32(backend: str) -> None:
    x = np.random.default_rng(3).standard_normal((4, 8, 9, 9), dtype=np.float32)
    frame = codec.encode(x, "int8", granularity="group", group_size=7, backend=backend)
    header = FrameHeader.from_bytes(frame)
    assert header.crc32 == zlib.crc32(frame[header.nbytes :])


def run_harness(compiler: str, folder: Path, *defines: str, runner: tuple[str, ...] = ()) -> list[str]:
    """Build tests/native/codec_harness.c with csrc/ (statically, for qemu-user) and return its lines."""
    binary = folder / f"harness{''.join(defines)}"
    sources = [str(REPO / "tests" / "native" / "codec_harness.c"), *(str(REPO / "csrc" / name) for name in ("codec.c", "crc32.c"))]
    subprocess.run([compiler, "-static", "-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-fno-fast-math",
                    "-ffp-contract=off", *defines, f"-I{REPO / 'csrc'}", *sources, "-o", str(binary)], check=True)
    return subprocess.run([*runner, str(binary)], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="cross-checks aarch64 from an x86-64 host")
def test_aarch64_build_matches_the_host_and_zlib(tmp_path: Path) -> None:
    """Cross-compile the codec for aarch64 (ARMv8 CRC32 and table builds), run it under qemu-user, compare.

    Needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (apt-get install -y ...).
    """
    cross = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    host = shutil.which(os.environ.get("CC", "cc"))
    if cross is None or qemu is None or host is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu "
                    "libc6-dev-arm64-cross qemu-user)")
    expected = run_harness(host, tmp_path)
    data = bytes((((i * 2654435761) & 0xFFFFFFFF) >> 24) for i in range(70000))  # as the harness makes it
    crc_lines = [line.split() for line in expected if line.startswith("crc ")]
    assert len(crc_lines) > 2000
    for _, offset, length, value in crc_lines:
        start = int(offset)
        assert int(value, 16) == zlib.crc32(data[start : start + int(length)]), (offset, length)
    for defines, implementation in (((), "armv8-crc32"), (("-DEDGEBLL_CODEC_NO_CLONES",), "slice-by-8")):
        lines = run_harness(cross, tmp_path, *defines, runner=(qemu,))
        assert lines[0] == f"implementation {implementation}"
        assert lines[1:] == expected[1:]


def test_crc32_tables_are_generated() -> None:
    done = subprocess.run([sys.executable, str(REPO / "csrc" / "make_crc32_table.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
