// RWKV-5/6 WKV kernels on CUDA: one block of N threads per (batch row, head). In the forward thread j keeps column j
// of the N x N state (its value channel) in registers and the token's key-indexed vectors (r, w, k, u k) are staged
// in shared memory, as in RWKV-LM's RWKV-v5/cuda/wkv5_cuda.cu and RWKV-v6's wkv6_cuda.cu. The math is wkv5_math.h's.
// Inputs may be bfloat16; logw, u, the state and all arithmetic are fp32 (fp64 for fp64 inputs); the incoming state
// and the gradients of both states are part of the op, so segmented training gets exact gradients.
// Backward: the forward writes the state at the start of every SEG tokens to a checkpoint buffer; the backward, one
// segment at a time from the end, has thread i recompute row i of the segment's states from its checkpoint (a row
// evolves on its own) into a scratch buffer, then walk back: thread i owns row i of dL/dS (gr, gk, gw are row sums)
// and column i (gv is a column sum), as RWKV-LM's backward keeps both. No sums across threads except through shared
// memory. Any T; head sizes 8, 16, 32 and 64 (compiled per size). No torch headers.
#include <cstdint>

#include "cuda_common.cuh"
#include "wkv5.h"
#include "wkv5_math.h"

namespace {
using namespace wkv_device;

constexpr int SEG = WKV5_SEG;

// per head: the SEG + 1 states of the segment being walked back
__host__ __device__ int64_t scratch_per_head(int64_t N) { return (SEG + 1) * N * N; }

template <int N, typename IN, typename ACC>
__global__ void __launch_bounds__(N, 1) forward_kernel(int64_t T, int64_t H, const IN *__restrict__ r,
                                                    const IN *__restrict__ k, const IN *__restrict__ v,
                                                    const ACC *__restrict__ logw, const ACC *__restrict__ u,
                                                    const ACC *__restrict__ s0, IN *__restrict__ y,
                                                    ACC *__restrict__ sT, ACC *__restrict__ ckpt) {
    using C = Cvt<IN, ACC>;
    constexpr int NN = N * N;
    const int64_t bh = blockIdx.x, bb = bh / H, h = bh % H, nseg = (T + SEG - 1) / SEG;
    const int j = threadIdx.x;
    __shared__ ACC r_[N], w_[N], k_[N], uk_[N];
    ACC s[N];  // column j of the state
#pragma unroll
    for (int i = 0; i < N; i++) s[i] = s0[bh * NN + i * N + j];
    const ACC uj = u[h * N + j];
    for (int64_t t = 0; t < T; t++) {
        const int64_t o = ((bb * T + t) * H + h) * N + j;
        if (ckpt && t % SEG == 0) {
#pragma unroll
            for (int i = 0; i < N; i++) ckpt[(bh * nseg + t / SEG) * NN + i * N + j] = s[i];
        }
        __syncthreads();  // the previous token's readers are done with the shared vectors
        r_[j] = C::load(r[o]);
        k_[j] = C::load(k[o]);
        w_[j] = exp_acc(logw[o]);
        uk_[j] = uj * k_[j];
        const ACC vj = C::load(v[o]);
        __syncthreads();
        ACC yj = 0, ruk = 0;
#pragma unroll
        for (int i = 0; i < N; i++) {
            yj += r_[i] * s[i];
            ruk += r_[i] * uk_[i];
            s[i] = wkv5_state(s[i], w_[i], k_[i], vj);
        }
        y[o] = C::store(yj + vj * ruk);
    }
#pragma unroll
    for (int i = 0; i < N; i++) sT[bh * NN + i * N + j] = s[i];
}

template <int N, typename IN, typename ACC>
__global__ void __launch_bounds__(N, 1) backward_kernel(
    int64_t T, int64_t H, const IN *__restrict__ r, const IN *__restrict__ k, const IN *__restrict__ v,
    const ACC *__restrict__ logw, const ACC *__restrict__ u, const ACC *__restrict__ ckpt, const IN *__restrict__ gy,
    const ACC *__restrict__ gsT, IN *__restrict__ gr, IN *__restrict__ gk, IN *__restrict__ gv,
    ACC *__restrict__ glogw, ACC *__restrict__ gu, ACC *__restrict__ gs0, ACC *__restrict__ scratch) {
    using C = Cvt<IN, ACC>;
    constexpr int NN = N * N;
    const int64_t bh = blockIdx.x, bb = bh / H, h = bh % H, nseg = (T + SEG - 1) / SEG;
    const int i = threadIdx.x;  // row i (key channel i) of dL/dS, and column i (value channel i)
    ACC *seg = scratch + bh * scratch_per_head(N);
    __shared__ ACC r_[N], k_[N], w_[N], uk_[N], v_[N], gy_[N];
    const ACC ui = u[h * N + i];
    ACC dr[N], dc[N], s[N], gui = 0;
#pragma unroll
    for (int j = 0; j < N; j++) {
        dr[j] = gsT[bh * NN + i * N + j];
        dc[j] = gsT[bh * NN + j * N + i];
    }
    for (int64_t sg = nseg - 1; sg >= 0; sg--) {
        const int64_t t0 = sg * SEG, t1 = t0 + SEG < T ? t0 + SEG : T;
        // row i of the segment's states; only thread i writes and reads it, so no barrier guards the scratch
#pragma unroll
        for (int j = 0; j < N; j++) seg[i * N + j] = s[j] = ckpt[(bh * nseg + sg) * NN + i * N + j];
        for (int64_t t = t0; t < t1; t++) {
            const int64_t o = ((bb * T + t) * H + h) * N;
            const ACC wi = exp_acc(logw[o + i]), ki = C::load(k[o + i]);
#pragma unroll
            for (int j = 0; j < N; j++) {
                s[j] = wkv5_state(s[j], wi, ki, C::load(v[o + j]));
                seg[(t - t0 + 1) * NN + i * N + j] = s[j];
            }
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t o = ((bb * T + t) * H + h) * N + i;
            __syncthreads();  // the previous token's readers are done with the shared vectors
            r_[i] = C::load(r[o]);
            k_[i] = C::load(k[o]);
            w_[i] = exp_acc(logw[o]);
            uk_[i] = ui * k_[i];
            v_[i] = C::load(v[o]);
            gy_[i] = C::load(gy[o]);
            __syncthreads();
            const ACC *Sp = seg + (t - t0) * NN + i * N;
            const ACC ri = r_[i], ki = k_[i], wi = w_[i], gyi = gy_[i];
            ACC gyv = 0, ruk = 0, gri = 0, gki = 0, gwi = 0, gvi = 0;
#pragma unroll
            for (int j = 0; j < N; j++) {
                const ACC sp = Sp[j];
                gyv += gy_[j] * v_[j];
                ruk += r_[j] * uk_[j];
                gri += gy_[j] * sp;  // row i: the sums over values
                gki += dr[j] * v_[j];
                gwi += dr[j] * sp;
                dr[j] = wkv5_dstate_prev(dr[j], wi, ri, gy_[j]);
                gvi += dc[j] * k_[j];  // column i: the sums over keys
                dc[j] = wkv5_dstate_prev(dc[j], w_[j], r_[j], gyi);
            }
            gr[o] = C::store(gri + ui * ki * gyv);
            gk[o] = C::store(gki + ri * ui * gyv);
            gv[o] = C::store(gvi + gyi * ruk);
            glogw[o] = gwi * wi;
            gui += ri * ki * gyv;
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) gs0[bh * NN + i * N + j] = dr[j];
    gu[bh * N + i] = gui;
}

const char *unsupported() { return "wkv5: the CUDA kernel is compiled for head sizes 8, 16, 32, 64"; }

template <int N, typename D, typename ACC>
const char *launch_forward(int64_t B, int64_t T, int64_t H, const D *r, const D *k, const D *v, const ACC *logw,
                           const ACC *u, const ACC *s0, D *y, ACC *sT, ACC *ckpt, cudaStream_t stream) {
    KERNEL_LAUNCH((forward_kernel<N, D, ACC>), B * H, N, stream)(T, H, r, k, v, logw, u, s0, y, sT, ckpt);
    return last_error();
}

template <int N, typename D, typename ACC>
const char *launch_backward(int64_t B, int64_t T, int64_t H, const D *r, const D *k, const D *v, const ACC *logw,
                            const ACC *u, const ACC *ckpt, const D *gy, const ACC *gsT, D *gr, D *gk, D *gv,
                            ACC *glogw, ACC *gu, ACC *gs0, ACC *scratch, cudaStream_t stream) {
    KERNEL_LAUNCH((backward_kernel<N, D, ACC>), B * H, N, stream)(T, H, r, k, v, logw, u, ckpt, gy, gsT, gr, gk, gv,
                                                                  glogw, gu, gs0, scratch);
    return last_error();
}
}  // namespace

// the head sizes with a compiled kernel: X(8) X(16) ...
#define WKV5_HEAD_SIZES(X) X(8) X(16) X(32) X(64)

bool wkv5_cuda_head_size(int64_t N) {
#define WKV5_IS(NH) N == NH ||
    return WKV5_HEAD_SIZES(WKV5_IS) false;
#undef WKV5_IS
}

int64_t wkv5_scratch_size(int64_t B, int64_t H, int64_t N) { return B * H * scratch_per_head(N); }

template <typename IN, typename ACC>
const char *wkv5_forward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const IN *k, const IN *v,
                              const ACC *logw, const ACC *u, const ACC *s0, IN *y, ACC *sT, ACC *ckpt, void *stream) {
    using D = typename Dev<IN>::type;
    const auto d = [](const IN *p) { return reinterpret_cast<const D *>(p); };
    switch (N) {
#define WKV5_CASE(NH)                                                                                              \
    case NH:                                                                                                       \
        return launch_forward<NH, D, ACC>(B, T, H, d(r), d(k), d(v), logw, u, s0, reinterpret_cast<D *>(y), sT,    \
                                          ckpt, static_cast<cudaStream_t>(stream));
        WKV5_HEAD_SIZES(WKV5_CASE)
#undef WKV5_CASE
        default: return unsupported();
    }
}

template <typename IN, typename ACC>
const char *wkv5_backward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const IN *k, const IN *v,
                               const ACC *logw, const ACC *u, const ACC *ckpt, const IN *gy, const ACC *gsT, IN *gr,
                               IN *gk, IN *gv, ACC *glogw, ACC *gu, ACC *gs0, ACC *scratch, void *stream) {
    using D = typename Dev<IN>::type;
    const auto d = [](const IN *p) { return reinterpret_cast<const D *>(p); };
    const auto m = [](IN *p) { return reinterpret_cast<D *>(p); };
    switch (N) {
#define WKV5_CASE(NH)                                                                                              \
    case NH:                                                                                                       \
        return launch_backward<NH, D, ACC>(B, T, H, d(r), d(k), d(v), logw, u, ckpt, d(gy), gsT, m(gr), m(gk),     \
                                           m(gv), glogw, gu, gs0, scratch, static_cast<cudaStream_t>(stream));
        WKV5_HEAD_SIZES(WKV5_CASE)
#undef WKV5_CASE
        default: return unsupported();
    }
}

#define WKV5_INSTANTIATE(IN, ACC)                                                                                   \
    template const char *wkv5_forward_cuda<IN, ACC>(int64_t, int64_t, int64_t, int64_t, const IN *, const IN *,    \
                                                    const IN *, const ACC *, const ACC *, const ACC *, IN *, ACC *, \
                                                    ACC *, void *);                                                \
    template const char *wkv5_backward_cuda<IN, ACC>(int64_t, int64_t, int64_t, int64_t, const IN *, const IN *,   \
                                                     const IN *, const ACC *, const ACC *, const ACC *, const IN *, \
                                                     const ACC *, IN *, IN *, IN *, ACC *, ACC *, ACC *, ACC *,     \
                                                     void *);
WKV5_INSTANTIATE(float, float)
WKV5_INSTANTIATE(double, double)
WKV5_INSTANTIATE(uint16_t, float)
