/* Element-wise chunk steps of the chunked merge kernels (merging/kernels.py), one pass over memory.
 *
 * Each function reproduces the eager torch operations of the Python chunk path exactly, in the same
 * order and with the same roundings: every torch operation rounds its float32 result once, so every
 * C expression below is one IEEE operation; `torch.add(a, b, alpha=l)` is one fused multiply-add on
 * CPU, hence the explicit fmaf. Compile without -ffast-math and with -ffp-contract=off so that the
 * compiler neither reassociates nor fuses what torch rounds separately.
 *
 * dtype codes: 0 = float32, 1 = bfloat16 (the compute dtype is float32 for both). The functions
 * return 1 when a result, as stored in the output dtype, is NaN or infinite (the caller then redoes
 * the chunk in torch, which owns the error reporting and the bit patterns of non-finite values), else 0.
 */
#define _POSIX_C_SOURCE 200809L /* pread */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

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

/* entry i of a float32 (dtype 0) or bfloat16 (dtype 1) array, as float32 */
static inline __attribute__((always_inline)) float get(int dtype, const void *p, int64_t i) {
    return dtype == 0 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline __attribute__((always_inline)) uint32_t not_finite(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
}

/* store v as entry i; 1 when the stored value is NaN or infinite (a finite float32 above bfloat16's
 * range rounds to infinity there), else 0 */
static inline __attribute__((always_inline)) uint32_t put(int dtype, void *p, int64_t i, float v) {
    if (dtype == 0) {
        ((float *)p)[i] = v;
        return not_finite(v);
    }
    const uint16_t b = f32_to_bf16(v);
    ((uint16_t *)p)[i] = b;
    return (uint32_t)((b & 0x7f80u) == 0x7f80u);
}

/* The loops below are written once and instantiated per dtype (a constant after inlining), so that
 * each one is a plain vectorisable loop. */

/* Task arithmetic, `TaskArithmetic.combine` on one chunk: xs[0] = θ0, xs[1..T] = θ_t.
 * scalar λ:     acc = τ_1; acc += τ_t (t ≥ 2);        out = fma(acc, λ, θ0)
 * one λ a task: acc = τ_1 · λ_1; acc = fma(τ_t, λ_t, acc); out = θ0 + acc
 * with τ_t = θ_t − θ0. */
static inline __attribute__((always_inline)) int task_arithmetic(int dtype, int64_t n, int T, const void *const *xs,
                                                                 const float *lams, int scalar, void *out) {
    float pre[BLOCK], acc[BLOCK];
    uint32_t bad = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const char *p0 = (const char *)xs[0] + s * (dtype == 0 ? 4 : 2);
        const char *p1 = (const char *)xs[1] + s * (dtype == 0 ? 4 : 2);
        if (scalar) {
            for (int64_t i = 0; i < m; i++) {
                pre[i] = get(dtype, p0, i);
                acc[i] = get(dtype, p1, i) - pre[i];
            }
        } else {
            const float l = lams[0];
            for (int64_t i = 0; i < m; i++) {
                pre[i] = get(dtype, p0, i);
                acc[i] = (get(dtype, p1, i) - pre[i]) * l;
            }
        }
        for (int t = 1; t < T; t++) {
            const char *pt = (const char *)xs[t + 1] + s * (dtype == 0 ? 4 : 2);
            if (scalar) {
                for (int64_t i = 0; i < m; i++) {
                    float tau = get(dtype, pt, i) - pre[i];
                    acc[i] = acc[i] + tau;
                }
            } else {
                const float l = lams[t];
                for (int64_t i = 0; i < m; i++) {
                    float tau = get(dtype, pt, i) - pre[i];
                    acc[i] = fmaf(tau, l, acc[i]);
                }
            }
        }
        char *o = (char *)out + s * (dtype == 0 ? 4 : 2);
        if (scalar) {
            const float l = lams[0];
            for (int64_t i = 0; i < m; i++) {
                float v = fmaf(acc[i], l, pre[i]);
                bad |= put(dtype, o, i, v);
            }
        } else {
            for (int64_t i = 0; i < m; i++) {
                float v = pre[i] + acc[i];
                bad |= put(dtype, o, i, v);
            }
        }
    }
    return bad != 0;
}

int mtl_task_arithmetic(int dtype, int64_t n, int T, const void *const *xs, const float *lams, int scalar,
                        void *out) {
    return dtype == 0 ? task_arithmetic(0, n, T, xs, lams, scalar, out)
                      : task_arithmetic(1, n, T, xs, lams, scalar, out);
}

/* Plain average, `_average` on one chunk: acc = θ_1; acc += θ_t (t ≥ 2); out = acc / T
 * (xs[0..T-1] = θ_1..θ_T: the base model is not read). */
static inline __attribute__((always_inline)) int average(int dtype, int64_t n, int T, const void *const *xs,
                                                         void *out) {
    float acc[BLOCK];
    uint32_t bad = 0;
    const float div = (float)T;
    const int64_t es = dtype == 0 ? 4 : 2;
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const char *p0 = (const char *)xs[0] + s * es;
        for (int64_t i = 0; i < m; i++)
            acc[i] = get(dtype, p0, i);
        for (int t = 1; t < T; t++) {
            const char *pt = (const char *)xs[t] + s * es;
            for (int64_t i = 0; i < m; i++)
                acc[i] = acc[i] + get(dtype, pt, i);
        }
        char *o = (char *)out + s * es;
        for (int64_t i = 0; i < m; i++) {
            float v = acc[i] / div;
            bad |= put(dtype, o, i, v);
        }
    }
    return bad != 0;
}

int mtl_average(int dtype, int64_t n, int T, const void *const *xs, void *out) {
    return dtype == 0 ? average(0, n, T, xs, out) : average(1, n, T, xs, out);
}

/* pread of `len` bytes at `pos` into `buf`; -1 on an error or the end of the file */
static int read_full(int fd, char *buf, size_t len, int64_t pos) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, (off_t)(pos + (int64_t)done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

/* Block `s` (m entries) of each source into its scratch slot; 0, or -2 - i when source i failed. */
static int read_block(int nsrc, const int *fds, const int64_t *pos, int64_t s, int64_t m, size_t es,
                      const void *const *xs) {
    for (int i = 0; i < nsrc; i++)
        if (read_full(fds[i], (char *)xs[i], (size_t)m * es, pos[i] + s * (int64_t)es))
            return -2 - i;
    return 0;
}

/* entries [0, m) of a float32 or bfloat16 array as float32 */
static inline __attribute__((always_inline)) void widen(int dtype, const void *p, int64_t m, float *dst) {
    for (int64_t i = 0; i < m; i++)
        dst[i] = get(dtype, p, i);
}

/* TIES, `Ties.trim_and_elect` + `Ties.disjoint_merge` + `.mul_(lam).add_(pre)` on one chunk, the torch
 * operations' order and roundings: τ_t = θ_t − θ0; kept where |τ_t| ≥ thr[t] (τ̂_t = τ_t · keep, so a
 * dropped entry is a signed zero, as torch's multiply by False gives); total = τ̂_1 + ... + τ̂_T;
 * γ = sign(total) (+0 for ±0), γ = zero_sign where γ = 0 and zero_sign ≠ 0 (FusionBench's rule);
 * a_t = max(τ̂_t·γ, 0) (torch's clamp keeps −0), out = ((+0 + a_1) + ... + a_T) · γ, divided by
 * max(count of a_t > 0, 1) for the mean; result = out · lam + θ0. `work` holds T · BLOCK floats.
 * Returns 1 when a τ_t or a result is not finite (the caller redoes the chunk in torch), else 0. */
static inline __attribute__((always_inline)) int ties(int dtype, int64_t n, int T, const void *const *xs,
                                                      const float *thr, float zero_sign, int mean, float lam,
                                                      float *work, void *out) {
    float pre[BLOCK], total[BLOCK], sign[BLOCK], acc[BLOCK], cnt[BLOCK];
    uint32_t bad = 0;
    const int64_t es = dtype == 0 ? 4 : 2;
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t m = n - s < BLOCK ? n - s : BLOCK;
        widen(dtype, (const char *)xs[0] + s * es, m, pre);
        for (int t = 0; t < T; t++) {
            const char *pt = (const char *)xs[t + 1] + s * es;
            float *tt = work + (size_t)t * BLOCK;
            const float th = thr[t];
            for (int64_t i = 0; i < m; i++) {
                float tau = get(dtype, pt, i) - pre[i];
                bad |= not_finite(tau);
                tt[i] = tau * (fabsf(tau) >= th ? 1.0f : 0.0f);
            }
            if (t == 0)
                for (int64_t i = 0; i < m; i++)
                    total[i] = tt[i];
            else
                for (int64_t i = 0; i < m; i++)
                    total[i] = total[i] + tt[i];
        }
        for (int64_t i = 0; i < m; i++) {
            float g = (float)((total[i] > 0.0f) - (total[i] < 0.0f));
            sign[i] = (g == 0.0f && zero_sign != 0.0f) ? zero_sign : g;
            acc[i] = 0.0f;
            cnt[i] = 0.0f;
        }
        for (int t = 0; t < T; t++) {
            const float *tt = work + (size_t)t * BLOCK;
            for (int64_t i = 0; i < m; i++) {
                float a = tt[i] * sign[i];
                a = a < 0.0f ? 0.0f : a;
                cnt[i] += a > 0.0f ? 1.0f : 0.0f;
                acc[i] = acc[i] + a;
            }
        }
        char *o = (char *)out + s * es;
        for (int64_t i = 0; i < m; i++) {
            float v = acc[i] * sign[i];
            if (mean)
                v = v / (cnt[i] > 1.0f ? cnt[i] : 1.0f);
            v = v * lam;
            v = v + pre[i];
            bad |= put(dtype, o, i, v);
        }
    }
    return bad != 0;
}

/* Radix-select histograms of |τ_t| (float32 bits; non-negative floats order like their bits) on one
 * chunk. prefix[t] = -1: count the top 16 bits of every |τ_t| into hist[t]; prefix[t] ≥ 0: count the low
 * 16 bits of the |τ_t| whose top 16 bits equal prefix[t]; prefix[t] = -2: skip task t. hist holds
 * T · 4 · 65536 counters (four sub-histograms per task, to be summed). Returns 1 when a τ_t is not
 * finite, else 0. */
static inline __attribute__((always_inline)) int ties_hist(int dtype, int64_t n, int T, const void *const *xs,
                                                           const int32_t *prefix, int64_t *hist) {
    float pre[BLOCK];
    uint32_t bits[BLOCK];
    uint32_t bad = 0;
    const int64_t es = dtype == 0 ? 4 : 2;
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t m = n - s < BLOCK ? n - s : BLOCK;
        widen(dtype, (const char *)xs[0] + s * es, m, pre);
        for (int t = 0; t < T; t++) {
            if (prefix[t] == -2)
                continue;
            const char *pt = (const char *)xs[t + 1] + s * es;
            /* the bits of |τ| in a vectorised loop, then the (scalar) counting */
            for (int64_t i = 0; i < m; i++) {
                float tau = get(dtype, pt, i) - pre[i];
                bad |= not_finite(tau);
                float a = fabsf(tau);
                memcpy(&bits[i], &a, sizeof a);
            }
            /* four interleaved sub-histograms: runs of equal buckets (bf16 deltas are multiples of a few
             * powers of two) would otherwise wait on the previous increment of the same counter */
            int64_t *h0 = hist + (size_t)t * 4 * 65536, *h1 = h0 + 65536, *h2 = h1 + 65536, *h3 = h2 + 65536;
            const int32_t want = prefix[t];
            int64_t i = 0;
            if (want < 0) {
                for (; i + 4 <= m; i += 4) {
                    h0[bits[i] >> 16]++;
                    h1[bits[i + 1] >> 16]++;
                    h2[bits[i + 2] >> 16]++;
                    h3[bits[i + 3] >> 16]++;
                }
                for (; i < m; i++)
                    h0[bits[i] >> 16]++;
            } else {
                /* branches: most entries lie outside the wanted bucket */
                for (; i + 4 <= m; i += 4) {
                    if ((int32_t)(bits[i] >> 16) == want)
                        h0[bits[i] & 0xffffu]++;
                    if ((int32_t)(bits[i + 1] >> 16) == want)
                        h1[bits[i + 1] & 0xffffu]++;
                    if ((int32_t)(bits[i + 2] >> 16) == want)
                        h2[bits[i + 2] & 0xffffu]++;
                    if ((int32_t)(bits[i + 3] >> 16) == want)
                        h3[bits[i + 3] & 0xffffu]++;
                }
                for (; i < m; i++)
                    if ((int32_t)(bits[i] >> 16) == want)
                        h0[bits[i] & 0xffffu]++;
            }
        }
    }
    return bad != 0;
}

int mtl_ties(int dtype, int64_t n, int T, const void *const *xs, const float *thr, float zero_sign, int mean,
             float lam, float *work, void *out) {
    return dtype == 0 ? ties(0, n, T, xs, thr, zero_sign, mean, lam, work, out)
                      : ties(1, n, T, xs, thr, zero_sign, mean, lam, work, out);
}

int mtl_ties_hist(int dtype, int64_t n, int T, const void *const *xs, const int32_t *prefix, int64_t *hist) {
    return dtype == 0 ? ties_hist(0, n, T, xs, prefix, hist) : ties_hist(1, n, T, xs, prefix, hist);
}

/* The step a block read from the files goes through: 0 task arithmetic, 1 average, 2 TIES's merge,
 * 3 TIES's histograms (with the arguments that step uses). */
typedef struct {
    int kind;
    const float *lams;
    int scalar;
    const float *thr;
    float zero_sign;
    int mean;
    float lam;
    const int32_t *prefix;
    int64_t *hist;
    float *work;
} step_args;

/* Entries [0, n) read from the files block by block and each block stepped while it sits in the L2
 * cache: source i's entries start at byte pos[i] of file fds[i]; `scratch` holds nsrc blocks of `block`
 * entries. Returns 0, 1 (a non-finite τ or result), or -2 - i when source i could not be read (the
 * caller's own read then reports it). */
static int pread_blocks(const step_args *a, int dtype, int64_t n, int nsrc, const int *fds, const int64_t *pos,
                        int64_t block, void *scratch, void *out) {
    const size_t es = dtype == 0 ? sizeof(float) : sizeof(uint16_t);
    const void *xs[nsrc];
    int bad = 0;
    for (int i = 0; i < nsrc; i++)
        xs[i] = (char *)scratch + (size_t)i * (size_t)block * es;
    for (int64_t s = 0; s < n; s += block) {
        int64_t m = n - s < block ? n - s : block;
        int err = read_block(nsrc, fds, pos, s, m, es, xs);
        if (err)
            return err;
        void *o = out == NULL ? NULL : (char *)out + (size_t)s * es;
        switch (a->kind) {
        case 0: bad |= mtl_task_arithmetic(dtype, m, nsrc - 1, xs, a->lams, a->scalar, o); break;
        case 1: bad |= mtl_average(dtype, m, nsrc, xs, o); break;
        case 2: bad |= mtl_ties(dtype, m, nsrc - 1, xs, a->thr, a->zero_sign, a->mean, a->lam, a->work, o); break;
        default: bad |= mtl_ties_hist(dtype, m, nsrc - 1, xs, a->prefix, a->hist);
        }
    }
    return bad;
}

/* kind 0: task arithmetic (sources θ0, θ_1..θ_T), kind 1: average (sources θ_1..θ_T), read straight
 * from the files (`pread_blocks`). */
int mtl_pread_merge(int kind, int dtype, int64_t n, int nsrc, const int *fds, const int64_t *pos,
                    const float *lams, int scalar, int64_t block, void *scratch, void *out) {
    step_args a = {.kind = kind, .lams = lams, .scalar = scalar};
    return pread_blocks(&a, dtype, n, nsrc, fds, pos, block, scratch, out);
}

/* TIES read straight from the files (sources θ0, θ_1..θ_T): hist == NULL: the merge (`mtl_ties`) into
 * out; else the histograms of `mtl_ties_hist` (out unused). */
int mtl_pread_ties(int dtype, int64_t n, int nsrc, const int *fds, const int64_t *pos, const float *thr,
                   float zero_sign, int mean, float lam, const int32_t *prefix, int64_t *hist, int64_t block,
                   void *scratch, float *work, void *out) {
    step_args a = {.kind = hist != NULL ? 3 : 2, .thr = thr, .zero_sign = zero_sign, .mean = mean, .lam = lam,
                   .prefix = prefix, .hist = hist, .work = work};
    return pread_blocks(&a, dtype, n, nsrc, fds, pos, block, scratch, hist != NULL ? NULL : out);
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
