/*
 * codec_harness.c -- runs libedgebll_codec's CRC-32 and int encoders on fixed inputs and prints the
 * results, one per line, so that builds for other CPUs (aarch64 under qemu-user) can be compared
 * with the host's and with zlib. Used by tests/test_codec.py::test_aarch64_build_*; no Python there.
 *
 *   data[i] = (uint8_t)((i * 2654435761) mod 2^32 >> 24)          bytes for the CRC lines
 *   x[i]    = (float)((int32_t)(i * 2654435761 mod 2^32) >> 8) * 2^-20   floats for the encoders
 */
#include <stdint.h>
#include <stdio.h>

#include "edgebll_codec.h"

#define DATA_BYTES 70000
#define VALUES 4100

static uint8_t data[DATA_BYTES];
static float x[VALUES];
static float scales[VALUES];
static uint8_t payload[VALUES];

static uint32_t golden(uint32_t i) { return i * 2654435761u; }

int main(void) {
    printf("implementation %s\n", edgebll_crc32_implementation());
    for (uint32_t i = 0; i < DATA_BYTES; ++i) {
        data[i] = (uint8_t)(golden(i) >> 24);
    }
    static const size_t offsets[] = {0, 1, 3, 13};
    for (size_t k = 0; k < sizeof offsets / sizeof offsets[0]; ++k) {
        for (size_t n = 0; n + offsets[k] <= DATA_BYTES; n += n < 600 ? 1 : 997) {
            printf("crc %zu %zu %08x\n", offsets[k], n, edgebll_crc32(0, data + offsets[k], n));
        }
    }
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
            uint32_t c8 = edgebll_crc32(edgebll_crc32(0, scales, n_scales * 4), payload, VALUES);
            int s4 = edgebll_encode_int4(x, VALUES, run, scales, n_scales, rounding, 42, payload);
            uint32_t c4 = edgebll_crc32(edgebll_crc32(0, scales, n_scales * 4), payload, (VALUES + 1) / 2);
            int s2 = edgebll_encode_int2(x, VALUES, run, scales, n_scales, rounding, 42, payload);
            uint32_t c2 = edgebll_crc32(edgebll_crc32(0, scales, n_scales * 4), payload, (VALUES + 3) / 4);
            printf("encode run=%zu rounding=%d int8 %d %08x int4 %d %08x int2 %d %08x\n", run, rounding,
                   s8, c8, s4, c4, s2, c2);
        }
    }
    return 0;
}
