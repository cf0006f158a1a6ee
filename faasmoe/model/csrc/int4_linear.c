/* y = x @ W.T for 4-bit weights W [N, K] read from the very words a GPTQ or AWQ checkpoint stores, so that
 * loading a matrix converts nothing: its qweight, qzeros and scales are held as the file has them.
 *
 *   GPTQ (layout 0): qweight [K/8, N] int32, word [r, n] holds rows 8r..8r+7 of column n, nibble i = row 8r + i;
 *   AWQ  (layout 1): qweight [K, N/8] int32, word [k, c] holds columns 8c.. of row k, nibble i = column
 *                    8c + AWQ_ORDER[i];
 *   qzeros [K/group, N/8] int32 in the same nibble order along the columns as qweight's words (GPTQ: i, AWQ:
 *   AWQ_ORDER[i]), the zero being the nibble plus `zero_offset` (1 for GPTQ's v1 format, which stores z - 1);
 *   scales [K/group, N] fp32, fp16 or bf16. W[n, k] = (q - z) * s of k's group.
 *
 * One or two rows of x (decode) take each word's nibbles in turn in registers (mask, shift the word on,
 * convert: three ops for eight weights, then an FMA a row). More rows share an unpacking: per tile of 64 output
 * columns and chunk of up to 32 rows of K, the codes go once into an fp32 buffer in L1 and are multiplied
 * against up to 4 rows of x at a time from there. Each group's sums become y += s * sum(x q) - s z * sum(x) in
 * fp32 at the group's end. One mask register, no table of masks: with seven more live, GCC spilled the sums
 * to the stack on every row of K. Built by faasmoe.model.native.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE 64        /* output columns a tile: one AWQ row of 8 words, or 8 vectors of GPTQ words */
#define CHUNK_K 32     /* rows of K unpacked at once: 32 x 64 fp32 = 8 KiB */
#define CHUNK_ROWS 16  /* rows of x per pass over the weights: the tile's sums stay in L1 */
/* Up to this many rows, each is multiplied with the codes unpacked in registers (three ops per eight weights
 * and row); more share one unpacking into the buffer (its store and load cost about one op more a row). */
#define ROWS_IN_REGISTERS 2

static const int AWQ_ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    union { uint32_t u; float f; } v;
    if (exp == 0x1F) v.u = sign | 0x7F800000u | (mant << 13);
    else if (exp != 0) v.u = sign | ((exp + 112) << 23) | (mant << 13);
    else { v.f = (float)mant * (1.0f / 16777216.0f); v.u |= sign; }
    return v.f;
#endif
}

static inline float scale_at(const void *scales, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)scales)[i];
    if (dtype == 1) return half_to_float(((const uint16_t *)scales)[i]);
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)((const uint16_t *)scales)[i] << 16;
    return v.f;
}

static inline uint32_t nibble(uint32_t word, int i) { return (word >> (4 * i)) & 0xFu; }

/* GPTQ: rows k0..k0+kc (kc a multiple of 8) of columns col..col+nt (nt a multiple of 8) into buf[kk][b], b in
 * column order. */
static void unpack_gptq(const int32_t *words, int n, int k0, int kc, int col, int nt, float *buf) {
    for (int r = 0; r < kc / 8; r++) {
        const int32_t *row = words + (int64_t)(k0 / 8 + r) * n + col;
        float *out = buf + 8 * r * TILE;
#ifdef __AVX2__
        const __m256i low = _mm256_set1_epi32(0xF);
        for (int v = 0; v < nt; v += 8) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(row + v));
            for (int i = 0; i < 8; i++, w = _mm256_srli_epi32(w, 4))
                _mm256_storeu_ps(out + i * TILE + v, _mm256_cvtepi32_ps(_mm256_and_si256(w, low)));
        }
#else
        for (int i = 0; i < 8; i++)
            for (int b = 0; b < nt; b++) out[i * TILE + b] = (float)nibble((uint32_t)row[b], i);
#endif
    }
}

/* AWQ: rows k0..k0+kc of the words of columns col..col+nt into buf[kk][b], buffer column b = i * words + c
 * holding nibble i of word c (column col + 8c + AWQ_ORDER[i]). */
static void unpack_awq(const int32_t *words, int n, int k0, int kc, int col, int nt, float *buf) {
    int count = nt / 8;
    for (int kk = 0; kk < kc; kk++) {
        const int32_t *row = words + (int64_t)(k0 + kk) * (n / 8) + col / 8;
        float *out = buf + kk * TILE;
#ifdef __AVX2__
        __m256i w;
        if (count == 8) {
            w = _mm256_loadu_si256((const __m256i *)row);
        } else {  /* a narrower last tile: lanes past its words are loaded as zeros and overwritten below */
            __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            w = _mm256_maskload_epi32(row, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes));
        }
        /* in order of i: each store's lanes past `count` are overwritten by the next one's */
        for (int i = 0; i < 8; i++, w = _mm256_srli_epi32(w, 4))
            _mm256_storeu_ps(out + i * count, _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xF))));
#else
        for (int i = 0; i < 8; i++)
            for (int c = 0; c < count; c++) out[i * count + c] = (float)nibble((uint32_t)row[c], i);
#endif
    }
}

/* sums[r][b] += sum over kk < kc of x[r][kk] * buf[kk][b] for R rows and vectors of 8 columns v0.. (C of them). */
#ifdef __AVX2__
#define MICRO(R, C)                                                                                         \
    static void micro_##R##x##C(const float *x, int ldx, const float *buf, int kc, float *sums) {         \
        __m256 acc[R][C];                                                                                 \
        for (int r = 0; r < R; r++)                                                                       \
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_loadu_ps(sums + r * TILE + 8 * c);             \
        for (int kk = 0; kk < kc; kk++) {                                                                 \
            __m256 w[C];                                                                                  \
            for (int c = 0; c < C; c++) w[c] = _mm256_loadu_ps(buf + kk * TILE + 8 * c);                 \
            for (int r = 0; r < R; r++) {                                                                 \
                __m256 xr = _mm256_broadcast_ss(x + (int64_t)r * ldx + kk);                               \
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xr, w[c], acc[r][c]);              \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++)                                                                       \
            for (int c = 0; c < C; c++) _mm256_storeu_ps(sums + r * TILE + 8 * c, acc[r][c]);             \
    }
/* Eight independent chains of FMAs where the rows allow it (one row's sums are latency-bound otherwise). */
MICRO(1, 8) MICRO(1, 4) MICRO(1, 2) MICRO(1, 1)
MICRO(2, 4) MICRO(2, 2) MICRO(2, 1)
MICRO(3, 2) MICRO(3, 1)
MICRO(4, 2) MICRO(4, 1)

static void multiply(const float *x, int ldx, int rows, const float *buf, int kc, int nt, float *sums) {
    for (int r0 = 0; r0 < rows; r0 += 4) {
        int group = rows - r0 < 4 ? rows - r0 : 4;
        const float *xr = x + (int64_t)r0 * ldx;
        float *sr = sums + r0 * TILE;
        for (int v = 0; v < nt / 8;) {
            int left = nt / 8 - v, c;
            switch (group) {
                case 1: c = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                    if (c == 8) micro_1x8(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else if (c == 4) micro_1x4(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else if (c == 2) micro_1x2(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else micro_1x1(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    break;
                case 2: c = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                    if (c == 4) micro_2x4(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else if (c == 2) micro_2x2(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else micro_2x1(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    break;
                case 3: c = left >= 2 ? 2 : 1;
                    if (c == 2) micro_3x2(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else micro_3x1(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    break;
                default: c = left >= 2 ? 2 : 1;
                    if (c == 2) micro_4x2(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
                    else micro_4x1(xr, ldx, buf + 8 * v, kc, sr + 8 * v);
            }
            v += c;
        }
    }
}
#else
static void multiply(const float *x, int ldx, int rows, const float *buf, int kc, int nt, float *sums) {
    for (int r = 0; r < rows; r++)
        for (int kk = 0; kk < kc; kk++) {
            float xv = x[(int64_t)r * ldx + kk];
            for (int b = 0; b < nt; b++) sums[r * TILE + b] += xv * buf[kk * TILE + b];
        }
}
#endif

#ifdef __AVX2__
/* One row of x against V vectors of GPTQ columns (8 each), rows k0..k1 of K, unpacked in registers: for decode,
 * where the buffer's stores and loads would cost more than the unpacking. Four sets of sums (nibble i mod 4)
 * keep 4V chains of FMAs in flight; V = 4 spilled them. sums[v * 8..] += x . q. */
#define GPTQ_ROW(V)                                                                                          \
    static void gptq_row_##V(const float *x, const int32_t *words, int n, int k0, int k1, int col,         \
                             float *sums) {                                                                \
        const __m256i low = _mm256_set1_epi32(0xF);                                                       \
        __m256 acc[4][V];                                                                                  \
        for (int j = 0; j < 4; j++)                                                                        \
            for (int v = 0; v < V; v++) acc[j][v] = _mm256_setzero_ps();                                   \
        for (int k = k0; k < k1; k += 8) {                                                                 \
            const int32_t *row = words + (int64_t)(k / 8) * n + col;                                       \
            _mm_prefetch((const char *)(row + TILE), _MM_HINT_T0);                                         \
            __m256i w[V];                                                                                  \
            for (int v = 0; v < V; v++) w[v] = _mm256_loadu_si256((const __m256i *)(row + 8 * v));         \
            for (int i = 0; i < 8; i++) {                                                                  \
                __m256 xi = _mm256_broadcast_ss(x + k + i);                                                \
                for (int v = 0; v < V; v++) {                                                              \
                    acc[i % 4][v] = _mm256_fmadd_ps(xi, _mm256_cvtepi32_ps(_mm256_and_si256(w[v], low)), acc[i % 4][v]); \
                    w[v] = _mm256_srli_epi32(w[v], 4);                                                     \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int v = 0; v < V; v++)                                                                        \
            _mm256_storeu_ps(sums + 8 * v, _mm256_add_ps(_mm256_loadu_ps(sums + 8 * v),                    \
                             _mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]), _mm256_add_ps(acc[2][v], acc[3][v])))); \
    }
GPTQ_ROW(2) GPTQ_ROW(1)

/* One row of x against a full AWQ tile (8 words a row of K: 64 columns), rows k0..k1, unpacked in registers:
 * sums[i * 8 + c] += x . q of nibble i, the buffer's column order. */
static void awq_row(const float *x, const int32_t *words, int n, int k0, int k1, int col, float *sums) {
    const __m256i low = _mm256_set1_epi32(0xF);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int k = k0; k < k1; k++) {
        const int32_t *row = words + (int64_t)k * (n / 8) + col / 8;
        _mm_prefetch((const char *)(row + 16), _MM_HINT_T0);  /* the next line of this row: the tile after next */
        __m256i w = _mm256_loadu_si256((const __m256i *)row);
        __m256 xk = _mm256_broadcast_ss(x + k);
#define AWQ_NIBBLE(acc) acc = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_and_si256(w, low)), acc); w = _mm256_srli_epi32(w, 4);
        AWQ_NIBBLE(a0) AWQ_NIBBLE(a1) AWQ_NIBBLE(a2) AWQ_NIBBLE(a3) AWQ_NIBBLE(a4) AWQ_NIBBLE(a5) AWQ_NIBBLE(a6)
        a7 = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(w), a7);
#undef AWQ_NIBBLE
    }
    __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(sums + 8 * i, _mm256_add_ps(_mm256_loadu_ps(sums + 8 * i), acc[i]));
}

/* One row's sums over rows k0..k1 of K for a tile, in registers; 0 where this tile needs the buffer. */
static int row_in_registers(const float *x, const int32_t *words, int layout, int n, int k0, int k1, int col,
                            int nt, float *sums) {
    if (layout == 1) {
        if (nt != TILE) return 0;
        awq_row(x, words, n, k0, k1, col, sums);
        return 1;
    }
    for (int v = 0; v < nt / 8;) {
        int left = nt / 8 - v;
        if (left >= 2) { gptq_row_2(x, words, n, k0, k1, col + 8 * v, sums + 8 * v); v += 2; }
        else { gptq_row_1(x, words, n, k0, k1, col + 8 * v, sums + 8 * v); v += 1; }
    }
    return 1;
}
#else
static int row_in_registers(const float *x, const int32_t *words, int layout, int n, int k0, int k1, int col,
                            int nt, float *sums) {
    return 0;
}
#endif

/* The scales and the zeros (times the scales) of group g for a tile's buffer columns (AWQ: see unpack_awq). */
static void group_terms(const int32_t *qzeros, int zero_offset, const void *scales, int scale_dtype, int layout,
                        int g, int n, int col, int nt, float *scale, float *offset) {
    int count = nt / 8;
    const int32_t *zeros = qzeros + (int64_t)g * (n / 8) + col / 8;
    int64_t at = (int64_t)g * n + col;
#ifdef __AVX2__
    const __m256i nibbles = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low = _mm256_set1_epi32(0xF);
    const __m256 zoff = _mm256_set1_ps((float)zero_offset);
    if (layout == 0) {  /* columns in order: eight scales, and one word of eight zeros, at a time */
        for (int v = 0; v < count; v++) {
            __m256 s;
            if (scale_dtype == 0) s = _mm256_loadu_ps((const float *)scales + at + 8 * v);
            else if (scale_dtype == 1) s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)scales + at + 8 * v)));
            else s = _mm256_castsi256_ps(_mm256_slli_epi32(
                     _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)scales + at + 8 * v))), 16));
            __m256i z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(zeros[v]), nibbles), low);
            _mm256_storeu_ps(scale + 8 * v, s);
            _mm256_storeu_ps(offset + 8 * v, _mm256_mul_ps(s, _mm256_add_ps(_mm256_cvtepi32_ps(z), zoff)));
        }
        return;
    }
    if (count == 8) {  /* a full AWQ tile: buffer column 8i + c is column 8c + AWQ_ORDER[i], zero in nibble i */
        __m256i z = _mm256_loadu_si256((const __m256i *)zeros);
        for (int i = 0; i < 8; i++, z = _mm256_srli_epi32(z, 4)) {
            for (int c = 0; c < 8; c++) scale[8 * i + c] = scale_at(scales, scale_dtype, at + 8 * c + AWQ_ORDER[i]);
            __m256 s = _mm256_loadu_ps(scale + 8 * i);
            __m256 zero = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_and_si256(z, low)), zoff);
            _mm256_storeu_ps(offset + 8 * i, _mm256_mul_ps(s, zero));
        }
        return;
    }
#endif
    for (int b = 0; b < nt; b++) {
        int c = layout == 0 ? b : 8 * (b % count) + AWQ_ORDER[b / count];
        int position = layout == 0 ? c % 8 : b / count;  /* the nibble that holds column c */
        float s = scale_at(scales, scale_dtype, at + c);
        float zero = (float)(nibble((uint32_t)zeros[c / 8], position) + zero_offset);
        scale[b] = s;
        offset[b] = s * zero;
    }
}

/* Group g of one tile (columns col..col+nt) for nr rows of x (xsum: the rows'
 * sums per group): out[r][b] += scale * sum(x q) - zero * scale * sum(x). */
static void tile_group(const float *x, const float *xsum, int nr, int k, const int32_t *words, int layout,
                       const int32_t *qzeros, int zero_offset, const void *scales, int scale_dtype, int group,
                       int chunk, int g, int n, int col, int nt, float *out) {
    float buf[CHUNK_K * TILE], sums[CHUNK_ROWS * TILE], scale[TILE], offset[TILE];
    int groups = k / group, r = 0;
    memset(sums, 0, sizeof(float) * (size_t)nr * TILE);
    if (nr <= ROWS_IN_REGISTERS)  /* the group's codes stay in L1 for the next row */
        while (r < nr && row_in_registers(x + (int64_t)r * k, words, layout, n, g * group, (g + 1) * group, col,
                                          nt, sums + r * TILE))
            r++;
    if (r < nr) {
        memset(sums, 0, sizeof(float) * (size_t)nr * TILE);
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += chunk) {
            if (layout == 0) unpack_gptq(words, n, k0, chunk, col, nt, buf);
            else unpack_awq(words, n, k0, chunk, col, nt, buf);
            multiply(x + k0, k, nr, buf, chunk, nt, sums);
        }
    }
    group_terms(qzeros, zero_offset, scales, scale_dtype, layout, g, n, col, nt, scale, offset);
    for (r = 0; r < nr; r++) {
        float xg = xsum[r * groups + g];
        for (int b = 0; b < nt; b++) out[r * TILE + b] += scale[b] * sums[r * TILE + b] - offset[b] * xg;
    }
}

/* Output columns n0..n1 (multiples of 8, or n1 = N) of y [rows, *] (row stride ldy) from x [rows, K]. Returns 0,
 * or -1 where the sizes are outside what this kernel takes (the caller checks them first) or memory ran out. */
int int4_linear(const float *x, int rows, int k, const int32_t *words, int layout, const int32_t *qzeros,
                int zero_offset, const void *scales, int scale_dtype, int group, int n0, int n1, int n, float *y,
                int ldy) {
    if (rows < 1 || k % 8 || n % 8 || n0 % 8 || group < 8 || group % 8 || k % group || layout < 0 || layout > 1 ||
        scale_dtype < 0 || scale_dtype > 2)
        return -1;
    int groups = k / group, chunk = group % CHUNK_K == 0 ? CHUNK_K : 8;
    float *xsum = malloc(sizeof(float) * (size_t)rows * (size_t)groups);  /* each row's sum over each group */
    if (xsum == NULL) return -1;
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            const float *src = x + (int64_t)r * k + (int64_t)g * group;
            float sum = 0.0f;
            for (int i = 0; i < group; i++) sum += src[i];
            xsum[r * groups + g] = sum;
        }
    /* Group by group, every tile of the group's rows of K in turn: those rows are one contiguous run of the words
     * (GPTQ: 16 rows of N words, AWQ: 128 rows of N / 8), read from memory once, in order, and kept in L2 for
     * the tiles; tile by tile instead, each row of K would be a jump to another page that no prefetcher follows.
     * The sums of all the columns wait in `out` (buffer order within each tile) until the last group. */
    int tiles = (n1 - n0 + TILE - 1) / TILE;
    float *out = malloc(sizeof(float) * (size_t)CHUNK_ROWS * (size_t)tiles * TILE);
    if (out == NULL) {
        free(xsum);
        return -1;
    }
    for (int r0 = 0; r0 < rows; r0 += CHUNK_ROWS) {
        int nr = rows - r0 < CHUNK_ROWS ? rows - r0 : CHUNK_ROWS;
        memset(out, 0, sizeof(float) * (size_t)CHUNK_ROWS * (size_t)tiles * TILE);
        for (int g = 0; g < groups; g++)
            for (int t = 0; t < tiles; t++) {
                int col = n0 + t * TILE, nt = n1 - col < TILE ? n1 - col : TILE;
                tile_group(x + (int64_t)r0 * k, xsum + r0 * groups, nr, k, words, layout, qzeros, zero_offset,
                           scales, scale_dtype, group, chunk, g, n, col, nt, out + (size_t)t * CHUNK_ROWS * TILE);
            }
        for (int t = 0; t < tiles; t++) {
            int col = n0 + t * TILE, nt = n1 - col < TILE ? n1 - col : TILE, count = nt / 8;
            const float *tile = out + (size_t)t * CHUNK_ROWS * TILE;
            for (int i = 0; i < (layout == 0 ? 1 : 8); i++)  /* AWQ's buffer column i * count + j is column 8j + order[i] */
                for (int j = 0; j < (layout == 0 ? nt : count); j++) {
                    int b = i * count + j, c = layout == 0 ? col + j : col + 8 * j + AWQ_ORDER[i];
                    for (int r = 0; r < nr; r++) y[(int64_t)(r0 + r) * ldy + c] = tile[r * TILE + b];
                }
        }
    }
    free(out);
    free(xsum);
    return 0;
}
