"""The message codec: float32 activations between blocks <-> self-describing byte frames.

A message (float32, NCHW or [B, C]) is encoded once by the block that sends it and decoded once
by the block that receives it::

    frame = encode(activation, "int8", granularity="channel")   # bytes
    x = decode(frame)                                            # float32, same shape

Codecs: ``fp32`` (a copy), ``fp16`` (round to nearest even; values beyond the fp16 range are
refused rather than sent as Inf), ``int8`` (symmetric, scale = amax / 127, per tensor or per
channel = per index of axis 1). The frame layout is in :mod:`edgebll.codec.frame`, the numerical
rules in :mod:`edgebll.codec.reference`.

Decisions:

- Input must be float32; float64 and every other dtype are refused (a float64 message means an
  upstream bug, and silently halving its precision would hide it). Non-contiguous input is made
  contiguous. NaN/Inf are refused with their count and first index.
- ``granularity="channel"`` needs ``ndim >= 2`` and is refused otherwise (whatever the codec):
  quietly sending a per-tensor frame would not be what was asked for. fp32/fp16 frames carry no
  scales, so for them the granularity is only recorded.
- An all-zero int8 channel gets scale ``FLT_MIN`` (the same floor that protects tiny channels),
  so it decodes to exact zeros.
- Backends: ``"c"`` (libedgebll_codec, raises NativeLibraryError if it is not built), ``"numpy"``
  (the reference), ``"auto"`` (C when available, else numpy). Both give the same frame, byte for
  byte, and the same decoded bits.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from types import ModuleType
from typing import Sequence

import numpy as np

from edgebll.codec import native, reference
from edgebll.codec.frame import (
    CODEC_IDS,
    GRANULARITY_IDS,
    FrameHeader,
    byte_view,
    check_frame,
)
from edgebll.codec.reference import Layout
from edgebll.errors import CodecError

CODECS: tuple[str, ...] = ("fp32", "fp16", "int8")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel")
BACKENDS: tuple[str, ...] = ("auto", "c", "numpy")
assert CODECS == tuple(CODEC_IDS) and GRANULARITIES == tuple(GRANULARITY_IDS)

_PAYLOAD_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}

__all__ = ["BACKENDS", "CODECS", "GRANULARITIES", "decode", "encode", "frame_nbytes", "native_available"]


def native_available() -> bool:
    """Whether the C kernel (libedgebll_codec) is built and loadable."""
    return native.available()


def frame_nbytes(
    shape: Sequence[int], codec: str = "int8", granularity: str = "tensor"
) -> int:
    """Exact size in bytes of the frame :func:`encode` returns for a message of `shape`."""
    shape = tuple(int(dim) for dim in shape)
    _check_choice("codec", codec, CODECS)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_granularity_fits(granularity, shape)
    return FrameHeader.for_message(codec, granularity, shape).frame_nbytes


def encode(
    array: np.ndarray, codec: str = "int8", *, granularity: str = "tensor", backend: str = "auto"
) -> bytes:
    """Encode a float32 message into a frame; raises CodecError on NaN/Inf or bad arguments."""
    kernels = _kernels(backend)
    _check_choice("codec", codec, CODECS)
    _check_choice("granularity", granularity, GRANULARITIES)
    x = _as_message(array)
    _check_granularity_fits(granularity, x.shape)
    header = FrameHeader.for_message(codec, granularity, x.shape)
    header.to_bytes()  # refuse an unrepresentable shape before allocating the frame

    # One allocation: the kernels write scales and payload straight into the frame.
    frame = bytearray(header.frame_nbytes)
    scales = np.frombuffer(frame, np.float32, header.num_scales, header.scales_offset)
    payload = np.frombuffer(frame, _PAYLOAD_DTYPES[codec], x.size, header.payload_offset)
    if codec == "int8":
        kernels.encode_int8(x, _layout(granularity, x.shape), scales, payload)
    elif codec == "fp16":
        kernels.encode_fp16(x, payload)
    else:
        kernels.encode_fp32(x, payload)

    crc = zlib.crc32(memoryview(frame)[header.nbytes :])
    frame[: header.nbytes] = replace(header, crc32=crc).to_bytes()
    # `bytes` is the contract (hashable, immutable); this one copy is of the frame (a quarter of
    # the input for int8), not of the input.
    return bytes(frame)


def decode(
    frame: bytes | bytearray | memoryview, out: np.ndarray | None = None, *, backend: str = "auto"
) -> np.ndarray:
    """Decode a frame into a float32 array (into `out` when given, which is also returned).

    The whole frame is checked (header, length, CRC, scales, `out`) before any data is read.
    """
    kernels = _kernels(backend)
    view = byte_view(frame)
    header = FrameHeader.from_bytes(view)
    check_frame(header, view)
    size = math.prod(header.shape)
    scales = np.frombuffer(view, np.float32, header.num_scales, header.scales_offset)
    payload = np.frombuffer(view, _PAYLOAD_DTYPES[header.codec], size, header.payload_offset)
    _check_scales(scales)
    result = _output_array(out, header.shape, payload)
    if kernels is native and not (scales.flags.aligned and payload.flags.aligned):
        # A frame sliced out of a larger buffer at an odd offset: C needs aligned data.
        scales, payload = scales.copy(), payload.copy()

    if header.codec == "int8":
        kernels.decode_int8(payload, _layout(header.granularity, header.shape), scales, result)
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


def _layout(granularity: str, shape: tuple[int, ...]) -> Layout:
    """(outer, channels, inner) of the int8 kernels: one scale per channel."""
    if granularity == "channel":
        return shape[0], shape[1], math.prod(shape[2:])
    return 1, 1, math.prod(shape)


def _check_scales(scales: np.ndarray) -> None:
    """Scales must lie where the encoder puts them, which also keeps q * scale finite."""
    low, high = reference.SCALE_FLOOR, reference.SCALE_CEILING
    bad = ~((scales >= low) & (scales <= high))  # also catches NaN
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
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
