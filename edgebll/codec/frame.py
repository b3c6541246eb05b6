"""The self-describing byte frame that carries one encoded message.

Layout of format version 2, the one :func:`edgebll.codec.encode` writes (little-endian, no
padding; every offset after the fixed part is a multiple of 4, so the float32 scales and the
fp16 / fp32 payload are aligned relative to the frame's start):

=========  ===============  =================================================================
offset     field            type
=========  ===============  =================================================================
0          magic            4 bytes, ``b"EBLM"``
4          version          uint8, :data:`FORMAT_VERSION` (2)
5          codec id         uint8: 0 fp32, 1 fp16, 2 int8, 3 int4, 4 int2
6          granularity id   uint8: 0 tensor, 1 channel, 2 group
7          ndim             uint8, at most :data:`MAX_NDIM`
8          num_scales       uint32: int codecs 1 (tensor), shape[1] (channel),
                            ceil(size / group_size) (group); fp32 / fp16 0
12         payload_nbytes   uint64: ceil(size * bits / 8), bits 32 / 16 / 8 / 4 / 2
20         crc32            uint32: ``zlib.crc32`` of everything after the header
24         group_size       uint32: values per scale with granularity group, else 0
28         shape            ndim x uint32
28+4*ndim  scales           num_scales x float32
...        payload          payload_nbytes bytes, C order
=========  ===============  =================================================================

int4 and int2 pack 2 and 4 values per byte, in C order over the whole message (not per channel
or group), the first value in the lowest bits: value ``i`` is bits ``[b * (i % k), b * (i % k + 1))``
of byte ``i // k`` (``b`` bits, ``k = 8 // b`` values per byte), two's complement. The unused high
bits of the last byte are zero. A group is ``group_size`` consecutive values of the flattened
message; the last one may be shorter. How the values were rounded (nearest or stochastic, and the
seed) is not recorded: decoding does not depend on it.

Version 1 (edgebll before int4) is the same without the ``group_size`` field (a 24-byte fixed
part) and with only fp32 / fp16 / int8 and tensor / channel. Frames are only ever in flight
between blocks, but the boards of one deployment may run different edgebll versions for a while:
this module still *decodes* version-1 frames (so a v2 receiver understands a v1 sender); it only
writes version 2. A v1 receiver refuses a v2 frame by its version byte.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

from edgebll.errors import CodecError

MAGIC = b"EBLM"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_NDIM = 32  # numpy allows 64; messages are NCHW or [B, C], so 32 is generous
MAX_DIM = 2**32 - 1
MAX_GROUP_SIZE = 2**32 - 1

CODEC_IDS: dict[str, int] = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3, "int2": 4}
GRANULARITY_IDS: dict[str, int] = {"tensor": 0, "channel": 1, "group": 2}
BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
INT_CODECS = ("int8", "int4", "int2")  # the ones with scales
SCALE_NBYTES = 4  # one float32 per scale

# What each version can carry: a v1 frame with codec id 3 is corrupt, not an int4 frame.
_V1_CODECS = ("fp32", "fp16", "int8")
_V1_GRANULARITIES = ("tensor", "channel")

_FIXED = {1: struct.Struct("<4sBBBBIQI"), 2: struct.Struct("<4sBBBBIQII")}
FIXED_NBYTES = _FIXED[FORMAT_VERSION].size  # 28
assert FIXED_NBYTES == 28 and _FIXED[1].size == 24, "the table in the module docstring is the contract"

_CODEC_NAMES = {value: name for name, value in CODEC_IDS.items()}
_GRANULARITY_NAMES = {value: name for name, value in GRANULARITY_IDS.items()}


def expected_num_scales(codec: str, granularity: str, shape: Sequence[int], group_size: int = 0) -> int:
    """How many float32 scales a frame of this kind carries (only the int codecs have any)."""
    if codec not in INT_CODECS:
        return 0
    if granularity == "channel":
        return int(shape[1])
    if granularity == "group":
        return -(-math.prod(shape) // group_size)
    return 1


def payload_nbytes(codec: str, size: int) -> int:
    """Bytes of the payload of `size` values: sub-byte codecs round up to whole bytes."""
    return -(-size * BITS[codec] // 8)


@dataclass(frozen=True)
class FrameHeader:
    """The fixed-size part of a frame plus its shape; see the module docstring for the bytes."""

    codec: str
    granularity: str
    shape: tuple[int, ...]
    num_scales: int
    payload_nbytes: int
    crc32: int = 0
    group_size: int = 0
    """Values per scale with granularity "group", else 0."""
    version: int = FORMAT_VERSION
    """The format version the frame was written in (decoding also reads version 1)."""

    @classmethod
    def for_message(
        cls, codec: str, granularity: str, shape: Sequence[int], crc32: int = 0, group_size: int = 0,
        version: int = FORMAT_VERSION,
    ) -> FrameHeader:
        """The header of a message of `shape` encoded with `codec` at `granularity`.

        `group_size` is recorded only with granularity "group" (0 otherwise).
        """
        shape = tuple(int(dim) for dim in shape)
        group_size = int(group_size) if granularity == "group" else 0
        return cls(
            codec=codec,
            granularity=granularity,
            shape=shape,
            num_scales=expected_num_scales(codec, granularity, shape, group_size),
            payload_nbytes=payload_nbytes(codec, math.prod(shape)),
            crc32=crc32,
            group_size=group_size,
            version=version,
        )

    @property
    def nbytes(self) -> int:
        """Size of the header itself (fixed part and shape)."""
        return _FIXED[self.version].size + 4 * len(self.shape)

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
        """The header's bytes (fixed part and shape), in the header's format version."""
        if len(self.shape) > MAX_NDIM:
            raise CodecError(f"frame ndim: expected at most {MAX_NDIM}, got {len(self.shape)}")
        too_large = [dim for dim in self.shape if not 0 <= dim <= MAX_DIM]
        if too_large:
            raise CodecError(
                f"frame shape {self.shape}: expected every dimension in [0, {MAX_DIM}] (uint32), "
                f"got {too_large[0]}"
            )
        fields = [
            MAGIC,
            self.version,
            CODEC_IDS[self.codec],
            GRANULARITY_IDS[self.granularity],
            len(self.shape),
            self.num_scales,
            self.payload_nbytes,
            self.crc32,
        ]
        if self.version == 1:
            assert self.codec in _V1_CODECS and self.granularity in _V1_GRANULARITIES, self
        else:
            fields.append(self.group_size)
        return _FIXED[self.version].pack(*fields) + struct.pack(f"<{len(self.shape)}I", *self.shape)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse and check the header at the start of `buf` (a frame, or at least its header).

        Checks the magic, the version, the codec and granularity ids (those the version knows),
        the group size, that `buf` holds the whole header, and that the scale count and payload
        size agree with the codec and shape. The frame's total length, CRC and padding bits are
        checked by :func:`check_frame`.
        """
        view = byte_view(buf)
        if len(view) < 5:
            raise CodecError(
                f"truncated frame: expected at least {FIXED_NBYTES} bytes (the fixed header), "
                f"got {len(view)}"
            )
        magic, version = bytes(view[:4]), view[4]
        if magic != MAGIC:
            raise CodecError(
                f"frame magic: expected {MAGIC!r}, got {magic!r} (not an edgebll message frame)"
            )
        if version not in READABLE_VERSIONS:
            raise CodecError(
                f"frame format version: expected one of {READABLE_VERSIONS}, got {version}; "
                "hint: encode and decode with the same edgebll version"
            )
        fixed = _FIXED[version]
        if len(view) < fixed.size:
            raise CodecError(
                f"truncated frame: expected at least {fixed.size} bytes (the fixed header of "
                f"version {version}), got {len(view)}"
            )
        _, _, codec_id, granularity_id, ndim, num_scales, payload_size, crc, *rest = fixed.unpack_from(view, 0)
        group_size = rest[0] if rest else 0
        codecs = _V1_CODECS if version == 1 else tuple(CODEC_IDS)
        granularities = _V1_GRANULARITIES if version == 1 else tuple(GRANULARITY_IDS)
        if _CODEC_NAMES.get(codec_id) not in codecs:
            known = {CODEC_IDS[name]: name for name in codecs}
            raise CodecError(f"frame codec id: expected one of {known}, got {codec_id}")
        if _GRANULARITY_NAMES.get(granularity_id) not in granularities:
            known = {GRANULARITY_IDS[name]: name for name in granularities}
            raise CodecError(f"frame granularity id: expected one of {known}, got {granularity_id}")
        codec = _CODEC_NAMES[codec_id]
        granularity = _GRANULARITY_NAMES[granularity_id]
        if granularity == "group" and group_size == 0:
            raise CodecError("frame group size: expected at least 1 with granularity 'group', got 0")
        if granularity != "group" and group_size != 0:
            raise CodecError(
                f"frame group size: expected 0 with granularity {granularity!r}, got {group_size}"
            )
        if ndim > MAX_NDIM:
            raise CodecError(f"frame ndim: expected at most {MAX_NDIM}, got {ndim}")
        header_nbytes = fixed.size + 4 * ndim
        if len(view) < header_nbytes:
            raise CodecError(
                f"truncated frame: expected at least {header_nbytes} bytes (the header with "
                f"ndim={ndim}), got {len(view)}"
            )
        shape = struct.unpack_from(f"<{ndim}I", view, fixed.size)
        if granularity == "channel" and ndim < 2:
            raise CodecError(
                f"frame with granularity 'channel': expected ndim >= 2, got shape {shape}"
            )
        expected = cls.for_message(codec, granularity, shape, crc, group_size, version)
        if num_scales != expected.num_scales:
            per = f"group of {group_size}" if granularity == "group" else granularity
            raise CodecError(
                f"frame scale count for {codec} per {per} of shape {shape}: "
                f"expected {expected.num_scales}, got {num_scales}"
            )
        if payload_size != expected.payload_nbytes:
            raise CodecError(
                f"frame payload size for {codec} of shape {shape}: "
                f"expected {expected.payload_nbytes} bytes, got {payload_size}"
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
    """Check that `view` is exactly the frame `header` describes: length, CRC (zlib's), padding bits."""
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
    used_bits = math.prod(header.shape) * BITS[header.codec] % 8
    if used_bits:
        padding = view[-1] >> used_bits
        if padding:
            raise CodecError(
                f"frame payload padding: expected the {8 - used_bits} unused high bits of the last "
                f"byte to be zero, got {padding:#x} (the encoder that wrote it is broken)"
            )
