// CPU sinkhorn: the pointer-level math of sinkhorn_math.h, one matrix per loop iteration.
#include "sinkhorn/cpu.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"
#include "sinkhorn/sinkhorn_math.h"

namespace musetalk_fast {
namespace sinkhorn {

void check_args(const at::Tensor& logits, int64_t iters, double eps) {
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 2 && logits.size(-1) == logits.size(-2),
                    "logits must have shape [..., n, n], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(-1) <= kMaxN, "logits: n must be at most ", kMaxN, ", got ", logits.size(-1));
  TORCH_CHECK_VALUE(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
}

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps) {
  check_args(logits, iters, eps);
  const int n = static_cast<int>(logits.size(-1));
  const at::Tensor x = logits.to(compute_dtype(logits)).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t matrices = n == 0 ? 0 : x.numel() / (n * n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, matrices, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        forward<scalar_t>(src + b * n * n, dst + b * n * n, n, static_cast<int>(iters), static_cast<scalar_t>(eps));
      }
    });
  });
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  check_args(logits, iters, eps);
  check_float(grad, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "grad must have the shape of logits ", logits.sizes(),
                    ", got ", grad.sizes());
  const int n = static_cast<int>(logits.size(-1));
  const at::Tensor x = logits.to(compute_dtype(logits)).contiguous();
  at::Tensor grad_logits = grad.to(x.scalar_type()).contiguous().clone();
  const int64_t matrices = n == 0 ? 0 : x.numel() / (n * n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_backward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* g = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, matrices, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(n * n);
      std::vector<scalar_t> states(2 * iters * n * n);  // every step's input: O(iters) backward
      for (int64_t b = begin; b < end; ++b) {
        backward<scalar_t>(src + b * n * n, g + b * n * n, scratch.data(), states.data(), n,
                           static_cast<int>(iters), static_cast<scalar_t>(eps));
      }
    });
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace sinkhorn
}  // namespace musetalk_fast
