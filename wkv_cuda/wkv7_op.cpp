// Python binding of the RWKV-7 WKV kernels: checks devices, dtypes, shapes and contiguity with messages that say
// what to do, allocates the outputs, and passes raw pointers to wkv7_cpu.cpp or (built with -DWKV_WITH_CUDA)
// wkv7_cuda.cu. Supported: float32 and float64 everywhere, bfloat16 r, k, v, a, b on CUDA (the caller converts them
// to float on the CPU); logw and the state are float32, or float64 for float64 inputs.
#include <vector>

#include "binding.h"
#include "wkv7.h"

namespace {
using namespace wkv_binding;

struct Shape {
    int64_t B, T, H, N;
};

Shape check_inputs(const Tensor &r, const Tensor &logw, const Tensor &k, const Tensor &v, const Tensor &a,
                   const Tensor &b, const Tensor &s0) {
    TORCH_CHECK(r.dim() == 4, "wkv7: r must be (B, T, H, N), got shape ", r.sizes());
    const Shape s{r.size(0), r.size(1), r.size(2), r.size(3)};
    TORCH_CHECK(s.B > 0 && s.T > 0 && s.H > 0 && s.N > 0, "wkv7: empty input, r has shape ", r.sizes());
    const auto acc = acc_dtype("wkv7", "r", r);
    const Checker check{"wkv7", "r", r.device()};
    for (auto [t, name] : {std::pair{&r, "r"}, {&k, "k"}, {&v, "v"}, {&a, "a"}, {&b, "b"}})
        check(*t, name, r.sizes(), r.scalar_type());
    check(logw, "logw", r.sizes(), acc);
    check(s0, "state", {s.B, s.H, s.N, s.N}, acc);
#ifdef WKV_WITH_CUDA
    if (use_cuda(r))
        TORCH_CHECK(wkv7_cuda_head_size(s.N), "wkv7: head size ", s.N,
                    " has no CUDA kernel (8, 16, 32, 64); use wkv_backend='torch'");
#endif
    return s;
}

}  // namespace

// keep: also return the checkpoints the backward needs (else an empty tensor)
std::vector<Tensor> forward(Tensor r, Tensor logw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, bool keep) {
    const auto s = check_inputs(r, logw, k, v, a, b, s0);
    auto y = torch::empty_like(r);
    auto sT = torch::empty_like(s0);
    auto ckpt = torch::empty({keep ? s.B : 0, s.H, wkv7_segments(s.T), s.N, s.N}, s0.options());
    auto *ck = keep ? ckpt.data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, r.scalar_type(), "wkv7_forward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(r)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(r);
            check_launch("wkv7", wkv7_forward_cuda<IN, ACC>(s.B, s.T, s.H, s.N, ptr<const IN>(r), ptr<const ACC>(logw),
                                                    ptr<const IN>(k), ptr<const IN>(v), ptr<const IN>(a),
                                                    ptr<const IN>(b), ptr<const ACC>(s0), ptr<IN>(y), ptr<ACC>(sT),
                                                    static_cast<ACC *>(ck), stream()));
#else
            no_cuda("wkv7");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {
            wkv7_forward_cpu<ACC>(s.B, s.T, s.H, s.N, ptr<const ACC>(r), ptr<const ACC>(logw), ptr<const ACC>(k),
                                  ptr<const ACC>(v), ptr<const ACC>(a), ptr<const ACC>(b), ptr<const ACC>(s0),
                                  ptr<ACC>(y), ptr<ACC>(sT), static_cast<ACC *>(ck));
        }
    });
    return {y, sT, ckpt};
}

// from the forward's checkpoints: the gradients of r, logw, k, v, a, b and of the incoming state
std::vector<Tensor> backward(Tensor r, Tensor logw, Tensor k, Tensor v, Tensor a, Tensor b, Tensor ckpt, Tensor gy,
                             Tensor gsT) {
    TORCH_CHECK(ckpt.dim() == 5 && ckpt.size(0) == r.size(0), "wkv7: the checkpoints must come from forward(..., "
                "keep=True), got shape ", ckpt.sizes());
    const auto s0 = ckpt.select(2, 0);
    const auto s = check_inputs(r, logw, k, v, a, b, s0.contiguous());
    const Checker check{"wkv7", "r", r.device()};
    check(ckpt, "the checkpoints", {s.B, s.H, wkv7_segments(s.T), s.N, s.N}, s0.scalar_type());
    check(gy, "gy", r.sizes(), r.scalar_type());
    check(gsT, "the gradient of the state", s0.sizes(), s0.scalar_type());
    auto gr = torch::empty_like(r), gk = torch::empty_like(k), gv = torch::empty_like(v);
    auto ga = torch::empty_like(a), gb = torch::empty_like(b);
    auto glogw = torch::empty_like(logw), gs0 = torch::empty_like(gsT);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, r.scalar_type(), "wkv7_backward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(r)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(r);
            auto scratch = torch::empty({wkv7_scratch_size(s.B, s.H, s.N)}, s0.options());
            check_launch("wkv7", wkv7_backward_cuda<IN, ACC>(
                s.B, s.T, s.H, s.N, ptr<const IN>(r), ptr<const ACC>(logw), ptr<const IN>(k), ptr<const IN>(v),
                ptr<const IN>(a), ptr<const IN>(b), ptr<const ACC>(ckpt), ptr<const IN>(gy), ptr<const ACC>(gsT),
                ptr<IN>(gr), ptr<ACC>(glogw), ptr<IN>(gk), ptr<IN>(gv), ptr<IN>(ga), ptr<IN>(gb), ptr<ACC>(gs0),
                ptr<ACC>(scratch), stream()));
#else
            no_cuda("wkv7");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {
            wkv7_backward_cpu<ACC>(s.B, s.T, s.H, s.N, ptr<const ACC>(r), ptr<const ACC>(logw), ptr<const ACC>(k),
                                   ptr<const ACC>(v), ptr<const ACC>(a), ptr<const ACC>(b), ptr<const ACC>(ckpt),
                                   ptr<const ACC>(gy), ptr<const ACC>(gsT), ptr<ACC>(gr), ptr<ACC>(glogw),
                                   ptr<ACC>(gk), ptr<ACC>(gv), ptr<ACC>(ga), ptr<ACC>(gb), ptr<ACC>(gs0));
        }
    });
    return {gr, glogw, gk, gv, ga, gb, gs0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "RWKV-7 WKV forward: (r, logw, k, v, a, b, state, keep) -> (y, state, checkpoints)");
    m.def("backward", &backward,
          "RWKV-7 WKV backward: (r, logw, k, v, a, b, checkpoints, gy, gstate) -> (gr, glogw, gk, gv, ga, gb, gstate)");
}
