// CUDA C++ sinkhorn: one thread per n x n matrix, the matrix in registers / local memory, running
// the same pointer-level math as the CPU kernel (sinkhorn_math.h).
#include "sinkhorn/cuda.h"
#include "sinkhorn/sinkhorn_math.h"

namespace musetalk_fast {
namespace sinkhorn {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ logits, T* __restrict__ out, int64_t matrices, int n, int iters,
                               T eps) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= matrices) return;
  T l[kMaxN * kMaxN];
  T p[kMaxN * kMaxN];
  const int64_t base = b * n * n;
  for (int i = 0; i < n * n; ++i) l[i] = logits[base + i];
  forward(l, p, n, iters, eps);
  for (int i = 0; i < n * n; ++i) out[base + i] = p[i];
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ logits, T* __restrict__ grad, int64_t matrices, int n, int iters,
                                T eps) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= matrices) return;
  T l[kMaxN * kMaxN];
  T g[kMaxN * kMaxN];
  T scratch[kMaxN * kMaxN];
  const int64_t base = b * n * n;
  for (int i = 0; i < n * n; ++i) {
    l[i] = logits[base + i];
    g[i] = grad[base + i];
  }
  backward(l, g, scratch, static_cast<T*>(nullptr), n, iters, eps);  // recompute: no per-step memory
  for (int i = 0; i < n * n; ++i) grad[base + i] = g[i];
}

unsigned blocks_for(int64_t matrices) { return static_cast<unsigned>((matrices + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
cudaError_t launch_forward(const T* logits, T* out, int64_t matrices, int n, int iters, T eps, cudaStream_t stream) {
  if (matrices == 0 || n == 0) return cudaSuccess;
  forward_kernel<T><<<blocks_for(matrices), kThreads, 0, stream>>>(logits, out, matrices, n, iters, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const T* logits, T* grad, int64_t matrices, int n, int iters, T eps, cudaStream_t stream) {
  if (matrices == 0 || n == 0) return cudaSuccess;
  backward_kernel<T><<<blocks_for(matrices), kThreads, 0, stream>>>(logits, grad, matrices, n, iters, eps);
  return cudaGetLastError();
}

template cudaError_t launch_forward<float>(const float*, float*, int64_t, int, int, float, cudaStream_t);
template cudaError_t launch_forward<double>(const double*, double*, int64_t, int, int, double, cudaStream_t);
template cudaError_t launch_backward<float>(const float*, float*, int64_t, int, int, float, cudaStream_t);
template cudaError_t launch_backward<double>(const double*, double*, int64_t, int, int, double, cudaStream_t);

}  // namespace sinkhorn
}  // namespace musetalk_fast
