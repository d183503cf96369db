// Python binding of the RWKV-5/6 WKV kernels: checks devices, dtypes, shapes and contiguity with messages that say
// what to do, allocates the outputs, and passes raw pointers to wkv5_cpu.cpp or (built with -DWKV_WITH_CUDA)
// wkv5_cuda.cu. Supported: float32 and float64 everywhere, bfloat16 r, k, v on CUDA (the caller converts them
// to float on the CPU); logw, u and the state are float32, or float64 for float64 inputs.
#include <vector>

#include "binding.h"
#include "wkv5.h"

namespace {
using namespace wkv_binding;

struct Shape {
    int64_t B, T, H, N;
};

Shape check_inputs(const Tensor &r, const Tensor &k, const Tensor &v, const Tensor &logw, const Tensor &u,
                   const Tensor &s0) {
    TORCH_CHECK(r.dim() == 4, "wkv5: r must be (B, T, H, N), got shape ", r.sizes());
    const Shape s{r.size(0), r.size(1), r.size(2), r.size(3)};
    TORCH_CHECK(s.B > 0 && s.T > 0 && s.H > 0 && s.N > 0, "wkv5: empty input, r has shape ", r.sizes());
    const auto acc = acc_dtype("wkv5", "r", r);
    const Checker check{"wkv5", "r", r.device()};
    for (auto [t, name] : {std::pair{&r, "r"}, {&k, "k"}, {&v, "v"}}) check(*t, name, r.sizes(), r.scalar_type());
    check(logw, "logw", r.sizes(), acc);
    check(u, "u", {s.H, s.N}, acc);
    check(s0, "state", {s.B, s.H, s.N, s.N}, acc);
#ifdef WKV_WITH_CUDA
    if (use_cuda(r))
        TORCH_CHECK(wkv5_cuda_head_size(s.N), "wkv5: head size ", s.N,
                    " has no CUDA kernel (8, 16, 32, 64); use wkv_backend='torch'");
#endif
    return s;
}

}  // namespace

// keep: also return the checkpoints the backward needs (else an empty tensor)
std::vector<Tensor> forward(Tensor r, Tensor k, Tensor v, Tensor logw, Tensor u, Tensor s0, bool keep) {
    const auto s = check_inputs(r, k, v, logw, u, s0);
    auto y = torch::empty_like(r);
    auto sT = torch::empty_like(s0);
    auto ckpt = torch::empty({keep ? s.B : 0, s.H, wkv5_segments(s.T), s.N, s.N}, s0.options());
    auto *ck = keep ? ckpt.data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, r.scalar_type(), "wkv5_forward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(r)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(r);
            check_launch("wkv5", wkv5_forward_cuda<IN, ACC>(s.B, s.T, s.H, s.N, ptr<const IN>(r), ptr<const IN>(k),
                                                    ptr<const IN>(v), ptr<const ACC>(logw), ptr<const ACC>(u),
                                                    ptr<const ACC>(s0), ptr<IN>(y), ptr<ACC>(sT),
                                                    static_cast<ACC *>(ck), stream()));
#else
            no_cuda("wkv5");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {
            wkv5_forward_cpu<ACC>(s.B, s.T, s.H, s.N, ptr<const ACC>(r), ptr<const ACC>(k), ptr<const ACC>(v),
                                  ptr<const ACC>(logw), ptr<const ACC>(u), ptr<const ACC>(s0), ptr<ACC>(y),
                                  ptr<ACC>(sT), static_cast<ACC *>(ck));
        }
    });
    return {y, sT, ckpt};
}

// from the forward's checkpoints: the gradients of r, k, v, logw, u (summed over the batch) and the incoming state
std::vector<Tensor> backward(Tensor r, Tensor k, Tensor v, Tensor logw, Tensor u, Tensor ckpt, Tensor gy,
                             Tensor gsT) {
    TORCH_CHECK(ckpt.dim() == 5 && ckpt.size(0) == r.size(0), "wkv5: the checkpoints must come from forward(..., "
                "keep=True), got shape ", ckpt.sizes());
    const auto s0 = ckpt.select(2, 0);
    const auto s = check_inputs(r, k, v, logw, u, s0.contiguous());
    const Checker check{"wkv5", "r", r.device()};
    check(ckpt, "the checkpoints", {s.B, s.H, wkv5_segments(s.T), s.N, s.N}, s0.scalar_type());
    check(gy, "gy", r.sizes(), r.scalar_type());
    check(gsT, "the gradient of the state", s0.sizes(), s0.scalar_type());
    auto gr = torch::empty_like(r), gk = torch::empty_like(k), gv = torch::empty_like(v);
    auto glogw = torch::empty_like(logw), gs0 = torch::empty_like(gsT);
    auto gu = torch::empty({s.B, s.H, s.N}, u.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, r.scalar_type(), "wkv5_backward", [&] {
        using IN = typename Raw<scalar_t>::type;
        using ACC = Acc<scalar_t>;
        if (use_cuda(r)) {
#ifdef WKV_WITH_CUDA
            WKV_DEVICE_GUARD(r);
            auto scratch = torch::empty({wkv5_scratch_size(s.B, s.H, s.N)}, s0.options());
            check_launch("wkv5", wkv5_backward_cuda<IN, ACC>(
                s.B, s.T, s.H, s.N, ptr<const IN>(r), ptr<const IN>(k), ptr<const IN>(v), ptr<const ACC>(logw),
                ptr<const ACC>(u), ptr<const ACC>(ckpt), ptr<const IN>(gy), ptr<const ACC>(gsT), ptr<IN>(gr),
                ptr<IN>(gk), ptr<IN>(gv), ptr<ACC>(glogw), ptr<ACC>(gu), ptr<ACC>(gs0), ptr<ACC>(scratch), stream()));
#else
            no_cuda("wkv5");
#endif
        } else if constexpr (std::is_same_v<IN, ACC>) {
            wkv5_backward_cpu<ACC>(s.B, s.T, s.H, s.N, ptr<const ACC>(r), ptr<const ACC>(k), ptr<const ACC>(v),
                                   ptr<const ACC>(logw), ptr<const ACC>(u), ptr<const ACC>(ckpt), ptr<const ACC>(gy),
                                   ptr<const ACC>(gsT), ptr<ACC>(gr), ptr<ACC>(gk), ptr<ACC>(gv), ptr<ACC>(glogw),
                                   ptr<ACC>(gu), ptr<ACC>(gs0));
        }
    });
    return {gr, gk, gv, glogw, gu.sum(0), gs0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "RWKV-5/6 WKV forward: (r, k, v, logw, u, state, keep) -> (y, state, checkpoints)");
    m.def("backward", &backward,
          "RWKV-5/6 WKV backward: (r, k, v, logw, u, checkpoints, gy, gstate) -> (gr, gk, gv, glogw, gu, gstate)");
}
