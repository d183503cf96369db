// Runs every CUDA kernel of wkv_cuda/ (forward and backward, float and bfloat16) through wkv_cuda/cuda_shim on a
// small shape whose T spans three checkpoint segments, for test_wkv_matrix_kernels.py's ThreadSanitizer build. The
// values are checked by the Python tests; this program only has to run, so ThreadSanitizer sees every access.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "wkv.h"
#include "wkv5.h"
#include "wkv7.h"

namespace {
std::mt19937 rng(0);

std::vector<float> randn(size_t n, float scale = 1.0f, float shift = 0.0f) {
    std::normal_distribution<float> d(shift, scale);
    std::vector<float> x(n);
    for (auto &e : x) e = d(rng);
    return x;
}

std::vector<uint16_t> bf16(const std::vector<float> &x) {  // truncation is enough for inputs
    std::vector<uint16_t> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = uint16_t(*reinterpret_cast<const uint32_t *>(&x[i]) >> 16);
    return y;
}

void check(const char *err, const char *what) {
    if (err) {
        std::fprintf(stderr, "%s: %s\n", what, err);
        std::exit(1);
    }
}

template <typename IN>
std::vector<IN> as(const std::vector<float> &x) {
    if constexpr (sizeof(IN) == 2) return bf16(x);
    else return x;
}

template <typename IN>
void matrix_ops(int64_t B, int64_t T, int64_t H, int64_t N) {
    const size_t n = B * T * H * N, ns = B * H * N * N, nck = B * H * wkv7_segments(T) * N * N;
    auto r = as<IN>(randn(n)), k = as<IN>(randn(n)), v = as<IN>(randn(n)), a = as<IN>(randn(n, 0.1f));
    auto b = as<IN>(randn(n, 0.1f)), gy = as<IN>(randn(n));
    auto logw = randn(n, 0.1f, -0.5f), u = randn(H * N), s0 = randn(ns), gs = randn(ns);
    std::vector<IN> y(n), gr(n), gk(n), gv(n), ga(n), gb(n);
    std::vector<float> sT(ns), ckpt(nck), glogw(n), gu(B * H * N), gs0(ns);
    std::vector<float> scratch(wkv7_scratch_size(B, H, N) + wkv5_scratch_size(B, H, N));
    check(wkv7_forward_cuda<IN, float>(B, T, H, N, r.data(), logw.data(), k.data(), v.data(), a.data(), b.data(),
                                       s0.data(), y.data(), sT.data(), ckpt.data(), nullptr), "wkv7 forward");
    check(wkv7_backward_cuda<IN, float>(B, T, H, N, r.data(), logw.data(), k.data(), v.data(), a.data(), b.data(),
                                        ckpt.data(), gy.data(), gs.data(), gr.data(), glogw.data(), gk.data(),
                                        gv.data(), ga.data(), gb.data(), gs0.data(), scratch.data(), nullptr),
          "wkv7 backward");
    check(wkv5_forward_cuda<IN, float>(B, T, H, N, r.data(), k.data(), v.data(), logw.data(), u.data(), s0.data(),
                                       y.data(), sT.data(), ckpt.data(), nullptr), "wkv5 forward");
    check(wkv5_backward_cuda<IN, float>(B, T, H, N, r.data(), k.data(), v.data(), logw.data(), u.data(), ckpt.data(),
                                        gy.data(), gs.data(), gr.data(), gk.data(), gv.data(), glogw.data(),
                                        gu.data(), gs0.data(), scratch.data(), nullptr), "wkv5 backward");
}

template <typename IN>
void rwkv4(int64_t B, int64_t T, int64_t C) {
    const size_t n = B * T * C, ns = B * C;
    auto k = as<IN>(randn(n)), v = as<IN>(randn(n)), gy = as<IN>(randn(n));
    auto w = randn(C, 0.1f, -1.0f), u = randn(C), aa = randn(ns), bb = randn(ns, 0.1f, 2.0f), pp = randn(ns);
    auto gaa = randn(ns), gbb = randn(ns);
    std::vector<IN> y(n), gk(n), gv(n);
    std::vector<float> aa2(ns), bb2(ns), pp2(ns), gw(ns), gu(ns), ga(ns), gb(ns), gp(ns), scratch(3 * n);
    check(wkv_forward_cuda<IN, float>(B, T, C, w.data(), u.data(), k.data(), v.data(), aa.data(), bb.data(),
                                      pp.data(), y.data(), aa2.data(), bb2.data(), pp2.data(), nullptr), "wkv forward");
    check(wkv_backward_cuda<IN, float>(B, T, C, w.data(), u.data(), k.data(), v.data(), aa.data(), bb.data(),
                                       pp.data(), gy.data(), gaa.data(), gbb.data(), gw.data(), gu.data(), gk.data(),
                                       gv.data(), ga.data(), gb.data(), gp.data(), scratch.data(), nullptr),
          "wkv backward");
}
}  // namespace

int main() {
    matrix_ops<float>(2, 37, 2, 8);
    matrix_ops<uint16_t>(1, 21, 1, 16);
    rwkv4<float>(2, 9, 40);
    rwkv4<uint16_t>(1, 5, 33);
    std::puts("ok");
    return 0;
}
