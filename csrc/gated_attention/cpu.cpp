// CPU gated attention: one (batch, kv-head) group per task, the group's Hq/Hkv query heads stacked
// as rows of one matrix so GQA needs no repeated k/v. Scores are materialised for kRowChunk rows
// at a time, so memory stays O(kRowChunk * S) at any context length (the portable path; the GPU
// path is the Triton flash kernel in kernels/gated_attention.py).
#include "gated_attention/cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/checks.h"

namespace musetalk_fast {
namespace gated_attention {
namespace {

constexpr int64_t kRowChunk = 512;

struct Shape {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
  bool head_wise_gate;
};

Shape check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate) {
  check_float(q, "q");
  check_rank(q, 4, "q");
  check_rank(k, 4, "k");
  check_rank(v, 4, "v");
  check_rank(gate, 4, "gate");
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&gate, "gate"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t->device());
  }
  Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), false};
  TORCH_CHECK_VALUE(k.size(0) == s.batch, "k batch ", k.size(0), " must equal q batch ", s.batch);
  TORCH_CHECK_VALUE(k.size(3) == s.head_dim, "k head dim ", k.size(3), " must equal q head dim ", s.head_dim);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, "q heads (", s.q_heads,
                    ") must be a multiple of k/v heads (", s.kv_heads, ")");
  const bool full = gate.sizes() == q.sizes();
  s.head_wise_gate = !full && gate.size(0) == s.batch && gate.size(1) == s.q_heads && gate.size(2) == s.q_len &&
                     gate.size(3) == 1;
  TORCH_CHECK_VALUE(full || s.head_wise_gate, "gate must have shape ", q.sizes(), " or [B, Hq, L, 1], got ",
                    gate.sizes());
  return s;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Where a group's scores are masked: [G*L, S] rows (query head in group, query position), true
// where key s > query l. Top-left aligned like torch's SDPA. Undefined when not causal.
at::Tensor causal_mask(const Shape& s, bool is_causal) {
  if (!is_causal) return {};
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor query_pos = at::arange(s.q_heads / s.kv_heads * s.q_len, opts).remainder(s.q_len).unsqueeze(1);
  return at::arange(s.kv_len, opts).unsqueeze(0) > query_pos;
}

// Scaled scores of the group's rows [r0, r1), [r1 - r0, S].
at::Tensor chunk_scores(const at::Tensor& q_rows, const at::Tensor& k_head, double scale, const at::Tensor& mask,
                        at::indexing::Slice chunk) {
  at::Tensor scores = at::matmul(q_rows, k_head.transpose(0, 1)).mul_(scale);
  if (mask.defined()) scores.masked_fill_(mask.index({chunk}), -std::numeric_limits<double>::infinity());
  return scores;
}

// softmax probabilities from scores and their lse; rows with lse = -inf (no key) give zeros.
at::Tensor probabilities(const at::Tensor& scores, const at::Tensor& lse) {
  const at::Tensor finite_lse = at::where(at::isinf(lse), at::zeros_like(lse), lse);
  return at::exp(scores - finite_lse.unsqueeze(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& gate, bool is_causal, std::optional<double> scale) {
  const Shape s = check_args(q, k, v, gate);
  const double sm_scale = resolve_scale(scale, s.head_dim);
  const auto compute = compute_dtype(q);
  const int64_t group = s.q_heads / s.kv_heads;
  const at::Tensor qc = q.to(compute), kc = k.to(compute), vc = v.to(compute);
  const at::Tensor gate_sigmoid = at::sigmoid(gate.to(compute)).expand_as(qc);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(compute));
  at::Tensor lse = at::empty({s.batch, s.q_heads, s.q_len}, q.options().dtype(compute));
  const at::Tensor mask = causal_mask(s, is_causal);

  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.kv_heads, h = task % s.kv_heads;
      const auto heads = at::indexing::Slice(h * group, (h + 1) * group);
      const int64_t rows = group * s.q_len;
      const at::Tensor q_group = qc[b].index({heads}).reshape({rows, s.head_dim});
      const at::Tensor gate_group = gate_sigmoid[b].index({heads}).reshape({rows, s.head_dim});
      at::Tensor out_group = out[b].index({heads}).view({rows, s.head_dim});
      at::Tensor lse_group = lse[b].index({heads}).view({rows});
      for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const auto chunk = at::indexing::Slice(r0, std::min(rows, r0 + kRowChunk));
        const at::Tensor scores = chunk_scores(q_group.index({chunk}), kc[b][h], sm_scale, mask, chunk);
        const at::Tensor row_lse = at::logsumexp(scores, {1});
        const at::Tensor o = at::matmul(probabilities(scores, row_lse), vc[b][h]);
        out_group.index({chunk}).copy_(o * gate_group.index({chunk}));
        lse_group.index({chunk}).copy_(row_lse);
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
    const at::Tensor& out, const at::Tensor& lse, bool is_causal, std::optional<double> scale) {
  const Shape s = check_args(q, k, v, gate);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({s.batch, s.q_heads, s.q_len}), "lse must have shape [B, Hq, L] = [",
                    s.batch, ", ", s.q_heads, ", ", s.q_len, "], got ", lse.sizes());
  const double sm_scale = resolve_scale(scale, s.head_dim);
  const auto compute = compute_dtype(q);
  const int64_t group = s.q_heads / s.kv_heads;
  const at::Tensor qc = q.to(compute), kc = k.to(compute), vc = v.to(compute), lsec = lse.to(compute);
  const at::Tensor dy = grad_out.to(compute), y = out.to(compute);
  const at::Tensor gate_sigmoid = at::sigmoid(gate.to(compute));
  // SPEC 4: with Y = O * sigmoid(gate):  dO = dY * s,  rowsum(dO * O) = rowsum(dY * Y),
  // dgate = dY * Y * (1 - s) (summed over D for a head-wise gate).
  const at::Tensor d_attn = dy * gate_sigmoid;
  const at::Tensor delta = (dy * y).sum(-1);
  at::Tensor dgate = dy * y * (1 - gate_sigmoid);
  if (s.head_wise_gate) dgate = dgate.sum(-1, /*keepdim=*/true);

  // Outputs are contiguous whatever the inputs' strides (empty_like would copy a transposed layout).
  const auto options = q.options().dtype(compute);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(k.sizes(), options), dv = at::empty(v.sizes(), options);
  const at::Tensor mask = causal_mask(s, is_causal);
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.kv_heads, h = task % s.kv_heads;
      const auto heads = at::indexing::Slice(h * group, (h + 1) * group);
      const int64_t rows = group * s.q_len;
      const at::Tensor q_group = qc[b].index({heads}).reshape({rows, s.head_dim});
      const at::Tensor d_out_group = d_attn[b].index({heads}).reshape({rows, s.head_dim});
      const at::Tensor lse_group = lsec[b].index({heads}).reshape({rows});
      const at::Tensor delta_group = delta[b].index({heads}).reshape({rows, 1});
      at::Tensor dq_group = dq[b].index({heads}).view({rows, s.head_dim});
      at::Tensor dk_head = dk[b][h].zero_(), dv_head = dv[b][h].zero_();
      for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const auto chunk = at::indexing::Slice(r0, std::min(rows, r0 + kRowChunk));
        const at::Tensor q_rows = q_group.index({chunk}), d_o = d_out_group.index({chunk});
        const at::Tensor p = probabilities(chunk_scores(q_rows, kc[b][h], sm_scale, mask, chunk), lse_group.index({chunk}));
        // Softmax backward: dS = P * (dP - rowsum(dO * O)), dP = dO V^T.
        const at::Tensor dp = at::matmul(d_o, vc[b][h].transpose(0, 1));
        const at::Tensor ds = p * (dp - delta_group.index({chunk})) * sm_scale;
        dv_head.addmm_(p.transpose(0, 1), d_o);
        dk_head.addmm_(ds.transpose(0, 1), q_rows);
        dq_group.index({chunk}).copy_(at::matmul(ds, kc[b][h]));
      }
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dgate.to(gate.scalar_type()).contiguous()};
}

}  // namespace gated_attention
}  // namespace musetalk_fast
