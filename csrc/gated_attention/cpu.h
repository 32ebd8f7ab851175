#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace musetalk_fast {
namespace gated_attention {

// out = SDPA(q, k, v) * sigmoid(gate); lse = the row log-sum-exp of the scaled scores [B, Hq, L].
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& gate, bool is_causal, std::optional<double> scale);

// (dq, dk, dv, dgate) from the gated output `out` and `lse` alone (docs/ops.md §4: no pre-gate output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
    const at::Tensor& out, const at::Tensor& lse, bool is_causal, std::optional<double> scale);

}  // namespace gated_attention
}  // namespace musetalk_fast
