// RWKV-5/6 WKV kernels on the CPU: at::parallel_for over (batch row, head); inside, the time loop is outermost and the
// value index j of the N x N state the innermost loop, contiguous in memory, so the compiler vectorises it. Rows are
// taken R = 4 at a time so each load of the column sums (y in the forward, gv in the backward) serves four rows. The
// math is wkv5_math.h's.
// Backward: the forward keeps the state at the start of every SEG tokens (ckpt); one segment at a time from the end,
// the segment's states are recomputed from its checkpoint into a (SEG + 1) * N * N buffer (L2-sized) and walked back.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "wkv5.h"
#include "wkv5_math.h"

namespace {
constexpr int64_t SEG = WKV5_SEG;
constexpr int R = 4;

int64_t offset(int64_t T, int64_t H, int64_t N, int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * N; }

template <typename F>
F dot(int64_t N, const F *x, const F *y) {
    F s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < N; j++) s += x[j] * y[j];
    return s;
}

// rows i0 .. i0+Q-1 of one token forward: y += r_i S_in[i, :] (when y is given), S_out[i, :] = w_i S_in[i, :] + k_i v
template <int Q, typename F>
void rows_forward(int64_t N, int64_t i0, const F *S_in, F *S_out, const F *r, const F *w, const F *k, const F *v,
                  F *y) {
    const F *Si[Q];
    F *So[Q];
    F rq[Q], wq[Q], kq[Q];
    for (int q = 0; q < Q; q++) {
        Si[q] = S_in + (i0 + q) * N;
        So[q] = S_out + (i0 + q) * N;
        rq[q] = r[i0 + q];
        wq[q] = w[i0 + q];
        kq[q] = k[i0 + q];
    }
    if (y) {
#pragma GCC ivdep
        for (int64_t j = 0; j < N; j++) {
            const F vj = v[j];
            F yj = y[j];
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) {
                const F x = Si[q][j];
                yj += rq[q] * x;
                So[q][j] = wkv5_state(x, wq[q], kq[q], vj);
            }
            y[j] = yj;
        }
    } else {  // the backward's recomputation: the states only
#pragma GCC ivdep
        for (int64_t j = 0; j < N; j++) {
            const F vj = v[j];
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) So[q][j] = wkv5_state(Si[q][j], wq[q], kq[q], vj);
        }
    }
}

template <typename F>
void token_forward(int64_t N, const F *S_in, F *S_out, const F *r, const F *w, const F *k, const F *v, F *y) {
    int64_t i = 0;
    for (; i + R <= N; i += R) rows_forward<R>(N, i, S_in, S_out, r, w, k, v, y);
    for (; i < N; i++) rows_forward<1>(N, i, S_in, S_out, r, w, k, v, y);
}

// rows i0 .. i0+Q-1 of one token backward: D holds dL/dS_t on entry, dL/dS_{t-1} on return; gv accumulates
template <int Q, typename F>
void rows_backward(int64_t N, int64_t i0, F *D, const F *Sp, const F *r, const F *w, const F *k, const F *v,
                   const F *u, const F *gy, F gyv, F *gr, F *gk, F *glogw, F *gu, F *gv) {
    F *Dq[Q];
    const F *Spq[Q];
    F rq[Q], wq[Q], kq[Q], sr[Q] = {}, sk[Q] = {}, sw[Q] = {};
    for (int q = 0; q < Q; q++) {
        Dq[q] = D + (i0 + q) * N;
        Spq[q] = Sp + (i0 + q) * N;
        rq[q] = r[i0 + q];
        wq[q] = w[i0 + q];
        kq[q] = k[i0 + q];
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < N; j++) {
        const F gyj = gy[j], vj = v[j];
        F gvj = gv[j];
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) {
            const F d = Dq[q][j], sp = Spq[q][j];
            sr[q] += gyj * sp;
            sk[q] += d * vj;
            sw[q] += d * sp;
            gvj += d * kq[q];
            Dq[q][j] = wkv5_dstate_prev(d, wq[q], rq[q], gyj);
        }
        gv[j] = gvj;
    }
    for (int q = 0; q < Q; q++) {
        const int64_t i = i0 + q;
        gr[i] = sr[q] + u[i] * kq[q] * gyv;
        gk[i] = sk[q] + rq[q] * u[i] * gyv;
        glogw[i] = sw[q] * wq[q];
        gu[i] += rq[q] * kq[q] * gyv;
    }
}

template <typename F>
void exp_into(int64_t N, const F *logw, F *w) {
#pragma omp simd  // glibc's vector exp (libmvec), as -ffast-math allows
    for (int64_t j = 0; j < N; j++) w[j] = std::exp(logw[j]);
}

template <typename F>
F bonus(int64_t N, const F *r, const F *u, const F *k) {
    F s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; i++) s += r[i] * u[i] * k[i];
    return s;
}
}  // namespace

template <typename F>
void wkv5_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *k, const F *v,
                      const F *logw, const F *u, const F *s0, F *y, F *sT, F *ckpt) {
    const int64_t NN = N * N, nseg = wkv5_segments(T);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> w(N);
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
            const F *uh = u + h * N;
            F *S = sT + bh * NN;
            std::copy(s0 + bh * NN, s0 + (bh + 1) * NN, S);
            for (int64_t t = 0; t < T; t++) {
                if (ckpt && t % SEG == 0) std::copy(S, S + NN, ckpt + (bh * nseg + t / SEG) * NN);
                const int64_t o = offset(T, H, N, bb, t, h);
                exp_into(N, logw + o, w.data());
                const F ruk = bonus(N, r + o, uh, k + o);
                F *yt = y + o;
                for (int64_t j = 0; j < N; j++) yt[j] = v[o + j] * ruk;
                token_forward(N, S, S, r + o, w.data(), k + o, v + o, yt);
            }
        }
    });
}

template <typename F>
void wkv5_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *k, const F *v,
                       const F *logw, const F *u, const F *ckpt, const F *gy, const F *gsT, F *gr, F *gk, F *gv,
                       F *glogw, F *gu, F *gs0) {
    const int64_t NN = N * N, nseg = wkv5_segments(T);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> seg((SEG + 1) * NN), w(N);
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
            const F *uh = u + h * N;
            F *guh = gu + bh * N;
            std::fill(guh, guh + N, F(0));
            F *D = gs0 + bh * NN;  // dL/dS, walked back from gsT to the gradient of s0
            std::copy(gsT + bh * NN, gsT + (bh + 1) * NN, D);
            for (int64_t i = nseg - 1; i >= 0; i--) {
                const int64_t t0 = i * SEG, t1 = std::min(T, t0 + SEG);
                const F *ck0 = ckpt + (bh * nseg + i) * NN;
                std::copy(ck0, ck0 + NN, seg.begin());
                for (int64_t t = t0; t < t1; t++) {  // seg[m] = the state before token t0 + m
                    const int64_t o = offset(T, H, N, bb, t, h), m = t - t0;
                    exp_into(N, logw + o, w.data());
                    token_forward(N, seg.data() + m * NN, seg.data() + (m + 1) * NN, r + o, w.data(), k + o, v + o,
                                  static_cast<F *>(nullptr));
                }
                for (int64_t t = t1 - 1; t >= t0; t--) {
                    const int64_t o = offset(T, H, N, bb, t, h), m = t - t0;
                    const F *Sp = seg.data() + m * NN;
                    exp_into(N, logw + o, w.data());
                    const F gyv = dot(N, gy + o, v + o), ruk = bonus(N, r + o, uh, k + o);
                    F *gvt = gv + o;
                    for (int64_t j = 0; j < N; j++) gvt[j] = gy[o + j] * ruk;
                    int64_t ii = 0;
                    for (; ii + R <= N; ii += R)
                        rows_backward<R>(N, ii, D, Sp, r + o, w.data(), k + o, v + o, uh, gy + o, gyv, gr + o,
                                         gk + o, glogw + o, guh, gvt);
                    for (; ii < N; ii++)
                        rows_backward<1>(N, ii, D, Sp, r + o, w.data(), k + o, v + o, uh, gy + o, gyv, gr + o,
                                         gk + o, glogw + o, guh, gvt);
                }
            }
        }
    });
}

#define WKV5_CPU_INSTANTIATE(F)                                                                                   \
    template void wkv5_forward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,       \
                                      const F *, const F *, const F *, F *, F *, F *);                            \
    template void wkv5_backward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,      \
                                       const F *, const F *, const F *, const F *, const F *, F *, F *, F *, F *, \
                                       F *, F *);
WKV5_CPU_INSTANTIATE(float)
WKV5_CPU_INSTANTIATE(double)
