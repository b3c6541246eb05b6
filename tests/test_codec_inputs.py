"""What encode refuses or accepts as a message and as options, and the frame sizes it promises."""

from __future__ import annotations

import codec_helpers
import numpy as np
import pytest
from codec_helpers import INT_CODECS

from edgebll import codec
from edgebll.errors import CodecError

backend = codec_helpers.backend  # a pytest fixture: each test that names it runs on both backends


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
