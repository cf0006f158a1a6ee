/* y = x @ W.T for bf16 weights W [N, K] and decode-sized fp32 x, on CPUs without native bf16 dot products.
 *
 * torch's bf16 GEMM on an AVX2 CPU costs about as much again for each row of x (a 151936x2048 lm_head: 38 ms
 * for 1 row, 95 ms for 4); widening a cache-sized chunk to fp32 first only pays from 4-8 rows. Here each
 * weight is widened in registers (a bf16 is the top half of an fp32: a shift) and used for up to four rows
 * of x at once, so the weight is read once at the memory's pace. Built by faasmoe.model.native.
 */
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16

/* Output columns n0..n1 of y [rows, N] (row stride N) from x [rows, K] (row stride K). Returns 0, or -1
 * where the sizes are outside what this kernel takes. */
int bf16_linear(const float *x, int rows, int k, const uint16_t *weight, int n0, int n1, int n, float *y) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    for (int col = n0; col < n1; col++) {
        const uint16_t *w = weight + (int64_t)col * k;
        for (int r0 = 0; r0 < rows; r0 += 4) {
            int group = rows - r0 < 4 ? rows - r0 : 4;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int i = 0;
#ifdef __AVX2__
            __m256 sums[4][2];
            for (int r = 0; r < 4; r++) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
            for (; i + 16 <= k; i += 16) {
                __m256i pair = _mm256_loadu_si256((const __m256i *)(w + i));
                __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(pair)), 16));
                __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(pair, 1)), 16));
                for (int r = 0; r < 4; r++) {
                    if (r < group) {
                        const float *xr = x + (int64_t)(r0 + r) * k + i;
                        sums[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), low, sums[r][0]);
                        sums[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), high, sums[r][1]);
                    }
                }
            }
            for (int r = 0; r < group; r++) {
                __m256 v = _mm256_add_ps(sums[r][0], sums[r][1]);
                __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                acc[r] = _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));
            }
#endif
            for (; i < k; i++) {  /* the tail (or everything, without AVX2) */
                union { uint32_t u; float f; } v;
                v.u = (uint32_t)w[i] << 16;
                for (int r = 0; r < group; r++) acc[r] += x[(int64_t)(r0 + r) * k + i] * v.f;
            }
            for (int r = 0; r < group; r++) y[(int64_t)(r0 + r) * n + col] = acc[r];
        }
    }
    return 0;
}
