// The WKV recurrence of RWKV-5 and RWKV-6 for one head, element by element, shared by the CPU kernel
// (wkv5_cpu.cpp) and the CUDA kernels (wkv5_cuda.cu), so the code CI runs on the CPU is the code a GPU runs.
//
// Per token t, with the state S (N x N, [key i, value j]) of wkv_cuda/wkv5.py (RWKV-LM RWKV-v5/cuda/wkv5_cuda.cu and
// RWKV-v6's wkv6_cuda.cu; the rwkv pip package's (H, K, V) layout), w = exp(logw) (per token in RWKV-6) and the
// bonus u of the current token:
//     y_j      = sum_i r_i S_{t-1}[i, j] + v_j ruk,     ruk = sum_i r_i u_i k_i
//     S_t[i,j] = w_i S_{t-1}[i, j] + k_i v_j
// Backward, with D = dL/dS_t (from token t+1, or the gradient of the outgoing state at t = T-1) and gyv = gy . v:
//     gr_i = sum_j gy_j S_{t-1}[i, j] + u_i k_i gyv        gk_i = sum_j D[i, j] v_j + r_i u_i gyv
//     gv_j = sum_i D[i, j] k_i + gy_j ruk                   gu_i = sum over t of r_i k_i gyv
//     gw_i = sum_j D[i, j] S_{t-1}[i, j]  (g logw_i = gw_i w_i)
//     dL/dS_{t-1}[i,j] = w_i D[i, j] + r_i gy_j
// Row i of S and of D evolves on its own (w_i, k_i, r_i are scalars for it), so both kernels walk rows; the sums
// over i (y, gv) run down columns: the CPU kernel accumulates them in N-vectors, a CUDA thread also owns a column.
// Accumulation is fp32 (fp64 for fp64 inputs).
#pragma once

#ifdef __CUDACC__
#define WKV5_HD __host__ __device__ __forceinline__
#else
#define WKV5_HD inline
#endif

// the state update of one element: S[i, j] <- w_i S[i, j] + k_i v_j
template <typename F>
WKV5_HD F wkv5_state(F s, F w, F k, F v) { return w * s + k * v; }

// dL/dS_{t-1}[i, j] from D[i, j]: through the decay and through y_t's read of S_{t-1}
template <typename F>
WKV5_HD F wkv5_dstate_prev(F d, F w, F r, F gy) { return w * d + r * gy; }
