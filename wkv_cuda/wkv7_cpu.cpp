// RWKV-7 WKV kernels on the CPU: at::parallel_for over (batch row, head); inside, the time loop is outermost and the
// key index j of the N x N state the innermost loop, contiguous in memory, so the compiler vectorises it (`omp simd`;
// the pointers never alias). Rows are taken R = 4 at a time so each load of a token's key vectors (w, b, k, r, a) and
// of the backward's column sums serves four rows: the loops are bound by loads, not arithmetic. The math is
// wkv7_math.h's; the column sums of the backward accumulate in N-vectors.
// Backward: the forward keeps the state at the start of every SEG tokens (ckpt, nseg * N * N values per head instead
// of T * N * N); one segment at a time from the end, the segment's states are recomputed from its checkpoint into a
// buffer of (SEG + 1) * N * N values (L2-sized) and walked back. Any T.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "wkv7.h"
#include "wkv7_math.h"

namespace {
constexpr int64_t SEG = WKV7_SEG;
constexpr int R = 4;  // rows per pass of the forward
constexpr int RB = 4;  // and of the backward

int64_t offset(int64_t T, int64_t H, int64_t N, int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * N; }

// rows i0 .. i0+Q-1 of one token forward: S_out = S_in diag(w) + (S_in a) b^T + v k^T; y = S_out r where y is given;
// sa receives S_in a where given. S_in may be S_out.
template <int Q, typename F>
void rows_forward(int64_t N, int64_t i0, const F *S_in, F *S_out, const F *r, const F *w, const F *k, const F *v,
                  const F *a, const F *b, F *y, F *sa) {
    F s[Q] = {}, yq[Q] = {}, vq[Q];
    const F *Si[Q];
    F *So[Q];
    for (int q = 0; q < Q; q++) {
        Si[q] = S_in + (i0 + q) * N;
        So[q] = S_out + (i0 + q) * N;
        vq[q] = v[i0 + q];
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < N; j++)
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) s[q] += Si[q][j] * a[j];
    if (y) {
#pragma GCC ivdep
        for (int64_t j = 0; j < N; j++) {
            const F wj = w[j], bj = b[j], kj = k[j], rj = r[j];
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) {
                const F x = wkv7_state(Si[q][j], wj, s[q], bj, vq[q], kj);
                So[q][j] = x;
                yq[q] += x * rj;
            }
        }
        for (int q = 0; q < Q; q++) y[i0 + q] = yq[q];
    } else {  // the backward's recomputation: the states only
#pragma GCC ivdep
        for (int64_t j = 0; j < N; j++) {
            const F wj = w[j], bj = b[j], kj = k[j];
#pragma GCC unroll 4
            for (int q = 0; q < Q; q++) So[q][j] = wkv7_state(Si[q][j], wj, s[q], bj, vq[q], kj);
        }
    }
    if (sa)
        for (int q = 0; q < Q; q++) sa[i0 + q] = s[q];
}

template <typename F>
void token_forward(int64_t N, const F *S_in, F *S_out, const F *r, const F *w, const F *k, const F *v, const F *a,
                   const F *b, F *y, F *sa) {
    int64_t i = 0;
    for (; i + R <= N; i += R) rows_forward<R>(N, i, S_in, S_out, r, w, k, v, a, b, y, sa);
    for (; i < N; i++) rows_forward<1>(N, i, S_in, S_out, r, w, k, v, a, b, y, sa);
}

// the token's key-indexed sums that the backward accumulates over rows
template <typename F>
struct Columns {
    std::vector<F> r, w, k, b, a;
    explicit Columns(int64_t N) : r(N), w(N), k(N), b(N), a(N) {}
    void zero() {
        for (auto *c : {&r, &w, &k, &b, &a}) std::fill(c->begin(), c->end(), F(0));
    }
};

// rows i0 .. i0+Q-1 of one token backward (wkv7_math.h): D holds dL/dS_t on entry, dL/dS_{t-1} on return
template <int Q, typename F>
void rows_backward(int64_t N, int64_t i0, F *D, const F *Sp, const F *St, const F *r, const F *w, const F *k,
                   const F *v, const F *a, const F *b, const F *sa, const F *gy, F rk, F rb, F *gv, Columns<F> &c) {
    F *Dq[Q];
    const F *Spq[Q], *Stq[Q];
    F gyq[Q], vq[Q], saq[Q], dk[Q] = {}, db[Q] = {};
    for (int q = 0; q < Q; q++) {
        Dq[q] = D + (i0 + q) * N;
        Spq[q] = Sp + (i0 + q) * N;
        Stq[q] = St + (i0 + q) * N;
        gyq[q] = gy[i0 + q];
        vq[q] = v[i0 + q];
        saq[q] = sa[i0 + q];
    }
    // the row sums first: gv_i and gsa_i of D + gy_i r^T, as sums over D plus gy_i (r.k) and gy_i (r.b)
#pragma GCC ivdep
    for (int64_t j = 0; j < N; j++)
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) {
            dk[q] += Dq[q][j] * k[j];
            db[q] += Dq[q][j] * b[j];
        }
    F gsa[Q];
    for (int q = 0; q < Q; q++) {
        gv[i0 + q] = dk[q] + gyq[q] * rk;
        gsa[q] = db[q] + gyq[q] * rb;
    }
    F *cr = c.r.data(), *cw = c.w.data(), *ck = c.k.data(), *cb = c.b.data(), *ca = c.a.data();
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        const F rj = r[j], wj = w[j], aj = a[j];
        F sr = cr[j], sw = cw[j], sk = ck[j], sb = cb[j], sa_ = ca[j];
#pragma GCC unroll 4
        for (int q = 0; q < Q; q++) {
            const F d = wkv7_dstate_y(Dq[q][j], gyq[q], rj), sp = Spq[q][j];
            sr += Stq[q][j] * gyq[q];
            sw += d * sp;
            sk += d * vq[q];
            sb += d * saq[q];
            sa_ += gsa[q] * sp;
            Dq[q][j] = wkv7_dstate_prev(d, wj, gsa[q], aj);
        }
        cr[j] = sr;
        cw[j] = sw;
        ck[j] = sk;
        cb[j] = sb;
        ca[j] = sa_;
    }
}

template <typename F>
void exp_into(int64_t N, const F *logw, F *w) {
#pragma omp simd  // glibc's vector exp (libmvec), as -ffast-math allows
    for (int64_t j = 0; j < N; j++) w[j] = std::exp(logw[j]);
}

template <typename F>
F dot(int64_t N, const F *x, const F *y) {
    F s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < N; j++) s += x[j] * y[j];
    return s;
}
}  // namespace

template <typename F>
void wkv7_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                      const F *v, const F *a, const F *b, const F *s0, F *y, F *sT, F *ckpt) {
    const int64_t NN = N * N, nseg = wkv7_segments(T);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> w(N);
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
            F *S = sT + bh * NN;
            std::copy(s0 + bh * NN, s0 + (bh + 1) * NN, S);
            for (int64_t t = 0; t < T; t++) {
                if (ckpt && t % SEG == 0) std::copy(S, S + NN, ckpt + (bh * nseg + t / SEG) * NN);
                const int64_t o = offset(T, H, N, bb, t, h);
                exp_into(N, logw + o, w.data());
                token_forward(N, S, S, r + o, w.data(), k + o, v + o, a + o, b + o, y + o, static_cast<F *>(nullptr));
            }
        }
    });
}

template <typename F>
void wkv7_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                       const F *v, const F *a, const F *b, const F *ckpt, const F *gy, const F *gsT, F *gr,
                       F *glogw, F *gk, F *gv, F *ga, F *gb, F *gs0) {
    const int64_t NN = N * N, nseg = wkv7_segments(T);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<F> seg((SEG + 1) * NN), sa(SEG * N), w(N);
        Columns<F> c(N);
        for (int64_t bh = begin; bh < end; bh++) {
            const int64_t bb = bh / H, h = bh % H;
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
                                  a + o, b + o, static_cast<F *>(nullptr), sa.data() + m * N);
                }
                for (int64_t t = t1 - 1; t >= t0; t--) {
                    const int64_t o = offset(T, H, N, bb, t, h), m = t - t0;
                    const F *Sp = seg.data() + m * NN, *St = Sp + NN, *sam = sa.data() + m * N;
                    exp_into(N, logw + o, w.data());
                    const F rk = dot(N, r + o, k + o), rb = dot(N, r + o, b + o);
                    c.zero();
                    int64_t ii = 0;
                    for (; ii + RB <= N; ii += RB)
                        rows_backward<RB>(N, ii, D, Sp, St, r + o, w.data(), k + o, v + o, a + o, b + o, sam, gy + o,
                                         rk, rb, gv + o, c);
                    for (; ii < N; ii++)
                        rows_backward<1>(N, ii, D, Sp, St, r + o, w.data(), k + o, v + o, a + o, b + o, sam, gy + o,
                                         rk, rb, gv + o, c);
                    for (int64_t j = 0; j < N; j++) {
                        gr[o + j] = c.r[j];
                        glogw[o + j] = c.w[j] * w[j];
                        gk[o + j] = c.k[j];
                        gb[o + j] = c.b[j];
                        ga[o + j] = c.a[j];
                    }
                }
            }
        }
    });
}

#define WKV7_CPU_INSTANTIATE(F)                                                                                   \
    template void wkv7_forward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,       \
                                      const F *, const F *, const F *, const F *, F *, F *, F *);                 \
    template void wkv7_backward_cpu<F>(int64_t, int64_t, int64_t, int64_t, const F *, const F *, const F *,      \
                                       const F *, const F *, const F *, const F *, const F *, const F *, F *, F *, \
                                       F *, F *, F *, F *, F *);
WKV7_CPU_INSTANTIATE(float)
WKV7_CPU_INSTANTIATE(double)
