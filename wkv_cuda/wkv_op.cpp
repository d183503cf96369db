// Python binding of the WKV kernels and of the quantized matrix products (qlinear_cpu.cpp): checks devices, dtypes,
// shapes and contiguity with messages that say what to do, allocates the outputs, and passes raw pointers to
// wkv_cpu.cpp, qlinear_cpu.cpp or (built with -DWKV_WITH_CUDA) wkv_cuda.cu.
// Supported: float32 and float64 everywhere; bfloat16 k, v on CUDA (the caller converts them to float on the CPU).
// The state and w, u are float32, or float64 for float64 inputs.
#include <vector>

#include "binding.h"
#include "qlinear.h"
#include "wkv.h"

namespace {
using namespace wkv_binding;

struct Shape {
    int64_t B, T, C;
};

Shape check_inputs(const torch::Tensor &w, const torch::Tensor &u, const torch::Tensor &k, const torch::Tensor &v,
                   const torch::Tensor &aa, const torch::Tensor &bb, const torch::Tensor &pp) {
    TORCH_CHECK(k.dim() == 3, "wkv: k must be (B, T, C), got shape ", k.sizes());
    const Shape s{k.size(0), k.size(1), k.size(2)};
    TORCH_CHECK(s.B > 0 && s.T > 0 && s.C > 0, "wkv: empty input, k has shape ", k.sizes());
    const auto acc = acc_dtype("wkv", "k", k);
    const Checker check{"wkv", "k", k.device()};
    check(k, "k", k.sizes(), k.scalar_type());
    check(v, "v", k.sizes(), k.scalar_type());
    check(w, "w", {s.C}, acc);
    check(u, "u", {s.C}, acc);
    check(aa, "aa", {s.B, s.C}, acc);
    check(bb, "bb", {s.B, s.C}, acc);
    check(pp, "pp", {s.B, s.C}, acc);
    return s;
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor aa, torch::Tensor bb, torch::Tensor pp) {
    const auto s = check_inputs(w, u, k, v, aa, bb, pp);
    auto y = torch::empty_like(k);
    auto aa_out = torch::empty_like(aa), bb_out = torch::empty_like(bb), pp_out = torch::empty_like(pp);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, k.scalar_type(), "wkv_forward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(k)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(k);
            check_launch("wkv", wkv_forward_cuda<IN, ACC>(s.B, s.T, s.C, ptr<const ACC>(w), ptr<const ACC>(u),
                                                   ptr<const IN>(k), ptr<const IN>(v), ptr<const ACC>(aa),
                                                   ptr<const ACC>(bb), ptr<const ACC>(pp), ptr<IN>(y), ptr<ACC>(aa_out),
                                                   ptr<ACC>(bb_out), ptr<ACC>(pp_out), stream()));
#else
            no_cuda("wkv");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {  // the CPU kernel: float and double (check_inputs said so)
            wkv_forward_cpu<ACC>(s.B, s.T, s.C, ptr<const ACC>(w), ptr<const ACC>(u), ptr<const ACC>(k),
                                 ptr<const ACC>(v), ptr<const ACC>(aa), ptr<const ACC>(bb), ptr<const ACC>(pp),
                                 ptr<ACC>(y), ptr<ACC>(aa_out), ptr<ACC>(bb_out), ptr<ACC>(pp_out));
        }
    });
    return {y, aa_out, bb_out, pp_out};
}

// returns gw, gu (summed over the batch), gk, gv, and the gradients of the incoming state gaa, gbb, gpp
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor aa, torch::Tensor bb, torch::Tensor pp, torch::Tensor gy,
                                    torch::Tensor gaa_out, torch::Tensor gbb_out) {
    const auto s = check_inputs(w, u, k, v, aa, bb, pp);
    const Checker check{"wkv", "k", k.device()};
    check(gy, "gy", k.sizes(), k.scalar_type());
    check(gaa_out, "gaa_out", {s.B, s.C}, aa.scalar_type());
    check(gbb_out, "gbb_out", {s.B, s.C}, aa.scalar_type());
    auto gw = torch::empty_like(aa), gu = torch::empty_like(aa);
    auto gk = torch::empty_like(k), gv = torch::empty_like(v);
    auto gaa = torch::empty_like(aa), gbb = torch::empty_like(aa), gpp = torch::empty_like(aa);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, k.scalar_type(), "wkv_backward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(k)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(k);
            auto scratch = torch::empty({3, s.B, s.T, s.C}, aa.options());
            check_launch("wkv", wkv_backward_cuda<IN, ACC>(
                s.B, s.T, s.C, ptr<const ACC>(w), ptr<const ACC>(u), ptr<const IN>(k), ptr<const IN>(v),
                ptr<const ACC>(aa), ptr<const ACC>(bb), ptr<const ACC>(pp), ptr<const IN>(gy), ptr<const ACC>(gaa_out),
                ptr<const ACC>(gbb_out), ptr<ACC>(gw), ptr<ACC>(gu), ptr<IN>(gk), ptr<IN>(gv), ptr<ACC>(gaa),
                ptr<ACC>(gbb), ptr<ACC>(gpp), ptr<ACC>(scratch), stream()));
#else
            no_cuda("wkv");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {
            wkv_backward_cpu<ACC>(s.B, s.T, s.C, ptr<const ACC>(w), ptr<const ACC>(u), ptr<const ACC>(k),
                                  ptr<const ACC>(v), ptr<const ACC>(aa), ptr<const ACC>(bb), ptr<const ACC>(pp),
                                  ptr<const ACC>(gy), ptr<const ACC>(gaa_out), ptr<const ACC>(gbb_out), ptr<ACC>(gw),
                                  ptr<ACC>(gu), ptr<ACC>(gk), ptr<ACC>(gv), ptr<ACC>(gaa), ptr<ACC>(gbb),
                                  ptr<ACC>(gpp));
        }
    });
    return {gw.sum(0), gu.sum(0), gk, gv, gaa, gbb, gpp};
}

// y (B, O) = x (B, I) @ dequantize(W)^T for W stored in format fmt (qlinear.h); m and qh are empty where unused
torch::Tensor qlinear(torch::Tensor x, int64_t fmt, torch::Tensor q, torch::Tensor d, torch::Tensor m,
                      torch::Tensor qh) {
    TORCH_CHECK(fmt >= 0 && fmt <= 4, "qlinear: unknown format ", fmt);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && !x.is_cuda(),
                "qlinear: x must be a contiguous float32 (B, I) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
    const int64_t B = x.size(0), I = x.size(1), O = q.size(0), nb = I / 32;
    TORCH_CHECK(I % 32 == 0, "qlinear: in_features ", I, " must be a multiple of 32");
    const bool nibbles = fmt >= 2;
    const auto qtype = fmt <= 1 ? at::kChar : at::kByte;
    TORCH_CHECK(q.dim() == 2 && q.size(1) == (nibbles ? I / 2 : I) && q.scalar_type() == qtype && q.is_contiguous(),
                "qlinear: q has shape ", q.sizes(), " and dtype ", q.scalar_type(), ", expected (O, ",
                nibbles ? I / 2 : I, ") ", qtype);
    auto check_f = [&](const torch::Tensor &t, const char *name, int64_t cols) {
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == O &&
                    t.size(1) == cols, "qlinear: ", name, " must be contiguous float32 (", O, ", ", cols, "), got ",
                    t.sizes(), " ", t.scalar_type());
    };
    check_f(d, "d", fmt == 0 ? 1 : nb);
    if (fmt >= 3) check_f(m, "m", nb);
    if (fmt == 3)
        TORCH_CHECK(qh.scalar_type() == at::kInt && qh.is_contiguous() && qh.numel() == O * nb,
                    "qlinear: qh must be contiguous int32 (O, I/32)");
    auto y = torch::empty({B, O}, x.options());
    qlinear_cpu(static_cast<int>(fmt), B, O, I, x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                fmt >= 3 ? m.data_ptr<float>() : nullptr, fmt == 3 ? qh.data_ptr<int32_t>() : nullptr,
                y.data_ptr<float>());
    return y;
}

// y (1, O) = x (1, I) @ W^T in float32 for W (O, I) row-major
torch::Tensor flinear(torch::Tensor x, torch::Tensor w) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && !x.is_cuda(),
                "flinear: x must be a contiguous float32 (1, I) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.scalar_type() == at::kFloat && !w.is_cuda() &&
                w.is_contiguous(), "flinear: the weight must be a contiguous float32 (O, ", x.size(1), ") CPU tensor, "
                "got ", w.sizes(), " ", w.scalar_type(), " with strides ", w.strides());
    auto y = torch::empty({1, w.size(0)}, x.options());
    flinear_cpu(w.size(0), w.size(1), x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>());
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("flinear", &flinear, "float32 linear of one input row: (x (1, I), W (O, I)) -> x @ W^T");
    m.def("qlinear", &qlinear, "quantized linear: (x, fmt, q, d, m, qh) -> x @ dequantize(W)^T");
    m.def("forward", &forward, "WKV forward: (w, u, k, v, aa, bb, pp) -> (y, aa, bb, pp)");
    m.def("backward", &backward,
          "WKV backward: (w, u, k, v, aa, bb, pp, gy, gaa_out, gbb_out) -> (gw, gu, gk, gv, gaa, gbb, gpp)");
}
