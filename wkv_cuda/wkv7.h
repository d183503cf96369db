// Raw-pointer entry points of the RWKV-7 WKV kernels, shared by the binding (wkv7_op.cpp), the CPU kernel
// (wkv7_cpu.cpp) and the CUDA kernels (wkv7_cuda.cu). No torch types here, so the .cu compiles without torch headers.
//
// Layout: r, logw, k, v, a, b, y and their gradients are (B, T, H, N) contiguous; the state s0 (in), sT (out) and
// their gradients are (B, H, N, N) [value, key]. logw, the state and all arithmetic are ACC (float, or double for
// double inputs); IN is the element type of r, k, v, a, b, y and their gradients: float, double, or (CUDA only)
// uint16_t standing for the bits of a bfloat16. The forward keeps the state at the start of every WKV7_SEG tokens in
// ckpt, (B, H, wkv7_segments(T), N, N) (pass nullptr when no backward follows); the backward recomputes the states
// between checkpoints from them and returns g logw, the gradient of the log-decay.
#pragma once
#include <cstdint>

#define WKV7_SEG 16
inline int64_t wkv7_segments(int64_t T) { return (T + WKV7_SEG - 1) / WKV7_SEG; }

template <typename F>
void wkv7_forward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                      const F *v, const F *a, const F *b, const F *s0, F *y, F *sT, F *ckpt);

template <typename F>
void wkv7_backward_cpu(int64_t B, int64_t T, int64_t H, int64_t N, const F *r, const F *logw, const F *k,
                       const F *v, const F *a, const F *b, const F *ckpt, const F *gy, const F *gsT, F *gr,
                       F *glogw, F *gk, F *gv, F *ga, F *gb, F *gs0);

// CUDA launchers: one block of N threads per (batch row, head). They return nullptr, or an error string (a failed
// launch, or a head size without a compiled kernel). scratch holds wkv7_scratch_size(B, H, N) ACC values.
bool wkv7_cuda_head_size(int64_t N);
int64_t wkv7_scratch_size(int64_t B, int64_t H, int64_t N);

template <typename IN, typename ACC>
const char *wkv7_forward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                              const IN *k, const IN *v, const IN *a, const IN *b, const ACC *s0, IN *y, ACC *sT,
                              ACC *ckpt, void *stream);

template <typename IN, typename ACC>
const char *wkv7_backward_cuda(int64_t B, int64_t T, int64_t H, int64_t N, const IN *r, const ACC *logw,
                               const IN *k, const IN *v, const IN *a, const IN *b, const ACC *ckpt, const IN *gy,
                               const ACC *gsT, IN *gr, ACC *glogw, IN *gk, IN *gv, IN *ga, IN *gb, ACC *gs0,
                               ACC *scratch, void *stream);
