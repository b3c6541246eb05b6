"""numpy reference kernels of the message codec: the ground truth the C kernel must match.

Every kernel writes into arrays the caller hands in (views into the frame being built, or the
decode output), so both backends share one signature and :mod:`edgebll.codec` can pick either.
int8 kernels take a `layout` ``(outer, channels, inner)`` and see the message as that 3-D array:
``(B, C, H*W)`` per channel, ``(1, 1, size)`` per tensor, with one scale per channel.

Numerical rules (also in csrc/edgebll_codec.h):

- int8: ``scale = clip(amax / 127, FLT_MIN, SCALE_MAX)`` in float32,
  ``q = clip(rint(x / scale), -127, 127)``, decode ``q * scale``. The ``FLT_MIN`` floor gives an
  all-zero channel a positive scale (so it decodes to zeros) and keeps ``|x / scale| <= 127`` when
  ``amax / 127`` would be subnormal; the ``SCALE_MAX`` ceiling stops ``127 * scale`` from
  overflowing to Inf when amax is near ``FLT_MAX`` (``FLT_MAX / 127`` rounds up). So the
  round-trip error is at most ``scale / 2`` (plus float32 rounding) for every finite input.
- fp16: numpy's ``astype(np.float16)`` (round to nearest even, subnormals kept); values with
  ``|x| >= 65520`` would become Inf and are refused.
- fp32: a copy.
"""

from __future__ import annotations

import numpy as np

from edgebll.errors import CodecError

INT8_LEVELS = np.float32(127.0)
SCALE_FLOOR = np.finfo(np.float32).tiny  # FLT_MIN, the smallest normal float32
SCALE_CEILING = np.float32(float.fromhex("0x1.020406p+121"))  # the largest s with 127 * s finite
FP16_OVERFLOW = np.float32(65520.0)  # the midpoint 65504..65536: from here on fp16 rounds to Inf


def nonfinite_error(x: np.ndarray) -> CodecError:
    """The error for a message holding NaN or Inf (the caller adds block/step context)."""
    bad = ~np.isfinite(x)
    first = int(np.flatnonzero(bad.reshape(-1))[0])
    index = tuple(int(i) for i in np.unravel_index(first, x.shape))
    return CodecError(
        f"message contains {int(bad.sum())} non-finite values "
        f"(first at index {index}: {x.reshape(-1)[first]!s}) of {x.size}; "
        "hint: a NaN/Inf activation means the block diverged: lower its learning rate"
    )


def fp16_overflow_error(x: np.ndarray) -> CodecError:
    """The error for a finite message with values that float16 would turn into Inf."""
    too_large = np.abs(x) >= FP16_OVERFLOW
    first = int(np.flatnonzero(too_large.reshape(-1))[0])
    index = tuple(int(i) for i in np.unravel_index(first, x.shape))
    return CodecError(
        f"message has {int(too_large.sum())} values beyond the float16 range "
        f"(first at index {index}: {x.reshape(-1)[first]!s}; fp16 keeps |x| < {FP16_OVERFLOW:g}, "
        "larger values would become Inf); hint: use codec='int8' or codec='fp32'"
    )


def abs_max(x3: np.ndarray) -> np.ndarray:
    """Per-channel max |x| of ``x3`` (outer, channels, inner) as float32; NaN/Inf propagate.

    max(x) and -min(x) instead of max(|x|): the same exact value without a full-size temporary.
    ``initial=0`` makes empty channels 0.
    """
    axes = (0, 2)
    largest = x3.max(axis=axes, initial=np.float32(0))
    smallest = x3.min(axis=axes, initial=np.float32(0))
    return np.maximum(largest, -smallest)


def check_encodable(x: np.ndarray, codec: str) -> None:
    """Raise the CodecError the encoder would hit (NaN/Inf, or fp16 overflow); else return.

    The C kernel only reports *that* something failed; this finds what and where.
    """
    amax = abs_max(x.reshape(1, 1, -1))[0]
    if not np.isfinite(amax):
        raise nonfinite_error(x)
    if codec == "fp16" and amax >= FP16_OVERFLOW:
        raise fp16_overflow_error(x)


def encode_fp32(x: np.ndarray, payload: np.ndarray) -> None:
    """Copy the float32 message `x` into `payload` (same size), refusing NaN/Inf."""
    check_encodable(x, "fp32")
    np.copyto(payload, x.reshape(-1))


def encode_fp16(x: np.ndarray, payload: np.ndarray) -> None:
    """Round `x` to float16 into `payload` (float16, same size), refusing NaN/Inf and overflow."""
    check_encodable(x, "fp16")
    np.copyto(payload, x.reshape(-1), casting="same_kind")


Layout = tuple[int, int, int]  # (outer, channels, inner)


def encode_int8(x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray) -> None:
    """Quantize `x` seen as `layout` into int8 `payload` (flat) and float32 `scales` (channels)."""
    x3 = x.reshape(layout)
    amax = abs_max(x3)
    if not np.isfinite(amax).all():
        raise nonfinite_error(x)
    np.clip(amax / INT8_LEVELS, SCALE_FLOOR, SCALE_CEILING, out=scales)
    ratio = x3 / scales[None, :, None]  # float32 / float32: IEEE division, as in C
    np.rint(ratio, out=ratio)  # round half to even
    np.clip(ratio, -127, 127, out=ratio)
    np.copyto(payload.reshape(layout), ratio, casting="unsafe")  # exact: integer values in [-127, 127]


def decode_fp32(payload: np.ndarray, out: np.ndarray) -> None:
    """Copy the float32 `payload` into `out` (float32, same size)."""
    np.copyto(out.reshape(-1), payload)


def decode_fp16(payload: np.ndarray, out: np.ndarray) -> None:
    """Widen the float16 `payload` into `out` (float32, same size; exact)."""
    np.copyto(out.reshape(-1), payload)


def decode_int8(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize int8 `payload` seen as `layout` times `scales` into float32 `out`."""
    # int8 -> float32 is exact, so this is q * scale rounded once, as in C
    np.multiply(payload.reshape(layout), scales[None, :, None], out=out.reshape(layout))
