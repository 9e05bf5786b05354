/* lorafit's CPU kernels: LoRA dropout masks applied inside the loops that need them.
 *
 * The mask is dropout_mask.py's keep_mask, bit for bit: position i = row * cols + col
 * (mod 2^32), v = lowbias32's two rounds of (i ^ key), kept where v as a signed 32-bit
 * integer is >= t. Built and loaded by cpu_kernels.py.
 *
 * lorafit_dropout_mask zeroes the dropped elements of any floating dtype (it goes by
 * element size); lorafit_dropout_scale also rescales the kept ones, in float32. The
 * lorafit_lora_* kernels are the float32 low-rank products with the
 * mask fused in (or none, masked = 0): each reads the activation once, where separate
 * ops would write the dropped copy and read it again. Rows (or column ranges) are split
 * over OpenMP threads and every sum runs in a fixed order, so results do not depend on
 * the thread count. The kernels that allocate scratch memory return 1 where that failed (their
 * output is then undefined), else 0. GCC/Clang vector extensions keep 8 float lanes per register: AVX2
 * with -march=native on x86, two 4-lane registers elsewhere. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

/* lowbias32's two rounds, for a uint32_t or a v8u alike (vector extensions broadcast the scalars) */
#define LOWBIAS32(v)                       \
    do {                                   \
        v = (v ^ (v >> 16)) * 0x7feb352dU; \
        v = (v ^ (v >> 15)) * 0x846ca68bU; \
    } while (0)

static inline int32_t keep_key(uint32_t i, uint32_t key) {
    uint32_t v = i ^ key;
    LOWBIAS32(v);
    return (int32_t)v;
}

static const v8u LANES = {0, 1, 2, 3, 4, 5, 6, 7};

/* x with the lanes the mask drops set to 0; i0 is lane 0's position */
static inline v8f keep8(v8f x, uint32_t i0, uint32_t key, int32_t t) {
    v8u v = (LANES + i0) ^ key;
    LOWBIAS32(v);
    return (v8f)((v8i)x & ((v8i)v >= t));
}

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline float sum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* s[j] = sum8(acc[j]) for j < 8, in sum8's order (the same bits): with AVX, 15 vector shuffles and adds
 * for all eight, where scalar sums take 56 adds after every row of lorafit_lora_down */
static inline void sum8x8(const v8f acc[8], float s[8]) {
#ifdef __AVX__
    __m256 pair[4]; /* lanes 0-3: acc[j]'s halves added, 4-7: acc[j + 4]'s */
    for (int j = 0; j < 4; j++) {
        const __m256 u = (__m256)acc[j], v = (__m256)acc[j + 4];
        pair[j] = _mm256_add_ps(_mm256_permute2f128_ps(u, v, 0x20), _mm256_permute2f128_ps(u, v, 0x31));
    }
    _mm256_storeu_ps(s, _mm256_hadd_ps(_mm256_hadd_ps(pair[0], pair[1]), _mm256_hadd_ps(pair[2], pair[3])));
#else
    for (int j = 0; j < 8; j++) s[j] = sum8(acc[j]);
#endif
}

#define MASK_ROWS(T)                                                               \
    for (int64_t r = 0; r < rows; r++) {                                           \
        const T *s = (const T *)(src + r * src_row_bytes);                         \
        T *d = (T *)(dst + r * dst_row_bytes);                                     \
        uint32_t base = (uint32_t)r * (uint32_t)cols;                              \
        for (int64_t c = 0; c < cols; c++)                                         \
            d[c] = keep_key(base + (uint32_t)c, (uint32_t)key) >= t ? s[c] : (T)0; \
    }

/* dst = src where the mask keeps an element, else 0 */
void lorafit_dropout_mask(const char *src, char *dst, int64_t rows, int64_t cols,
                          int64_t src_row_bytes, int64_t dst_row_bytes, int64_t elem_bytes,
                          int32_t key, int32_t t, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        if (elem_bytes == 4) {
#pragma omp for schedule(static)
            MASK_ROWS(uint32_t)
        } else if (elem_bytes == 2) {
#pragma omp for schedule(static)
            MASK_ROWS(uint16_t)
        } else {
#pragma omp for schedule(static)
            MASK_ROWS(uint64_t)
        }
    }
}

/* dst = scale * src where the mask keeps an element, else 0, for float32 rows: a model's own dropout,
 * forward (src = x) and backward (src = dY), in one pass */
void lorafit_dropout_scale(const float *src, float *dst, int64_t rows, int64_t cols, int64_t src_stride,
                           int64_t dst_stride, float scale, int32_t key, int32_t t, int32_t threads) {
    const int64_t c8 = cols / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *s = src + r * src_stride;
        float *d = dst + r * dst_stride;
        const uint32_t base = (uint32_t)r * (uint32_t)cols;
        for (int64_t c = 0; c < c8; c += 8) store8(d + c, keep8(scale * load8(s + c), base + c, key, t));
        for (int64_t c = c8; c < cols; c++) d[c] = keep_key(base + c, key) >= t ? scale * s[c] : 0.0f;
    }
}

/* hn[0..r) = mask(xn) . a's rows, for one row xn of cols floats at position base; row: a buffer of cols
 * floats to hold the dropped row, NULL without a mask */
static inline void down_row(const float *xn, const float *a, float *hn, int64_t cols, int64_t r, float *row,
                            uint32_t base, int32_t key, int32_t t) {
    const int64_t c8 = cols / 8 * 8;
    const float *tail = xn; /* where the last cols % 8 columns are read */
    if (row) {
        for (int64_t c = c8; c < cols; c++) row[c] = keep_key(base + c, key) >= t ? xn[c] : 0.0f;
        tail = row;
        if (r < 8) { /* no block of eight k below to drop the row as it reads it */
            for (int64_t c = 0; c < c8; c += 8) store8(row + c, keep8(load8(xn + c), base + c, key, t));
            xn = row;
        }
    }
    int64_t k = 0;
    for (; k + 8 <= r; k += 8) { /* eight dot products share each load of the row */
        /* with a mask, the first eight drop the row as they read it: the hash's integer work overlaps
         * their multiply-adds, where a pass of its own would not. Later k read the kept copy. */
        const int drop = row && k == 0, save_row = drop && r > 8;
        const float *ak = a + k * cols;
        v8f acc[8] = {0};
        for (int64_t c = 0; c < c8; c += 8) {
            v8f xv = load8(xn + c);
            if (drop) {
                xv = keep8(xv, base + c, key, t);
                if (save_row) store8(row + c, xv);
            }
            for (int j = 0; j < 8; j++) acc[j] += xv * load8(ak + j * cols + c);
        }
        float s[8];
        sum8x8(acc, s);
        for (int j = 0; j < 8; j++) {
            for (int64_t c = c8; c < cols; c++) s[j] += tail[c] * ak[j * cols + c];
            hn[k + j] = s[j];
        }
        if (drop) xn = row;
    }
    for (; k < r; k++) {
        const float *ak = a + k * cols;
        v8f acc = {0};
        for (int64_t c = 0; c < c8; c += 8) acc += load8(xn + c) * load8(ak + c);
        float s = sum8(acc);
        for (int64_t c = c8; c < cols; c++) s += tail[c] * ak[c];
        hn[k] = s;
    }
}

/* h (rows x r, contiguous) = mask(x) a^T; x (rows x cols) has row stride xs, a is (r x cols) */
int32_t lorafit_lora_down(const float *x, int64_t xs, const float *a, float *h, int64_t rows, int64_t cols,
                          int64_t r, int32_t masked, int32_t key, int32_t t, int32_t threads) {
    int32_t failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = masked ? malloc(cols * sizeof(float)) : NULL;
        if (masked && !row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < rows; n++)
            if (row || !masked)
                down_row(x + n * xs, a, h + n * r, cols, r, row, (uint32_t)n * (uint32_t)cols, key, t);
        free(row);
    }
    return failed;
}

/* Floats of one thread's accumulators in lorafit_lora_grad_a: 16 KB, half of a small L1 */
#define GRAD_A_ACC 4096
/* Rows ahead that add_outer prefetches: 20% faster on activations that are not in cache, where the
 * hardware prefetcher alone does not follow four row streams per thread */
#define GRAD_A_AHEAD 8

/* acc[k * as + c] += sum over rows n in [n0, n1), in order, of g[n][k] mask(x)[n][c0 + c], for c < w
 * (a multiple of 8); g is (rows x r, contiguous), x has row stride xs and cols columns. x streams in
 * row order, four rows per load of the accumulators: walking down columns instead (x's rows are
 * kilobytes apart) defeats the prefetcher and, at power-of-two-ish row strides, the cache sets. */
static void add_outer(const float *g, const float *x, int64_t xs, float *acc, int64_t as, int64_t n0, int64_t n1,
                      int64_t c0, int64_t w, int64_t cols, int64_t r, int32_t masked, int32_t key, int32_t t) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const float *xn = x + n * xs + c0, *gn = g + n * r;
        const uint32_t i0 = (uint32_t)n * (uint32_t)cols + (uint32_t)c0;
        const int fetch = n + 4 + GRAD_A_AHEAD <= n1;
        int64_t c = 0;
        for (; c + 16 <= w; c += 16) { /* two vectors a row: each broadcast of g serves two FMAs */
            if (fetch) /* once per 64-byte line of each of the four rows */
                for (int j = 0; j < 4; j++) __builtin_prefetch(xn + (GRAD_A_AHEAD + j) * xs + c);
            v8f lo[4], hi[4];
            for (int j = 0; j < 4; j++) {
                lo[j] = load8(xn + j * xs + c);
                hi[j] = load8(xn + j * xs + c + 8);
                if (masked) {
                    lo[j] = keep8(lo[j], i0 + (uint32_t)j * (uint32_t)cols + c, key, t);
                    hi[j] = keep8(hi[j], i0 + (uint32_t)j * (uint32_t)cols + c + 8, key, t);
                }
            }
            for (int64_t k = 0; k < r; k++) {
                float *ak = acc + k * as + c;
                v8f sl = load8(ak), sh = load8(ak + 8);
                for (int j = 0; j < 4; j++) {
                    const float gj = gn[j * r + k];
                    sl += gj * lo[j];
                    sh += gj * hi[j];
                }
                store8(ak, sl);
                store8(ak + 8, sh);
            }
        }
        if (c < w) { /* the last 8 columns */
            v8f x0 = load8(xn + c), x1 = load8(xn + xs + c), x2 = load8(xn + 2 * xs + c), x3 = load8(xn + 3 * xs + c);
            if (masked) {
                x0 = keep8(x0, i0 + c, key, t);
                x1 = keep8(x1, i0 + (uint32_t)cols + c, key, t);
                x2 = keep8(x2, i0 + 2 * (uint32_t)cols + c, key, t);
                x3 = keep8(x3, i0 + 3 * (uint32_t)cols + c, key, t);
            }
            for (int64_t k = 0; k < r; k++) {
                v8f s = load8(acc + k * as + c);
                s += gn[k] * x0;
                s += gn[r + k] * x1;
                s += gn[2 * r + k] * x2;
                s += gn[3 * r + k] * x3;
                store8(acc + k * as + c, s);
            }
        }
    }
    for (; n < n1; n++) {
        const float *xn = x + n * xs + c0, *gn = g + n * r;
        for (int64_t c = 0; c < w; c += 8) {
            v8f x0 = load8(xn + c);
            if (masked) x0 = keep8(x0, (uint32_t)n * (uint32_t)cols + (uint32_t)(c0 + c), key, t);
            for (int64_t k = 0; k < r; k++) store8(acc + k * as + c, load8(acc + k * as + c) + gn[k] * x0);
        }
    }
}

/* out[k][c] = sum over rows n, in order, of g[n][k] mask(x)[n][c] for the last cols % 8 columns (out has
 * row stride os) */
static void outer_tail(const float *g, const float *x, int64_t xs, float *out, int64_t os, int64_t rows,
                       int64_t cols, int64_t r, int32_t masked, int32_t key, int32_t t) {
    for (int64_t k = 0; k < r; k++)
        for (int64_t c = cols / 8 * 8; c < cols; c++) {
            float sum = 0.0f;
            for (int64_t n = 0; n < rows; n++)
                if (!masked || keep_key((uint32_t)n * (uint32_t)cols + (uint32_t)c, key) >= t)
                    sum += g[n * r + k] * x[n * xs + c];
            out[k * os + c] = sum;
        }
}

/* ga (r x cols, contiguous) = g^T mask(x); g is (rows x r, contiguous). Threads own column ranges,
 * cut into panels whose r accumulator rows fit in GRAD_A_ACC; every sum runs over the rows in order. */
int32_t lorafit_lora_grad_a(const float *g, const float *x, int64_t xs, float *ga, int64_t rows, int64_t cols,
                            int64_t r, int32_t masked, int32_t key, int32_t t, int32_t threads) {
    int32_t failed = 0;
    const int64_t vecs = cols / 8;
    int64_t width = (GRAD_A_ACC / r - 8) / 8 * 8;
    if (width < 8) width = 8;
    const int64_t stride = width + 8; /* padded so that accumulator rows do not alias 4 KB apart */
    const int64_t parts = vecs < threads ? vecs : threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < parts; p++) {
        const int64_t c0 = vecs * p / parts * 8, c1 = vecs * (p + 1) / parts * 8;
        float *acc = malloc(sizeof(float) * r * stride);
        if (!acc) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int64_t s0 = c0; s0 < c1; s0 += width) {
            const int64_t w = s0 + width < c1 ? width : c1 - s0;
            for (int64_t k = 0; k < r; k++) memset(acc + k * stride, 0, sizeof(float) * w);
            add_outer(g, x, xs, acc, stride, 0, rows, s0, w, cols, r, masked, key, t);
            for (int64_t k = 0; k < r; k++) memcpy(ga + k * cols + s0, acc + k * stride, sizeof(float) * w);
        }
        free(acc);
    }
    outer_tail(g, x, xs, ga, cols, rows, cols, r, masked, key, t);
    return failed;
}

/* Rows per block of lorafit_lora_grad_b (at least), blocks at most, and rows per sub-block: the two
 * products of a sub-block read its rows of dy from L2 (16 rows of 1536 floats: 96 KB) */
#define GRAD_B_ROWS 64
#define GRAD_B_BLOCKS 16
#define GRAD_B_SUB 16

/* gh (rows x r) = dy bt^T and gbt (r x cols) = h^T dy, all contiguous but dy (row stride ys): the two
 * products backward takes of dY (bt = B^T, h = x A^T), in one pass over it where two kernels would read
 * it twice. gh's sums are lorafit_lora_down's. gbt is summed over fixed blocks of rows (their count
 * depends on rows only), each in row order, then over the blocks in order: the thread count does not
 * change a bit. */
int32_t lorafit_lora_grad_b(const float *dy, int64_t ys, const float *bt, const float *h, float *gh, float *gbt,
                            int64_t rows, int64_t cols, int64_t r, int32_t threads) {
    const int64_t c8 = cols / 8 * 8, as = c8 + 8; /* padded as in lorafit_lora_grad_a */
    int64_t blocks = rows / GRAD_B_ROWS;
    blocks = blocks < 1 ? 1 : blocks > GRAD_B_BLOCKS ? GRAD_B_BLOCKS : blocks;
    float *part = calloc(blocks * r * as, sizeof(float));
    if (!part) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n1 = rows * (b + 1) / blocks;
        for (int64_t s = rows * b / blocks; s < n1; s += GRAD_B_SUB) {
            const int64_t e = s + GRAD_B_SUB < n1 ? s + GRAD_B_SUB : n1;
            for (int64_t n = s; n < e; n++) down_row(dy + n * ys, bt, gh + n * r, cols, r, NULL, 0, 0, 0);
            add_outer(h, dy, ys, part + b * r * as, as, s, e, 0, c8, cols, r, 0, 0, 0);
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < r; k++) {
        float *out = gbt + k * cols;
        memcpy(out, part + k * as, sizeof(float) * c8);
        for (int64_t b = 1; b < blocks; b++) {
            const float *pb = part + (b * r + k) * as;
            for (int64_t c = 0; c < c8; c += 8) store8(out + c, load8(out + c) + load8(pb + c));
        }
    }
    free(part);
    outer_tail(h, dy, ys, gbt, cols, rows, cols, r, 0, 0, 0);
    return 0;
}

/* out (rows x cols, row stride os) = start + scale mask(g a), where start is NULL (zeros), a cols-vector
 * (ss = 0: a bias) or a matrix of row stride ss, out itself included. g is (rows x r), a (r x cols), both
 * contiguous. Forward writes bias + s H B^T with it as the output that x W^T then adds into; backward
 * s mask(dY B A) for dx, which dY W adds into; folding writes W + s B A. One pass that only writes the
 * output, where a copy of the start and a separate low-rank sum would each pass over it. Eight column
 * vectors per pass over k: eight independent sums, where one would wait out each multiply-add's latency
 * before the next. */
void lorafit_lora_up(const float *g, const float *a, const float *start, int64_t ss, float *out, int64_t os,
                     float scale, int64_t rows, int64_t cols, int64_t r, int32_t masked, int32_t key, int32_t t,
                     int32_t threads) {
    const int64_t c8 = cols / 8 * 8, c64 = cols / 64 * 64;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < rows; n++) {
        const float *gn = g + n * r, *sn = start ? start + n * ss : NULL;
        float *o = out + n * os;
        const uint32_t i0 = (uint32_t)n * (uint32_t)cols;
        for (int64_t c = 0; c < c64; c += 64) {
            v8f acc[8] = {0};
            for (int64_t k = 0; k < r; k++) {
                const float *ak = a + k * cols + c;
                const float gk = gn[k];
                for (int j = 0; j < 8; j++) acc[j] += gk * load8(ak + 8 * j);
            }
            for (int j = 0; j < 8; j++) {
                const int64_t cj = c + 8 * j;
                const v8f part = scale * acc[j];
                store8(o + cj, (sn ? load8(sn + cj) : (v8f){0}) + (masked ? keep8(part, i0 + cj, key, t) : part));
            }
        }
        for (int64_t c = c64; c < c8; c += 8) {
            v8f acc = {0};
            for (int64_t k = 0; k < r; k++) acc += gn[k] * load8(a + k * cols + c);
            const v8f part = scale * acc;
            store8(o + c, (sn ? load8(sn + c) : (v8f){0}) + (masked ? keep8(part, i0 + c, key, t) : part));
        }
        for (int64_t c = c8; c < cols; c++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < r; k++) acc += gn[k] * a[k * cols + c];
            const float part = masked && keep_key(i0 + c, key) < t ? 0.0f : scale * acc;
            o[c] = (sn ? sn[c] : 0.0f) + part;
        }
    }
}
