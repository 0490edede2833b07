/* BGMV on the CPU: LoRA per token row (shrink and expand fused) over the page pool, in place.
 *
 * Semantics: worker/kernels/lora_meta.py (the same tables the Triton kernels read). For
 * layer l, group g and every token row t whose slot s = row_slot[t] is >= 0:
 *
 *   v[j]           = sum_i x[t, i] * pool[row_addr[a_row[s, l, g] + j] + i]       j < a_rank[s, l, g]
 *   y[t, c_p + o] += sum_{j < b_rank[s,l,m]} v[b_col[s,l,m] + j] * pool[row_addr[b_row[s,l,m] + j] + o]
 *
 * for each part p (projection m = first projection of g + p) with columns [c_p, c_p + w_p).
 * v stays in registers and the stack: nothing of an adapter's size is gathered, copied or
 * multiplied out; A and B are each read once per row, straight from their pages. Rows run
 * in parallel (OpenMP, the runtime torch already loaded). x, y and the sums are float32;
 * the pool's adapter rows are float32 (lora_bgmv_f32) or bfloat16 (lora_bgmv_bf16: half the
 * bytes to read, each weight widened exactly to float32 as it is loaded).
 *
 * Built and loaded by lora_cpu.py (ctypes); its wrapper validates every argument first.
 * Returns 0, or -1 when it could not allocate its task list (nothing was written).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 4 /* rows of A (or B) per pass over x (or y): 4 independent accumulators */

typedef uint16_t bf16_t;

static inline float widen_f32(float w) { return w; }

static inline float widen_bf16(bf16_t w) { /* exact: bfloat16 is float32's top half */
    uint32_t bits = (uint32_t)w << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rows first..first + n - 1 of a matrix, every cache line, toward L1. Called for the next
 * block while the current one is summed: adapter rows are short streams (a bfloat16 row of
 * 576 is 18 lines, a k/v row of B 3 to 6) that end before the hardware prefetcher has
 * found them, so each row would otherwise start with a full memory latency. */
static inline void prefetch_rows(const void *pool, size_t elem_size, const int64_t *addr,
                                 int32_t first, int32_t n, int64_t row_bytes) {
    for (int32_t k = first; k < first + n; k++)
        for (int64_t c = 0; c < row_bytes; c += 64)
            __builtin_prefetch((const char *)pool + addr[k] * (int64_t)elem_size + c, 0, 3);
}

static inline int32_t next_block(int32_t j, int32_t rank) { /* rows of the block after j's */
    int32_t left = rank - j - BLOCK;
    return left < 0 ? 0 : left < BLOCK ? left : BLOCK;
}

/* The kernel for one weight type W, read through WIDEN (float32 or bfloat16 rows). */
#define LORA_KERNEL(NAME, W, WIDEN)                                                            \
    static void shrink_##NAME(const W *pool, const int64_t *addr, int32_t rank, const float *x, \
                              int64_t in_features, float *v) {                                 \
        int32_t j = 0;                                                                         \
        for (; j + BLOCK <= rank; j += BLOCK) {                                                \
            prefetch_rows(pool, sizeof(W), addr, j + BLOCK, next_block(j, rank),               \
                          in_features * (int64_t)sizeof(W));                                   \
            const W *a0 = pool + addr[j], *a1 = pool + addr[j + 1];                            \
            const W *a2 = pool + addr[j + 2], *a3 = pool + addr[j + 3];                        \
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                      \
            _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                  \
            for (int64_t i = 0; i < in_features; i++) {                                        \
                float xi = x[i];                                                               \
                s0 += WIDEN(a0[i]) * xi;                                                       \
                s1 += WIDEN(a1[i]) * xi;                                                       \
                s2 += WIDEN(a2[i]) * xi;                                                       \
                s3 += WIDEN(a3[i]) * xi;                                                       \
            }                                                                                  \
            v[j] = s0;                                                                         \
            v[j + 1] = s1;                                                                     \
            v[j + 2] = s2;                                                                     \
            v[j + 3] = s3;                                                                     \
        }                                                                                      \
        for (; j < rank; j++) {                                                                \
            const W *a = pool + addr[j];                                                       \
            float s = 0.f;                                                                     \
            _Pragma("omp simd reduction(+ : s)")                                               \
            for (int64_t i = 0; i < in_features; i++) s += WIDEN(a[i]) * x[i];                 \
            v[j] = s;                                                                          \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    static void expand_##NAME(const W *pool, const int64_t *addr, int32_t rank, const float *v, \
                              float *out, int64_t width) {                                     \
        int32_t j = 0;                                                                         \
        for (; j + BLOCK <= rank; j += BLOCK) {                                                \
            prefetch_rows(pool, sizeof(W), addr, j + BLOCK, next_block(j, rank),               \
                          width * (int64_t)sizeof(W));                                         \
            const W *b0 = pool + addr[j], *b1 = pool + addr[j + 1];                            \
            const W *b2 = pool + addr[j + 2], *b3 = pool + addr[j + 3];                        \
            float c0 = v[j], c1 = v[j + 1], c2 = v[j + 2], c3 = v[j + 3];                      \
            _Pragma("omp simd")                                                                \
            for (int64_t o = 0; o < width; o++)                                                \
                out[o] += c0 * WIDEN(b0[o]) + c1 * WIDEN(b1[o]) + c2 * WIDEN(b2[o]) +          \
                          c3 * WIDEN(b3[o]);                                                   \
        }                                                                                      \
        for (; j < rank; j++) {                                                                \
            const W *b = pool + addr[j];                                                       \
            float c = v[j];                                                                    \
            _Pragma("omp simd")                                                                \
            for (int64_t o = 0; o < width; o++) out[o] += c * WIDEN(b[o]);                     \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* One task: rows t0 .. t1 - 1, all of slot s (one adapter: its rows stay in this       \
     * core's cache after the first token reads them from memory). */                         \
    static void rows_##NAME(const W *pool, const int64_t *row_addr, const int64_t *a_row,      \
                            const int32_t *a_rank, const int64_t *b_row,                       \
                            const int32_t *b_rank, const int32_t *b_col, int64_t kg,           \
                            int64_t km0, int32_t num_parts, const int64_t *part_start,         \
                            const int64_t *part_width, int64_t t0, int64_t t1, const float *x, \
                            int64_t stride_x, int64_t in_features, float *y,                   \
                            int64_t stride_y, float *v) {                                      \
        int32_t rank = a_rank[kg];                                                             \
        if (rank <= 0) return;                                                                 \
        for (int64_t t = t0; t < t1; t++) {                                                    \
            shrink_##NAME(pool, row_addr + a_row[kg], rank, x + t * stride_x, in_features, v); \
            float *yt = y + t * stride_y;                                                      \
            for (int32_t p = 0; p < num_parts; p++) {                                          \
                int64_t km = km0 + p;                                                          \
                int32_t r = b_rank[km];                                                        \
                if (r <= 0) continue;                                                          \
                expand_##NAME(pool, row_addr + b_row[km], r, v + b_col[km],                    \
                              yt + part_start[p], part_width[p]);                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    int lora_bgmv_##NAME(const W *pool, const int64_t *row_addr, const int64_t *a_row,         \
                         const int32_t *a_rank, /* [n, L * G] */                               \
                         const int64_t *b_row, const int32_t *b_rank,                          \
                         const int32_t *b_col, /* [n, L * M] */                                \
                         int64_t slot_stride_g, int64_t slot_stride_m, /* L * G, L * M */      \
                         int64_t off_g, int64_t off_m, /* l * G + g, l * M + first proj. */    \
                         int32_t num_parts, const int64_t *part_start,                         \
                         const int64_t *part_width, const int32_t *row_slot, int64_t rows,     \
                         const float *x, int64_t stride_x, int64_t in_features, float *y,      \
                         int64_t stride_y, int32_t max_rank) {                                 \
        int64_t *starts = malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int64_t));            \
        if (starts == NULL) return -1;                                                         \
        int64_t tasks = task_starts(row_slot, rows, starts);                                   \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                       \
        for (int64_t k = 0; k < tasks; k++) {                                                  \
            int64_t t0 = starts[k], t1 = task_end(row_slot, rows, t0);                         \
            int32_t s = row_slot[t0];                                                          \
            float v[max_rank > 0 ? max_rank : 1];                                              \
            rows_##NAME(pool, row_addr, a_row, a_rank, b_row, b_rank, b_col,                   \
                        s * slot_stride_g + off_g, s * slot_stride_m + off_m, num_parts,       \
                        part_start, part_width, t0, t1, x, stride_x, in_features, y, stride_y, \
                        v);                                                                    \
        }                                                                                      \
        free(starts);                                                                          \
        return 0;                                                                              \
    }

/* Tasks: runs of consecutive rows of one slot, at most TASK_ROWS each (a long segment still
 * spreads over the threads). Decode rows of distinct adapters are one row each. */
enum { TASK_ROWS = 8 };

static int64_t task_end(const int32_t *row_slot, int64_t rows, int64_t t) {
    int64_t e = t + 1;
    while (e < rows && e - t < TASK_ROWS && row_slot[e] == row_slot[t]) e++;
    return e;
}

static int64_t task_starts(const int32_t *row_slot, int64_t rows, int64_t *starts) {
    int64_t tasks = 0;
    for (int64_t t = 0; t < rows;) {
        if (row_slot[t] < 0) {
            t++;
            continue;
        }
        starts[tasks++] = t;
        t = task_end(row_slot, rows, t);
    }
    return tasks;
}

LORA_KERNEL(f32, float, widen_f32)
LORA_KERNEL(bf16, bf16_t, widen_bf16)
