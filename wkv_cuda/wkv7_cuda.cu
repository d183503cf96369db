// RWKV-7 WKV kernels on CUDA: one block of N threads per (batch row, head); thread i keeps row i of the N x N state
// in registers and the token's key-indexed vectors (r, w, k, a, b) are staged in shared memory, as in RWKV-LM's
// RWKV-v7/train_temp/cuda/wkv7_cuda.cu. The math is wkv7_math.h's.
// Inputs may be bfloat16; logw, the state and all arithmetic are fp32 (fp64 for fp64 inputs), and the incoming state
// and the gradients of both states are part of the op, so segmented training gets exact gradients.
// Backward: the forward writes the state at the start of every SEG tokens to a checkpoint buffer in global memory
// (T/SEG states per head instead of T; RWKV-LM keeps every 16th too, but steps back by dividing by w, which is
// inexact when decays are strong); the backward, one segment at a time from the end, recomputes the segment's states
// from its checkpoint into a (SEG + 1)-state scratch buffer and walks them back. Thread i owns row i and column i of
// dL/dS (RWKV-LM's kernel keeps both too): row sums (gv, gsa) need rows, column sums (gr, gw, gk, ga, gb) columns, and
// nothing is summed across threads except through shared memory. Any T, no compile-time T; head sizes 8, 16, 32 and
// 64 (compiled per size; 128 would spill registers in fp64). No torch headers.
#include <cstdint>

#include "cuda_common.cuh"
#include "wkv7.h"
#include "wkv7_math.h"

namespace {
using namespace wkv_device;

constexpr int SEG = WKV7_SEG;

// per head: the SEG + 1 states of the segment being walked back, and its SEG sa vectors
__host__ __device__ int64_t scratch_per_head(int64_t N) { return (SEG + 1) * N * N + SEG * N; }

template <int N, typename IN, typename ACC>
__global__ void __launch_bounds__(N, 1) forward_kernel(int64_t T, int64_t H, const IN *__restrict__ r,
                                                    const ACC *__restrict__ logw, const IN *__restrict__ k,
                                                    const IN *__restrict__ v, const IN *__restrict__ a,
                                                    const IN *__restrict__ b, const ACC *__restrict__ s0,
                                                    IN *__restrict__ y, ACC *__restrict__ sT,
                                                    ACC *__restrict__ ckpt) {
    using C = Cvt<IN, ACC>;
    const int64_t bh = blockIdx.x, bb = bh / H, h = bh % H, nseg = (T + SEG - 1) / SEG;
    const int i = threadIdx.x;
    __shared__ ACC r_[N], w_[N], k_[N], a_[N], b_[N];
    ACC s[N];  // row i of the state
#pragma unroll
    for (int j = 0; j < N; j++) s[j] = s0[(bh * N + i) * N + j];
    for (int64_t t = 0; t < T; t++) {
        const int64_t o = ((bb * T + t) * H + h) * N + i;
        if (ckpt && t % SEG == 0) {
#pragma unroll
            for (int j = 0; j < N; j++) ckpt[((bh * nseg + t / SEG) * N + i) * N + j] = s[j];
        }
        __syncthreads();  // the previous token's readers are done with the shared vectors
        r_[i] = C::load(r[o]);
        w_[i] = exp_acc(logw[o]);
        k_[i] = C::load(k[o]);
        a_[i] = C::load(a[o]);
        b_[i] = C::load(b[o]);
        const ACC vi = C::load(v[o]);
        __syncthreads();
        ACC sa = 0;
#pragma unroll
        for (int j = 0; j < N; j++) sa += s[j] * a_[j];
        ACC yi = 0;
#pragma unroll
        for (int j = 0; j < N; j++) {
            s[j] = wkv7_state(s[j], w_[j], sa, b_[j], vi, k_[j]);
            yi += s[j] * r_[j];
        }
        y[o] = C::store(yi);
    }
#pragma unroll
    for (int j = 0; j < N; j++) sT[(bh * N + i) * N + j] = s[j];
}

template <int N, typename IN, typename ACC>
__global__ void __launch_bounds__(N, 1) backward_kernel(
    int64_t T, int64_t H, const IN *__restrict__ r, const ACC *__restrict__ logw, const IN *__restrict__ k,
    const IN *__restrict__ v, const IN *__restrict__ a, const IN *__restrict__ b, const ACC *__restrict__ ckpt,
    const IN *__restrict__ gy, const ACC *__restrict__ gsT, IN *__restrict__ gr, ACC *__restrict__ glogw,
    IN *__restrict__ gk, IN *__restrict__ gv, IN *__restrict__ ga, IN *__restrict__ gb, ACC *__restrict__ gs0,
    ACC *__restrict__ scratch) {
    using C = Cvt<IN, ACC>;
    constexpr int NN = N * N;
    const int64_t bh = blockIdx.x, bb = bh / H, h = bh % H, nseg = (T + SEG - 1) / SEG;
    const int i = threadIdx.x;
    ACC *seg = scratch + bh * scratch_per_head(N), *sa_seg = seg + (SEG + 1) * NN;
    __shared__ ACC r_[N], w_[N], k_[N], a_[N], b_[N], v_[N], gy_[N], sa_[N], gsa_[N];
    ACC s[N];

    // one token of the forward on row i, the shared vectors staged first; returns sa_i
    auto forward_row = [&](int64_t t) {
        const int64_t o = ((bb * T + t) * H + h) * N + i;
        __syncthreads();
        w_[i] = exp_acc(logw[o]);
        k_[i] = C::load(k[o]);
        a_[i] = C::load(a[o]);
        b_[i] = C::load(b[o]);
        const ACC vi = C::load(v[o]);
        __syncthreads();
        ACC sa = 0;
#pragma unroll
        for (int j = 0; j < N; j++) sa += s[j] * a_[j];
#pragma unroll
        for (int j = 0; j < N; j++) s[j] = wkv7_state(s[j], w_[j], sa, b_[j], vi, k_[j]);
        return sa;
    };

    ACC dr[N], dc[N];  // row i and column i of dL/dS
#pragma unroll
    for (int j = 0; j < N; j++) {
        dr[j] = gsT[bh * NN + i * N + j];
        dc[j] = gsT[bh * NN + j * N + i];
    }
    for (int64_t sg = nseg - 1; sg >= 0; sg--) {
        const int64_t t0 = sg * SEG, t1 = t0 + SEG < T ? t0 + SEG : T;
        __syncthreads();  // every thread is done reading the previous segment's states
#pragma unroll
        for (int j = 0; j < N; j++) seg[i * N + j] = s[j] = ckpt[(bh * nseg + sg) * NN + i * N + j];
        for (int64_t t = t0; t < t1; t++) {  // seg[m] = the state before token t0 + m
            const int64_t m = t - t0;
            sa_seg[m * N + i] = forward_row(t);
#pragma unroll
            for (int j = 0; j < N; j++) seg[(m + 1) * NN + i * N + j] = s[j];
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t m = t - t0, o = ((bb * T + t) * H + h) * N + i;
            __syncthreads();  // the segment's states are written; the previous token's readers are done
            r_[i] = C::load(r[o]);
            w_[i] = exp_acc(logw[o]);
            k_[i] = C::load(k[o]);
            a_[i] = C::load(a[o]);
            b_[i] = C::load(b[o]);
            v_[i] = C::load(v[o]);
            gy_[i] = C::load(gy[o]);
            sa_[i] = sa_seg[m * N + i];
            __syncthreads();
            const ACC gyi = gy_[i];
            ACC gvi = 0, gsai = 0;
#pragma unroll
            for (int j = 0; j < N; j++) {  // row i: the sums over keys
                dr[j] = wkv7_dstate_y(dr[j], gyi, r_[j]);
                gvi += dr[j] * k_[j];
                gsai += dr[j] * b_[j];
            }
            gsa_[i] = gsai;
            __syncthreads();
            const ACC *Sp = seg + m * NN, *St = Sp + NN;
            const ACC ri = r_[i], wi = w_[i], ai = a_[i];
            ACC gri = 0, gwi = 0, gki = 0, gbi = 0, gai = 0;
#pragma unroll
            for (int j = 0; j < N; j++) {  // column i: the sums over values
                const ACC sp = Sp[j * N + i];
                gri += St[j * N + i] * gy_[j];
                const ACC d = wkv7_dstate_y(dc[j], gy_[j], ri);
                gwi += d * sp;
                gki += d * v_[j];
                gbi += d * sa_[j];
                gai += gsa_[j] * sp;
                dc[j] = wkv7_dstate_prev(d, wi, gsa_[j], ai);
            }
#pragma unroll
            for (int j = 0; j < N; j++) dr[j] = wkv7_dstate_prev(dr[j], w_[j], gsai, a_[j]);
            gv[o] = C::store(gvi);
            gr[o] = C::store(gri);
            glogw[o] = gwi * wi;
            gk[o] = C::store(gki);
            gb[o] = C::store(gbi);
            ga[o] = C::store(gai);
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) gs0[(bh * N + i) * N + j] = dr[j];
}

const char *unsupported() { return "wkv7: the CUDA kernel is compiled for head sizes 8, 16, 32, 64"; }

template <int N, typename D, typename ACC>
const char *launch_forward(int64_t B, int64_t T, int64_t H, const D *r, const ACC *logw, const D *k, const D *v,
                           const D *a, const D *b, const ACC *s0, D *y, ACC *sT, ACC *ckpt, cudaStream_t stream) {
    KERNEL_LAUNCH((forward_kernel<N, D, ACC>), B * H, N, stream)(T, H, r, logw, k, v, a, b, s0, y, sT, ckpt);
    return last_error();
}

template <int N, typename D, typename ACC>
const char *launch_backward(int64_t B, int64_t T, int64_t H, const D *r, const ACC *logw, const D *k, const D *v,
                            const D *a, const D *b, const ACC *ckpt, const D *gy, const ACC *gsT, D *gr, ACC *glogw,
                            D *gk, D *gv, D *ga, D *gb, ACC *gs0, ACC *scratch, cudaStream_t stream) {
    KERNEL_LAUNCH((backward_kernel<N, D, ACC>), B * H, N, stream)(T, H, r, logw, k, v, a, b, ckpt, gy, gsT, gr, glogw,
                                                                  gk, gv, ga, gb, gs0, scratch);
    return last_error();
}
}  // namespace

// the head sizes with a compiled kernel: X(8) X(16) ...
#define WKV7_HEAD_SIZES(X) X(8) X(16) X(32) X(64)

bool wkv7_cuda_head_size(int64_t N) {
#define WKV7_IS(NH) N == NH ||
    return WKV7_HEAD_SIZES(WKV7_IS) false;
#undef WKV7_IS
}

int64_t wkv7_scratch_size(int64_t B, int64_t H, int64_t N) {
    return B * H * scratch_per_head(N);
}

template <typename IN, typename ACC>
const char *wkv7_forward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                              const IN *k, const IN *v, const IN *a, const IN *b, const ACC *s0, IN *y, ACC *sT,
                              ACC *ckpt, void *stream) {
    using D = typename Dev<IN>::type;
    const auto d = [](const IN *p) { return reinterpret_cast<const D *>(p); };
    switch (N) {
#define WKV7_CASE(NH)                                                                                              \
    case NH:                                                                                                       \
        return launch_forward<NH, D, ACC>(B, T, H, d(r), logw, d(k), d(v), d(a), d(b), s0,                          \
                                          reinterpret_cast<D *>(y), sT, ckpt, static_cast<cudaStream_t>(stream));
        WKV7_HEAD_SIZES(WKV7_CASE)
#undef WKV7_CASE
        default: return unsupported();
    }
}

template <typename IN, typename ACC>
const char *wkv7_backward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                               const IN *k, const IN *v, const IN *a, const IN *b, const ACC *ckpt, const IN *gy,
                               const ACC *gsT, IN *gr, ACC *glogw, IN *gk, IN *gv, IN *ga, IN *gb, ACC *gs0,
                               ACC *scratch, void *stream) {
    using D = typename Dev<IN>::type;
    const auto d = [](const IN *p) { return reinterpret_cast<const D *>(p); };
    const auto m = [](IN *p) { return reinterpret_cast<D *>(p); };
    switch (N) {
#define WKV7_CASE(NH)                                                                                              \
    case NH:                                                                                                       \
        return launch_backward<NH, D, ACC>(B, T, H, d(r), logw, d(k), d(v), d(a), d(b), ckpt, d(gy), gsT, m(gr),      \
                                           glogw, m(gk), m(gv), m(ga), m(gb), gs0, scratch,                         \
                                           static_cast<cudaStream_t>(stream));
        WKV7_HEAD_SIZES(WKV7_CASE)
#undef WKV7_CASE
        default: return unsupported();
    }
}

#define WKV7_INSTANTIATE(IN, ACC)                                                                                   \
    template const char *wkv7_forward_cuda<IN, ACC>(int64_t, int64_t, int64_t, int64_t, const IN *, const ACC *,   \
                                                    const IN *, const IN *, const IN *, const IN *, const ACC *,   \
                                                    IN *, ACC *, ACC *, void *);                                          \
    template const char *wkv7_backward_cuda<IN, ACC>(int64_t, int64_t, int64_t, int64_t, const IN *, const ACC *,  \
                                                     const IN *, const IN *, const IN *, const IN *, const ACC *,  \
                                                     const IN *, const ACC *, IN *, ACC *, IN *, IN *, IN *, IN *, \
                                                     ACC *, ACC *, void *);
WKV7_INSTANTIATE(float, float)
WKV7_INSTANTIATE(double, double)
WKV7_INSTANTIATE(uint16_t, float)
