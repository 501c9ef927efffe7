/* The 16-bit products on the CPU over rows by index, and over whole matrices. The neuron cache leaves its rows where
   they were read and frees a deleted neuron's slot for the next read (nothing is moved), so a layer's rows are
   scattered over its cache, and these kernels take the list of the slots to multiply. Both sum in float32, in an
   order that depends only on the list's order and the values (not on where the rows lie, nor on the thread).

   fb_up_bf16 / fb_up_f16(rows, idx, n, d, stride, x, bias, out, threads): out[i] = rows[idx[i]] . x + bias[idx[i]]
   for i < n (idx NULL: row i; bias NULL: none), rows of d values at rows + idx[i] * stride (elements), x d float32
   values, bias 16-bit values by row as the rows are; each row's sum over 16 lanes (element j in lane j % 16, the
   lanes' sums in j order), then the lanes in order, then the bias, in float32 (one rounding, by the caller, as
   F.linear's). With idx NULL it is a plain
   matrix-vector product, the engine's "rows" matvec kernel (attention, the LM head): torch's own 16-bit products are
   slow on CPUs without AMX (Intel Xeon with avx512_bf16, no AMX, 2 threads, 4096x4096 matrices past the L3:
   bfloat16 by torch.mv 5.0-5.4 GB/s, F.linear 10.3-11.8, this kernel 19.0-19.2; float16 5.2-6.5, 9.6-10.6 and
   13.0-13.9). The rows go in chunks to `threads` OpenMP threads (`up_chunk`):
   built with -fopenmp, this library needs libgomp.so.1, which torch has loaded already (the loader matches the name),
   so the rows go to torch's own worker threads. A thread of our own lost its core to those workers, which spin a while
   after each of torch's products: 2.7 against 1.1 ms for 3,200 rows after a torch product (Intel Xeon, 2 cores).

   fb_down_bf16 / fb_down_f16(rows, idx, n, d, stride, h, out, threads): out[j] = sum over i < n with h[i] != 0 of
   h[i] * rows[idx[i] * stride + j] (idx NULL: row i), in i order, four rows at a time, the columns split between
   `threads` OpenMP threads (3,200 rows, half active: 1.28 ms on one, 0.73 on two): a ReLU FFN's activations are
   mostly zero, so most rows are never read; and torch's 16-bit products in this orientation (the sum running down a
   neuron-major matrix) are slow on some CPUs (6.6 GB/s in bfloat16 on an Intel Xeon with AMX, against 27 GB/s for
   matrix-vector products over the same bytes).

   Neither allocates. Built by `make` (reference/_row_kernels.so) with contraction
   off, so that every code path below (one per instruction set) gives the same bits; called through ctypes
   (row_kernels.py), which lets go of the GIL for the call. */
#include <omp.h>
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
   fields read as the value times 2^-112 (the two biases differ by 112), subnormals included; inf and NaN by select.
   (The compiler's own _Float16 conversion, F16C's vcvtph2ps, did not vectorise in these loops: 4.2 against 14.5 GB/s,
   Intel Xeon with avx512_fp16, gcc 12, 2 threads, 4096x4096.) */
static inline float from_f16(uint16_t v) {
    uint32_t sign = (uint32_t)(v & 0x8000) << 16;
    uint32_t rest = (uint32_t)(v & 0x7fff) << 13;
    uint32_t bits = as_bits(as_float(rest) * 0x1p112f);
    bits = (v & 0x7c00) == 0x7c00 ? rest | 0x7f800000 : bits;
    return as_float(bits | sign);
}

#define LANES 16
#define UP_ROWS 8 /* rows at a time: each x load serves eight rows (8 measured faster than 2 or 4 here) */
#define ROW(k) (rows + (idx ? idx[k] : (k)) * stride) /* row k of the list (idx NULL: the rows in order) */

/* Rows per chunk of the up kernel's threads, which take chunks as they finish (OpenMP's dynamic schedule): a fixed
   half each waited for the thread whose core also takes the disk's interrupts. About 8 chunks a thread, whole
   8-row blocks, at most 256 rows. bfloat16 4096x4096 beside fio's 16 KiB random reads: 14.5-15.0 GB/s split in
   halves, 16.5-18.6 in chunks of 256 (20.5-21.7 and 21.7-22.3 with no reads; Intel Xeon, 2 threads). */
static long up_chunk(long n, int threads) {
    long chunk = (n / ((long)threads * 8) + UP_ROWS - 1) / UP_ROWS * UP_ROWS;
    return chunk < UP_ROWS ? UP_ROWS : chunk > 256 ? 256 : chunk;
}

/* One row's sum from its lanes, in lane order. */
static inline float lane_sum(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* Element e of the eight rows r0..r7 times x[e], into lane l of their accumulators. */
#define EIGHT_ROWS(CONVERT, e, l)                                                                                  \
    do {                                                                                                           \
        float xv = x[e];                                                                                           \
        a0[l] += xv * CONVERT(r0[e]); a1[l] += xv * CONVERT(r1[e]); a2[l] += xv * CONVERT(r2[e]);                  \
        a3[l] += xv * CONVERT(r3[e]); a4[l] += xv * CONVERT(r4[e]); a5[l] += xv * CONVERT(r5[e]);                  \
        a6[l] += xv * CONVERT(r6[e]); a7[l] += xv * CONVERT(r7[e]);                                                \
    } while (0)

#define UP(NAME, CONVERT)                                                                                          \
    CLONES static void NAME##_rows(const uint16_t *rows, const int64_t *idx, long n, long d, long stride,          \
                                   const float *x, float *out) {                                                  \
        long i = 0;                                                                                               \
        for (; i + UP_ROWS <= n; i += UP_ROWS) { /* eight rows unrolled by hand: arrays of them do not vectorise */ \
            const uint16_t *r0 = ROW(i), *r1 = ROW(i + 1);                                                        \
            const uint16_t *r2 = ROW(i + 2), *r3 = ROW(i + 3);                                                    \
            const uint16_t *r4 = ROW(i + 4), *r5 = ROW(i + 5);                                                    \
            const uint16_t *r6 = ROW(i + 6), *r7 = ROW(i + 7);                                                    \
            float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};                             \
            float a4[LANES] = {0}, a5[LANES] = {0}, a6[LANES] = {0}, a7[LANES] = {0};                             \
            long j = 0;                                                                                           \
            for (; j + LANES <= d; j += LANES) {                                                                  \
                __builtin_prefetch(r0 + j + 256); __builtin_prefetch(r1 + j + 256);                               \
                __builtin_prefetch(r2 + j + 256); __builtin_prefetch(r3 + j + 256);                               \
                __builtin_prefetch(r4 + j + 256); __builtin_prefetch(r5 + j + 256);                               \
                __builtin_prefetch(r6 + j + 256); __builtin_prefetch(r7 + j + 256);                               \
                for (int l = 0; l < LANES; l++) {                                                                 \
                    EIGHT_ROWS(CONVERT, j + l, l);                                                                \
                }                                                                                                 \
            }                                                                                                     \
            for (int l = 0; j + l < d; l++) {                                                                     \
                EIGHT_ROWS(CONVERT, j + l, l);                                                                    \
            }                                                                                                     \
            out[i] = lane_sum(a0); out[i + 1] = lane_sum(a1); out[i + 2] = lane_sum(a2);                          \
            out[i + 3] = lane_sum(a3); out[i + 4] = lane_sum(a4); out[i + 5] = lane_sum(a5);                      \
            out[i + 6] = lane_sum(a6); out[i + 7] = lane_sum(a7);                                                 \
        }                                                                                                         \
        for (; i < n; i++) {                                                                                      \
            const uint16_t *r0 = ROW(i);                                                                          \
            float a0[LANES] = {0};                                                                                \
            long j = 0;                                                                                           \
            for (; j + LANES <= d; j += LANES)                                                                    \
                for (int l = 0; l < LANES; l++) a0[l] += x[j + l] * CONVERT(r0[j + l]);                           \
            for (int l = 0; j + l < d; l++) a0[l] += x[j + l] * CONVERT(r0[j + l]);                               \
            out[i] = lane_sum(a0);                                                                                \
        }                                                                                                         \
    }                                                                                                             \
    void NAME(const uint16_t *rows, const int64_t *idx, long n, long d, long stride, const float *x,               \
              const uint16_t *bias, float *out, int threads) {                                                    \
        long chunk = up_chunk(n, threads), chunks = (n + chunk - 1) / chunk;                                      \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                                     \
        for (long c = 0; c < chunks; c++) {                                                                       \
            long first = c * chunk, last = first + chunk < n ? first + chunk : n;                                 \
            NAME##_rows(idx ? rows : rows + first * stride, idx ? idx + first : NULL, last - first, d, stride, x,  \
                        out + first);                                                                             \
            if (bias)                                                                                             \
                for (long i = first; i < last; i++) out[i] += CONVERT(bias[idx ? idx[i] : i]);                    \
        }                                                                                                         \
    }

/* The rows with nonzero activations, gathered four at a time, over columns [first, last). */
#define DOWN(NAME, CONVERT)                                                                                        \
    CLONES static void NAME##_columns(const uint16_t *rows, const int64_t *idx, long n, long first, long last,      \
                                      long stride, const float *h, float *out) {                                  \
        long at[4];                                                                                             \
        int k = 0;                                                                                              \
        for (long i = 0; i < n; i++) {                                                                          \
            if (h[i] == 0.0f) continue;                                                                         \
            at[k++] = i;                                                                                        \
            if (k < 4) continue;                                                                                \
            const uint16_t *r0 = rows + (idx ? idx[at[0]] : at[0]) * stride;                                    \
            const uint16_t *r1 = rows + (idx ? idx[at[1]] : at[1]) * stride;                                    \
            const uint16_t *r2 = rows + (idx ? idx[at[2]] : at[2]) * stride;                                    \
            const uint16_t *r3 = rows + (idx ? idx[at[3]] : at[3]) * stride;                                    \
            float h0 = h[at[0]], h1 = h[at[1]], h2 = h[at[2]], h3 = h[at[3]];                                   \
            for (long j = first; j < last; j++)                                                                 \
                out[j] += h0 * CONVERT(r0[j]) + h1 * CONVERT(r1[j]) + h2 * CONVERT(r2[j]) + h3 * CONVERT(r3[j]); \
            k = 0;                                                                                              \
        }                                                                                                       \
        for (int q = 0; q < k; q++) {                                                                           \
            const uint16_t *r = rows + (idx ? idx[at[q]] : at[q]) * stride;                                     \
            float hq = h[at[q]];                                                                                \
            for (long j = first; j < last; j++) out[j] += hq * CONVERT(r[j]);                                   \
        }                                                                                                       \
    }                                                                                                           \
    void NAME(const uint16_t *rows, const int64_t *idx, long n, long d, long stride, const float *h, float *out,   \
              int threads) {                                                                                    \
        memset(out, 0, (size_t)d * sizeof(float));                                                              \
        long blocks = (d + 63) / 64; /* whole cache lines of columns per thread */                               \
        _Pragma("omp parallel num_threads(threads)") {                                                          \
            long parts = omp_get_num_threads(), me = omp_get_thread_num();                                      \
            long first = blocks * me / parts * 64, last = blocks * (me + 1) / parts * 64;                       \
            if (last > d) last = d;                                                                             \
            if (first < last) NAME##_columns(rows, idx, n, first, last, stride, h, out);                        \
        }                                                                                                       \
    }

UP(fb_up_bf16, from_bf16)
UP(fb_up_f16, from_f16)
DOWN(fb_down_bf16, from_bf16)
DOWN(fb_down_f16, from_f16)
