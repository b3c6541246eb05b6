/*
 * codec.c -- the native message codec: float32 <-> fp32 / fp16 / int8 / int4 / int2 payloads.
 *
 * Contract and numerical rules: edgebll_codec.h. The numpy reference
 * (edgebll/codec/reference.py) is the ground truth; tests/test_codec_parity.py compares whole frames
 * byte for byte. Build with -O3 but never -ffast-math: the rules rely on IEEE division and
 * addition rounding to nearest even (the default rounding mode, which np.rint assumes too), on
 * `(v + c) - c` not being folded to v, and on exact NaN/Inf handling.
 *
 * Hot loops are written as straight-line code over contiguous arrays (selects instead of
 * branches, integer bit tricks instead of float comparisons where a reduction is needed) so
 * that gcc -O3 vectorises them with the baseline x86-64 / aarch64 instruction sets. The int
 * codecs share one encoder and one decoder, inlined into each public function with the bit width,
 * the rounding and the scale layout as constants, so every combination gets its own straight loop.
 * Encoders write scales and payload straight into the caller's frame, decoders straight into the
 * caller's float32 array: nothing is allocated, nothing the size of the message is staged.
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
/* Levels L of the int codecs (q in [-L, L]) and the largest float32 s with L * s finite: the
 * scale ceiling. FLT_MAX / 127 rounds up, just past its ceiling; FLT_MAX / 7 and / 1 do not. */
#define INT8_LEVELS 127
#define INT4_LEVELS 7
#define INT2_LEVELS 1
#define INT8_SCALE_MAX 0x1.020406p+121f
#define INT4_SCALE_MAX 0x1.249248p+125f
#define INT2_SCALE_MAX FLT_MAX
/* SplitMix64's increment, 2^64 / golden ratio (stochastic_offset). */
#define GOLDEN_GAMMA UINT64_C(0x9E3779B97F4A7C15)

/* Inlining is what specialises the shared int kernels per codec; -O3 alone may decline. */
#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* KERNEL: on x86-64 with glibc, gcc and clang also compile each kernel for AVX2 and for
 * x86-64-v4 (AVX-512), and the dynamic loader picks the copy the CPU runs (an ifunc), as numpy
 * dispatches its own loops. The baseline (SSE2) copy converts float32 <-> int16 with long shuffle
 * chains and divides 4 floats at a time; the AVX2 one ran the int8 encoder 2.4x faster, and the
 * AVX-512 one (16 divisions at a time, direct int32 -> int8 narrowing) another 1.6x on Zen 5 (4 MiB
 * per tensor: 152 -> 95 us, then bound by reading the message twice). x86-64-v4 has FMA, but
 * -ffp-contract=off keeps the compiler from fusing, and IEEE division, addition and conversion
 * round the same at every vector width, so all copies give the same bits; tests/test_codec_parity.py
 * builds the library with -DEDGEBLL_CODEC_NO_CLONES (baseline only) and -DEDGEBLL_CODEC_NO_AVX512 too
 * and compares.
 * Elsewhere (aarch64: NEON is baseline; musl; other compilers) KERNEL is empty. */
/* KERNEL_NO_AVX512: AVX2 and baseline only, for the int2 encoder. gcc's AVX-512 copy of its
 * packing loop wants 64 bytes (256 values) per vector step, so a group of 64 values (16 bytes) ran
 * entirely in the scalar remainder loop: 4 MiB per group of 64 took 4.5 ms, the AVX2 copy 0.8. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute) && \
    !defined(EDGEBLL_CODEC_NO_CLONES)
#if __has_attribute(target_clones)
#define KERNEL_NO_AVX512 __attribute__((target_clones("avx2", "default")))
#if defined(EDGEBLL_CODEC_NO_AVX512)
#define KERNEL KERNEL_NO_AVX512
#else
#define KERNEL __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
#endif
#endif
#ifndef KERNEL
#define KERNEL
#define KERNEL_NO_AVX512
#endif

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

KERNEL int edgebll_encode_fp32(const float *x, size_t n, float *payload) {
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

KERNEL int edgebll_encode_fp16(const float *x, size_t n, uint16_t *payload) {
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
static ALWAYS_INLINE int32_t abs_max_bits(const float *x, size_t n, int32_t largest) {
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

/* ---- the int codecs: int8, int4, int2 ------------------------------------------------------ */

/* Stochastic rounding noise for value `index`: output number `index` of SplitMix64 started at
 * state `seed` (Vigna's splitmix64.c, one step per value), top 24 bits times 2^-24. Pure integer
 * arithmetic modulo 2^64 and an exact int -> float conversion: numpy computes the same bits. */
static ALWAYS_INLINE float stochastic_offset(uint64_t seed, uint64_t index) {
    uint64_t z = seed + (index + 1u) * GOLDEN_GAMMA;
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    z ^= z >> 31;
    return (float)(int32_t)(z >> 40) * 0x1p-24f;
}

/* Clamp to [-levels, levels] as int16 (|q| <= 128 fits): SSE2 has 16-bit min/max but no 32-bit
 * ones, and float clamps do not vectorise without fast-math. */
static ALWAYS_INLINE int16_t clamp_levels(int16_t q, int16_t levels) {
    q = q < -levels ? (int16_t)-levels : q;
    return q > levels ? levels : q;
}

/* clip(rint(x / scale), -levels, levels), the numpy reference's order of operations. Pass 1
 * guarantees |x / scale| <= levels * (1 + 2^-22), so the clip is a safety net and the rounding
 * trick below is always in range. */
static ALWAYS_INLINE int16_t quantize_nearest(float x, float scale, int16_t levels) {
    float v = x / scale; /* a true division: x * (1 / scale) would round differently */
    /* rintf(v) for |v| <= 2^22: the sum lands where the float ulp is 1, so the IEEE add rounds
     * to the nearest integer, ties to even, exactly like rintf in the default rounding mode; the
     * subtraction is exact. Unlike rintf it vectorises without SSE4.1's roundps. (It turns -0.3
     * into +0 rather than -0, a difference an integer cannot hold.) */
    return clamp_levels((int16_t)(int32_t)((v + ROUNDING_MAGIC) - ROUNDING_MAGIC), levels);
}

/* clip(floor(x / scale + offset), -levels, levels): two float32 operations, each rounded to
 * nearest even (-ffp-contract=off keeps them apart), then an exact floor. */
static ALWAYS_INLINE int16_t quantize_stochastic(float x, float scale, float offset, int16_t levels) {
    float v = x / scale;
    float w = v + offset;                   /* |w| <= levels + 1 */
    int32_t t = (int32_t)w;                 /* truncates toward zero ... */
    t -= (float)t > w;                      /* ... so a negative non-integer goes one down: floor */
    return clamp_levels((int16_t)t, levels);
}

static ALWAYS_INLINE int16_t quantize_value(float x, float scale, int stochastic, uint64_t seed,
                                            size_t index, int16_t levels) {
    return stochastic ? quantize_stochastic(x, scale, stochastic_offset(seed, index), levels)
                      : quantize_nearest(x, scale, levels);
}

/* The `bits`-bit two's complement field `k` of `byte`, as an int. */
static ALWAYS_INLINE int32_t field_value(unsigned byte, unsigned k, int bits) {
    unsigned mask = (1u << bits) - 1u, sign = 1u << (bits - 1);
    return (int32_t)(((byte >> (bits * k)) & mask) ^ sign) - (int32_t)sign;
}

/* Quantizes the values [begin, end) of x into the payload, `bits` (8, 4 or 2) per value packed
 * 8 / bits per byte (first value in the low bits). The scale of value i is scales[0], or
 * scales[i - begin] with per_value. Segments must be written in increasing order: a segment that
 * starts inside a byte ORs into it, so the segment before must have assigned the byte. Every
 * argument after `scales` is a constant at each call site, so each inlined copy is a straight
 * loop the compiler vectorises. */
static ALWAYS_INLINE void quantize_segment(const float *restrict x, size_t begin, size_t end,
                                           const float *restrict scales, int per_value, int bits,
                                           int16_t levels, int stochastic, uint64_t seed,
                                           uint8_t *restrict payload) {
    const size_t per_byte = 8u / (size_t)bits;
    const unsigned mask = (1u << bits) - 1u;
    const float scale = scales[0];
#define SCALE_OF(i) (per_value ? scales[(i) - begin] : scale)
#define QUANTIZE(i) quantize_value(x[i], SCALE_OF(i), stochastic, seed, (i), levels)
#define FIELD(i) ((unsigned)QUANTIZE(i) & mask) << (bits * ((i) % per_byte))
    if (bits == 8) {
        for (size_t i = begin; i < end; ++i) {
            payload[i] = (uint8_t)QUANTIZE(i);
        }
        return;
    }
    size_t i = begin;
    for (; i < end && i % per_byte != 0; ++i) { /* finish the byte the segment before began */
        payload[i / per_byte] |= (uint8_t)(FIELD(i));
    }
    if (i == end) {
        return;
    }
    const size_t whole_end = end / per_byte; /* i is at a byte boundary here */
    for (size_t byte = i / per_byte; byte < whole_end; ++byte) {
        unsigned packed = 0;
        for (size_t k = 0; k < per_byte; ++k) {
            packed |= FIELD(byte * per_byte + k);
        }
        payload[byte] = (uint8_t)packed;
    }
    i = whole_end * per_byte;
    if (i < end) { /* begin a byte; the next segment (or the zero padding) fills the rest */
        payload[i / per_byte] = (uint8_t)(FIELD(i));
        for (++i; i < end; ++i) {
            payload[i / per_byte] |= (uint8_t)(FIELD(i));
        }
    }
#undef FIELD
#undef QUANTIZE
#undef SCALE_OF
}

/* Dequantizes the values [begin, end): out[i] = field i * its scale (as in quantize_segment). */
static ALWAYS_INLINE void dequantize_segment(const uint8_t *restrict payload, size_t begin,
                                             size_t end, const float *restrict scales,
                                             int per_value, int bits, float *restrict out) {
    const size_t per_byte = 8u / (size_t)bits;
    const float scale = scales[0];
#define SCALE_OF(i) (per_value ? scales[(i) - begin] : scale)
#define VALUE(i) (float)field_value(payload[(i) / per_byte], (unsigned)((i) % per_byte), bits)
    if (bits == 8) {
        for (size_t i = begin; i < end; ++i) {
            out[i] = (float)(int8_t)payload[i] * SCALE_OF(i);
        }
        return;
    }
    size_t i = begin;
    for (; i < end && i % per_byte != 0; ++i) {
        out[i] = VALUE(i) * SCALE_OF(i);
    }
    if (i == end) {
        return;
    }
    const size_t whole_end = end / per_byte;
    for (size_t byte = i / per_byte; byte < whole_end; ++byte) {
        const unsigned packed = payload[byte];
        for (size_t k = 0; k < per_byte; ++k) {
            size_t index = byte * per_byte + k;
            out[index] = (float)field_value(packed, (unsigned)k, bits) * SCALE_OF(index);
        }
    }
    for (i = whole_end * per_byte; i < end; ++i) {
        out[i] = VALUE(i) * SCALE_OF(i);
    }
#undef VALUE
#undef SCALE_OF
}

/* The layout rules of edgebll_codec.h: n values in runs of `run` (the last may be shorter only
 * when each run has its own scale), run r scaled by scales[r % n_scales]. */
static int layout_is_valid(size_t n, size_t run, size_t n_scales) {
    if (n == 0) {
        return 1;
    }
    if (run == 0 || n_scales == 0 || n > SIZE_MAX / sizeof(float)) {
        return 0;
    }
    size_t runs = n / run + (n % run != 0);
    return runs % n_scales == 0 && (n % run == 0 || runs == n_scales);
}

/* Quantizes every value, segment by segment: per run (one scale), or per row of n_scales values
 * when runs are single values ([B, C] per channel), to vectorise across channels. */
static ALWAYS_INLINE void quantize_all(const float *x, size_t n, size_t run, const float *scales,
                                       size_t n_scales, int bits, int16_t levels, int stochastic,
                                       uint64_t seed, uint8_t *payload) {
    if (run == 1) {
        for (size_t begin = 0; begin < n; begin += n_scales) {
            quantize_segment(x, begin, begin + n_scales, scales, 1, bits, levels, stochastic, seed,
                             payload);
        }
        return;
    }
    size_t c = 0;
    for (size_t begin = 0, length; begin < n; begin += length) {
        length = n - begin < run ? n - begin : run;
        quantize_segment(x, begin, begin + length, scales + c, 0, bits, levels, stochastic, seed,
                         payload);
        c = c + 1 == n_scales ? 0 : c + 1;
    }
}

static ALWAYS_INLINE int encode_int(const float *x, size_t n, size_t run, float *scales,
                                    size_t n_scales, int rounding, uint64_t seed, uint8_t *payload,
                                    int bits, int16_t levels, float scale_max) {
    if (x == NULL || scales == NULL || payload == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(x, _Alignof(float)) || !is_aligned(scales, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (!layout_is_valid(n, run, n_scales) || n_scales > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    if (rounding != EDGEBLL_ROUND_NEAREST && rounding != EDGEBLL_ROUND_STOCHASTIC) {
        return EDGEBLL_ERR_ARGUMENT;
    }
    const size_t per_byte = 8u / (size_t)bits;
    const size_t payload_bytes = n / per_byte + (n % per_byte != 0);
    if (ranges_overlap(x, n * sizeof(float), scales, n_scales * sizeof(float)) ||
        ranges_overlap(x, n * sizeof(float), payload, payload_bytes) ||
        ranges_overlap(scales, n_scales * sizeof(float), payload, payload_bytes)) {
        return EDGEBLL_ERR_OVERLAP;
    }

    /* Pass 1: max |x| per scale as bits, kept in the scales buffer between runs so that no
     * scratch memory is needed. memcpy keeps the float/uint32 punning defined. */
    for (size_t c = 0; c < n_scales; ++c) {
        scales[c] = 0.0f; /* bits 0 */
    }
    if (n > 0 && run == 1) {
        /* [B, C] messages per channel: vectorise across channels instead of along a run of 1. */
        for (size_t begin = 0; begin < n; begin += n_scales) {
            const float *row = x + begin;
            for (size_t c = 0; c < n_scales; ++c) {
                int32_t magnitude = magnitude_bits(row[c]);
                int32_t largest = (int32_t)float_bits(scales[c]);
                scales[c] = bits_float((uint32_t)(magnitude > largest ? magnitude : largest));
            }
        }
    } else if (n > 0) {
        size_t c = 0;
        for (size_t begin = 0, length; begin < n; begin += length) {
            length = n - begin < run ? n - begin : run;
            scales[c] = bits_float((uint32_t)abs_max_bits(x + begin, length,
                                                          (int32_t)float_bits(scales[c])));
            c = c + 1 == n_scales ? 0 : c + 1;
        }
    }
    for (size_t c = 0; c < n_scales; ++c) {
        uint32_t largest = float_bits(scales[c]);
        if (largest >= FLOAT_INF_BITS) {
            return EDGEBLL_ERR_NONFINITE;
        }
        /* FLT_MIN floor: an all-zero run gets a positive scale (decodes to zeros), and one so
         * tiny that amax / levels is subnormal keeps |x / scale| <= levels exactly. scale_max
         * ceiling: near FLT_MAX, amax / 127 rounds up and 127 * scale would decode to Inf. */
        float scale = bits_float(largest) / (float)levels;
        scale = scale > FLT_MIN ? scale : FLT_MIN;
        scales[c] = scale < scale_max ? scale : scale_max;
    }

    /* Pass 2: quantize, straight into the payload. */
    if (rounding == EDGEBLL_ROUND_STOCHASTIC) {
        quantize_all(x, n, run, scales, n_scales, bits, levels, 1, seed, payload);
    } else {
        quantize_all(x, n, run, scales, n_scales, bits, levels, 0, 0, payload);
    }
    return EDGEBLL_OK;
}

static ALWAYS_INLINE int decode_int(const uint8_t *payload, size_t n, size_t run,
                                    const float *scales, size_t n_scales, float *out, int bits) {
    if (payload == NULL || scales == NULL || out == NULL) {
        return EDGEBLL_ERR_NULL;
    }
    if (!is_aligned(scales, _Alignof(float)) || !is_aligned(out, _Alignof(float))) {
        return EDGEBLL_ERR_ALIGN;
    }
    if (!layout_is_valid(n, run, n_scales) || n_scales > SIZE_MAX / sizeof(float)) {
        return EDGEBLL_ERR_SIZE;
    }
    const size_t per_byte = 8u / (size_t)bits;
    const size_t payload_bytes = n / per_byte + (n % per_byte != 0);
    if (ranges_overlap(payload, payload_bytes, out, n * sizeof(float)) ||
        ranges_overlap(scales, n_scales * sizeof(float), out, n * sizeof(float))) {
        return EDGEBLL_ERR_OVERLAP;
    }
    if (run == 1) {
        for (size_t begin = 0; begin < n; begin += n_scales) {
            dequantize_segment(payload, begin, begin + n_scales, scales, 1, bits, out);
        }
        return EDGEBLL_OK;
    }
    size_t c = 0;
    for (size_t begin = 0, length; begin < n; begin += length) {
        length = n - begin < run ? n - begin : run;
        dequantize_segment(payload, begin, begin + length, scales + c, 0, bits, out);
        c = c + 1 == n_scales ? 0 : c + 1;
    }
    return EDGEBLL_OK;
}

KERNEL int edgebll_encode_int8(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, int8_t *payload) {
    return encode_int(x, n, run, scales, n_scales, rounding, seed, (uint8_t *)payload, 8,
                      INT8_LEVELS, INT8_SCALE_MAX);
}

KERNEL int edgebll_encode_int4(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, uint8_t *payload) {
    return encode_int(x, n, run, scales, n_scales, rounding, seed, payload, 4, INT4_LEVELS,
                      INT4_SCALE_MAX);
}

KERNEL_NO_AVX512 int edgebll_encode_int2(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
                        int rounding, uint64_t seed, uint8_t *payload) {
    return encode_int(x, n, run, scales, n_scales, rounding, seed, payload, 2, INT2_LEVELS,
                      INT2_SCALE_MAX);
}

KERNEL int edgebll_decode_fp32(const float *payload, size_t n, float *out) {
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

KERNEL int edgebll_decode_fp16(const uint16_t *payload, size_t n, float *out) {
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

KERNEL int edgebll_decode_int8(const int8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out) {
    return decode_int((const uint8_t *)payload, n, run, scales, n_scales, out, 8);
}

KERNEL int edgebll_decode_int4(const uint8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out) {
    return decode_int(payload, n, run, scales, n_scales, out, 4);
}

KERNEL int edgebll_decode_int2(const uint8_t *payload, size_t n, size_t run, const float *scales,
                        size_t n_scales, float *out) {
    return decode_int(payload, n, run, scales, n_scales, out, 2);
}
