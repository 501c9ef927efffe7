/* The FFN's down projection over a block of 16-bit neuron rows, skipping the neurons whose activation is zero:
   out[j] = sum over i with h[i] != 0 of h[i] * rows[i * stride + j], for j < d, summed in float32 in row order,
   four rows at a time. A ReLU FFN's activations are mostly zero, so most rows are never read; and torch's 16-bit
   products in this orientation (the sum running down a neuron-major matrix) are slow on some CPUs (6.6 GB/s in
   bfloat16 on an Intel Xeon with AMX, against 27 GB/s for matrix-vector products over the same bytes).

   fb_down_bf16 / fb_down_f16(rows, n, d, stride, h, out): rows is n x d 16-bit values, row i at rows + i * stride
   (elements); h is n float32 activations; out is d float32 sums. Single-threaded, no allocation. Built by `make`
   (reference/_sparse_down.so), called through ctypes (sparse_down.py), which lets go of the GIL for the call. */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static inline float as_float(uint32_t u) {
    union { uint32_t u; float f; } x = {u};
    return x.f;
}

static inline uint32_t as_bits(float f) {
    union { float f; uint32_t u; } x = {f};
    return x.u;
}

static inline float from_bf16(uint16_t v) {
    return as_float((uint32_t)v << 16);  /* bfloat16 is float32's upper half */
}

/* float16 -> float32, exact and branch-free so that it vectorises: the exponent and mantissa moved into float32's
   fields read as the value times 2^-112 (the two biases differ by 112), subnormals included; inf and NaN by select. */
static inline float from_f16(uint16_t v) {
    uint32_t sign = (uint32_t)(v & 0x8000) << 16;
    uint32_t rest = (uint32_t)(v & 0x7fff) << 13;
    uint32_t bits = as_bits(as_float(rest) * 0x1p112f);
    bits = (v & 0x7c00) == 0x7c00 ? rest | 0x7f800000 : bits;
    return as_float(bits | sign);
}

/* One body for both dtypes: the rows with nonzero activations, gathered four at a time. */
#define DOWN(NAME, CONVERT)                                                                                        \
    CLONES void NAME(const uint16_t *rows, long n, long d, long stride, const float *h, float *out) {          \
        memset(out, 0, (size_t)d * sizeof(float));                                                              \
        long at[4];                                                                                             \
        int k = 0;                                                                                              \
        for (long i = 0; i < n; i++) {                                                                          \
            if (h[i] == 0.0f) continue;                                                                         \
            at[k++] = i;                                                                                        \
            if (k < 4) continue;                                                                                \
            const uint16_t *r0 = rows + at[0] * stride, *r1 = rows + at[1] * stride;                            \
            const uint16_t *r2 = rows + at[2] * stride, *r3 = rows + at[3] * stride;                            \
            float h0 = h[at[0]], h1 = h[at[1]], h2 = h[at[2]], h3 = h[at[3]];                                   \
            for (long j = 0; j < d; j++)                                                                        \
                out[j] += h0 * CONVERT(r0[j]) + h1 * CONVERT(r1[j]) + h2 * CONVERT(r2[j]) + h3 * CONVERT(r3[j]); \
            k = 0;                                                                                              \
        }                                                                                                       \
        for (int q = 0; q < k; q++) {                                                                           \
            const uint16_t *r = rows + at[q] * stride;                                                          \
            float hq = h[at[q]];                                                                                \
            for (long j = 0; j < d; j++) out[j] += hq * CONVERT(r[j]);                                          \
        }                                                                                                       \
    }

DOWN(fb_down_bf16, from_bf16)
DOWN(fb_down_f16, from_f16)
