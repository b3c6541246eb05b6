/*
 * edgebll_codec.h -- ABI of the native message codec (libedgebll_codec).
 *
 * The kernels quantize / dequantize the *data* of a message; the frame header, its CRC-32 (zlib's)
 * and all validation of user input live in Python (edgebll/codec/). Every result must equal the numpy
 * reference (edgebll/codec/reference.py) bit for bit, so the rules below are the contract:
 *
 *   fp32  payload[i] = x[i]                                (raw copy)
 *   fp16  payload[i] = IEEE binary16 of x[i], round to nearest even, subnormals kept
 *         (what numpy's astype(np.float16) gives); |x| >= 65520 would become Inf -> error
 *   int   (int8, int4, int2 with L = 127, 7, 1 levels; the message seen as layout below)
 *         amax[c]    = max |x| over the values using scale c
 *         scale[c]   = min(max(amax[c] / (float)L, FLT_MIN), SCALE_MAX)   (float32 arithmetic;
 *                      SCALE_MAX = the largest s with L * s finite: 0x1.020406p+121f for int8,
 *                      0x1.249248p+125f for int4, FLT_MAX for int2)
 *         q[i]       = clamp(rint(x[i] / scale), -L, L)              rounding NEAREST
 *                    = clamp(floor(x[i] / scale + u(seed, i)), -L, L)  rounding STOCHASTIC
 *                      (x / scale and + u each one float32 operation, round to nearest even)
 *         u(seed, i) = (float)(splitmix64(seed, i) >> 40) * 2^-24, in [0, 1), where
 *                      splitmix64(seed, i) is output i (from 0) of SplitMix64 at state seed:
 *                      z = seed + (i + 1) * 0x9E3779B97F4A7C15 (mod 2^64),
 *                      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9, z = (z ^ (z >> 27)) *
 *                      0x94D049BB133111EB, z ^ (z >> 31). i is the flat C-order index.
 *         payload    = int8: one int8_t per value. int4 / int2: two's complement fields of 4 / 2
 *                      bits, 2 / 4 per byte, value i in bits [b * (i % k), b * (i % k + 1)) of
 *                      byte i / k (b bits, k = 8 / b); the unused high bits of the last byte are 0
 *         decode     = (float) q[i] * scale                   (one rounding)
 *
 * Layout of the int codecs: the n values (C order) are runs of `run` consecutive values, run r
 * scaled by scales[r % n_scales]; only the last run may be shorter, and only when every run has
 * its own scale (ceil(n / run) == n_scales). The number of runs must be a multiple of n_scales.
 *   per tensor                  run = n,      n_scales = 1
 *   per channel of (B, C, H, W) run = H * W,  n_scales = C
 *   per group of G values       run = G,      n_scales = ceil(n / G)
 * With n == 0 the other counts are not checked and every scale is FLT_MIN.
 *
 * Rules shared by every function:
 *   - No allocation, no I/O, no global state: thread-safe and re-entrant.
 *   - Pointers must be non-NULL and aligned to their element type, even when the count is 0
 *     (byte payloads need no alignment); input and output ranges must not overlap.
 *   - Counts are element counts (not bytes); a layout breaking the rules above is
 *     EDGEBLL_ERR_SIZE.
 *   - Return EDGEBLL_OK (0) or one of the error codes below; on error, outputs may be partly
 *     written and must be discarded.
 */
#ifndef EDGEBLL_CODEC_H
#define EDGEBLL_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a prototype or a numerical rule above changes; Python refuses a mismatch. */
#define EDGEBLL_CODEC_ABI_VERSION 4

enum edgebll_status {
    EDGEBLL_OK = 0,
    EDGEBLL_ERR_NULL = 1,          /* a pointer argument is NULL */
    EDGEBLL_ERR_ALIGN = 2,         /* a pointer is not aligned to its element type */
    EDGEBLL_ERR_SIZE = 3,          /* counts overflow size_t, or the layout breaks its rules */
    EDGEBLL_ERR_OVERLAP = 4,       /* an input range overlaps an output range */
    EDGEBLL_ERR_NONFINITE = 5,     /* the input holds NaN or Inf */
    EDGEBLL_ERR_FP16_OVERFLOW = 6, /* a finite input is too large for float16 (or is NaN/Inf) */
    EDGEBLL_ERR_ARGUMENT = 7       /* an enum argument (rounding) is not one of its values */
};

/* `rounding` of the int encoders. */
enum edgebll_rounding {
    EDGEBLL_ROUND_NEAREST = 0,    /* rint: half to even */
    EDGEBLL_ROUND_STOCHASTIC = 1  /* floor(x / scale + u(seed, i)) */
};

/* Returns EDGEBLL_CODEC_ABI_VERSION of the build. */
int edgebll_codec_abi_version(void);

/* Encoders: read n float32 values from x. The int ones write n_scales scales and the payload;
 * `seed` is used only by stochastic rounding. */
int edgebll_encode_fp32(const float *x, size_t n, float *payload);
int edgebll_encode_fp16(const float *x, size_t n, uint16_t *payload);
int edgebll_encode_int8(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, int8_t *payload);
int edgebll_encode_int4(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, uint8_t *payload);
int edgebll_encode_int2(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, uint8_t *payload);

/* Decoders: write n float32 values to out. They do not check the values (the frame's CRC and
 * Python's scale check do that): an fp16 Inf/NaN decodes to Inf/NaN, an int8 -128 or an int4 -8
 * (never written) decode to -128 * scale and -8 * scale. */
int edgebll_decode_fp32(const float *payload, size_t n, float *out);
int edgebll_decode_fp16(const uint16_t *payload, size_t n, float *out);
int edgebll_decode_int8(const int8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out);
int edgebll_decode_int4(const uint8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out);
int edgebll_decode_int2(const uint8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out);

#ifdef __cplusplus
}
#endif

#endif /* EDGEBLL_CODEC_H */
