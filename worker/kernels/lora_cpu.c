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
 * multiplied out; A and B are read straight from their pages, once per decode row and once
 * per four rows of a prompt segment (4 x 4 register tiles). Tasks (runs of rows of one
 * slot) run in parallel (OpenMP, the runtime torch already loaded). x, y and the sums are
 * float32; the pool's adapter rows are float32 (lora_bgmv_f32) or bfloat16 (lora_bgmv_bf16:
 * half the bytes to read, each weight widened exactly to float32 as it is loaded). The
 * bfloat16 rows are software-prefetched a block ahead; float32 rows are not (measured on
 * the 2-core dev machine: the prefetch made a float32 decode step 2-3 ms longer, and a
 * bfloat16 one about 3 ms shorter).
 *
 * Built and loaded by lora_cpu.py (ctypes); its wrapper validates every argument first.
 * Returns 0, or -1 when it could not allocate its task list (nothing was written).
 */
#include <omp.h>
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
#define LORA_KERNEL(NAME, W, WIDEN, PF)                                                        \
    static void shrink_##NAME(const W *pool, const int64_t *addr, int32_t rank, const float *x, \
                              int64_t in_features, float *v) {                                 \
        int32_t j = 0;                                                                         \
        for (; j + BLOCK <= rank; j += BLOCK) {                                                \
            if (PF)                                                                            \
                prefetch_rows(pool, sizeof(W), addr, j + BLOCK, next_block(j, rank),           \
                              in_features * (int64_t)sizeof(W));                               \
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
            if (PF)                                                                            \
                prefetch_rows(pool, sizeof(W), addr, j + BLOCK, next_block(j, rank),           \
                              width * (int64_t)sizeof(W));                                     \
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
    /* Four token rows of one adapter at once (prompt segments): each weight loaded once       \
     * for the four, from memory or this core's cache, and used in four sums; 4 x 4            \
     * accumulators stay in registers. v4 holds the four rows' shrink outputs, rank apart. */  \
    static void shrink4_##NAME(const W *pool, const int64_t *addr, int32_t rank,               \
                               const float *x, int64_t stride_x, int64_t in_features,          \
                               float *v4) {                                                    \
        const float *x0 = x, *x1 = x + stride_x;                                               \
        const float *x2 = x + 2 * stride_x, *x3 = x + 3 * stride_x;                            \
        int32_t j = 0;                                                                         \
        for (; j + BLOCK <= rank; j += BLOCK) {                                                \
            const W *a0 = pool + addr[j], *a1 = pool + addr[j + 1];                            \
            const W *a2 = pool + addr[j + 2], *a3 = pool + addr[j + 3];                        \
            float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f;            \
            float s12 = 0.f, s13 = 0.f, s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f;            \
            float s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;                                  \
            _Pragma("omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, \
                                           s22, s23, s30, s31, s32, s33)")                     \
            for (int64_t i = 0; i < in_features; i++) {                                        \
                float w0 = WIDEN(a0[i]), w1 = WIDEN(a1[i]), w2 = WIDEN(a2[i]);                 \
                float w3 = WIDEN(a3[i]);                                                       \
                float u0 = x0[i], u1 = x1[i], u2 = x2[i], u3 = x3[i];                          \
                s00 += w0 * u0, s01 += w1 * u0, s02 += w2 * u0, s03 += w3 * u0;                \
                s10 += w0 * u1, s11 += w1 * u1, s12 += w2 * u1, s13 += w3 * u1;                \
                s20 += w0 * u2, s21 += w1 * u2, s22 += w2 * u2, s23 += w3 * u2;                \
                s30 += w0 * u3, s31 += w1 * u3, s32 += w2 * u3, s33 += w3 * u3;                \
            }                                                                                  \
            float *v0 = v4 + j, *v1 = v0 + rank, *v2 = v1 + rank, *v3 = v2 + rank;             \
            v0[0] = s00, v0[1] = s01, v0[2] = s02, v0[3] = s03;                                \
            v1[0] = s10, v1[1] = s11, v1[2] = s12, v1[3] = s13;                                \
            v2[0] = s20, v2[1] = s21, v2[2] = s22, v2[3] = s23;                                \
            v3[0] = s30, v3[1] = s31, v3[2] = s32, v3[3] = s33;                                \
        }                                                                                      \
        for (; j < rank; j++) {                                                                \
            const W *a = pool + addr[j];                                                       \
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                      \
            _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                  \
            for (int64_t i = 0; i < in_features; i++) {                                        \
                float w = WIDEN(a[i]);                                                         \
                s0 += w * x0[i], s1 += w * x1[i], s2 += w * x2[i], s3 += w * x3[i];            \
            }                                                                                  \
            v4[j] = s0, v4[rank + j] = s1, v4[2 * rank + j] = s2, v4[3 * rank + j] = s3;       \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* out rows (stride_y apart) += v rows (stride_v apart) times B, four rows at once. */     \
    static void expand4_##NAME(const W *pool, const int64_t *addr, int32_t rank,               \
                               const float *v, int64_t stride_v, float *out,                   \
                               int64_t stride_y, int64_t width) {                              \
        float *o0 = out, *o1 = out + stride_y;                                                 \
        float *o2 = out + 2 * stride_y, *o3 = out + 3 * stride_y;                              \
        const float *v0 = v, *v1 = v + stride_v;                                               \
        const float *v2 = v + 2 * stride_v, *v3 = v + 3 * stride_v;                            \
        int32_t j = 0;                                                                         \
        for (; j + BLOCK <= rank; j += BLOCK) {                                                \
            const W *b0 = pool + addr[j], *b1 = pool + addr[j + 1];                            \
            const W *b2 = pool + addr[j + 2], *b3 = pool + addr[j + 3];                        \
            float c00 = v0[j], c01 = v0[j + 1], c02 = v0[j + 2], c03 = v0[j + 3];              \
            float c10 = v1[j], c11 = v1[j + 1], c12 = v1[j + 2], c13 = v1[j + 3];              \
            float c20 = v2[j], c21 = v2[j + 1], c22 = v2[j + 2], c23 = v2[j + 3];              \
            float c30 = v3[j], c31 = v3[j + 1], c32 = v3[j + 2], c33 = v3[j + 3];              \
            _Pragma("omp simd")                                                                \
            for (int64_t o = 0; o < width; o++) {                                              \
                float w0 = WIDEN(b0[o]), w1 = WIDEN(b1[o]), w2 = WIDEN(b2[o]);                 \
                float w3 = WIDEN(b3[o]);                                                       \
                o0[o] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3;                            \
                o1[o] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3;                            \
                o2[o] += c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3;                            \
                o3[o] += c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3;                            \
            }                                                                                  \
        }                                                                                      \
        for (; j < rank; j++) {                                                                \
            const W *b = pool + addr[j];                                                       \
            float c0 = v0[j], c1 = v1[j], c2 = v2[j], c3 = v3[j];                              \
            _Pragma("omp simd")                                                                \
            for (int64_t o = 0; o < width; o++) {                                              \
                float w = WIDEN(b[o]);                                                         \
                o0[o] += c0 * w, o1[o] += c1 * w, o2[o] += c2 * w, o3[o] += c3 * w;            \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
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
        int64_t t = t0;                                                                        \
        for (; t + 4 <= t1; t += 4) { /* prompt rows: four at a time */                        \
            shrink4_##NAME(pool, row_addr + a_row[kg], rank, x + t * stride_x, stride_x,       \
                           in_features, v);                                                    \
            for (int32_t p = 0; p < num_parts; p++) {                                          \
                int64_t km = km0 + p;                                                          \
                int32_t r = b_rank[km];                                                        \
                if (r <= 0) continue;                                                          \
                expand4_##NAME(pool, row_addr + b_row[km], r, v + b_col[km], rank,             \
                               y + t * stride_y + part_start[p], stride_y, part_width[p]);     \
            }                                                                                  \
        }                                                                                      \
        for (; t < t1; t++) { /* decode rows, and a prompt's last rows */                      \
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
        int64_t most = task_rows(rows);                                                        \
        int64_t tasks = task_starts(row_slot, rows, most, starts);                             \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                       \
        for (int64_t k = 0; k < tasks; k++) {                                                  \
            int64_t t0 = starts[k], t1 = task_end(row_slot, rows, t0, most);                   \
            int32_t s = row_slot[t0];                                                          \
            float v[4 * (max_rank > 0 ? max_rank : 1)]; /* four rows' shrink outputs */        \
            rows_##NAME(pool, row_addr, a_row, a_rank, b_row, b_rank, b_col,                   \
                        s * slot_stride_g + off_g, s * slot_stride_m + off_m, num_parts,       \
                        part_start, part_width, t0, t1, x, stride_x, in_features, y, stride_y, \
                        v);                                                                    \
        }                                                                                      \
        free(starts);                                                                          \
        return 0;                                                                              \
    }

/* Tasks: runs of consecutive rows of one slot, at most `most` each. Fewer, longer tasks read
 * each adapter from memory fewer times (a prompt segment as one task measured 12% faster
 * than in tasks of 8); `task_rows` keeps about four tasks per thread for the batch's rows,
 * a multiple of the four-row tiles between 4 and 32. Decode rows of distinct adapters are
 * one row each. */
static int64_t task_rows(int64_t rows) {
    int64_t most = rows / (4 * (int64_t)omp_get_max_threads()) / 4 * 4;
    return most < 4 ? 4 : most > 32 ? 32 : most;
}

static int64_t task_end(const int32_t *row_slot, int64_t rows, int64_t t, int64_t most) {
    int64_t e = t + 1;
    while (e < rows && e - t < most && row_slot[e] == row_slot[t]) e++;
    return e;
}

static int64_t task_starts(const int32_t *row_slot, int64_t rows, int64_t most,
                           int64_t *starts) {
    int64_t tasks = 0;
    for (int64_t t = 0; t < rows;) {
        if (row_slot[t] < 0) {
            t++;
            continue;
        }
        starts[tasks++] = t;
        t = task_end(row_slot, rows, t, most);
    }
    return tasks;
}

LORA_KERNEL(f32, float, widen_f32, 0)
LORA_KERNEL(bf16, bf16_t, widen_bf16, 1)
