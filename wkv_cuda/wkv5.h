// Raw-pointer entry points of the RWKV-5/6 WKV kernels, shared by the binding (wkv5_op.cpp), the CPU kernel
// (wkv5_cpu.cpp) and the CUDA kernels (wkv5_cuda.cu). No torch types here, so the .cu compiles without torch headers.
//
// Layout: r, k, v, logw, y and their gradients are (B, T, H, N) contiguous (logw per token: RWKV-5's constant decay
// arrives expanded); u is (H, N) and gu (B, H, N), per batch row, summed by the caller; the state s0 (in), sT (out)
// and their gradients are (B, H, N, N) [key, value]. logw, u, the state and all arithmetic are ACC (float, or double
// for double inputs); IN is the element type of r, k, v, y and their gradients: float, double, or (CUDA only)
// uint16_t standing for the bits of a bfloat16. The forward keeps the state at the start of every WKV5_SEG tokens in
// ckpt, (B, H, wkv5_segments(T), N, N) (nullptr when no backward follows); the backward recomputes the states between
// checkpoints from them.
#pragma once
#include <cstdint>

#define WKV5_SEG 16
inline int64_t wkv5_segments(int64_t T) { return (T + WKV5_SEG - 1) / WKV5_SEG; }

template <typename F>
void wkv5_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *k, const F *v,
                      const F *logw, const F *u, const F *s0, F *y, F *sT, F *ckpt);

template <typename F>
void wkv5_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *k, const F *v,
                       const F *logw, const F *u, const F *ckpt, const F *gy, const F *gsT, F *gr, F *gk, F *gv,
                       F *glogw, F *gu, F *gs0);

// CUDA launchers: one block of N threads per (batch row, head). They return nullptr, or an error string (a failed
// launch, or a head size without a compiled kernel). scratch holds wkv5_scratch_size(B, H, N) ACC values.
bool wkv5_cuda_head_size(int64_t N);
int64_t wkv5_scratch_size(int64_t B, int64_t H, int64_t N);

template <typename IN, typename ACC>
const char *wkv5_forward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const IN *k, const IN *v,
                              const ACC *logw, const ACC *u, const ACC *s0, IN *y, ACC *sT, ACC *ckpt, void *stream);

template <typename IN, typename ACC>
const char *wkv5_backward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const IN *k, const IN *v,
                               const ACC *logw, const ACC *u, const ACC *ckpt, const IN *gy, const ACC *gsT, IN *gr,
                               IN *gk, IN *gv, ACC *glogw, ACC *gu, ACC *gs0, ACC *scratch, void *stream);
