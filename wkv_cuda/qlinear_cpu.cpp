// Quantized matrix-vector products on the CPU (the formats are in qlinear.h and quantize.py). Decoding one token reads
// every weight once, so it runs at the speed of memory, and fewer bytes per weight is the whole speed-up: 1 byte
// (int8, q8_0: 8.5 bits with the scales), 4.5-6 bits (q4_0, int4, q5_1) instead of fp32's 32.
//
// A block of 32 weights is widened in registers, never written back as a dequantized matrix: 8 at a time to int32
// lanes (AVX2: sign/zero extension, nibble masks and shifts, q5_1's fifth bit by a variable shift of qh), then to
// float, multiplied into the activations with FMA; the block's sum is scaled by its d once. An asymmetric format's
// offset m contributes m * (the block's sum of activations), computed once per input row. Accumulation is float32.
// Parallel over output rows with at::parallel_for; a widened block serves up to 8 input rows of a batch before the
// next is read. Without AVX2 the same arithmetic runs one element at a time.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "qlinear.h"

namespace {
constexpr int64_t QK = 32;  // weights per block (ggml's QK8_0 = QK4_0 = QK5_1 = 32)

// bytes of quantized values per block
template <int FMT> constexpr int64_t block_bytes() { return FMT <= 1 ? QK : QK / 2; }

// the integer of element i (0..31) of a block, as the formats define it (scalar path and reference for AVX2)
template <int FMT>
inline int32_t qvalue(const uint8_t *blk, uint32_t qh, int i) {
    if (FMT <= 1) return static_cast<int8_t>(blk[i]);
    const int32_t nib = i < 16 ? (blk[i] & 15) : (blk[i - 16] >> 4);
    if (FMT == 2) return nib - 8;
    if (FMT == 3) return nib | (((qh >> i) & 1) << 4);
    return nib;
}

#ifdef __AVX2__
// elements 8g .. 8g + 7 of a block as 8 int32 lanes
template <int FMT>
inline __m256i qvalues8(const uint8_t *blk, uint32_t qh, int g) {
    if (FMT <= 1) return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(blk + 8 * g)));
    // elements 0..15 are the low nibbles of bytes 0..15, elements 16..31 their high nibbles
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(blk + 8 * (g & 1))));
    v = g < 2 ? _mm256_and_si256(v, _mm256_set1_epi32(15)) : _mm256_srli_epi32(v, 4);
    if (FMT == 2) return _mm256_sub_epi32(v, _mm256_set1_epi32(8));
    if (FMT == 3) {
        const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * g));
        const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(qh)), lane),
                                             _mm256_set1_epi32(1));
        v = _mm256_or_si256(v, _mm256_slli_epi32(bit, 4));
    }
    return v;
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

constexpr int64_t RB = 8;  // input rows that share one widening of a weight block (a decode batch)

// out[r] = sum_b d_b * (sum_i q_bi * x[r]_bi) over the blocks of one weight row, for N <= RB input rows (x: row r at
// x + r * I). Each block is widened once and used by every input row. N is a compile-time constant so that the N
// accumulators live in registers. int8's single row scale is applied by the caller (its d is null here).
template <int FMT, int N>
inline void row_dots(const uint8_t *row, const int32_t *qh, const float *d, const float *x, int64_t I, int64_t nb,
                     float *out) {
#ifdef __AVX2__
    __m256 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * block_bytes<FMT>();
        const uint32_t h = FMT == 3 ? static_cast<uint32_t>(qh[b]) : 0;
        __m256 w[4];
        for (int g = 0; g < 4; g++) w[g] = _mm256_cvtepi32_ps(qvalues8<FMT>(blk, h, g));
        const __m256 scale = _mm256_set1_ps(FMT == 0 ? 1.0f : d[b]);
        for (int r = 0; r < N; r++) {
            const float *xb = x + r * I + b * QK;
            __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
            for (int g = 1; g < 4; g++) s = _mm256_fmadd_ps(w[g], _mm256_loadu_ps(xb + 8 * g), s);
            acc[r] = FMT == 0 ? _mm256_add_ps(acc[r], s) : _mm256_fmadd_ps(s, scale, acc[r]);
        }
    }
    for (int r = 0; r < N; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < N; r++) out[r] = 0.0f;
    int32_t w[QK];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * block_bytes<FMT>();
        const uint32_t h = FMT == 3 ? static_cast<uint32_t>(qh[b]) : 0;
        for (int i = 0; i < QK; i++) w[i] = qvalue<FMT>(blk, h, i);
        for (int r = 0; r < N; r++) {
            const float *xb = x + r * I + b * QK;
            float s = 0.0f;
            for (int i = 0; i < QK; i++) s += static_cast<float>(w[i]) * xb[i];
            out[r] += FMT == 0 ? s : s * d[b];
        }
    }
#endif
}

template <int FMT>
void row_dots_n(int64_t n, const uint8_t *row, const int32_t *qh, const float *d, const float *x, int64_t I,
                int64_t nb, float *out) {
    switch (n) {
        case 1: row_dots<FMT, 1>(row, qh, d, x, I, nb, out); break;
        case 2: row_dots<FMT, 2>(row, qh, d, x, I, nb, out); break;
        case 3: row_dots<FMT, 3>(row, qh, d, x, I, nb, out); break;
        case 4: row_dots<FMT, 4>(row, qh, d, x, I, nb, out); break;
        case 5: row_dots<FMT, 5>(row, qh, d, x, I, nb, out); break;
        case 6: row_dots<FMT, 6>(row, qh, d, x, I, nb, out); break;
        case 7: row_dots<FMT, 7>(row, qh, d, x, I, nb, out); break;
        default: row_dots<FMT, 8>(row, qh, d, x, I, nb, out); break;
    }
}

template <int FMT>
void qlinear(int64_t B, int64_t O, int64_t I, const float *x, const uint8_t *q, const float *d, const float *m,
             const int32_t *qh, float *y) {
    const int64_t nb = I / QK;
    constexpr bool asym = FMT == 3 || FMT == 4;
    std::vector<float> xsum(asym ? B * nb : 0);  // the activations' sum per block, for the offsets m
    for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); i++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += x[i * QK + j];
        xsum[i] = s;
    }
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
        float dots[RB];
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *row = q + o * nb * block_bytes<FMT>();
            const float *dr = FMT == 0 ? nullptr : d + o * nb;
            const int32_t *qhr = FMT == 3 ? qh + o * nb : nullptr;
            for (int64_t b0 = 0; b0 < B; b0 += RB) {
                const int64_t n = std::min(RB, B - b0);
                row_dots_n<FMT>(n, row, qhr, dr, x + b0 * I, I, nb, dots);
                for (int64_t r = 0; r < n; r++) {
                    float v = FMT == 0 ? dots[r] * d[o] : dots[r];
                    if (asym) {
                        const float *mr = m + o * nb;
                        const float *xs = xsum.data() + (b0 + r) * nb;
                        for (int64_t k = 0; k < nb; k++) v += mr[k] * xs[k];
                    }
                    y[(b0 + r) * O + o] = v;
                }
            }
        }
    });
}
}  // namespace

// The float32 product of one input row, y (O) = W x with W (O, I) row-major, for decoding a single sequence, where
// a BLAS's matrix-vector path runs on one thread and below the speed of memory. One row at a time, read front to
// back with four 8-lane accumulators (ggml's ggml_vec_dot_f32 has this shape), so the weights stream through memory
// in order; threads split the rows. Measured against F.linear (one thread of a 2-core EPYC, DRAM-resident, GB/s):
// 768 x 768 22 vs 10, 3072 x 768 21 vs 10, the 65536 x 768 head 20 vs 10.
void flinear_cpu(int64_t O, int64_t I, const float *x, const float *w, float *y) {
    at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; o++) {
            const float *r = w + o * I;
            float s = 0.0f;
            int64_t i = 0;
#ifdef __AVX2__
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (; i + 32 <= I; i += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 8), _mm256_loadu_ps(x + i + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 16), _mm256_loadu_ps(x + i + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 24), _mm256_loadu_ps(x + i + 24), a3);
            }
            s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
            for (; i < I; i++) s += r[i] * x[i];
            y[o] = s;
        }
    });
}

void qlinear_cpu(int fmt, int64_t B, int64_t O, int64_t I, const float *x, const void *q, const float *d,
                 const float *m, const int32_t *qh, float *y) {
    const auto *qb = static_cast<const uint8_t *>(q);
    switch (fmt) {
        case 0: qlinear<0>(B, O, I, x, qb, d, m, qh, y); break;
        case 1: qlinear<1>(B, O, I, x, qb, d, m, qh, y); break;
        case 2: qlinear<2>(B, O, I, x, qb, d, m, qh, y); break;
        case 3: qlinear<3>(B, O, I, x, qb, d, m, qh, y); break;
        default: qlinear<4>(B, O, I, x, qb, d, m, qh, y); break;
    }
}
