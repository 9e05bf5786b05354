/* lorafit's CPU dropout kernel: dst = src where the hash keeps an element, else 0.
 *
 * The hash and the threshold are dropout_mask.py's keep_mask, bit for bit: position
 * i = row * cols + col (mod 2^32), v = lowbias32's two rounds of (i ^ key), kept where
 * v as a signed 32-bit integer is >= t. Zeroing goes by element size (2, 4 or 8 bytes),
 * so one loop serves every floating dtype. Rows are split over OpenMP threads; gcc
 * vectorises the inner loop. Built and loaded by dropout_cpu.py. */
#include <stdint.h>

static inline int32_t keep_key(uint32_t i, uint32_t key) {
    uint32_t v = i ^ key;
    v = (v ^ (v >> 16)) * 0x7feb352dU;
    v = (v ^ (v >> 15)) * 0x846ca68bU;
    return (int32_t)v;
}

#define MASK_ROWS(T)                                                               \
    for (int64_t r = 0; r < rows; r++) {                                           \
        const T *s = (const T *)(src + r * src_row_bytes);                         \
        T *d = (T *)(dst + r * dst_row_bytes);                                     \
        uint32_t base = (uint32_t)r * (uint32_t)cols;                              \
        for (int64_t c = 0; c < cols; c++)                                         \
            d[c] = keep_key(base + (uint32_t)c, (uint32_t)key) >= t ? s[c] : (T)0; \
    }

void lorafit_dropout_mask(const char *src, char *dst, int64_t rows, int64_t cols,
                          int64_t src_row_bytes, int64_t dst_row_bytes, int64_t elem_bytes,
                          int32_t key, int32_t t, int32_t threads) {
    /* one row per iteration keeps the loop simple; a row is at least a few hundred elements */
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
