// WKV kernels on CUDA: one thread per (batch row, channel), walking the time axis with the recurrence of
// wkv_math.h. Reads and writes are coalesced: neighbouring threads are neighbouring channels, contiguous in memory.
// k, v (and y, gy, gk, gv) may be bfloat16; all arithmetic and the state are fp32 (fp64 for fp64 inputs), so bf16
// training cannot overflow or lose the sums to rounding (the source of RWKV-LM's bf16 NaN reports).
// No compile-time T_MAX: the backward recomputes the state before every token into a scratch buffer in global
// memory instead of a per-thread array, so any T runs with one build. No B * C % 32 requirement: threads past the
// end return. Deliberately no torch headers here, so this file compiles in seconds.
#include <cstdint>

#include "cuda_common.cuh"
#include "wkv.h"
#include "wkv_math.h"

namespace {
using namespace wkv_device;

constexpr int THREADS = 32;  // small blocks spread B * C threads over all SMs (RWKV-LM uses min(C, 32))

template <typename IN, typename ACC>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const ACC *__restrict__ w,
                               const ACC *__restrict__ u, const IN *__restrict__ k, const IN *__restrict__ v,
                               const ACC *__restrict__ aa_in, const ACC *__restrict__ bb_in,
                               const ACC *__restrict__ pp_in, IN *__restrict__ y, ACC *__restrict__ aa_out,
                               ACC *__restrict__ bb_out, ACC *__restrict__ pp_out) {
    const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int64_t b = idx / C, c = idx % C;
    const ACC ww = w[c], uu = u[c];
    ACC aa = aa_in[idx], bb = bb_in[idx], pp = pp_in[idx];
    const int64_t off = b * T * C + c;
    for (int64_t t = 0; t < T; t++) {
        const int64_t o = off + t * C;
        const ACC yt = wkv_forward_step(ww, uu, Cvt<IN, ACC>::load(k[o]), Cvt<IN, ACC>::load(v[o]), aa, bb, pp);
        y[o] = Cvt<IN, ACC>::store(yt);
    }
    aa_out[idx] = aa;
    bb_out[idx] = bb;
    pp_out[idx] = pp;
}

template <typename IN, typename ACC>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const ACC *__restrict__ w,
                                const ACC *__restrict__ u, const IN *__restrict__ k, const IN *__restrict__ v,
                                const ACC *__restrict__ aa_in, const ACC *__restrict__ bb_in,
                                const ACC *__restrict__ pp_in, const IN *__restrict__ gy,
                                const ACC *__restrict__ gaa_out, const ACC *__restrict__ gbb_out,
                                ACC *__restrict__ gw_out, ACC *__restrict__ gu_out, IN *__restrict__ gk,
                                IN *__restrict__ gv, ACC *__restrict__ gaa_in, ACC *__restrict__ gbb_in,
                                ACC *__restrict__ gpp_in, ACC *__restrict__ scratch) {
    const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int64_t b = idx / C, c = idx % C;
    const int64_t BTC = B * T * C;
    ACC *saa = scratch, *sbb = scratch + BTC, *spp = scratch + 2 * BTC;
    const ACC ww = w[c], uu = u[c];
    ACC aa = aa_in[idx], bb = bb_in[idx], pp = pp_in[idx];
    const int64_t off = b * T * C + c;
    for (int64_t t = 0; t < T; t++) {  // recompute the state before each token
        const int64_t o = off + t * C;
        saa[o] = aa;
        sbb[o] = bb;
        spp[o] = pp;
        wkv_state_step(ww, Cvt<IN, ACC>::load(k[o]), Cvt<IN, ACC>::load(v[o]), aa, bb, pp);
    }
    ACC gaa = gaa_out[idx], gbb = gbb_out[idx], gw = 0, gu = 0;
    for (int64_t t = T - 1; t >= 0; t--) {
        const int64_t o = off + t * C;
        ACC gkt, gvt;
        wkv_backward_step(ww, uu, Cvt<IN, ACC>::load(k[o]), Cvt<IN, ACC>::load(v[o]), saa[o], sbb[o], spp[o],
                          Cvt<IN, ACC>::load(gy[o]), gaa, gbb, gw, gu, gkt, gvt);
        gk[o] = Cvt<IN, ACC>::store(gkt);
        gv[o] = Cvt<IN, ACC>::store(gvt);
    }
    gw_out[idx] = gw;
    gu_out[idx] = gu;
    gaa_in[idx] = gaa;
    gbb_in[idx] = gbb;
    gpp_in[idx] = gaa * aa_in[idx] + gbb * bb_in[idx];  // pp only shifts the state: see __init__.py
}

int64_t blocks(int64_t B, int64_t C) { return (B * C + THREADS - 1) / THREADS; }
}  // namespace

template <typename IN, typename ACC>
const char *wkv_forward_cuda(int64_t B, int64_t T, int64_t C, const ACC *w, const ACC *u, const IN *k,
                             const IN *v, const ACC *aa, const ACC *bb, const ACC *pp, IN *y, ACC *aa_out,
                             ACC *bb_out, ACC *pp_out, void *stream) {
    using D = typename Dev<IN>::type;
    KERNEL_LAUNCH((forward_kernel<D, ACC>), blocks(B, C), THREADS, static_cast<cudaStream_t>(stream))(
        B, T, C, w, u, reinterpret_cast<const D *>(k), reinterpret_cast<const D *>(v), aa, bb, pp,
        reinterpret_cast<D *>(y), aa_out, bb_out, pp_out);
    return last_error();
}

template <typename IN, typename ACC>
const char *wkv_backward_cuda(int64_t B, int64_t T, int64_t C, const ACC *w, const ACC *u, const IN *k,
                              const IN *v, const ACC *aa, const ACC *bb, const ACC *pp, const IN *gy,
                              const ACC *gaa_out, const ACC *gbb_out, ACC *gw, ACC *gu, IN *gk, IN *gv, ACC *gaa,
                              ACC *gbb, ACC *gpp, ACC *scratch, void *stream) {
    using D = typename Dev<IN>::type;
    KERNEL_LAUNCH((backward_kernel<D, ACC>), blocks(B, C), THREADS, static_cast<cudaStream_t>(stream))(
        B, T, C, w, u, reinterpret_cast<const D *>(k), reinterpret_cast<const D *>(v), aa, bb, pp,
        reinterpret_cast<const D *>(gy), gaa_out, gbb_out, gw, gu, reinterpret_cast<D *>(gk),
        reinterpret_cast<D *>(gv), gaa, gbb, gpp, scratch);
    return last_error();
}

#define WKV_INSTANTIATE(IN, ACC)                                                                                  \
    template const char *wkv_forward_cuda<IN, ACC>(int64_t, int64_t, int64_t, const ACC *, const ACC *,          \
                                                   const IN *, const IN *, const ACC *, const ACC *, const ACC *, \
                                                   IN *, ACC *, ACC *, ACC *, void *);                            \
    template const char *wkv_backward_cuda<IN, ACC>(int64_t, int64_t, int64_t, const ACC *, const ACC *,         \
                                                    const IN *, const IN *, const ACC *, const ACC *,             \
                                                    const ACC *, const IN *, const ACC *, const ACC *, ACC *,     \
                                                    ACC *, IN *, IN *, ACC *, ACC *, ACC *, ACC *, void *);
WKV_INSTANTIATE(float, float)
WKV_INSTANTIATE(double, double)
WKV_INSTANTIATE(uint16_t, float)
