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

#ifdef __AVX2__
/* Eight codes widened, scaled and (for a bf16 model) rounded to bf16, nearest, ties to even. */
static inline __m256 widen8(const int8_t *q, __m256 scale8, int round_bf16) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    __m256 f = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 20),
                                                                  _mm256_set1_epi32((int)0x87F00000u))), scale8);
    if (round_bf16) {
        __m256i u = _mm256_castps_si256(f);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
        f = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    return f;
}

static inline float sum8(__m256 v) {
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));
}
#endif

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
            if (len % 16 == 0) {  /* widened in registers, up to four rows' sums in flight per pass */
                const __m256 scale8 = _mm256_set1_ps(block_scale);
                for (int r0 = 0; r0 < rows; r0 += 4) {
                    int group = rows - r0 < 4 ? rows - r0 : 4;
                    __m256 sums[4][2];
                    for (int r = 0; r < 4; r++) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
                    for (int i = 0; i < len; i += 16) {
                        __m256 low = widen8(q + start + i, scale8, round_bf16);
                        __m256 high = widen8(q + start + i + 8, scale8, round_bf16);
                        for (int r = 0; r < 4; r++) {
                            if (r < group) {
                                const float *xr = x + (int64_t)(r0 + r) * k + start + i;
                                sums[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), low, sums[r][0]);
                                sums[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), high, sums[r][1]);
                            }
                        }
                    }
                    for (int r = 0; r < group; r++) acc[r0 + r] += sum8(_mm256_add_ps(sums[r][0], sums[r][1]));
                }
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
