// Raw-pointer entry of the quantized matrix-vector kernels (qlinear_cpu.cpp), called by the binding (wkv_op.cpp).
// No torch types here.
//
// y (B, O) = x (B, I) @ W^T for a weight matrix W (O, I) stored in one of the block formats of quantize.py:
//   fmt 0 int8: q int8 (O, I), d (O, 1)             W = q * d                 (one scale per row)
//   fmt 1 q8_0: q int8 (O, I), d (O, I/32)          W = q * d                 (ggml block_q8_0)
//   fmt 2 q4_0: q uint8 (O, I/2), d (O, I/32)       W = (nibble - 8) * d      (ggml block_q4_0)
//   fmt 3 q5_1: q uint8 (O, I/2), qh int32 (O, I/32), d, m (O, I/32)
//                                                   W = (nibble + 16 * bit) * d + m   (ggml block_q5_1)
//   fmt 4 int4: q uint8 (O, I/2), d, m (O, I/32)    W = nibble * d + m        (group-32 asymmetric)
// The 4-bit formats pack a block of 32 as ggml does: byte j holds element j (low nibble) and element j + 16 (high
// nibble); q5_1's fifth bit of element j is bit j of qh. d and m are float32 (ggml's fp16 values, converted exactly).
// I must be a multiple of 32.
#pragma once
#include <cstdint>

void qlinear_cpu(int fmt, int64_t B, int64_t O, int64_t I, const float *x, const void *q, const float *d,
                 const float *m, const int32_t *qh, float *y);

// y (O) = W x for one float32 input row x (I) and W (O, I) row-major
void flinear_cpu(int64_t O, int64_t I, const float *x, const float *w, float *y);
