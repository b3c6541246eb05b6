"""numpy reference kernels of the message codec: the ground truth the C kernel must match.

Every kernel writes into arrays the caller hands in (views into the frame being built, or the
decode output), so both backends share one signature and :mod:`edgebll.codec` can pick either.
The int kernels take a `layout` ``(size, run, num_scales)``: the message, flattened in C order, is
a sequence of runs of ``run`` consecutive values (only the last may be shorter), and run ``r`` uses
``scales[r % num_scales]``. Per tensor that is ``(size, size, 1)``; per channel of a (B, C, H, W)
message ``(size, H*W, C)``; per group of G values ``(size, G, ceil(size / G))``.

Numerical rules (also in csrc/edgebll_codec.h), for ``L`` levels (int8 127, int4 7, int2 1):

- ``scale = clip(amax / L, FLT_MIN, SCALE_MAX[codec])`` in float32 per scale, ``amax`` the largest
  ``|x|`` of the values using it; ``q = clip(round(x / scale), -L, L)``; decode ``q * scale``.
  The ``FLT_MIN`` floor gives an all-zero run a positive scale (so it decodes to zeros) and keeps
  ``|x / scale| <= L`` when ``amax / L`` would be subnormal; the ``SCALE_MAX`` ceiling (the largest
  ``s`` with ``L * s`` finite) stops ``L * scale`` from overflowing to Inf when amax is near
  ``FLT_MAX`` (only int8 can get there: ``FLT_MAX / 127`` rounds up).
- ``round`` is ``rint`` (half to even) with ``rounding="nearest"``: round-trip error at most
  ``scale / 2`` (plus float32 rounding) for every finite input. With ``rounding="stochastic"`` it is
  ``floor(x / scale + u_i)``, ``u_i`` in [0, 1) from :func:`stochastic_offsets` (counter-based, so C
  and numpy draw the same ``u_i`` for value ``i``): unbiased up to the float32 rounding of the sum,
  error below one scale. Each of ``x / scale`` and ``+ u_i`` is one float32 operation, rounded to
  nearest even, in both implementations.
- int8 payload: one int8 per value. int4 / int2: two's complement fields packed 2 / 4 per byte,
  first value in the low bits, unused high bits of the last byte zero (see
  :mod:`edgebll.codec.frame`). int2 with ``L = 1`` is ternary: -1, 0, 1 (the field ``0b10`` = -2 is
  never written).
- fp16: numpy's ``astype(np.float16)`` (round to nearest even, subnormals kept); values with
  ``|x| >= 65520`` would become Inf and are refused.
- fp32: a copy.
- The frame's checksum is zlib's CRC-32 (:mod:`edgebll.codec.frame`), computed outside the kernels.
"""

from __future__ import annotations

import numpy as np

from edgebll.errors import CodecError

LEVELS: dict[str, int] = {"int8": 127, "int4": 7, "int2": 1}
BITS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
INT8_LEVELS = np.float32(LEVELS["int8"])
SCALE_FLOOR = np.finfo(np.float32).tiny  # FLT_MIN, the smallest normal float32
# The largest float32 s with L * s finite, per codec: FLT_MAX / 127 rounds up past it, so int8 needs
# the clip; FLT_MAX / 7 and FLT_MAX / 1 do not (the ceilings hold for decode's scale check).
SCALE_CEILINGS: dict[str, np.float32] = {
    "int8": np.float32(float.fromhex("0x1.020406p+121")),
    "int4": np.float32(float.fromhex("0x1.249248p+125")),
    "int2": np.finfo(np.float32).max,
}
SCALE_CEILING = SCALE_CEILINGS["int8"]
FP16_OVERFLOW = np.float32(65520.0)  # the midpoint 65504..65536: from here on fp16 rounds to Inf
ROUNDINGS = ("nearest", "stochastic")

# SplitMix64 (Steele, Lea & Flood 2014; the constants of Vigna's splitmix64.c)
GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)

Layout = tuple[int, int, int]  # (size, run, num_scales)


def _first_offender(x: np.ndarray, mask: np.ndarray) -> tuple[int, tuple[int, ...], str]:
    """How many elements ``mask`` flags, the index of the first, and its value as text."""
    first = int(np.flatnonzero(mask.reshape(-1))[0])
    index = tuple(int(i) for i in np.unravel_index(first, x.shape))
    return int(mask.sum()), index, str(x.reshape(-1)[first])


def nonfinite_error(x: np.ndarray) -> CodecError:
    """The error for a message holding NaN or Inf (the caller adds block/step context)."""
    count, index, value = _first_offender(x, ~np.isfinite(x))
    return CodecError(
        f"message contains {count} non-finite values (first at index {index}: {value}) of {x.size}; "
        "hint: a NaN/Inf activation means the block diverged: lower its learning rate"
    )


def fp16_overflow_error(x: np.ndarray) -> CodecError:
    """The error for a finite message with values that float16 would turn into Inf."""
    count, index, value = _first_offender(x, np.abs(x) >= FP16_OVERFLOW)
    return CodecError(
        f"message has {count} values beyond the float16 range (first at index {index}: {value}; fp16 keeps "
        f"|x| < {FP16_OVERFLOW:g}, larger values would become Inf); hint: use codec='int8' or codec='fp32'"
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


def splitmix64(seed: int, indices: np.ndarray) -> np.ndarray:
    """Output number ``i`` (counting from 0) of SplitMix64 started at state `seed`, for each ``i``.

    Counter-based: value ``i`` is a pure function of ``(seed, i)``, ``mix(seed + (i + 1) * GAMMA)``
    in uint64 arithmetic modulo 2**64 (numpy's uint64 arrays wrap, as C's uint64_t does), so any
    slice of the stream can be computed without the ones before it, in any order, by any
    implementation.
    """
    z = (indices.astype(np.uint64) + np.uint64(1)) * GOLDEN_GAMMA + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def stochastic_offsets(seed: int, start: int, stop: int) -> np.ndarray:
    """The float32 offsets ``u_i`` in [0, 1) of stochastic rounding, for values start..stop-1.

    ``u_i`` = the top 24 bits of ``splitmix64(seed, i)`` times 2**-24: exact in float32 (a 24-bit
    integer times a power of two), so C gets the same float from the same integer.
    """
    top = splitmix64(seed, np.arange(start, stop, dtype=np.uint64)) >> np.uint64(40)
    return top.astype(np.float32) * np.float32(2.0**-24)


def encode_fp32(x: np.ndarray, payload: np.ndarray) -> None:
    """Copy the float32 message `x` into `payload` (same size), refusing NaN/Inf."""
    check_encodable(x, "fp32")
    np.copyto(payload, x.reshape(-1))


def encode_fp16(x: np.ndarray, payload: np.ndarray) -> None:
    """Round `x` to float16 into `payload` (float16, same size), refusing NaN/Inf and overflow."""
    check_encodable(x, "fp16")
    np.copyto(payload, x.reshape(-1), casting="same_kind")


def _parts(layout: Layout) -> list[tuple[slice, tuple[int, int, int], slice]]:
    """`layout` as 3-D pieces ``(values, (outer, scales, run), scales)``, each with one scale per
    index of its axis 1: one piece, or two when the last run (group) is shorter."""
    size, run, num_scales = layout
    if size == 0:
        return []
    if size % run == 0:
        return [(slice(0, size), (size // (run * num_scales), num_scales, run), slice(0, num_scales))]
    assert -(-size // run) == num_scales, f"a short last run needs one scale per run: {layout}"
    full = (num_scales - 1) * run
    last = (slice(full, size), (1, 1, size - full), slice(num_scales - 1, num_scales))
    return [(slice(0, full), (1, num_scales - 1, run), slice(0, num_scales - 1)), last] if full else [last]


def _encode_int(
    codec: str, x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
    rounding: str, seed: int,
) -> None:
    """Quantize `x` (any shape, `layout` over its flat values) into `scales` and `payload`."""
    assert rounding in ROUNDINGS, rounding
    flat = x.reshape(-1)
    levels = np.float32(LEVELS[codec])
    parts = _parts(layout)
    scales[:] = SCALE_FLOOR  # what a message without values gets (e.g. shape (0, C) per channel)
    for values, shape, scale_slice in parts:
        amax = abs_max(flat[values].reshape(shape))
        if not np.isfinite(amax).all():
            raise nonfinite_error(x)
        np.clip(amax / levels, SCALE_FLOOR, SCALE_CEILINGS[codec], out=scales[scale_slice])

    q = payload if codec == "int8" else np.empty(layout[0], np.int8)
    for values, shape, scale_slice in parts:
        ratio = flat[values].reshape(shape) / scales[scale_slice][None, :, None]  # IEEE division, as in C
        if rounding == "stochastic":
            ratio += stochastic_offsets(seed, values.start, values.stop).reshape(shape)
            np.floor(ratio, out=ratio)
        else:
            np.rint(ratio, out=ratio)  # round half to even
        np.clip(ratio, -levels, levels, out=ratio)
        np.copyto(q[values].reshape(shape), ratio, casting="unsafe")  # exact: integers in [-L, L]
    if codec != "int8":
        _pack(q, BITS[codec], payload)


def _pack(q: np.ndarray, bits: int, payload: np.ndarray) -> None:
    """Pack int8 values `q` (in [-2**(bits-1), 2**(bits-1))) as `bits`-bit fields into uint8 `payload`."""
    per_byte = 8 // bits
    fields = np.zeros(payload.size * per_byte, np.uint8)  # zero fields pad the last byte
    np.bitwise_and(q.view(np.uint8), (1 << bits) - 1, out=fields[: q.size])
    fields = fields.reshape(-1, per_byte)
    np.copyto(payload, fields[:, 0])
    for k in range(1, per_byte):
        payload |= fields[:, k] << np.uint8(bits * k)


def _unpack(payload: np.ndarray, bits: int, size: int) -> np.ndarray:
    """The `size` int8 values of the `bits`-bit fields in uint8 `payload` (inverse of :func:`_pack`)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    fields = (payload[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    sign = np.uint8(1 << (bits - 1))
    # two's complement sign extension: (f ^ sign) - sign, computed in int8
    return ((fields ^ sign).view(np.int8) - sign.astype(np.int8)).reshape(-1)[:size]


def _decode_int(q: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """``q * scale`` per value into `out` (int8 -> float32 is exact: one rounding, as in C)."""
    flat = out.reshape(-1)
    for values, shape, scale_slice in _parts(layout):
        np.multiply(q[values].reshape(shape), scales[scale_slice][None, :, None], out=flat[values].reshape(shape))


def encode_int8(
    x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
    rounding: str = "nearest", seed: int = 0,
) -> None:
    """Quantize `x` into int8 `payload` (flat) and float32 `scales` (one per scale of `layout`)."""
    _encode_int("int8", x, layout, scales, payload, rounding, seed)


def encode_int4(
    x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
    rounding: str = "nearest", seed: int = 0,
) -> None:
    """Quantize `x` into 4-bit fields of uint8 `payload` (2 per byte) and float32 `scales`."""
    _encode_int("int4", x, layout, scales, payload, rounding, seed)


def encode_int2(
    x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
    rounding: str = "nearest", seed: int = 0,
) -> None:
    """Quantize `x` to ternary (-1, 0, 1) 2-bit fields of uint8 `payload` (4 per byte) and `scales`."""
    _encode_int("int2", x, layout, scales, payload, rounding, seed)


def decode_fp32(payload: np.ndarray, out: np.ndarray) -> None:
    """Copy the float32 `payload` into `out` (float32, same size)."""
    np.copyto(out.reshape(-1), payload)


def decode_fp16(payload: np.ndarray, out: np.ndarray) -> None:
    """Widen the float16 `payload` into `out` (float32, same size; exact)."""
    np.copyto(out.reshape(-1), payload)


def decode_int8(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize int8 `payload` times the `scales` of `layout` into float32 `out`."""
    _decode_int(payload, layout, scales, out)


def decode_int4(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize the 4-bit fields of uint8 `payload` times `scales` into float32 `out`."""
    _decode_int(_unpack(payload, 4, out.size), layout, scales, out)


def decode_int2(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """Dequantize the 2-bit fields of uint8 `payload` times `scales` into float32 `out`."""
    _decode_int(_unpack(payload, 2, out.size), layout, scales, out)
