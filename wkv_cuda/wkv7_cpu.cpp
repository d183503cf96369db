// RWKV-7 WKV kernels on the CPU: at::parallel_for over (batch row, head); inside, the time loop is outermost and a
// row of the N x N state the innermost loop, contiguous in memory, so the compiler vectorises it (`omp simd`; the
// pointers never alias). The math is wkv7_math.h's; the column sums of the backward accumulate in N-vectors.
// Backward: the forward runs once more keeping the state every SEG tokens (nck * N * N values per head instead of
// T * N * N); then, one segment at a time from the end, the segment's states are recomputed from its checkpoint into
// a buffer of (SEG + 1) * N * N values (L2-sized) and walked back. Any T; no scratch in main memory beyond that.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "wkv7.h"
#include "wkv7_math.h"

namespace {
constexpr int64_t SEG = 16;

// the pointers to token t's N-vectors of head h in a (B, T, H, N) tensor
struct Token {
    int64_t T, H, N;
    int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }
};

// one token forward: S <- S diag(w) + (S a) b^T + v k^T, and (when y) y = S r; sa receives S_{t-1} a
template <typename F>
void step(int64_t N, F *S, const F *r, const F *w, const F *k, const F *v, const F *a, const F *b, F *y, F *sa) {
    for (int64_t i = 0; i < N; i++) {
        F *Si = S + i * N;
        F s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < N; j++) s += Si[j] * a[j];
        const F vi = v[i];
        F yi = 0;
#pragma omp simd reduction(+ : yi)
        for (int64_t j = 0; j < N; j++) {
            Si[j] = wkv7_state(Si[j], w[j], s, b[j], vi, k[j]);
            yi += Si[j] * r[j];
        }
        if (y) y[i] = yi;
        if (sa) sa[i] = s;
    }
}

template <typename F>
void exp_into(int64_t N, const F *logw, F *w) {
    for (int64_t j = 0; j < N; j++) w[j] = std::exp(logw[j]);
}
}  // namespace

template <typename F>
void wkv7_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                      const F *v, const F *a, const F *b, const F *s0, F *y, F *sT) {
    const Token tok{T, H, N};
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> w(N);
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
            F *S = sT + bh * N * N;
            std::copy(s0 + bh * N * N, s0 + (bh + 1) * N * N, S);
            for (int64_t t = 0; t < T; t++) {
                const int64_t o = tok.at(bb, t, h);
                exp_into(N, logw + o, w.data());
                step(N, S, r + o, w.data(), k + o, v + o, a + o, b + o, y + o, static_cast<F *>(nullptr));
            }
        }
    });
}

template <typename F>
void wkv7_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                       const F *v, const F *a, const F *b, const F *s0, const F *gy, const F *gsT, F *gr,
                       F *glogw, F *gk, F *gv, F *ga, F *gb, F *gs0) {
    const Token tok{T, H, N};
    const int64_t NN = N * N, nseg = (T + SEG - 1) / SEG;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> ckpt(nseg * NN), seg((SEG + 1) * NN), sa(SEG * N), w(N);
        std::vector<F> cr(N), cw(N), ck(N), cb(N), ca(N);  // the column sums of one token
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
            F *D = gs0 + bh * NN;  // dL/dS, walked back from gsT to the gradient of s0
            std::copy(gsT + bh * NN, gsT + (bh + 1) * NN, D);
            std::copy(s0 + bh * NN, s0 + (bh + 1) * NN, seg.data());
            for (int64_t t = 0; t < T; t++) {  // the checkpoints: the state at the start of every segment
                if (t % SEG == 0) std::copy(seg.begin(), seg.begin() + NN, ckpt.begin() + (t / SEG) * NN);
                const int64_t o = tok.at(bb, t, h);
                exp_into(N, logw + o, w.data());
                step(N, seg.data(), r + o, w.data(), k + o, v + o, a + o, b + o, static_cast<F *>(nullptr),
                     static_cast<F *>(nullptr));
            }
            for (int64_t i = nseg - 1; i >= 0; i--) {
                const int64_t t0 = i * SEG, t1 = std::min(T, t0 + SEG);
                std::copy(ckpt.begin() + i * NN, ckpt.begin() + (i + 1) * NN, seg.begin());
                for (int64_t t = t0; t < t1; t++) {  // seg[m] = the state before token t0 + m
                    const int64_t o = tok.at(bb, t, h), m = t - t0;
                    std::copy(seg.begin() + m * NN, seg.begin() + (m + 1) * NN, seg.begin() + (m + 1) * NN);
                    exp_into(N, logw + o, w.data());
                    step(N, seg.data() + (m + 1) * NN, r + o, w.data(), k + o, v + o, a + o, b + o,
                         static_cast<F *>(nullptr), sa.data() + m * N);
                }
                for (int64_t t = t1 - 1; t >= t0; t--) {
                    const int64_t o = tok.at(bb, t, h), m = t - t0;
                    const F *Sp = seg.data() + m * NN, *St = Sp + NN, *sam = sa.data() + m * N;
                    const F *rt = r + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = b + o, *gyt = gy + o;
                    exp_into(N, logw + o, w.data());
                    std::fill(cr.begin(), cr.end(), F(0));
                    std::fill(cw.begin(), cw.end(), F(0));
                    std::fill(ck.begin(), ck.end(), F(0));
                    std::fill(cb.begin(), cb.end(), F(0));
                    std::fill(ca.begin(), ca.end(), F(0));
                    for (int64_t ii = 0; ii < N; ii++) {
                        F *Di = D + ii * N;
                        const F *Spi = Sp + ii * N, *Sti = St + ii * N;
                        const F gyi = gyt[ii], vi = vt[ii], sai = sam[ii];
                        F gvi = 0, gsai = 0;
#pragma omp simd reduction(+ : gvi, gsai)
                        for (int64_t j = 0; j < N; j++) {
                            const F d = wkv7_dstate_y(Di[j], gyi, rt[j]);
                            gvi += d * kt[j];
                            gsai += d * bt[j];
                            cr[j] += Sti[j] * gyi;
                            cw[j] += d * Spi[j];
                            ck[j] += d * vi;
                            cb[j] += d * sai;
                            Di[j] = d;
                        }
#pragma omp simd
                        for (int64_t j = 0; j < N; j++) {
                            ca[j] += gsai * Spi[j];
                            Di[j] = wkv7_dstate_prev(Di[j], w[j], gsai, at[j]);
                        }
                        gv[o + ii] = gvi;
                    }
                    for (int64_t j = 0; j < N; j++) {
                        gr[o + j] = cr[j];
                        glogw[o + j] = cw[j] * w[j];
                        gk[o + j] = ck[j];
                        gb[o + j] = cb[j];
                        ga[o + j] = ca[j];
                    }
                }
            }
        }
    });
}

#define WKV7_CPU_INSTANTIATE(F)                                                                                   \
    template void wkv7_forward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,       \
                                      const F *, const F *, const F *, const F *, F *, F *);                      \
    template void wkv7_backward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,      \
                                       const F *, const F *, const F *, const F *, const F *, const F *, F *, F *, \
                                       F *, F *, F *, F *, F *);
WKV7_CPU_INSTANTIATE(float)
WKV7_CPU_INSTANTIATE(double)
