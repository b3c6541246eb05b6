"""What the tests of edgebll/codec (tests/test_codec_*.py) share: the backend fixture and hand-made frame readers.

The readers take a frame apart by hand, independently of ``decode``, so a test can check the
bytes a backend wrote rather than what the same code reads back.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebll.codec import native
from edgebll.codec.frame import FIXED_NBYTES, FrameHeader

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
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)
finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


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
    """Each codec backend in turn ("c" skips, or fails in CI, where the library is not built)."""
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
