#pragma once

#include <ATen/ATen.h>

namespace musetalk_fast {
namespace sinkhorn {

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps);
at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);

// Shared with the CUDA glue: the checked inputs as contiguous n x n matrices in the compute dtype,
// ready for a pointer-level kernel.
struct Matrices {
  at::Tensor logits;  // [..., n, n], contiguous, float32 or float64
  at::Tensor grad;    // backward only: dL/dP, a fresh contiguous copy the kernel overwrites in place
  int n;
  int64_t count;
};
Matrices prepare_forward(const at::Tensor& logits, int64_t iters, double eps);
Matrices prepare_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);

}  // namespace sinkhorn
}  // namespace musetalk_fast
