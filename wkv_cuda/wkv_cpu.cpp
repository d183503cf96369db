// WKV kernels on the CPU. Parallel over (batch row, block of channels) with at::parallel_for; inside a block the
// time loop is outermost and the channel loop innermost, over contiguous memory, so the compiler vectorises the
// recurrence across channels (`omp simd`: the pointers never alias; exp() from glibc's libmvec under -ffast-math).
// Accumulation in the input type (float or double; the caller converts bf16 to float), the math of wkv_math.h.
// The backward runs the forward once more keeping the state every SEG tokens, then walks back in time one segment
// at a time, recomputing that segment's states from its checkpoint into a small L1-sized buffer: any T, no scratch
// in main memory, and nothing but the inputs kept between forward and backward.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "wkv.h"
#include "wkv_math.h"

namespace {
constexpr int64_t CB = 64;  // channels per block: the state of a block stays in L1
constexpr int64_t SEG = 32;  // backward: time steps recomputed at once from a checkpoint (SEG x 3 x CB in L1)

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
#pragma omp simd
            for (int64_t j = 0; j < n; j++)
                y[o + j] = wkv_forward_step(w[c0 + j], u[c0 + j], k[o + j], v[o + j], aa[j], bb[j], pp[j]);
        }
        for (int64_t j = 0; j < n; j++) { aa_out[s + j] = aa[j]; bb_out[s + j] = bb[j]; pp_out[s + j] = pp[j]; }
    });
}

template <typename F>
void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const F *w, const F *u, const F *k, const F *v,
                      const F *aa_in, const F *bb_in, const F *pp_in, const F *gy, const F *gaa_out,
                      const F *gbb_out, F *gw_out, F *gu_out, F *gk, F *gv, F *gaa_in, F *gbb_in, F *gpp_in) {
    const int64_t nseg = (T + SEG - 1) / SEG;
    for_blocks<F>(B, C, [&](int64_t b, int64_t c0, int64_t n) {
        std::vector<F> ckpt(nseg * 3 * CB);  // the state at the start of every segment
        F seg[SEG][3][CB];  // the state before each token of the segment being walked back
        F aa[CB], bb[CB], pp[CB], gaa[CB], gbb[CB], gw[CB], gu[CB];
        const int64_t s = b * C + c0;
        for (int64_t j = 0; j < n; j++) { aa[j] = aa_in[s + j]; bb[j] = bb_in[s + j]; pp[j] = pp_in[s + j]; }
        for (int64_t t = 0; t < T; t++) {
            if (t % SEG == 0) {
                F *ck = &ckpt[(t / SEG) * 3 * CB];
                for (int64_t j = 0; j < n; j++) { ck[j] = aa[j]; ck[CB + j] = bb[j]; ck[2 * CB + j] = pp[j]; }
            }
            const int64_t o = (b * T + t) * C + c0;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) wkv_state_step(w[c0 + j], k[o + j], v[o + j], aa[j], bb[j], pp[j]);
        }
        for (int64_t j = 0; j < n; j++) { gaa[j] = gaa_out[s + j]; gbb[j] = gbb_out[s + j]; gw[j] = 0; gu[j] = 0; }
        for (int64_t i = nseg - 1; i >= 0; i--) {
            const int64_t t0 = i * SEG, t1 = std::min(T, t0 + SEG);
            const F *ck = &ckpt[i * 3 * CB];
            for (int64_t j = 0; j < n; j++) { aa[j] = ck[j]; bb[j] = ck[CB + j]; pp[j] = ck[2 * CB + j]; }
            for (int64_t t = t0; t < t1; t++) {  // recompute the segment's states from its checkpoint
                const int64_t o = (b * T + t) * C + c0;
                F(&st)[3][CB] = seg[t - t0];
#pragma omp simd
                for (int64_t j = 0; j < n; j++) {
                    st[0][j] = aa[j]; st[1][j] = bb[j]; st[2][j] = pp[j];
                    wkv_state_step(w[c0 + j], k[o + j], v[o + j], aa[j], bb[j], pp[j]);
                }
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {
                const int64_t o = (b * T + t) * C + c0;
                const F(&st)[3][CB] = seg[t - t0];
#pragma omp simd
                for (int64_t j = 0; j < n; j++)
                    wkv_backward_step(w[c0 + j], u[c0 + j], k[o + j], v[o + j], st[0][j], st[1][j], st[2][j],
                                      gy[o + j], gaa[j], gbb[j], gw[j], gu[j], gk[o + j], gv[o + j]);
            }
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
                                      float *, float *);
template void wkv_backward_cpu<double>(int64_t, int64_t, int64_t, const double *, const double *, const double *,
                                       const double *, const double *, const double *, const double *,
                                       const double *, const double *, const double *, double *, double *, double *,
                                       double *, double *, double *, double *);
