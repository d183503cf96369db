// Raw-pointer entry points of the WKV kernels, shared by the binding (wkv_op.cpp), the CPU kernel (wkv_cpu.cpp)
// and the CUDA kernels (wkv_cuda.cu). No torch types here, so the .cu compiles without torch headers.
//
// Layout: k, v, y, gy, gk, gv are (B, T, C) contiguous; w, u are (C,); the state aa, bb, pp and its gradients are
// (B, C); gw, gu are per batch row, (B, C), and the caller sums them over B. w is the per-step log-decay
// -exp(time_decay). scratch (CUDA backward only) receives the recomputed state before every token: 3 * B * T * C
// accumulator values.
// IN is the element type of k, v, y and their gradients; ACC the type of everything else and of all arithmetic.
#pragma once
#include <cstdint>

template <typename F>
void wkv_forward_cpu(int64_t B, int64_t T, int64_t C, const F *w, const F *u, const F *k, const F *v,
                     const F *aa, const F *bb, const F *pp, F *y, F *aa_out, F *bb_out, F *pp_out);

template <typename F>
void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const F *w, const F *u, const F *k, const F *v,
                      const F *aa, const F *bb, const F *pp, const F *gy, const F *gaa_out, const F *gbb_out,
                      F *gw, F *gu, F *gk, F *gv, F *gaa, F *gbb, F *gpp);

// CUDA launchers; IN is float, double, or uint16_t standing for the bits of a bfloat16. They return nullptr, or
// the CUDA error string of a failed launch.
template <typename IN, typename ACC>
const char *wkv_forward_cuda(int64_t B, int64_t T, int64_t C, const ACC *w, const ACC *u, const IN *k,
                             const IN *v, const ACC *aa, const ACC *bb, const ACC *pp, IN *y, ACC *aa_out,
                             ACC *bb_out, ACC *pp_out, void *stream);

template <typename IN, typename ACC>
const char *wkv_backward_cuda(int64_t B, int64_t T, int64_t C, const ACC *w, const ACC *u, const IN *k,
                              const IN *v, const ACC *aa, const ACC *bb, const ACC *pp, const IN *gy,
                              const ACC *gaa_out, const ACC *gbb_out, ACC *gw, ACC *gu, IN *gk, IN *gv, ACC *gaa,
                              ACC *gbb, ACC *gpp, ACC *scratch, void *stream);
