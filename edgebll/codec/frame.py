"""The self-describing byte frame that carries one encoded message.

Layout (little-endian, no padding; every offset after the fixed part is a multiple of 4, so the
float32 scales and the fp16 / fp32 payload are aligned relative to the frame's start):

=========  ===============  =================================================================
offset     field            type
=========  ===============  =================================================================
0          magic            4 bytes, ``b"EBLM"``
4          version          uint8, :data:`FORMAT_VERSION`
5          codec id         uint8: 0 fp32, 1 fp16, 2 int8
6          granularity id   uint8: 0 tensor, 1 channel
7          ndim             uint8, at most :data:`MAX_NDIM`
8          num_scales       uint32: 1 (int8 per tensor), shape[1] (int8 per channel), else 0
12         payload_nbytes   uint64: number of elements times 4 / 2 / 1 (fp32 / fp16 / int8)
20         crc32            uint32: ``zlib.crc32`` of everything after the header
24         shape            ndim x uint32
24+4*ndim  scales           num_scales x float32
...        payload          payload_nbytes bytes, C order
=========  ===============  =================================================================
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

from edgebll.errors import CodecError

MAGIC = b"EBLM"
FORMAT_VERSION = 1
MAX_NDIM = 32  # numpy allows 64; messages are NCHW or [B, C], so 32 is generous
MAX_DIM = 2**32 - 1

CODEC_IDS: dict[str, int] = {"fp32": 0, "fp16": 1, "int8": 2}
GRANULARITY_IDS: dict[str, int] = {"tensor": 0, "channel": 1}
ITEMSIZE: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
SCALE_NBYTES = 4  # one float32 per scale

_FIXED = struct.Struct("<4sBBBBIQI")
FIXED_NBYTES = _FIXED.size  # 24
assert FIXED_NBYTES == 24, "the table in the module docstring is the contract"

_CODEC_NAMES = {value: name for name, value in CODEC_IDS.items()}
_GRANULARITY_NAMES = {value: name for name, value in GRANULARITY_IDS.items()}


def expected_num_scales(codec: str, granularity: str, shape: Sequence[int]) -> int:
    """How many float32 scales a frame of this kind carries (only int8 has any)."""
    if codec != "int8":
        return 0
    return int(shape[1]) if granularity == "channel" else 1


@dataclass(frozen=True)
class FrameHeader:
    """The fixed-size part of a frame plus its shape; see the module docstring for the bytes."""

    codec: str
    granularity: str
    shape: tuple[int, ...]
    num_scales: int
    payload_nbytes: int
    crc32: int = 0

    @classmethod
    def for_message(
        cls, codec: str, granularity: str, shape: Sequence[int], crc32: int = 0
    ) -> FrameHeader:
        """The header of a message of `shape` encoded with `codec` at `granularity`."""
        shape = tuple(int(dim) for dim in shape)
        return cls(
            codec=codec,
            granularity=granularity,
            shape=shape,
            num_scales=expected_num_scales(codec, granularity, shape),
            payload_nbytes=math.prod(shape) * ITEMSIZE[codec],
            crc32=crc32,
        )

    @property
    def nbytes(self) -> int:
        """Size of the header itself (fixed part and shape)."""
        return FIXED_NBYTES + 4 * len(self.shape)

    @property
    def scales_offset(self) -> int:
        """Offset of the first scale in the frame."""
        return self.nbytes

    @property
    def payload_offset(self) -> int:
        """Offset of the payload in the frame."""
        return self.nbytes + SCALE_NBYTES * self.num_scales

    @property
    def frame_nbytes(self) -> int:
        """Size of the whole frame: header, scales and payload."""
        return self.payload_offset + self.payload_nbytes

    def to_bytes(self) -> bytes:
        """The header's bytes (fixed part and shape)."""
        if len(self.shape) > MAX_NDIM:
            raise CodecError(f"frame ndim: expected at most {MAX_NDIM}, got {len(self.shape)}")
        too_large = [dim for dim in self.shape if not 0 <= dim <= MAX_DIM]
        if too_large:
            raise CodecError(
                f"frame shape {self.shape}: expected every dimension in [0, {MAX_DIM}] (uint32), "
                f"got {too_large[0]}"
            )
        fixed = _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            CODEC_IDS[self.codec],
            GRANULARITY_IDS[self.granularity],
            len(self.shape),
            self.num_scales,
            self.payload_nbytes,
            self.crc32,
        )
        return fixed + struct.pack(f"<{len(self.shape)}I", *self.shape)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse and check the header at the start of `buf` (a frame, or at least its header).

        Checks the magic, the version, the codec and granularity ids, that `buf` holds the whole
        header, and that the scale count and payload size agree with the codec and shape. The
        frame's total length and CRC are checked by :func:`check_frame`.
        """
        view = byte_view(buf)
        if len(view) < FIXED_NBYTES:
            raise CodecError(
                f"truncated frame: expected at least {FIXED_NBYTES} bytes (the fixed header), "
                f"got {len(view)}"
            )
        magic, version, codec_id, granularity_id, ndim, num_scales, payload_nbytes, crc = (
            _FIXED.unpack_from(view, 0)
        )
        if magic != MAGIC:
            raise CodecError(
                f"frame magic: expected {MAGIC!r}, got {magic!r} (not an edgebll message frame)"
            )
        if version != FORMAT_VERSION:
            raise CodecError(
                f"frame format version: expected {FORMAT_VERSION}, got {version}; "
                "hint: encode and decode with the same edgebll version"
            )
        if codec_id not in _CODEC_NAMES:
            raise CodecError(
                f"frame codec id: expected one of {_CODEC_NAMES}, got {codec_id}"
            )
        if granularity_id not in _GRANULARITY_NAMES:
            raise CodecError(
                f"frame granularity id: expected one of {_GRANULARITY_NAMES}, got {granularity_id}"
            )
        if ndim > MAX_NDIM:
            raise CodecError(f"frame ndim: expected at most {MAX_NDIM}, got {ndim}")
        header_nbytes = FIXED_NBYTES + 4 * ndim
        if len(view) < header_nbytes:
            raise CodecError(
                f"truncated frame: expected at least {header_nbytes} bytes (the header with "
                f"ndim={ndim}), got {len(view)}"
            )
        shape = struct.unpack_from(f"<{ndim}I", view, FIXED_NBYTES)
        codec = _CODEC_NAMES[codec_id]
        granularity = _GRANULARITY_NAMES[granularity_id]
        if granularity == "channel" and ndim < 2:
            raise CodecError(
                f"frame with granularity 'channel': expected ndim >= 2, got shape {shape}"
            )
        expected = cls.for_message(codec, granularity, shape, crc32=crc)
        if num_scales != expected.num_scales:
            raise CodecError(
                f"frame scale count for {codec} per {granularity} of shape {shape}: "
                f"expected {expected.num_scales}, got {num_scales}"
            )
        if payload_nbytes != expected.payload_nbytes:
            raise CodecError(
                f"frame payload size for {codec} of shape {shape}: "
                f"expected {expected.payload_nbytes} bytes, got {payload_nbytes}"
            )
        return expected


def byte_view(buf: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view of `buf` without copying; refuses non-contiguous buffers."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise CodecError(
            f"frame: expected bytes, bytearray or memoryview, got {type(buf).__name__}"
        ) from None
    if not view.c_contiguous:
        raise CodecError("frame: expected a contiguous buffer, got a strided memoryview")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_frame(header: FrameHeader, view: memoryview) -> None:
    """Check that `view` is exactly the frame `header` describes and that its CRC matches."""
    if len(view) != header.frame_nbytes:
        kind = "truncated frame" if len(view) < header.frame_nbytes else "extra bytes after frame"
        raise CodecError(
            f"{kind}: expected {header.frame_nbytes} bytes for {header.codec} of shape "
            f"{header.shape}, got {len(view)}"
        )
    crc = zlib.crc32(view[header.nbytes :])
    if crc != header.crc32:
        raise CodecError(
            f"frame CRC32 of scales and payload: expected {header.crc32:#010x}, got {crc:#010x} "
            "(the frame was corrupted in transit)"
        )
