// Torch glue of the CUDA C++ sinkhorn candidates (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sinkhorn/cpu.h"
#include "sinkhorn/cuda.h"

namespace musetalk_fast {
namespace sinkhorn {
namespace {

at::Tensor sinkhorn_cudacpp(const at::Tensor& logits, int64_t iters, double eps) {
  const Matrices m = prepare_forward(logits, iters, eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(m.logits);
  AT_DISPATCH_FLOATING_TYPES(m.logits.scalar_type(), "sinkhorn_cudacpp", [&] {
    C10_CUDA_CHECK(launch_forward<scalar_t>(m.logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                            m.count, m.n, static_cast<int>(iters), static_cast<scalar_t>(eps),
                                            c10::cuda::getCurrentCUDAStream()));
  });
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward_cudacpp(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const Matrices m = prepare_backward(grad, logits, iters, eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES(m.logits.scalar_type(), "sinkhorn_backward_cudacpp", [&] {
    C10_CUDA_CHECK(launch_backward<scalar_t>(m.logits.const_data_ptr<scalar_t>(), m.grad.mutable_data_ptr<scalar_t>(),
                                             m.count, m.n, static_cast<int>(iters), static_cast<scalar_t>(eps),
                                             c10::cuda::getCurrentCUDAStream()));
  });
  return m.grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(musetalk_fast, CUDA, m) {
  m.impl("sinkhorn_cudacpp", &sinkhorn_cudacpp);
  m.impl("sinkhorn_backward_cudacpp", &sinkhorn_backward_cudacpp);
}

}  // namespace sinkhorn
}  // namespace musetalk_fast
