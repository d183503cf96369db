// Raw-pointer entry points of the RWKV-7 WKV kernels, shared by the binding (wkv7_op.cpp), the CPU kernel
// (wkv7_cpu.cpp) and the CUDA kernels (wkv7_cuda.cu). No torch types here, so the .cu compiles without torch headers.
//
// Layout: r, logw, k, v, a, b, y and their gradients are (B, T, H, N) contiguous; the state s0 (in), sT (out) and
// their gradients are (B, H, N, N) [value, key]. logw, the state and all arithmetic are ACC (float, or double for
// double inputs); IN is the element type of r, k, v, a, b, y and their gradients: float, double, or (CUDA only)
// uint16_t standing for the bits of a bfloat16. The backward recomputes the states from s0 (nothing but the inputs is
// kept between forward and backward) and returns g logw, the gradient of the log-decay.
#pragma once
#include <cstdint>

template <typename F>
void wkv7_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                      const F *v, const F *a, const F *b, const F *s0, F *y, F *sT);

template <typename F>
void wkv7_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                       const F *v, const F *a, const F *b, const F *s0, const F *gy, const F *gsT, F *gr,
                       F *glogw, F *gk, F *gv, F *ga, F *gb, F *gs0);

// CUDA launchers: one block of N threads per (batch row, head). They return nullptr, or an error string (a failed
// launch, or a head size without a compiled kernel). scratch holds wkv7_scratch_size(B, T, H, N) ACC values.
bool wkv7_cuda_head_size(int64_t N);
int64_t wkv7_scratch_size(int64_t B, int64_t T, int64_t H, int64_t N);

template <typename IN, typename ACC>
const char *wkv7_forward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                              const IN *k, const IN *v, const IN *a, const IN *b, const ACC *s0, IN *y, ACC *sT,
                              void *stream);

template <typename IN, typename ACC>
const char *wkv7_backward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                               const IN *k, const IN *v, const IN *a, const IN *b, const ACC *s0, const IN *gy,
                               const ACC *gsT, IN *gr, ACC *glogw, IN *gk, IN *gv, IN *ga, IN *gb, ACC *gs0,
                               ACC *scratch, void *stream);
