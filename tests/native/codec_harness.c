/*
 * codec_harness.c -- runs libedgebll_codec's int encoders on fixed inputs and prints a fingerprint
 * of each result, one per line, so that builds for other CPUs (aarch64 under qemu-user) can be
 * compared with the host's. Used by tests/test_codec_parity.py::test_aarch64_build_matches_the_host;
 * no Python there.
 *
 *   x[i] = (float)((int32_t)(i * 2654435761 mod 2^32) >> 8) * 2^-20   the floats encoded
 *
 * The fingerprint is FNV-1a (64 bits) of the scales' and the payload's bytes: it only has to
 * differ when a single bit does, it is no checksum of the frame format.
 */
#include <stdint.h>
#include <stdio.h>

#include "edgebll_codec.h"

#define VALUES 4100

static float x[VALUES];
static float scales[VALUES];
static uint8_t payload[VALUES];

static uint32_t golden(uint32_t i) { return i * 2654435761u; }

static uint64_t fnv1a(uint64_t hash, const void *data, size_t n) {
    const uint8_t *bytes = data;
    for (size_t i = 0; i < n; ++i) {
        hash = (hash ^ bytes[i]) * UINT64_C(0x100000001B3);
    }
    return hash;
}

/* The fingerprint of n_scales scales followed by n payload bytes. */
static uint64_t fingerprint(size_t n_scales, size_t n) {
    return fnv1a(fnv1a(UINT64_C(0xCBF29CE484222325), scales, n_scales * sizeof scales[0]), payload, n);
}

int main(void) {
    for (uint32_t i = 0; i < VALUES; ++i) {
        x[i] = (float)((int32_t)golden(i) >> 8) * 0x1p-20f;
    }
    /* (run, n_scales): per tensor, per group of 64 (the last one short), per channel of [1025, 4]
     * and of [5, 4, 205]; each with nearest and stochastic rounding */
    static const size_t runs[][2] = {{VALUES, 1}, {64, (VALUES + 63) / 64}, {1, 4}, {205, 4}};
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; ++r) {
        for (int rounding = 0; rounding < 2; ++rounding) {
            size_t run = runs[r][0], n_scales = runs[r][1];
            int s8 = edgebll_encode_int8(x, VALUES, run, scales, n_scales, rounding, 42, (int8_t *)payload);
            uint64_t f8 = fingerprint(n_scales, VALUES);
            int s4 = edgebll_encode_int4(x, VALUES, run, scales, n_scales, rounding, 42, payload);
            uint64_t f4 = fingerprint(n_scales, (VALUES + 1) / 2);
            int s2 = edgebll_encode_int2(x, VALUES, run, scales, n_scales, rounding, 42, payload);
            uint64_t f2 = fingerprint(n_scales, (VALUES + 3) / 4);
            printf("encode run=%zu rounding=%d int8 %d %016llx int4 %d %016llx int2 %d %016llx\n", run, rounding,
                   s8, (unsigned long long)f8, s4, (unsigned long long)f4, s2, (unsigned long long)f2);
        }
    }
    return 0;
}
