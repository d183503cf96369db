// What the three CUDA files (wkv_cuda.cu, wkv5_cuda.cu, wkv7_cuda.cu) share: loading and storing the input type IN
// in the accumulator type ACC (bfloat16 arrives as the raw bits named in the .h files), exp in either precision, the
// launch error, and KERNEL_LAUNCH, spelled so that wkv_cuda/cuda_shim can run the launches on CPU threads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#ifndef KERNEL_LAUNCH
#define KERNEL_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

namespace wkv_device {
template <typename IN, typename ACC>
struct Cvt {
    static __device__ __forceinline__ ACC load(IN x) { return static_cast<ACC>(x); }
    static __device__ __forceinline__ IN store(ACC x) { return static_cast<IN>(x); }
};
template <>
struct Cvt<__nv_bfloat16, float> {
    static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16(x); }
};

// the element type on the device for the type named in the .h files
template <typename IN> struct Dev { using type = IN; };
template <> struct Dev<uint16_t> { using type = __nv_bfloat16; };

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

inline const char *last_error() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
}  // namespace wkv_device
