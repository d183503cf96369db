// A CPU stand-in for the parts of the CUDA runtime our kernels use, so that a .cu file's real kernels and launchers
// compile with g++ (-std=c++20) and run on CPU threads: the tests execute every CUDA kernel of wkv_cuda/ this way.
// - a launch runs the grid's blocks one after another; a block's threads are std::threads, so __shared__ (a static
//   here) is one array per kernel instantiation, shared by the block's threads and reused by the next block;
// - __syncthreads() is a std::barrier across the block; a thread that returns early drops out of it, as on a GPU;
// - threadIdx / blockIdx / blockDim / gridDim are thread-locals set before the kernel body runs.
// Not emulated (so not used by our kernels): warp intrinsics (__shfl_*, __ballot), atomics, inline PTX, mma / cp.async.
// Built with -fsanitize=thread, ThreadSanitizer reports any pair of threads touching the same shared or global
// element without a barrier between them.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#define CUDA_SHIM 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_shim {
struct Thread {
    dim3 threadIdx, blockIdx, blockDim, gridDim;
    std::barrier<> *block_barrier = nullptr;
};
inline thread_local Thread self;

// KERNEL_LAUNCH(kernel, grid, block, stream)(args...): kernel<<<grid, block, 0, stream>>>(args...)
template <typename... P>
struct Launch {
    void (*kernel)(P...);
    dim3 grid, block;
    template <typename... A>
    void operator()(A &&...args) const {
        const unsigned nthreads = block.x * block.y * block.z;
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    std::barrier<> barrier(nthreads);
                    std::vector<std::thread> threads;
                    threads.reserve(nthreads);
                    for (unsigned t = 0; t < nthreads; t++)
                        threads.emplace_back([&, t] {
                            self = Thread{dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y)),
                                          dim3(bx, by, bz), block, grid, &barrier};
                            kernel(static_cast<P>(args)...);
                            barrier.arrive_and_drop();
                        });
                    for (auto &th : threads) th.join();
                }
    }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block) { return {kernel, grid, block}; }
}  // namespace cuda_shim

#define threadIdx (cuda_shim::self.threadIdx)
#define blockIdx (cuda_shim::self.blockIdx)
#define blockDim (cuda_shim::self.blockDim)
#define gridDim (cuda_shim::self.gridDim)
#define KERNEL_LAUNCH(kernel, grid, block, stream) cuda_shim::launch(kernel, grid, block)
inline void __syncthreads() { cuda_shim::self.block_barrier->arrive_and_wait(); }

typedef int cudaError_t;
typedef void *cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char *cudaGetErrorString(cudaError_t) { return "no error"; }
