// What the three bindings (wkv_op.cpp, wkv5_op.cpp, wkv7_op.cpp) share: input checks whose messages say what to do,
// the element and accumulator types the kernels see, and the CUDA launch plumbing (device guard, stream, launch
// errors). Built with -DCUDA_SHIM (wkv_cuda/cuda_shim) the CUDA launchers run for CPU tensors, on CPU threads.
#pragma once
#include <torch/extension.h>

#if defined(WKV_WITH_CUDA) && !defined(CUDA_SHIM)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <type_traits>

namespace wkv_binding {
using torch::Tensor;

// checks one input against the first one's device: "<op>: <name> has shape [..], expected [..]"
struct Checker {
    const char *op;
    const char *first;  // the input whose device the others must share
    torch::Device device;
    void operator()(const Tensor &t, const char *name, at::IntArrayRef shape, at::ScalarType dtype) const {
        TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", first, " is on ", device,
                    "; move all inputs to one device");
        TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
        TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
        TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() on it");
    }
};

// the CUDA launchers run for CUDA tensors, and for every tensor in the shim build
inline bool use_cuda(const Tensor &t) {
#ifdef CUDA_SHIM
    return true;
#else
    return t.is_cuda();
#endif
}

// the accumulator dtype for the element dtype of the input `name`, or an error for an unsupported one
inline at::ScalarType acc_dtype(const char *op, const char *name, const Tensor &x) {
    const auto in = x.scalar_type();
    if (in == at::kFloat || in == at::kDouble) return in;
    TORCH_CHECK(in == at::kBFloat16 && use_cuda(x), op, ": ", name, " has dtype ", in,
                "; the kernels take float32, float64, or bfloat16 on CUDA");
    return at::kFloat;
}

template <typename P>
P *ptr(const Tensor &t) { return reinterpret_cast<P *>(t.data_ptr()); }

// How the kernels see the element type (IN) and the accumulator type (ACC): bfloat16 travels as its raw bits (the
// .cu converts) and accumulates in float; float and double are themselves.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<at::BFloat16> { using type = uint16_t; };
template <typename T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

#ifdef WKV_WITH_CUDA
inline void check_launch(const char *op, const char *err) {
    TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}
inline void *stream() {
#ifdef CUDA_SHIM
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream().stream();
#endif
}
#else
[[noreturn]] inline void no_cuda(const char *op) {
    TORCH_CHECK(false, op, ": this build of the kernels has no CUDA; use wkv_backend='cuda' to build the CUDA one");
}
#endif
}  // namespace wkv_binding

// the current device for a launch on t's GPU (nothing in the shim build)
#if defined(WKV_WITH_CUDA) && !defined(CUDA_SHIM)
#define WKV_DEVICE_GUARD(t) const c10::cuda::CUDAGuard wkv_device_guard((t).device())
#else
#define WKV_DEVICE_GUARD(t) (void)(t)
#endif
