/* y = x @ W.T for e4m3 weights W [N, K] with block scales, read a byte a weight (decode-sized x).
 *
 * Each weight is widened as faasmoe.model.quantized.widen_e4m3 does (the byte sign-extended, shifted so its
 * exponent and mantissa bits sit where fp32 keeps them: 2^-120 times its value), multiplied by its block's
 * scale times 2^120 (exact: a power of two) and, for a bf16 model, rounded to bf16 (nearest, ties to even),
 * so that it is bit for bit the weight a dequantized checkpoint holds. Only the sums run in another order
 * than torch's matmul. Built by faasmoe.model.native with -O3 -march=native: the loops vectorise.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16
#define MAX_BLOCK 1024

/* Output columns n0..n1 of y [rows, N] (row stride N) from x [rows, K] (row stride K), rows <= MAX_ROWS.
 * scale [ceil(N / block_rows), ceil(K / block_cols)] already times 2^120. Returns 0, or -1 when the sizes
 * are outside what this kernel takes (the caller checks them first). */
int fp8_linear(const float *x, int rows, int k, const int8_t *codes, int n0, int n1, int n, const float *scale,
               int block_rows, int block_cols, int round_bf16, float *y) {
    if (rows < 1 || rows > MAX_ROWS || block_cols < 1 || block_cols > MAX_BLOCK || block_rows < 1) return -1;
    int scale_cols = (k + block_cols - 1) / block_cols;
    union { uint32_t bits[MAX_BLOCK]; float value[MAX_BLOCK]; } w;
    for (int col = n0; col < n1; col++) {
        const int8_t *q = codes + (int64_t)col * k;
        const float *s = scale + (int64_t)(col / block_rows) * scale_cols;
        float acc[MAX_ROWS];
        memset(acc, 0, sizeof(acc));
        for (int start = 0; start < k; start += block_cols) {
            int len = k - start < block_cols ? k - start : block_cols;
            float block_scale = s[start / block_cols];
#ifdef __AVX2__
            if (rows == 1 && len % 32 == 0) {  /* decode of one row: widened in registers, four sums in flight */
                const __m256i mask = _mm256_set1_epi32((int)0x87F00000u);
                const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
                const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
                const __m256 scale8 = _mm256_set1_ps(block_scale);
                __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                for (int i = 0; i < len; i += 32) {
                    for (int j = 0; j < 4; j++) {
                        __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + start + i + 8 * j)));
                        __m256 f = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 20), mask)),
                                                 scale8);
                        if (round_bf16) {
                            __m256i u = _mm256_castps_si256(f);
                            u = _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
                            f = _mm256_castsi256_ps(_mm256_and_si256(u, high));
                        }
                        sums[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + start + i + 8 * j), f, sums[j]);
                    }
                }
                __m256 total = _mm256_add_ps(_mm256_add_ps(sums[0], sums[1]), _mm256_add_ps(sums[2], sums[3]));
                __m128 quad = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
                quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                quad = _mm_add_ss(quad, _mm_movehdup_ps(quad));
                acc[0] += _mm_cvtss_f32(quad);
                continue;
            }
#endif
            /* s eeee mmm (sign-extended) -> s 0000 eeee mmm and 20 zero bits: 2^-120 times the value */
            #pragma omp simd
            for (int i = 0; i < len; i++) w.bits[i] = ((uint32_t)(int32_t)q[start + i] << 20) & 0x87F00000u;
            #pragma omp simd
            for (int i = 0; i < len; i++) w.value[i] *= block_scale;
            if (round_bf16) {  /* to bf16: nearest, ties to even */
                #pragma omp simd
                for (int i = 0; i < len; i++) w.bits[i] = (w.bits[i] + 0x7FFFu + ((w.bits[i] >> 16) & 1u)) & 0xFFFF0000u;
            }
            for (int r = 0; r < rows; r++) {
                const float *xr = x + (int64_t)r * k + start;
                float sum = 0.0f;
                #pragma omp simd reduction(+:sum)
                for (int i = 0; i < len; i++) sum += xr[i] * w.value[i];
                acc[r] += sum;
            }
        }
        for (int r = 0; r < rows; r++) y[(int64_t)r * n + col] = acc[r];
    }
    return 0;
}
