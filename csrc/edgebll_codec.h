/*
 * edgebll_codec.h -- ABI of the native message codec (libedgebll_codec).
 *
 * The kernels quantize / dequantize the *data* of a message; the frame header, the CRC and all
 * validation of user input live in Python (edgebll/codec/). Every result must equal the numpy
 * reference (edgebll/codec/reference.py) bit for bit, so the rules below are the contract:
 *
 *   fp32  payload[i] = x[i]                                (raw copy)
 *   fp16  payload[i] = IEEE binary16 of x[i], round to nearest even, subnormals kept
 *         (what numpy's astype(np.float16) gives); |x| >= 65520 would become Inf -> error
 *   int8  amax[c]    = max |x| over channel c (over the whole tensor when channels == 1)
 *         scale[c]   = min(max(amax[c] / 127.0f, FLT_MIN), SCALE_MAX)   (float32 arithmetic;
 *                      SCALE_MAX = 0x1.020406p+121f, the largest s with 127 * s finite)
 *         payload[i] = (int8) rint(clamp(x[i] / scale[c], -127, 127))
 *         decode     = (float) payload[i] * scale[c]
 *
 * int8 arrays are laid out as [outer][channels][inner] (C order): a message of shape
 * (B, C, H, W) quantized per channel is outer = B, channels = C, inner = H * W; per tensor it is
 * outer = 1, channels = 1, inner = B * C * H * W.
 *
 * Rules shared by every function:
 *   - No allocation, no global state, no I/O: thread-safe and re-entrant.
 *   - Pointers must be non-NULL and aligned to their element type (even when the count is 0);
 *     input and output ranges must not overlap.
 *   - Counts are element counts (not bytes). n_scales must equal channels.
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
#define EDGEBLL_CODEC_ABI_VERSION 1

enum edgebll_status {
    EDGEBLL_OK = 0,
    EDGEBLL_ERR_NULL = 1,          /* a pointer argument is NULL */
    EDGEBLL_ERR_ALIGN = 2,         /* a pointer is not aligned to its element type */
    EDGEBLL_ERR_SIZE = 3,          /* counts overflow size_t, or n_scales != channels */
    EDGEBLL_ERR_OVERLAP = 4,       /* an input range overlaps an output range */
    EDGEBLL_ERR_NONFINITE = 5,     /* the input holds NaN or Inf */
    EDGEBLL_ERR_FP16_OVERFLOW = 6  /* a finite input is too large for float16 (or is NaN/Inf) */
};

/* Returns EDGEBLL_CODEC_ABI_VERSION of the build. */
int edgebll_codec_abi_version(void);

/* Encoders: read n (or outer * channels * inner) float32 values from x. */
int edgebll_encode_fp32(const float *x, size_t n, float *payload);
int edgebll_encode_fp16(const float *x, size_t n, uint16_t *payload);
int edgebll_encode_int8(const float *x, size_t outer, size_t channels, size_t inner,
                        float *scales, size_t n_scales, int8_t *payload);

/* Decoders: write n (or outer * channels * inner) float32 values to out. They do not check the
 * values (the frame's CRC does that): an fp16 Inf/NaN decodes to Inf/NaN. */
int edgebll_decode_fp32(const float *payload, size_t n, float *out);
int edgebll_decode_fp16(const uint16_t *payload, size_t n, float *out);
int edgebll_decode_int8(const int8_t *payload, size_t outer, size_t channels, size_t inner,
                        const float *scales, size_t n_scales, float *out);

#ifdef __cplusplus
}
#endif

#endif /* EDGEBLL_CODEC_H */
