// CPU sinkhorn: the pointer-level math of sinkhorn_math.h, one matrix per loop iteration.
#include "sinkhorn/cpu.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"
#include "sinkhorn/sinkhorn_math.h"

namespace musetalk_fast {
namespace sinkhorn {

namespace {

void check_args(const at::Tensor& logits, int64_t iters, double eps) {
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 2 && logits.size(-1) == logits.size(-2),
                    "logits must have shape [..., n, n], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(-1) <= kMaxN, "logits: n must be at most ", kMaxN, ", got ", logits.size(-1));
  TORCH_CHECK_VALUE(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
}

}  // namespace

Matrices prepare_forward(const at::Tensor& logits, int64_t iters, double eps) {
  check_args(logits, iters, eps);
  const int n = static_cast<int>(logits.size(-1));
  at::Tensor x = logits.to(compute_dtype(logits)).contiguous();
  const int64_t count = n == 0 ? 0 : x.numel() / (n * n);
  return {x, {}, n, count};
}

Matrices prepare_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  Matrices m = prepare_forward(logits, iters, eps);
  check_float(grad, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "grad must have the shape of logits ", logits.sizes(),
                    ", got ", grad.sizes());
  m.grad = at::empty(logits.sizes(), m.logits.options()).copy_(grad);  // one copy: converted, contiguous
  return m;
}

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps) {
  const Matrices m = prepare_forward(logits, iters, eps);
  at::Tensor out = at::empty_like(m.logits);
  const int n = m.n;
  AT_DISPATCH_FLOATING_TYPES(m.logits.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* src = m.logits.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, m.count, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        forward<scalar_t>(src + b * n * n, dst + b * n * n, n, static_cast<int>(iters), static_cast<scalar_t>(eps));
      }
    });
  });
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const Matrices m = prepare_backward(grad, logits, iters, eps);
  const int n = m.n;
  AT_DISPATCH_FLOATING_TYPES(m.logits.scalar_type(), "sinkhorn_backward_cpu", [&] {
    const scalar_t* src = m.logits.const_data_ptr<scalar_t>();
    scalar_t* g = m.grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, m.count, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(n * n);
      std::vector<scalar_t> states(2 * iters * n * n);  // every step's input: O(iters) backward
      for (int64_t b = begin; b < end; ++b) {
        backward<scalar_t>(src + b * n * n, g + b * n * n, scratch.data(), states.data(), n,
                           static_cast<int>(iters), static_cast<scalar_t>(eps));
      }
    });
  });
  return m.grad.to(logits.scalar_type());
}

}  // namespace sinkhorn
}  // namespace musetalk_fast
