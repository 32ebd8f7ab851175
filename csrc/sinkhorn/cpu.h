#pragma once

#include <ATen/ATen.h>

namespace musetalk_fast {
namespace sinkhorn {

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps);
at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);
// Shared with the CUDA glue.
void check_args(const at::Tensor& logits, int64_t iters, double eps);

}  // namespace sinkhorn
}  // namespace musetalk_fast
