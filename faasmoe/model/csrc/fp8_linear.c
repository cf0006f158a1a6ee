/* y = x @ W.T for e4m3 weights W [N, K] with block scales, read a byte a weight (decode-sized x).
 *
 * With AVX2, where K and the blocks split in sixteens (every real checkpoint): each code is widened by moving its
 * bits (`bits8`) and a block's sums are multiplied by its scale once, not each weight (nor rounded). The
 * weights are fp8 * scale unrounded, in a bf16 model too: within one bf16 rounding (2^-9) of the weight a
 * dequantized bf16 checkpoint holds, and nearer the checkpoint's own.
 *
 * Elsewhere each weight is widened as faasmoe.model.quantized.widen_e4m3 does (the byte sign-extended, shifted
 * so its exponent and mantissa bits sit where fp32 keeps them: 2^-120 times its value), multiplied by its
 * block's scale times 2^120 (exact: a power of two) and, for a bf16 model, rounded to bf16 (nearest, ties to
 * even), so that it is bit for bit the weight a dequantized checkpoint holds. Only the sums run in another order
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
/* Eight e4m3 codes as fp32 bits worth 2^-120 times their values (three ops: sign-extended, shifted, masked).
 * An fp8 subnormal becomes an fp32 subnormal, which the FMAs take as it is; scaled, it is normal again. */
static inline __m256 bits8(const int8_t *q) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 20), _mm256_set1_epi32((int)0x87F00000u)));
}

/* Eight codes widened, scaled and (for a bf16 model) rounded to bf16, nearest, ties to even. */
static inline __m256 widen8(const int8_t *q, __m256 scale8, int round_bf16) {
    __m256 f = _mm256_mul_ps(bits8(q), scale8);
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

/* COLS columns of W against ROWS rows of x; each block's sums times its scale (times 2^120). The weights are used
 * unrounded: fp8 * scale exactly. */
#define FP8_COLUMNS(COLS, ROWS)                                                                                   \
    static void fp8_columns_##COLS##x##ROWS(const float *x, int k, const uint8_t *codes, int col, int n,          \
                                            const float *scale, int scale_cols, int block_rows, int block_cols,  \
                                            float *y) {                                                           \
        float total[ROWS][COLS];                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                                            \
            for (int c = 0; c < COLS; c++) total[r][c] = 0.0f;                                                    \
        for (int start = 0; start < k; start += block_cols) {                                                     \
            int len = k - start < block_cols ? k - start : block_cols;                                            \
            __m256 sums[ROWS][COLS][2];                                                                           \
            for (int r = 0; r < ROWS; r++)                                                                        \
                for (int c = 0; c < COLS; c++) sums[r][c][0] = sums[r][c][1] = _mm256_setzero_ps();               \
            for (int i = start; i < start + len; i += 16)                                                         \
                for (int c = 0; c < COLS; c++) {                                                                  \
                    const int8_t *q = (const int8_t *)codes + (int64_t)(col + c) * k + i;                         \
                    __m256 low = bits8(q), high = bits8(q + 8);  /* an fp16 conversion measured slower */         \
                    for (int r = 0; r < ROWS; r++) {                                                              \
                        const float *xr = x + (int64_t)r * k + i;                                                 \
                        sums[r][c][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), low, sums[r][c][0]);                 \
                        sums[r][c][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), high, sums[r][c][1]);            \
                    }                                                                                             \
                }                                                                                                 \
            for (int c = 0; c < COLS; c++) {                                                                      \
                float s = scale[(int64_t)((col + c) / block_rows) * scale_cols + start / block_cols];    \
                for (int r = 0; r < ROWS; r++) total[r][c] += sum8(_mm256_add_ps(sums[r][c][0], sums[r][c][1])) * s; \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < ROWS; r++)                                                                            \
            for (int c = 0; c < COLS; c++) y[(int64_t)r * n + col + c] = total[r][c];                             \
    }
/* Eight chains of FMAs in flight (one column's two are latency-bound). */
FP8_COLUMNS(4, 1)
FP8_COLUMNS(2, 2)
FP8_COLUMNS(1, 4)
FP8_COLUMNS(1, 3)
FP8_COLUMNS(1, 2)
FP8_COLUMNS(1, 1)

/* Columns n0..n1 by the kernels above (where K and the blocks split in sixteens). */
static void fp8_columns(const float *x, int rows, int k, const uint8_t *codes, int n0, int n1, int n,
                       const float *scale, int scale_cols, int block_rows, int block_cols, float *y) {
    int col = n0, cols = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    for (; col < n1; col += cols) {
        if (col + cols > n1) cols = 1;  /* the last few columns one at a time */
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const float *xg = x + (int64_t)r0 * k;
            float *yg = y + (int64_t)r0 * n;
            int group = rows - r0 < 4 ? rows - r0 : 4;
            if (cols == 4) fp8_columns_4x1(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
            else if (cols == 2) fp8_columns_2x2(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
            else if (group == 4) fp8_columns_1x4(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
            else if (group == 3) fp8_columns_1x3(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
            else if (group == 2) fp8_columns_1x2(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
            else fp8_columns_1x1(xg, k, codes, col, n, scale, scale_cols, block_rows, block_cols, yg);
        }
    }
}
#endif

/* Output columns n0..n1 of y [rows, N] (row stride N) from x [rows, K] (row stride K); rows <= MAX_ROWS where
 * K or the blocks do not split in sixteens.
 * scale [ceil(N / block_rows), ceil(K / block_cols)] already times 2^120. Returns 0, or -1 when the sizes
 * are outside what this kernel takes (the caller checks them first). */
int fp8_linear(const float *x, int rows, int k, const int8_t *codes, int n0, int n1, int n, const float *scale,
               int block_rows, int block_cols, int round_bf16, float *y) {
    if (rows < 1 || block_cols < 1 || block_cols > MAX_BLOCK || block_rows < 1) return -1;
    int scale_cols = (k + block_cols - 1) / block_cols;
#ifdef __AVX2__
    if (k % 16 == 0 && block_cols % 16 == 0) {  /* any number of rows, four at a time */
        fp8_columns(x, rows, k, (const uint8_t *)codes, n0, n1, n, scale, scale_cols, block_rows, block_cols, y);
        return 0;
    }
#endif
    if (rows > MAX_ROWS) return -1;
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
