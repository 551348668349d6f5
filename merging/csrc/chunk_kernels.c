/* Element-wise chunk steps of the chunked merge kernels (merging/kernels.py), one pass over memory.
 *
 * Each function reproduces the eager torch operations of the Python chunk path exactly, in the same
 * order and with the same roundings: every torch operation rounds its float32 result once, so every
 * C expression below is one IEEE operation; `torch.add(a, b, alpha=l)` is one fused multiply-add on
 * CPU, hence the explicit fmaf. Compile without -ffast-math and with -ffp-contract=off so that the
 * compiler neither reassociates nor fuses what torch rounds separately.
 *
 * dtype codes: 0 = float32, 1 = bfloat16 (the compute dtype is float32 for both). The functions
 * return 1 when a float32 result is NaN or infinite (the caller then redoes the chunk in torch, which
 * owns the error reporting and the bit patterns of non-finite values), else 0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest, ties to even (torch's conversion for finite values and infinities); a NaN keeps
 * its sign and payload's top bits and is made quiet */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void load(int dtype, const void *src, int64_t off, int64_t n, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)src + off, (size_t)n * sizeof(float));
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int64_t i = 0; i < n; i++)
            dst[i] = bf16_to_f32(s[i]);
    }
}

/* stores `v` and tells whether any value is not finite */
static inline int store(int dtype, void *dst, int64_t off, int64_t n, const float *v) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &v[i], sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    if (dtype == 0) {
        memcpy((float *)dst + off, v, (size_t)n * sizeof(float));
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        for (int64_t i = 0; i < n; i++)
            d[i] = f32_to_bf16(v[i]);
    }
    return bad != 0;
}

/* Task arithmetic, `TaskArithmetic.combine` on one chunk: xs[0] = θ0, xs[1..T] = θ_t.
 * scalar λ:     acc = τ_1; acc += τ_t (t ≥ 2);        out = fma(acc, λ, θ0)
 * one λ a task: acc = τ_1 · λ_1; acc = fma(τ_t, λ_t, acc); out = θ0 + acc
 * with τ_t = θ_t − θ0. */
int mtl_task_arithmetic(int dtype, int64_t n, int T, const void *const *xs, const float *lams, int scalar,
                        void *out) {
    float pre[BLOCK], x[BLOCK], acc[BLOCK];
    int bad = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        load(dtype, xs[0], s, m, pre);
        load(dtype, xs[1], s, m, x);
        if (scalar) {
            for (int64_t i = 0; i < m; i++)
                acc[i] = x[i] - pre[i];
        } else {
            const float l = lams[0];
            for (int64_t i = 0; i < m; i++)
                acc[i] = (x[i] - pre[i]) * l;
        }
        for (int t = 1; t < T; t++) {
            load(dtype, xs[t + 1], s, m, x);
            if (scalar) {
                for (int64_t i = 0; i < m; i++) {
                    float tau = x[i] - pre[i];
                    acc[i] = acc[i] + tau;
                }
            } else {
                const float l = lams[t];
                for (int64_t i = 0; i < m; i++) {
                    float tau = x[i] - pre[i];
                    acc[i] = fmaf(tau, l, acc[i]);
                }
            }
        }
        if (scalar) {
            const float l = lams[0];
            for (int64_t i = 0; i < m; i++)
                acc[i] = fmaf(acc[i], l, pre[i]);
        } else {
            for (int64_t i = 0; i < m; i++)
                acc[i] = pre[i] + acc[i];
        }
        bad |= store(dtype, out, s, m, acc);
    }
    return bad;
}

/* Plain average, `_average` on one chunk: acc = θ_1; acc += θ_t (t ≥ 2); out = acc / T
 * (xs[0..T-1] = θ_1..θ_T: the base model is not read). */
int mtl_average(int dtype, int64_t n, int T, const void *const *xs, void *out) {
    float x[BLOCK], acc[BLOCK];
    int bad = 0;
    const float div = (float)T;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        load(dtype, xs[0], s, m, acc);
        for (int t = 1; t < T; t++) {
            load(dtype, xs[t], s, m, x);
            for (int64_t i = 0; i < m; i++)
                acc[i] = acc[i] + x[i];
        }
        for (int64_t i = 0; i < m; i++)
            acc[i] = acc[i] / div;
        bad |= store(dtype, out, s, m, acc);
    }
    return bad;
}

/* Conversions, exposed for the tests. */
void mtl_f32_to_bf16(int64_t n, const float *src, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = f32_to_bf16(src[i]);
}

void mtl_bf16_to_f32(int64_t n, const uint16_t *src, float *dst) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = bf16_to_f32(src[i]);
}
