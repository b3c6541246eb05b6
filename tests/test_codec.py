"""The message codec: C kernel vs numpy reference byte for byte, error bounds, and every bad frame."""

from __future__ import annotations

import ctypes
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebll import codec
from edgebll.codec import native
from edgebll.codec.frame import FIXED_NBYTES, MAGIC, FrameHeader
from edgebll.errors import CodecError, NativeLibraryError

BACKENDS = ("numpy", "c")
FLT_MIN = np.finfo(np.float32).tiny
SCALE_MAX = np.float32(float.fromhex("0x1.020406p+121"))
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


def reframe(frame: bytes, **fixed_fields: int) -> bytes:
    """`frame` with fields of its fixed header replaced (by name), CRC left as it was."""
    names = ("magic", "version", "codec", "granularity", "ndim", "num_scales", "payload_nbytes", "crc32")
    values = dict(zip(names, struct.unpack_from("<4sBBBBIQI", frame)))
    values.update(fixed_fields)
    return struct.pack("<4sBBBBIQI", *values.values()) + frame[FIXED_NBYTES:]


def with_valid_crc(frame: bytes | bytearray) -> bytes:
    """Recompute the CRC of a (tampered) frame so that only the tampering is wrong."""
    ndim = frame[7]
    body = bytes(frame[FIXED_NBYTES + 4 * ndim :])
    return reframe(bytes(frame), crc32=zlib.crc32(body))


# ---------------------------------------------------------------------------------------------
# C vs numpy parity

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)
finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@HYPOTHESIS
@given(
    x=hnp.arrays(np.float32, shapes, elements=finite_float32),
    codec_name=st.sampled_from(codec.CODECS),
    granularity=st.sampled_from(codec.GRANULARITIES),
)
def test_c_frame_equals_numpy_frame_for_any_finite_input(x: np.ndarray, codec_name: str, granularity: str) -> None:
    """Adversarial values (subnormals, FLT_MAX, -0.0, mixed magnitudes): same bytes, same decoded bits."""
    require_native()
    if granularity == "channel" and x.ndim < 2:
        granularity = "tensor"
    if codec_name == "fp16" and x.size and np.abs(x).max() >= 65520:
        for backend in BACKENDS:  # both refuse the same way
            with pytest.raises(CodecError, match="beyond the float16 range"):
                codec.encode(x, codec_name, granularity=granularity, backend=backend)
        return
    frame_c = codec.encode(x, codec_name, granularity=granularity, backend="c")
    frame_numpy = codec.encode(x, codec_name, granularity=granularity, backend="numpy")
    assert frame_c == frame_numpy
    assert len(frame_c) == codec.frame_nbytes(x.shape, codec_name, granularity)
    decoded_c = codec.decode(frame_c, backend="c")
    decoded_numpy = codec.decode(frame_c, backend="numpy")
    assert decoded_c.shape == x.shape and decoded_c.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded_c), bits(decoded_numpy))


ACTIVATION_SHAPES = [(64, 32, 14, 14), (256, 10), (3, 5, 7), (1, 1), (0, 4, 2), (2, 0, 3)]


@pytest.mark.parametrize("shape, granularity", [
    *((shape, granularity) for shape in ACTIVATION_SHAPES for granularity in codec.GRANULARITIES),
    ((1000,), "tensor"),  # channel needs ndim >= 2: test_channel_granularity_needs_two_dims
])
@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_c_equals_numpy_on_activation_like_messages(shape: tuple[int, ...], codec_name: str, granularity: str) -> None:
    """Realistic messages: per-channel magnitudes spanning 1e-3..1e3, ReLU zeros, an all-zero channel."""
    require_native()
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2 and shape[1] > 1:
        x *= np.logspace(-3, 3, shape[1], dtype=np.float32).reshape((1, -1) + (1,) * (len(shape) - 2))
        x[:, 1] = 0.0
    x = np.maximum(x, 0, where=rng.random(shape) < 0.3, out=x)
    frame_c = codec.encode(x, codec_name, granularity=granularity, backend="c")
    assert frame_c == codec.encode(x, codec_name, granularity=granularity, backend="numpy")
    np.testing.assert_array_equal(bits(codec.decode(frame_c, backend="c")), bits(codec.decode(frame_c, backend="numpy")))


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
    granularity=st.sampled_from(codec.GRANULARITIES),
    backend=st.sampled_from(BACKENDS),
)
def test_int8_round_trip_error_is_at_most_half_a_scale(x: np.ndarray, granularity: str, backend: str) -> None:
    if backend == "c":
        require_native()
    frame = codec.encode(x, "int8", granularity=granularity, backend=backend)
    header, scales, q = int8_parts(frame)
    amax = np.abs(x).max(axis=tuple(a for a in range(x.ndim) if a != 1)) if granularity == "channel" else np.abs(x).max()
    np.testing.assert_array_equal(scales, np.clip(np.atleast_1d(amax) / np.float32(127), FLT_MIN, SCALE_MAX))
    assert np.abs(q.astype(np.int16)).max(initial=0) <= 127
    decoded = codec.decode(frame, backend=backend).astype(np.float64)
    per_element_scale = scales.reshape((1, -1) + (1,) * (x.ndim - 2)) if granularity == "channel" else scales[0]
    error = np.abs(decoded - x.astype(np.float64))
    # scale/2 from rounding, plus the float32 rounding of x/scale and of q*scale (a few ulps)
    bound = per_element_scale.astype(np.float64) * (0.5 + 1e-5) + np.spacing(np.abs(x).astype(np.float64)) * 2**29
    assert (error <= bound).all()


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


def test_int8_tiny_and_huge_tensors_keep_the_bound(backend: str) -> None:
    """amax/127 subnormal (the FLT_MIN floor) and amax = FLT_MAX (no overflow in x/scale)."""
    tiny = np.array([1e-45, -3e-44, 1e-38, 0.0], np.float32)
    huge = np.array([np.finfo(np.float32).max, -1e38, 1.0], np.float32)
    for x in (tiny, huge):
        frame = codec.encode(x, "int8", backend=backend)
        scale = int8_parts(frame)[1][0]
        decoded = codec.decode(frame, backend=backend).astype(np.float64)
        assert np.isfinite(decoded).all()
        assert (np.abs(decoded - x.astype(np.float64)) <= float(scale) * (0.5 + 1e-6)).all()
    assert int8_parts(codec.encode(tiny, "int8", backend=backend))[1][0] == FLT_MIN
    assert int8_parts(codec.encode(huge, "int8", backend=backend))[1][0] == SCALE_MAX


def test_scale_max_is_the_largest_scale_that_decodes_127_finitely() -> None:
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(127) * SCALE_MAX)
        assert np.isinf(np.float32(127) * np.nextafter(SCALE_MAX, np.float32(np.inf)))
        assert np.finfo(np.float32).max / np.float32(127) > SCALE_MAX  # why the ceiling exists


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


@pytest.mark.parametrize("argument, value", [("codec", "int4"), ("granularity", "row"), ("backend", "cuda")])
def test_unknown_choices_are_refused_listing_the_options(argument: str, value: str) -> None:
    kwargs = {"codec": "int8", "granularity": "tensor", "backend": "auto", argument: value}
    with pytest.raises(CodecError, match=rf"{argument}: expected one of \(.*\), got '{value}'"):
        codec.encode(np.ones(3, np.float32), kwargs.pop("codec"), **kwargs)
    if argument == "backend":
        with pytest.raises(CodecError, match="backend: expected one of"):
            codec.decode(codec.encode(np.ones(3, np.float32)), backend=value)


@pytest.mark.parametrize("shape", [(), (5,), (64, 32, 14, 14), (7, 0), (3, 129, 1, 1, 2)])
@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("granularity", codec.GRANULARITIES)
def test_frame_nbytes_is_the_length_of_encode(shape: tuple[int, ...], codec_name: str, granularity: str) -> None:
    if granularity == "channel" and len(shape) < 2:
        return
    x = np.ones(shape, np.float32)
    assert codec.frame_nbytes(shape, codec_name, granularity) == len(codec.encode(x, codec_name, granularity=granularity))


# ---------------------------------------------------------------------------------------------
# the frame


def test_frame_layout_is_pinned() -> None:
    """The byte table of edgebll/codec/frame.py, spelled out: a format change must fail here."""
    x = np.array([[1.0, -2.0], [0.0, 4.0]], np.float32)
    frame = codec.encode(x, "int8", granularity="channel", backend="numpy")
    scales = np.array([1 / 127, 4 / 127], np.float32).tobytes()
    payload = np.array([127, -64, 0, 127], np.int8).tobytes()
    expected_header = (
        b"EBLM" + bytes([1, 2, 1, 2]) + struct.pack("<I", 2) + struct.pack("<Q", 4)
        + struct.pack("<I", zlib.crc32(scales + payload)) + struct.pack("<2I", 2, 2)
    )
    assert frame == expected_header + scales + payload
    header = FrameHeader.from_bytes(frame)
    assert header == FrameHeader("int8", "channel", (2, 2), 2, 4, zlib.crc32(scales + payload))
    assert header.to_bytes() == expected_header and header.frame_nbytes == len(frame)


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
        np.testing.assert_allclose(out, x, atol=11 / 127 / 2)


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


BAD_FRAMES = {
    "empty": (lambda f: b"", r"truncated frame: expected at least 24 bytes \(the fixed header\), got 0"),
    "short header": (lambda f: f[:20], "truncated frame: expected at least 24 bytes"),
    "short shape": (lambda f: f[:30], r"truncated frame: expected at least 36 bytes \(the header with ndim=3\), got 30"),
    "magic": (lambda f: b"EBLX" + f[4:], r"frame magic: expected b'EBLM', got b'EBLX'"),
    "version": (lambda f: reframe(f, version=2), "frame format version: expected 1, got 2; hint"),
    "codec id": (lambda f: reframe(f, codec=7), "frame codec id: expected one of .*, got 7"),
    "granularity id": (lambda f: reframe(f, granularity=9), "frame granularity id: expected one of .*, got 9"),
    "ndim": (lambda f: reframe(f, ndim=40), "frame ndim: expected at most 32, got 40"),
    "scale count": (lambda f: reframe(f, num_scales=1), r"frame scale count for int8 per channel of shape \(2, 3, 4\): expected 3, got 1"),
    "payload size": (lambda f: reframe(f, payload_nbytes=25), "frame payload size for int8 of shape .*: expected 24 bytes, got 25"),
    "channel with ndim 1": (lambda f: reframe(f[:FIXED_NBYTES] + f[FIXED_NBYTES + 8 :], ndim=1), "expected ndim >= 2"),
    "truncated payload": (lambda f: f[:-1], r"truncated frame: expected 72 bytes for int8 of shape \(2, 3, 4\), got 71"),
    "extra bytes": (lambda f: f + b"\x00", "extra bytes after frame: expected 72 bytes .*, got 73"),
    "crc": (_flip_last_byte, r"frame CRC32 of scales and payload: expected 0x[0-9a-f]{8}, got 0x[0-9a-f]{8}"),
    "nan scale": (_nan_scale, r"frame scale 0: expected a float32 in \[1.17549e-38, 2.67939e\+36\], got nan"),
    "huge scale": (lambda f: with_valid_crc(f[:36] + np.float32(3e38).tobytes() + f[40:]), r"frame scale 0: expected a float32 in \[.*\], got 3e\+38"),
    "zero scale": (lambda f: with_valid_crc(f[:36] + bytes(4) + f[40:]), r"frame scale 0: expected a float32 in \[.*\], got 0.0"),
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
    assert lib.edgebll_encode_fp32(None, 8, addr(payload)) == 1  # NULL
    assert lib.edgebll_decode_fp16(addr(q), 2, None) == 1
    assert lib.edgebll_encode_fp32(addr(x) + 1, 4, addr(payload)) == 2  # misaligned
    assert lib.edgebll_decode_int8(addr(q), 1, 2, 4, addr(scales) + 2, 2, addr(x)) == 2
    assert lib.edgebll_encode_int8(addr(x), 4, 2, 1, addr(scales), 1, addr(q)) == 3  # n_scales != channels
    assert lib.edgebll_encode_int8(addr(x), 2**40, 2**30, 1, addr(scales), 2**30, addr(q)) == 3  # overflow
    assert lib.edgebll_encode_fp16(addr(x), 2**63, addr(q)) == 3
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(x) + 16) == 4  # output overlaps input
    assert lib.edgebll_decode_int8(addr(q), 4, 2, 1, addr(scales), 2, addr(q)) == 4
    x[3] = np.inf
    assert lib.edgebll_encode_int8(addr(x), 4, 2, 1, addr(scales), 2, addr(q)) == 5  # non-finite
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
    for name, (argtypes, restype) in native._SIGNATURES.items():
        function = getattr(lib, name)
        assert function.argtypes == argtypes and function.restype is restype is ctypes.c_int
