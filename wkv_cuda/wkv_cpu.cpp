// WKV kernels on the CPU. Parallel over (batch row, block of channels) with at::parallel_for; inside a block the
// time loop is outermost and the channel loop innermost, over contiguous memory, so the compiler vectorises the
// recurrence across channels (SIMD exp from glibc's libmvec under -O3 -ffast-math). Accumulation in the input type
// (float or double; bf16 is converted to float by the caller), exactly the math of wkv_math.h.
// The backward first recomputes the state before every token into scratch (3 x B x T x C), then walks back in time:
// no limit on T, and nothing but the inputs kept between forward and backward.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "wkv.h"
#include "wkv_math.h"

namespace {
constexpr int64_t CB = 64;  // channels per block: the state of a block lives in registers / L1

template <typename F, typename Body>
void for_blocks(int64_t B, int64_t C, Body body) {
    const int64_t nblk = (C + CB - 1) / CB;
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t b = i / nblk, c0 = (i % nblk) * CB;
            body(b, c0, std::min(CB, C - c0));
        }
    });
}
}  // namespace

template <typename F>
void wkv_forward_cpu(int64_t B, int64_t T, int64_t C, const F *w, const F *u, const F *k, const F *v,
                     const F *aa_in, const F *bb_in, const F *pp_in, F *y, F *aa_out, F *bb_out, F *pp_out) {
    for_blocks<F>(B, C, [&](int64_t b, int64_t c0, int64_t n) {
        F aa[CB], bb[CB], pp[CB];
        const int64_t s = b * C + c0;
        for (int64_t j = 0; j < n; j++) { aa[j] = aa_in[s + j]; bb[j] = bb_in[s + j]; pp[j] = pp_in[s + j]; }
        for (int64_t t = 0; t < T; t++) {
            const int64_t o = (b * T + t) * C + c0;
            for (int64_t j = 0; j < n; j++)
                y[o + j] = wkv_forward_step(w[c0 + j], u[c0 + j], k[o + j], v[o + j], aa[j], bb[j], pp[j]);
        }
        for (int64_t j = 0; j < n; j++) { aa_out[s + j] = aa[j]; bb_out[s + j] = bb[j]; pp_out[s + j] = pp[j]; }
    });
}

template <typename F>
void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const F *w, const F *u, const F *k, const F *v,
                      const F *aa_in, const F *bb_in, const F *pp_in, const F *gy, const F *gaa_out,
                      const F *gbb_out, F *gw_out, F *gu_out, F *gk, F *gv, F *gaa_in, F *gbb_in, F *gpp_in,
                      F *scratch) {
    const int64_t BTC = B * T * C;
    F *saa = scratch, *sbb = scratch + BTC, *spp = scratch + 2 * BTC;
    for_blocks<F>(B, C, [&](int64_t b, int64_t c0, int64_t n) {
        F aa[CB], bb[CB], pp[CB], gaa[CB], gbb[CB], gw[CB], gu[CB];
        const int64_t s = b * C + c0;
        for (int64_t j = 0; j < n; j++) { aa[j] = aa_in[s + j]; bb[j] = bb_in[s + j]; pp[j] = pp_in[s + j]; }
        for (int64_t t = 0; t < T; t++) {  // recompute the state before each token
            const int64_t o = (b * T + t) * C + c0;
            for (int64_t j = 0; j < n; j++) {
                saa[o + j] = aa[j]; sbb[o + j] = bb[j]; spp[o + j] = pp[j];
                wkv_state_step(w[c0 + j], k[o + j], v[o + j], aa[j], bb[j], pp[j]);
            }
        }
        for (int64_t j = 0; j < n; j++) { gaa[j] = gaa_out[s + j]; gbb[j] = gbb_out[s + j]; gw[j] = 0; gu[j] = 0; }
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t o = (b * T + t) * C + c0;
            for (int64_t j = 0; j < n; j++)
                wkv_backward_step(w[c0 + j], u[c0 + j], k[o + j], v[o + j], saa[o + j], sbb[o + j], spp[o + j],
                                  gy[o + j], gaa[j], gbb[j], gw[j], gu[j], gk[o + j], gv[o + j]);
        }
        for (int64_t j = 0; j < n; j++) {
            gw_out[s + j] = gw[j];
            gu_out[s + j] = gu[j];
            gaa_in[s + j] = gaa[j];
            gbb_in[s + j] = gbb[j];
            gpp_in[s + j] = gaa[j] * aa_in[s + j] + gbb[j] * bb_in[s + j];  // pp only shifts: see __init__.py
        }
    });
}

template void wkv_forward_cpu<float>(int64_t, int64_t, int64_t, const float *, const float *, const float *,
                                     const float *, const float *, const float *, const float *, float *, float *,
                                     float *, float *);
template void wkv_forward_cpu<double>(int64_t, int64_t, int64_t, const double *, const double *, const double *,
                                      const double *, const double *, const double *, const double *, double *,
                                      double *, double *, double *);
template void wkv_backward_cpu<float>(int64_t, int64_t, int64_t, const float *, const float *, const float *,
                                      const float *, const float *, const float *, const float *, const float *,
                                      const float *, const float *, float *, float *, float *, float *, float *,
                                      float *, float *, float *);
template void wkv_backward_cpu<double>(int64_t, int64_t, int64_t, const double *, const double *, const double *,
                                       const double *, const double *, const double *, const double *,
                                       const double *, const double *, const double *, double *, double *, double *,
                                       double *, double *, double *, double *, double *);
