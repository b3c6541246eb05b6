"""The frame format and its checks: pinned layouts, version 1, decode's inputs and outputs, the checksum,
and every corrupt or truncated frame refused before any data is written."""

from __future__ import annotations

import struct
import zlib

import codec_helpers
import numpy as np
import pytest
from codec_helpers import LEVELS, bits, reframe, with_valid_crc

from edgebll import codec
from edgebll.codec.frame import FIXED_NBYTES, MAGIC, FrameHeader
from edgebll.errors import CodecError

backend = codec_helpers.backend  # a pytest fixture: each test that names it runs on both backends


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


def test_both_backends_checksum_frames_with_zlib_crc32(backend: str) -> None:
    x = np.random.default_rng(3).standard_normal((4, 8, 9, 9), dtype=np.float32)
    frame = codec.encode(x, "int8", granularity="group", group_size=7, backend=backend)
    header = FrameHeader.from_bytes(frame)
    assert header.crc32 == zlib.crc32(frame[header.nbytes :])
