// The WKV recurrence of RWKV-7 (the generalized delta rule) for one head, element by element, shared by the CPU
// kernel (wkv7_cpu.cpp) and the CUDA kernels (wkv7_cuda.cu), so the code CI runs on the CPU is the code a GPU runs.
//
// Per token t, with the state S (N x N, [value i, key j]) of wkv_cuda/wkv7.py (RWKV-LM RWKV-v7/train_temp/cuda/
// wkv7_cuda.cu; the rwkv pip package's (H, V, K) layout) and w = exp(logw):
//     sa_i     = sum_j S_{t-1}[i, j] a_j                       (what the state returns along a)
//     S_t[i,j] = S_{t-1}[i, j] w_j + sa_i b_j + v_i k_j
//     y_i      = sum_j S_t[i, j] r_j
// Backward, with D = dL/dS_t (arriving from token t+1, or the gradient of the outgoing state at t = T-1):
//     D[i,j]  += gy_i r_j                                       (y_t reads S_t)
//     gr_j     = sum_i S_t[i, j] gy_i
//     gv_i     = sum_j D[i, j] k_j          gk_j = sum_i D[i, j] v_i
//     gsa_i    = sum_j D[i, j] b_j          gb_j = sum_i D[i, j] sa_i
//     gw_j     = sum_i D[i, j] S_{t-1}[i, j]   (g logw_j = gw_j w_j)
//     ga_j     = sum_i gsa_i S_{t-1}[i, j]
//     dL/dS_{t-1}[i,j] = D[i, j] w_j + gsa_i a_j
// The sums over i run down a column, those over j along a row: the CPU kernel walks rows and accumulates the
// column sums in vectors; a CUDA thread owns one row and one column of D (RWKV-LM's kernel keeps both as well), so
// no sum crosses threads except through shared memory. Both call the element functions below.
// Accumulation is fp32 (fp64 for fp64 inputs): the state is a sum over the whole history.
#pragma once

#ifdef __CUDACC__
#define WKV7_HD __host__ __device__ __forceinline__
#else
#define WKV7_HD inline
#endif

// the state update of one element: S[i, j] <- S[i, j] w_j + sa_i b_j + v_i k_j
template <typename F>
WKV7_HD F wkv7_state(F s, F w, F sa, F b, F v, F k) { return s * w + sa * b + v * k; }

// D[i, j] after y_t's read of S_t is added: D + gy_i r_j
template <typename F>
WKV7_HD F wkv7_dstate_y(F d, F gy, F r) { return d + gy * r; }

// dL/dS_{t-1}[i, j] from D[i, j]: through the decay and through sa (the only two ways S_{t-1} reaches S_t)
template <typename F>
WKV7_HD F wkv7_dstate_prev(F d, F w, F gsa, F a) { return d * w + gsa * a; }
