// Launchers of the CUDA C++ sinkhorn kernels: pointer level, no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace musetalk_fast {
namespace sinkhorn {

// logits, out: `matrices` contiguous n x n matrices. T is float or double.
template <typename T>
cudaError_t launch_forward(const T* logits, T* out, int64_t matrices, int n, int iters, T eps, cudaStream_t stream);

// grad: dL/dP on entry, dL/dlogits on exit (in place).
template <typename T>
cudaError_t launch_backward(const T* logits, T* grad, int64_t matrices, int n, int iters, T eps, cudaStream_t stream);

}  // namespace sinkhorn
}  // namespace musetalk_fast
