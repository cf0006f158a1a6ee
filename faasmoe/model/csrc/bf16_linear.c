/* y = x @ W.T for bf16 weights W [N, K] and decode-sized fp32 x, on CPUs without native bf16 dot products.
 *
 * torch's bf16 GEMM on an AVX2 CPU costs about as much again for each row of x (a 151936x2048 lm_head: 38 ms
 * for 1 row, 95 ms for 4); widening a cache-sized chunk to fp32 first only pays from 4-8 rows. Here each
 * weight is widened in registers (a bf16 is the top half of an fp32: a shift or a mask) and used for every
 * row of x while it is in the L1 cache, so the weight is read once at the memory's pace (one row on a 2-core
 * AVX2 EPYC: 24 ms, the 25 ms a plain read of the same bytes takes). Built by faasmoe.model.native.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16

#ifdef __AVX2__
/* Sixteen bf16 weights loaded at once as eight fp32 lanes of the even ones (each shifted into the top half)
 * and eight of the odd ones (each already the top half: the even one masked off). One cheap op each, no
 * shuffles; x is laid out to match once per call (`deinterleave`). */
#define WIDEN_EVEN(pair) _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16))
#define WIDEN_ODD(pair) _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32((int)0xFFFF0000u)))

static inline float hsum(__m256 a, __m256 b) {
    __m256 v = _mm256_add_ps(a, b);
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));
}

/* ROWS rows of x (deinterleaved) against COLS columns at once, SPLIT sums per pair: with one row a single
 * column's sums are two chains of dependent FMAs, latency-bound below the memory's pace; four columns give
 * eight independent chains. */
#define COLUMNS_OF_ROWS(COLS, ROWS, SPLIT)                                                                 \
    static int columns_##COLS##x##ROWS(const float *x, int k, const uint16_t *weight, int col, int n,     \
                                       float *y) {                                                        \
        const uint16_t *w[COLS];                                                                          \
        __m256 sums[ROWS][COLS][2];                                                                       \
        for (int c = 0; c < COLS; c++) w[c] = weight + (int64_t)(col + c) * k;                           \
        for (int r = 0; r < ROWS; r++)                                                                    \
            for (int c = 0; c < COLS; c++) sums[r][c][0] = sums[r][c][1] = _mm256_setzero_ps();           \
        int i = 0;                                                                                        \
        for (; i + 16 <= k; i += 16) {                                                                    \
            for (int c = 0; c < COLS; c++) {                                                              \
                __m256i pair = _mm256_loadu_si256((const __m256i *)(w[c] + i));                           \
                __m256 low = WIDEN_EVEN(pair), high = WIDEN_ODD(pair);                                    \
                for (int r = 0; r < ROWS; r++) {                                                          \
                    const float *xr = x + (int64_t)r * k + i;                                             \
                    sums[r][c][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), low, sums[r][c][0]);             \
                    sums[r][c][SPLIT - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), high,                \
                                                            sums[r][c][SPLIT - 1]);                       \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < ROWS; r++)                                                                    \
            for (int c = 0; c < COLS; c++) {                                                              \
                float acc = hsum(sums[r][c][0], sums[r][c][1]);                                           \
                for (int j = i; j < k; j++) {                                                             \
                    union { uint32_t u; float f; } v;                                                     \
                    v.u = (uint32_t)w[c][j] << 16;                                                        \
                    acc += x[(int64_t)r * k + j] * v.f;                                                   \
                }                                                                                         \
                y[(int64_t)r * n + col + c] = acc;                                                        \
            }                                                                                             \
        return COLS;                                                                                      \
    }
/* x's rows with each 16 values reordered as the kernels widen the weights: the 8 even ones, then the 8 odd. */
static void deinterleave(const float *x, int rows, int k, float *xp) {
    for (int r = 0; r < rows; r++) {
        const float *src = x + (int64_t)r * k;
        float *dst = xp + (int64_t)r * k;
        int i = 0;
        for (; i + 16 <= k; i += 16)
            for (int j = 0; j < 8; j++) {
                dst[i + j] = src[i + 2 * j];
                dst[i + 8 + j] = src[i + 2 * j + 1];
            }
        for (; i < k; i++) dst[i] = src[i];  /* the tail stays in order: the scalar loop reads it */
    }
}

/* Four to eight chains of FMAs in flight whatever the rows (more would spill the 16 registers). */
COLUMNS_OF_ROWS(4, 1, 2)
COLUMNS_OF_ROWS(2, 1, 2)
COLUMNS_OF_ROWS(2, 2, 2)
COLUMNS_OF_ROWS(2, 3, 1)
COLUMNS_OF_ROWS(2, 4, 1)
#endif

/* Output columns n0..n1 of y [rows, N] (row stride N) from x [rows, K] (row stride K). Returns 0, or -1
 * where the sizes are outside what this kernel takes. */
int bf16_linear(const float *x, int rows, int k, const uint16_t *weight, int n0, int n1, int n, float *y) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
#ifdef __AVX2__
    float *xp = malloc(sizeof(float) * (size_t)rows * (size_t)k);
    if (xp == NULL) return -1;
    deinterleave(x, rows, k, xp);
#endif
    int col = n0;
#ifdef __AVX2__
    /* A block of columns at a time, each group of up to four rows of x in turn while the block's weights are
     * in the L1 cache: from memory, each weight is read once whatever the rows. */
    int cols = rows == 1 ? 4 : 2;
    for (; col + cols <= n1; col += cols)
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const float *xg = xp + (int64_t)r0 * k;
            float *yg = y + (int64_t)r0 * n;
            switch (rows - r0 < 4 ? rows - r0 : 4) {
                case 1: cols == 4 ? columns_4x1(xg, k, weight, col, n, yg) : columns_2x1(xg, k, weight, col, n, yg); break;
                case 2: columns_2x2(xg, k, weight, col, n, yg); break;
                case 3: columns_2x3(xg, k, weight, col, n, yg); break;
                default: columns_2x4(xg, k, weight, col, n, yg);
            }
        }
#endif
    for (; col < n1; col++) {  /* the columns left over (or everything, without AVX2) */
        const uint16_t *w = weight + (int64_t)col * k;
        for (int r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (int i = 0; i < k; i++) {
                union { uint32_t u; float f; } v;
                v.u = (uint32_t)w[i] << 16;
                acc += x[(int64_t)r * k + i] * v.f;
            }
            y[(int64_t)r * n + col] = acc;
        }
    }
#ifdef __AVX2__
    free(xp);
#endif
    return 0;
}
