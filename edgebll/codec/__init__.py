"""The message codec: float32 activations between blocks <-> self-describing byte frames.

A message (float32, NCHW or [B, C]) is encoded once by the block that sends it and decoded once
by the block that receives it::

    frame = encode(activation, "int4", granularity="group", group_size=64)   # bytes
    x = decode(frame)                                                         # float32, same shape

Codecs: ``fp32`` (a copy), ``fp16`` (round to nearest even; values beyond the fp16 range are
refused rather than sent as Inf), and the symmetric integer codecs ``int8`` (127 levels each side,
one byte per value), ``int4`` (7 levels, two values per byte) and ``int2`` (ternary: -1, 0, 1 times
the scale, four values per byte), with ``scale = amax / levels`` per tensor, per channel (index of
axis 1) or per group of ``group_size`` consecutive values (C order), rounded to nearest or
stochastically. The frame layout is in :mod:`edgebll.codec.frame`, the numerical rules in
:mod:`edgebll.codec.reference`.

Decisions:

- Input must be float32; float64 and every other dtype are refused (a float64 message means an
  upstream bug, and silently halving its precision would hide it). Non-contiguous input is made
  contiguous. NaN/Inf are refused with their count and first index.
- ``granularity="channel"`` needs ``ndim >= 2`` and is refused otherwise (whatever the codec):
  quietly sending a per-tensor frame would not be what was asked for. fp32/fp16 frames carry no
  scales, so for them the granularity (and group size) is only recorded. ``group_size`` is
  checked always but recorded only with ``granularity="group"``.
- Groups run over the flattened message, not within a channel: the frame needs only the group
  size, the kernels see one contiguous run per scale, and a [B, C, H, W] activation with
  ``H*W`` a multiple of the group size gets groups inside one channel map anyway.
- ``rounding="stochastic"`` (``floor(x / scale + u)``, u uniform in [0, 1) from a counter-based
  generator keyed by ``seed`` and the value's index) is for the integer codecs only; asking for it
  with fp32/fp16 is refused. The same ``(message, seed)`` gives the same frame on every backend
  and machine; pass a different seed per step (and per block), or the same values get the same
  noise every time. The seed is not in the frame: decoding does not need it.
- An all-zero channel or group gets scale ``FLT_MIN`` (the same floor that protects tiny ones),
  so it decodes to exact zeros.
- Backends: ``"c"`` (libedgebll_codec, raises NativeLibraryError if it is not built), ``"numpy"``
  (the reference), ``"auto"`` (C when available, else numpy). Both give the same frame, byte for
  byte, and the same decoded bits.
- The frame is allocated once, as the ``bytes`` object that is returned, and the kernels write
  into it (:mod:`edgebll.codec.buffer`); or, with ``out=``, into the caller's buffer at ``offset``
  (a sender's envelope goes in front, and nothing is copied). Decoding writes into the output
  array. Version-1 frames (before int4) still decode.
- The frame's checksum is zlib's CRC-32 on both backends. A SIMD CRC-32 in C was removed: on the
  largest frame (1.6 MB) it saved 0.7 ms of a ~100 ms training step, below the 1 % that a
  hand-built part must save to be kept.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import replace
from types import ModuleType
from typing import Sequence, overload

import numpy as np

from edgebll.codec import native, reference
from edgebll.codec.buffer import finish_frame, frame_region, new_frame
from edgebll.codec.frame import (
    CODEC_IDS,
    GRANULARITY_IDS,
    INT_CODECS,
    MAX_GROUP_SIZE,
    SCALE_NBYTES,
    FrameHeader,
    byte_view,
    check_frame,
)
from edgebll.codec.reference import ROUNDINGS, Layout
from edgebll.errors import CodecError

CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int2")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
BACKENDS: tuple[str, ...] = ("auto", "c", "numpy")
DEFAULT_GROUP_SIZE = 64
MAX_SEED = 2**64 - 1
assert CODECS == tuple(CODEC_IDS) and GRANULARITIES == tuple(GRANULARITY_IDS)

_PAYLOAD_DTYPES = {
    "fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8), "int2": np.dtype(np.uint8),
}

__all__ = [
    "BACKENDS", "CODECS", "DEFAULT_GROUP_SIZE", "GRANULARITIES", "ROUNDINGS", "decode", "encode",
    "frame_nbytes", "native_available",
]


def native_available() -> bool:
    """Whether the C kernel (libedgebll_codec) is built and loadable."""
    return native.available()


def frame_nbytes(
    shape: Sequence[int], codec: str = "int8", granularity: str = "tensor",
    group_size: int = DEFAULT_GROUP_SIZE,
) -> int:
    """Exact size in bytes of the frame :func:`encode` returns for a message of `shape`."""
    shape = tuple(int(dim) for dim in shape)
    _check_choice("codec", codec, CODECS)
    _check_choice("granularity", granularity, GRANULARITIES)
    group_size = _check_group_size(group_size)
    _check_granularity_fits(granularity, shape)
    return FrameHeader.for_message(codec, granularity, shape, group_size=group_size).frame_nbytes


@overload
def encode(
    array: np.ndarray, codec: str = ..., *, granularity: str = ..., group_size: int = ..., rounding: str = ...,
    seed: int = ..., backend: str = ..., out: None = None, offset: int = ...,
) -> bytes: ...


@overload
def encode(
    array: np.ndarray, codec: str = ..., *, granularity: str = ..., group_size: int = ..., rounding: str = ...,
    seed: int = ..., backend: str = ..., out: bytearray | memoryview | np.ndarray, offset: int = ...,
) -> memoryview: ...


def encode(
    array: np.ndarray,
    codec: str = "int8",
    *,
    granularity: str = "tensor",
    group_size: int = DEFAULT_GROUP_SIZE,
    rounding: str = "nearest",
    seed: int = 0,
    backend: str = "auto",
    out: bytearray | memoryview | np.ndarray | None = None,
    offset: int = 0,
) -> bytes | memoryview:
    """Encode a float32 message into a frame; raises CodecError on NaN/Inf or bad arguments.

    `granularity`: one scale per "tensor", per "channel" (axis 1) or per "group" of `group_size`
    consecutive values. `rounding` "stochastic" (int codecs only) draws its noise from `seed`.
    Returns a new ``bytes``; or, given `out` (a writable bytearray, memoryview or numpy array),
    writes the frame into ``out[offset:offset + frame_nbytes(...)]`` and returns a memoryview of
    those bytes, so a sender can put its own header in front without copying the frame.
    """
    kernels = _kernels(backend)
    _check_choice("codec", codec, CODECS)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("rounding", rounding, ROUNDINGS)
    group_size = _check_group_size(group_size)
    seed = _check_seed(seed)
    if rounding == "stochastic" and codec not in INT_CODECS:
        raise CodecError(
            f"rounding 'stochastic': expected one of the int codecs {INT_CODECS}, got codec {codec!r} "
            "(fp16 rounds to nearest even, fp32 is exact); hint: use rounding='nearest'"
        )
    x = _as_message(array)
    _check_granularity_fits(granularity, x.shape)
    header = FrameHeader.for_message(codec, granularity, x.shape, group_size=group_size)
    header.to_bytes()  # refuse an unrepresentable shape before allocating the frame

    if out is None:
        # One allocation, the returned bytes: the kernels write scales and payload straight into it.
        frame, writable = new_frame(header.frame_nbytes)
        _write_frame(kernels, x, header, writable, rounding, seed)
        return finish_frame(frame, writable)
    region = frame_region(out, offset, header.frame_nbytes)
    if np.may_share_memory(region, x):
        raise CodecError("out: expected memory apart from the message, got a buffer that overlaps it")
    if region.ctypes.data % SCALE_NBYTES:
        # The kernels write float32 scales and fp16 / fp32 payloads aligned: stage an odd offset's frame.
        staged = np.empty(header.frame_nbytes, np.uint8)
        _write_frame(kernels, x, header, staged, rounding, seed)
        region[:] = staged
    else:
        _write_frame(kernels, x, header, region, rounding, seed)
    return memoryview(region)


def _write_frame(
    kernels: ModuleType, x: np.ndarray, header: FrameHeader, frame: np.ndarray, rounding: str, seed: int
) -> None:
    """Fill `frame` (uint8, 4-byte aligned, exactly the frame's size) with the frame of `x` that `header` describes."""
    dtype = _PAYLOAD_DTYPES[header.codec]
    scales = np.frombuffer(frame, np.float32, header.num_scales, header.scales_offset)
    payload = np.frombuffer(frame, dtype, header.payload_nbytes // dtype.itemsize, header.payload_offset)
    if header.codec in INT_CODECS:
        encode_int = getattr(kernels, f"encode_{header.codec}")
        encode_int(x, _layout(header.granularity, header.shape, header.group_size), scales, payload, rounding, seed)
    elif header.codec == "fp16":
        kernels.encode_fp16(x, payload)
    else:
        kernels.encode_fp32(x, payload)
    crc = zlib.crc32(frame[header.nbytes :])
    frame[: header.nbytes] = np.frombuffer(replace(header, crc32=crc).to_bytes(), np.uint8)


def decode(
    frame: bytes | bytearray | memoryview, out: np.ndarray | None = None, *, backend: str = "auto"
) -> np.ndarray:
    """Decode a frame into a float32 array (into `out` when given, which is also returned).

    The whole frame is checked (header, length, CRC, scales, padding, `out`) before any data is
    read. Frames of format version 1 decode too.
    """
    kernels = _kernels(backend)
    view = byte_view(frame)
    header = FrameHeader.from_bytes(view)
    check_frame(header, view)
    dtype = _PAYLOAD_DTYPES[header.codec]
    scales = np.frombuffer(view, np.float32, header.num_scales, header.scales_offset)
    payload = np.frombuffer(view, dtype, header.payload_nbytes // dtype.itemsize, header.payload_offset)
    if header.codec in INT_CODECS:
        _check_scales(scales, header.codec)
    result = _output_array(out, header.shape, payload)
    if kernels is native and not (scales.flags.aligned and payload.flags.aligned):
        # A frame sliced out of a larger buffer at an odd offset: C needs aligned data.
        scales, payload = scales.copy(), payload.copy()

    if header.codec in INT_CODECS:
        decode_int = getattr(kernels, f"decode_{header.codec}")
        decode_int(payload, _layout(header.granularity, header.shape, header.group_size), scales, result)
    elif header.codec == "fp16":
        kernels.decode_fp16(payload, result)
    else:
        kernels.decode_fp32(payload, result)
    return result


def _kernels(backend: str) -> ModuleType:
    """The kernel module for `backend`: :mod:`native` or :mod:`reference`."""
    if backend == "numpy":
        return reference
    if backend == "c":
        native.load_library()  # raises NativeLibraryError with a build hint
        return native
    if backend == "auto":
        return native if native.available() else reference
    raise CodecError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CodecError(f"{what}: expected one of {choices}, got {value!r}")


def _check_int(what: str, value: int, low: int, high: int, *, range_text: str, hint: str = "") -> int:
    """``value`` as an int in [low, high], or a CodecError that says which argument and why."""
    try:
        number = operator.index(value)
    except TypeError:
        raise CodecError(f"{what}: expected an int, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise CodecError(f"{what}: expected an int in {range_text}, got {number}{hint}")
    return number


def _check_group_size(group_size: int) -> int:
    return _check_int("group_size", group_size, 1, MAX_GROUP_SIZE, range_text=f"[1, {MAX_GROUP_SIZE}]")


def _check_seed(seed: int) -> int:
    return _check_int("seed", seed, 0, MAX_SEED, range_text="[0, 2**64 - 1]", hint="; hint: reduce it modulo 2**64")


def _check_granularity_fits(granularity: str, shape: tuple[int, ...]) -> None:
    if granularity == "channel" and len(shape) < 2:
        raise CodecError(
            f"granularity 'channel' (one scale per index of axis 1): expected ndim >= 2, "
            f"got shape {shape}; hint: use granularity='tensor'"
        )


def _as_message(array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous, aligned float32 ndarray (copied only if it is not one)."""
    if not isinstance(array, np.ndarray):
        raise CodecError(
            f"message: expected a numpy.ndarray of float32, got {type(array).__name__}"
        )
    if array.dtype != np.float32:
        raise CodecError(
            f"message dtype: expected float32, got {array.dtype}; "
            "hint: convert explicitly with array.astype(np.float32) if that is intended"
        )
    return np.require(np.asarray(array), requirements=("C_CONTIGUOUS", "ALIGNED"))


def _layout(granularity: str, shape: tuple[int, ...], group_size: int) -> Layout:
    """``(size, run, num_scales)`` of the int kernels (see :mod:`edgebll.codec.reference`)."""
    size = math.prod(shape)
    if granularity == "channel":
        return size, math.prod(shape[2:]), shape[1]
    if granularity == "group":
        return size, group_size, -(-size // group_size)
    return size, max(size, 1), 1


def _check_scales(scales: np.ndarray, codec: str) -> None:
    """Scales must lie where the encoder puts them, which also keeps q * scale finite."""
    low, high = reference.SCALE_FLOOR, reference.SCALE_CEILINGS[codec]
    # min/max propagate NaN, which fails both comparisons; no temporaries unless a scale is bad
    if scales.size == 0 or (scales.min() >= low and scales.max() <= high):
        return
    first = int(np.flatnonzero(~((scales >= low) & (scales <= high)))[0])
    raise CodecError(
        f"frame scale {first}: expected a float32 in [{low:g}, {high:g}], got {scales[first]!s}"
    )


def _output_array(out: np.ndarray | None, shape: tuple[int, ...], payload: np.ndarray) -> np.ndarray:
    """A fresh float32 array of `shape`, or `out` once it is checked to be usable as one."""
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray):
        raise CodecError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise CodecError(f"out shape: expected {shape} (from the frame), got {out.shape}")
    if out.dtype != np.float32:
        raise CodecError(f"out dtype: expected float32, got {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise CodecError(
            "out: expected a C-contiguous, aligned array, got a strided or unaligned view; "
            "hint: pass np.empty(shape, np.float32) or decode without out="
        )
    if not out.flags.writeable:
        raise CodecError("out: expected a writeable array, got a read-only one")
    if np.may_share_memory(out, payload):
        raise CodecError("out: expected memory apart from the frame, got a view into it")
    return out
