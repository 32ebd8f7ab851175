// Torch glue of the CUDA C++ sinkhorn candidates (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "sinkhorn/cpu.h"
#include "sinkhorn/cuda.h"

namespace musetalk_fast {
namespace sinkhorn {
namespace {

at::Tensor sinkhorn_cudacpp(const at::Tensor& logits, int64_t iters, double eps) {
  check_args(logits, iters, eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int n = static_cast<int>(logits.size(-1));
  const at::Tensor x = logits.to(compute_dtype(logits)).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t matrices = n == 0 ? 0 : x.numel() / (n * n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_cudacpp", [&] {
    C10_CUDA_CHECK(launch_forward<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), matrices,
                                            n, static_cast<int>(iters), static_cast<scalar_t>(eps),
                                            c10::cuda::getCurrentCUDAStream()));
  });
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward_cudacpp(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  check_args(logits, iters, eps);
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "grad must have the shape of logits ", logits.sizes(),
                    ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int n = static_cast<int>(logits.size(-1));
  const at::Tensor x = logits.to(compute_dtype(logits)).contiguous();
  at::Tensor grad_logits = grad.to(x.scalar_type()).contiguous().clone();
  const int64_t matrices = n == 0 ? 0 : x.numel() / (n * n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_backward_cudacpp", [&] {
    C10_CUDA_CHECK(launch_backward<scalar_t>(x.const_data_ptr<scalar_t>(), grad_logits.mutable_data_ptr<scalar_t>(),
                                             matrices, n, static_cast<int>(iters), static_cast<scalar_t>(eps),
                                             c10::cuda::getCurrentCUDAStream()));
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(musetalk_fast, CUDA, m) {
  m.impl("sinkhorn_cudacpp", &sinkhorn_cudacpp);
  m.impl("sinkhorn_backward_cudacpp", &sinkhorn_backward_cudacpp);
}

}  // namespace sinkhorn
}  // namespace musetalk_fast
