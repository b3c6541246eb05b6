/*
 * codec.c -- the native message codec: float32 <-> fp32 / fp16 / int8 payloads.
 *
 * Contract and numerical rules: edgebll_codec.h. The numpy reference
 * (edgebll/codec/reference.py) is the ground truth; tests/test_codec.py compares whole frames
 * byte for byte. Build with -O3 but never -ffast-math: the rules rely on IEEE division and
 * addition rounding to nearest even (the default rounding mode, which np.rint assumes too), on
 * `(v + c) - c` not being folded to v, and on exact NaN/Inf handling.
 *
 * Hot loops are written as straight-line code over contiguous arrays (selects instead of
 * branches, integer bit tricks instead of float comparisons where a reduction is needed) so
 * that gcc -O3 vectorises them with the baseline x86-64 / aarch64 instruction sets.
 */
#include "edgebll_codec.h"

#include <float.h>
#include <stdint.h>
#include <string.h>

/* |x| as raw bits. For non-negative floats the integer order of the bits is the numeric order,
 * and Inf/NaN (exponent all ones) sit above every finite value: one integer max gives both the
 * amax and a non-finite flag, and integer max reductions vectorise (float ones do not without
 * -ffinite-math-only). The bits fit int32, whose compare SSE2 has (its unsigned one it lacks). */
#define ABS_MASK 0x7FFFFFFFu
#define FLOAT_INF_BITS 0x7F800000u
/* Independent running maxima in abs_max_bits: with a single accumulator every step waits for
 * the previous compare-and-select (SSE2 has no 32-bit integer max), 2-3x slower on x86-64. */
#define MAX_LANES 16
/* 1.5 * 2^23: adding and subtracting it rounds a float with |v| <= 2^22 to an integer. */
#define ROUNDING_MAGIC 12582912.0f
/* The largest float32 s with 127 * s finite (FLT_MAX / 127 rounds up, just past it). */
#define SCALE_MAX 0x1.020406p+121f

static inline int32_t magnitude_bits(float value) {
    int32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits & (int32_t)ABS_MASK;
}

static inline uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits); /* the defined way to type-pun; compiles to a move */
    return bits;
}

static inline float bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static int is_aligned(const void *pointer, size_t alignment) {
    return ((uintptr_t)pointer % alignment) == 0;
}

/* 1 if the byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte. */
static int ranges_overlap(const void *a, size_t a_bytes, const void *b, size_t b_bytes) {
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    if (a_bytes == 0 || b_bytes == 0) {
        return 0;
    }
    return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

/* outer * channels * inner without size_t overflow, and small enough that n * 4 bytes fits. */
static int element_count(size_t outer, size_t channels, size_t inner, size_t *count) {
    size_t n = outer;
    if (channels != 0 && n > SIZE_MAX / channels) {
        return 0;
    }
    n *= channels;
    if (inner != 0 && n > SIZE_MAX / inner) {
        return 0;
    }
    n *= inner;
    if (n > SIZE_MAX / sizeof(float)) {
        return 0;
    }
    *count = n;
    return 1;
}

/* if_true where condition holds, else if_false, computed with masks. Both inputs are always
 * evaluated: written as `?:`, gcc sinks the float add of the subnormal path into a branch and,
 * since that add may raise an FP flag (-ftrapping-math, the default), then refuses to vectorise
 * the loop. */
static inline uint32_t select_bits(int condition, uint32_t if_true, uint32_t if_false) {
    uint32_t mask = (uint32_t)0 - (uint32_t)(condition != 0);
    return (if_true & mask) | (if_false & ~mask);
}

/* float32 bits -> binary16 bits, round to nearest even, subnormals kept: the same result as
 * numpy's astype(np.float16) (npy_floatbits_to_halfbits). Every case is computed and then
 * selected, so a loop calling this has no branches and vectorises with plain SSE2 / NEON. */
static inline uint16_t half_from_float_bits(uint32_t bits) {
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & ABS_MASK;

    /* Normal half (|x| >= 2^-14): re-bias the exponent (127 -> 15) and round away the 13 low
     * mantissa bits by adding just under half (0xFFF) plus the lowest kept bit, so an exact tie
     * rounds to even. A carry out of the mantissa bumps the exponent, up to Inf. */
    uint32_t normal = (magnitude - ((127u - 15u) << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;

    /* Subnormal half (|x| < 2^-14): adding 0.5 puts the float's ulp at 2^-24, the subnormal
     * half's unit, so the IEEE add itself rounds |x| to that grid (nearest even, the default
     * rounding mode; the same assumption np.rint and rintf make). The low bits of the sum are
     * then the half's bits; 0x400 is the smallest normal half, which is also right. A per-lane
     * variable shift would do the same in integers but does not vectorise before AVX2. */
    uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - float_bits(0.5f);

    uint32_t result = select_bits(magnitude < 0x38800000u, subnormal, normal); /* 2^-14 */
    uint32_t special = select_bits(magnitude > FLOAT_INF_BITS, 0x7E00u, 0x7C00u); /* NaN, Inf */
    result = select_bits(magnitude >= 0x47800000u, special, result); /* |x| >= 2^16 */
    return (uint16_t)(result | sign);
}

/* binary16 bits -> float32, exact (every half is a float). */
static inline float float_from_half_bits(uint16_t half) {
    uint32_t shifted = (uint32_t)(half & 0x7FFFu) << 13; /* exponent and mantissa in place */
    uint32_t exponent = shifted & 0x0F800000u;
    uint32_t normal = shifted + ((127u - 15u) << 23);
    uint32_t special = shifted + ((255u - 31u) << 23); /* Inf, and NaN keeping its payload */
    /* Subnormal: build 2^-14 * (1 + m / 1024) and subtract 2^-14; exact, no rounding. */
    uint32_t subnormal = float_bits(bits_float(shifted + (113u << 23)) - bits_float(113u << 23));
    uint32_t magnitude = select_bits(exponent == 0x0F800000u, special, normal);
    magnitude = select_bits(exponent == 0u, subnormal, magnitude);
    return bits_float(magnitude | ((uint32_t)(half & 0x8000u) << 16));
}

int edgebll_codec_abi_version(void) { return EDGEBLL_CODEC_ABI_VERSION; }

int edgebll_encode_fp32(const float *x, size_t n, float *payload) {
    if (x == NULL || payload == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(x, _Alignof(float)) || !is_aligned(payload, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(x, n * sizeof(float), payload, n * sizeof(float))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    uint32_t nonfinite = 0; /* an OR of flags: a 1-instruction chain, unlike a max */
    for (size_t i = 0; i < n; ++i) {
        nonfinite |= (float_bits(x[i]) & FLOAT_INF_BITS) == FLOAT_INF_BITS;
        payload[i] = x[i];
    }
    return nonfinite ? EDGEBLL_ERR_NONFINITE : EDGEBLL_OK;
}

int edgebll_encode_fp16(const float *x, size_t n, uint16_t *payload) {
    if (x == NULL || payload == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(x, _Alignof(float)) || !is_aligned(payload, _Alignof(uint16_t))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(x, n * sizeof(float), payload, n * sizeof(uint16_t))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    uint16_t overflow = 0; /* set when an Inf/NaN half (exponent all ones) came out */
    for (size_t i = 0; i < n; ++i) {
        uint16_t half = half_from_float_bits(float_bits(x[i]));
        overflow |= (half & 0x7C00u) == 0x7C00u;
        payload[i] = half;
    }
    /* Python tells apart a NaN/Inf input from a too-large finite one when it words the error. */
    return overflow ? EDGEBLL_ERR_FP16_OVERFLOW : EDGEBLL_OK;
}

/* Largest |x| bits of a contiguous run (and of `largest`), in MAX_LANES independent lanes that
 * the compiler turns into a few vector registers. */
static int32_t abs_max_bits(const float *x, size_t n, int32_t largest) {
    int32_t lanes[MAX_LANES] = {0};
    size_t i = 0;
    for (; i + MAX_LANES <= n; i += MAX_LANES) {
        for (size_t lane = 0; lane < MAX_LANES; ++lane) {
            int32_t magnitude = magnitude_bits(x[i + lane]);
            lanes[lane] = magnitude > lanes[lane] ? magnitude : lanes[lane];
        }
    }
    for (; i < n; ++i) {
        int32_t magnitude = magnitude_bits(x[i]);
        largest = magnitude > largest ? magnitude : largest;
    }
    for (size_t lane = 0; lane < MAX_LANES; ++lane) {
        largest = lanes[lane] > largest ? lanes[lane] : largest;
    }
    return largest;
}

/* clip(rint(x / scale), -127, 127) as int8, the numpy reference's order of operations.
 * Pass 1 guarantees |x / scale| <= 127 * (1 + 2^-22), so the clip is a safety net and the
 * rounding trick below is always in range. */
static inline int8_t quantize_one(float x, float scale) {
    float v = x / scale; /* a true division: x * (1 / scale) would round differently */
    /* rintf(v) for |v| <= 2^22: the sum lands where the float ulp is 1, so the IEEE add rounds
     * to the nearest integer, ties to even, exactly like rintf in the default rounding mode; the
     * subtraction is exact. Unlike rintf it vectorises without SSE4.1's roundps. (It turns -0.3
     * into +0 rather than -0, a difference an int8 cannot hold.) */
    int16_t q = (int16_t)(int32_t)((v + ROUNDING_MAGIC) - ROUNDING_MAGIC);
    /* Clamp as int16 (|q| <= 128 fits): SSE2 has 16-bit min/max but no 32-bit ones, and float
     * clamps do not vectorise without fast-math. */
    q = q < -127 ? -127 : q;
    q = q > 127 ? 127 : q;
    return (int8_t)q;
}

static void quantize_run(const float *x, size_t n, float scale, int8_t *q) {
    for (size_t i = 0; i < n; ++i) {
        q[i] = quantize_one(x[i], scale);
    }
}

int edgebll_encode_int8(const float *x, size_t outer, size_t channels, size_t inner,
                        float *scales, size_t n_scales, int8_t *payload) {
    size_t n;
    if (x == NULL || scales == NULL || payload == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(x, _Alignof(float)) || !is_aligned(scales, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n_scales != channels || !element_count(outer, channels, inner, &n)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(x, n * sizeof(float), scales, n_scales * sizeof(float)) ||
        ranges_overlap(x, n * sizeof(float), payload, n) ||
        ranges_overlap(scales, n_scales * sizeof(float), payload, n)) {
        return EDGEBLL_ERR_OVERLAP;
    }

    /* Pass 1: per-channel max |x| as bits, kept in the scales buffer between rows so that no
     * scratch memory is needed. memcpy keeps the float/uint32 punning defined. */
    for (size_t c = 0; c < channels; ++c) {
        scales[c] = 0.0f; /* bits 0 */
    }
    if (inner == 1) {
        /* [B, C] messages per channel: vectorise across channels instead of along a run of 1. */
        for (size_t b = 0; b < outer; ++b) {
            const float *row = x + b * channels;
            for (size_t c = 0; c < channels; ++c) {
                int32_t magnitude = magnitude_bits(row[c]);
                int32_t largest = (int32_t)float_bits(scales[c]);
                scales[c] = bits_float((uint32_t)(magnitude > largest ? magnitude : largest));
            }
        }
    } else {
        for (size_t b = 0; b < outer; ++b) {
            for (size_t c = 0; c < channels; ++c) {
                const float *run = x + (b * channels + c) * inner;
                int32_t largest = abs_max_bits(run, inner, (int32_t)float_bits(scales[c]));
                scales[c] = bits_float((uint32_t)largest);
            }
        }
    }
    for (size_t c = 0; c < channels; ++c) {
        uint32_t largest = float_bits(scales[c]);
        if (largest >= FLOAT_INF_BITS) {
            return EDGEBLL_ERR_NONFINITE;
        }
        /* FLT_MIN floor: an all-zero channel gets a positive scale (decodes to zeros), and a
         * channel so tiny that amax / 127 is subnormal keeps |x / scale| <= 127 exactly.
         * SCALE_MAX ceiling: near FLT_MAX, amax / 127 rounds up and 127 * scale would decode to
         * Inf. */
        float scale = bits_float(largest) / 127.0f;
        scale = scale > FLT_MIN ? scale : FLT_MIN;
        scales[c] = scale < SCALE_MAX ? scale : SCALE_MAX;
    }

    /* Pass 2: quantize. */
    if (inner == 1) {
        for (size_t b = 0; b < outer; ++b) {
            const float *row = x + b * channels;
            int8_t *q = payload + b * channels;
            for (size_t c = 0; c < channels; ++c) {
                q[c] = quantize_one(row[c], scales[c]);
            }
        }
    } else {
        for (size_t b = 0; b < outer; ++b) {
            for (size_t c = 0; c < channels; ++c) {
                size_t start = (b * channels + c) * inner;
                quantize_run(x + start, inner, scales[c], payload + start);
            }
        }
    }
    return EDGEBLL_OK;
}

int edgebll_decode_fp32(const float *payload, size_t n, float *out) {
    if (payload == NULL || out == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(payload, _Alignof(float)) || !is_aligned(out, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(payload, n * sizeof(float), out, n * sizeof(float))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    if (n > 0) {
        memcpy(out, payload, n * sizeof(float));
    }
    return EDGEBLL_OK;
}

int edgebll_decode_fp16(const uint16_t *payload, size_t n, float *out) {
    if (payload == NULL || out == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(payload, _Alignof(uint16_t)) || !is_aligned(out, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(payload, n * sizeof(uint16_t), out, n * sizeof(float))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    for (size_t i = 0; i < n; ++i) {
        out[i] = float_from_half_bits(payload[i]);
    }
    return EDGEBLL_OK;
}

int edgebll_decode_int8(const int8_t *payload, size_t outer, size_t channels, size_t inner,
                        const float *scales, size_t n_scales, float *out) {
    size_t n;
    if (payload == NULL || scales == NULL || out == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(scales, _Alignof(float)) || !is_aligned(out, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (n_scales != channels || !element_count(outer, channels, inner, &n)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (ranges_overlap(payload, n, out, n * sizeof(float)) ||
        ranges_overlap(scales, n_scales * sizeof(float), out, n * sizeof(float))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    if (inner == 1) {
        for (size_t b = 0; b < outer; ++b) {
            const int8_t *q = payload + b * channels;
            float *row = out + b * channels;
            for (size_t c = 0; c < channels; ++c) {
                row[c] = (float)q[c] * scales[c];
            }
        }
        return EDGEBLL_OK;
    }
    for (size_t b = 0; b < outer; ++b) {
        for (size_t c = 0; c < channels; ++c) {
            size_t start = (b * channels + c) * inner;
            const int8_t *q = payload + start;
            float *run = out + start;
            const float scale = scales[c];
            for (size_t i = 0; i < inner; ++i) {
                run[i] = (float)q[i] * scale;
            }
        }
    }
    return EDGEBLL_OK;
}
