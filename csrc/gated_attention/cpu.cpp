// CPU gated attention (the portable path; the GPU path is the Triton flash kernel in
// kernels/gated_attention.py). One task per (batch, kv head): its Hq/Hkv query heads read the same
// k/v, so GQA needs no repeated k/v, and dK, dV accumulate without atomics. Each query head is
// walked in chunks of rows, scores materialised one chunk at a time, so memory stays
// O(chunk * S) at any context length. Causal chunks score only the keys they can see and mask
// only their diagonal block, like the GPU kernels (masked entries also hit exp's slow path).
#include "gated_attention/cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/checks.h"

namespace musetalk_fast {
namespace gated_attention {
namespace {

constexpr int64_t kRowChunk = 512;        // rows per chunk without a mask
constexpr int64_t kCausalRowChunk = 128;  // smaller when causal: less of each chunk is masked

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
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", dtype_name(q.scalar_type()),
                     ", got ", dtype_name(t->scalar_type()));
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

// One chunk of query rows [l0, l1) of query head `q_head`, seeing keys [0, keys).
struct Chunk {
  int64_t b, kv_head, q_head, l0, l1, keys;
  at::indexing::Slice rows() const { return at::indexing::Slice(l0, l1); }
  at::indexing::Slice visible() const { return at::indexing::Slice(0, keys); }
};

// Calls fn(chunk) for every chunk of task (b, kv_head), in order.
template <typename Fn>
void for_each_chunk(const Shape& s, bool is_causal, int64_t b, int64_t kv_head, Fn&& fn) {
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t step = is_causal ? kCausalRowChunk : kRowChunk;
  for (int64_t q_head = kv_head * group; q_head < (kv_head + 1) * group; ++q_head) {
    for (int64_t l0 = 0; l0 < s.q_len; l0 += step) {
      const int64_t l1 = std::min(s.q_len, l0 + step);
      // Top-left causal, as torch's SDPA: query l sees keys s <= l.
      fn(Chunk{b, kv_head, q_head, l0, l1, is_causal ? std::min(s.kv_len, l1) : s.kv_len});
    }
  }
}

// Scaled scores [l1 - l0, keys] of one chunk; when causal, -inf above the diagonal, which only the
// chunk's last columns [l0, keys) can hold.
at::Tensor chunk_scores(const at::Tensor& q_rows, const at::Tensor& k_visible, double scale, bool is_causal,
                        const Chunk& c) {
  at::Tensor scores = at::matmul(q_rows, k_visible.transpose(0, 1)).mul_(scale);
  if (is_causal && c.keys > c.l0) {
    const auto opts = at::TensorOptions().dtype(at::kLong);
    const at::Tensor above = at::arange(c.l0, c.keys, opts).unsqueeze(0) > at::arange(c.l0, c.l1, opts).unsqueeze(1);
    scores.slice(1, c.l0, c.keys).masked_fill_(above, -std::numeric_limits<double>::infinity());
  }
  return scores;
}

// Softmax probabilities from scores and their lse, in place over the scores (two passes, no
// allocation of the score-sized matrix); rows with lse = -inf (no key) give zeros.
at::Tensor probabilities_(at::Tensor& scores, const at::Tensor& lse) {
  const at::Tensor finite_lse = at::where(at::isinf(lse), at::zeros_like(lse), lse);
  return scores.sub_(finite_lse.unsqueeze(1)).exp_();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& gate, bool is_causal, std::optional<double> scale) {
  const Shape s = check_args(q, k, v, gate);
  const double sm_scale = resolve_scale(scale, s.head_dim);
  const auto compute = compute_dtype(q);
  const at::Tensor qc = q.to(compute), kc = k.to(compute), vc = v.to(compute);
  const at::Tensor gate_sigmoid = at::sigmoid(gate.to(compute)).expand_as(qc);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(compute));
  at::Tensor lse = at::empty({s.batch, s.q_heads, s.q_len}, q.options().dtype(compute));

  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      for_each_chunk(s, is_causal, task / s.kv_heads, task % s.kv_heads, [&](const Chunk& c) {
        if (c.keys == 0) {  // no key (S = 0): the output is 0 and the lse -inf
          out[c.b][c.q_head].index({c.rows()}).zero_();
          lse[c.b][c.q_head].index({c.rows()}).fill_(-std::numeric_limits<double>::infinity());
          return;
        }
        at::Tensor scores = chunk_scores(qc[c.b][c.q_head].index({c.rows()}), kc[c.b][c.kv_head].index({c.visible()}),
                                         sm_scale, is_causal, c);
        // One exp pass: E = exp(S - m), O = (E V) / rowsum(E), lse = m + log(rowsum(E)); the
        // division touches the [rows, D] output, not the [rows, keys] matrix.
        const at::Tensor row_max = std::get<0>(scores.max(1, /*keepdim=*/true));
        const at::Tensor row_sum = scores.sub_(row_max).exp_().sum(1, /*keepdim=*/true);
        const at::Tensor o = at::matmul(scores, vc[c.b][c.kv_head].index({c.visible()})).div_(row_sum);
        out[c.b][c.q_head].index({c.rows()}).copy_(o.mul_(gate_sigmoid[c.b][c.q_head].index({c.rows()})));
        lse[c.b][c.q_head].index({c.rows()}).copy_((row_max + row_sum.log()).squeeze(1));
      });
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
  const at::Tensor qc = q.to(compute), kc = k.to(compute), vc = v.to(compute), lsec = lse.to(compute);
  const at::Tensor dy = grad_out.to(compute), y = out.to(compute);
  const at::Tensor gate_sigmoid = at::sigmoid(gate.to(compute));
  // docs/ops.md §4: with Y = O * sigmoid(gate):  dO = dY * s,  rowsum(dO * O) = rowsum(dY * Y),
  // dgate = dY * Y * (1 - s) (summed over D for a head-wise gate).
  const at::Tensor d_attn = dy * gate_sigmoid;
  const at::Tensor delta = (dy * y).sum(-1, /*keepdim=*/true);
  at::Tensor dgate = dy * y * (1 - gate_sigmoid);
  if (s.head_wise_gate) dgate = dgate.sum(-1, /*keepdim=*/true);

  // Outputs are contiguous whatever the inputs' strides (empty_like would copy a transposed layout).
  const auto options = q.options().dtype(compute);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::zeros(k.sizes(), options), dv = at::zeros(v.sizes(), options);
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      for_each_chunk(s, is_causal, task / s.kv_heads, task % s.kv_heads, [&](const Chunk& c) {
        const at::Tensor q_rows = qc[c.b][c.q_head].index({c.rows()});
        const at::Tensor d_o = d_attn[c.b][c.q_head].index({c.rows()});
        const at::Tensor k_visible = kc[c.b][c.kv_head].index({c.visible()});
        at::Tensor scores = chunk_scores(q_rows, k_visible, sm_scale, is_causal, c);
        const at::Tensor p = probabilities_(scores, lsec[c.b][c.q_head].index({c.rows()}));
        // Softmax backward: dS = P * (dP - rowsum(dO * O)), dP = dO V^T (dS built in dP's memory).
        const at::Tensor ds = at::matmul(d_o, vc[c.b][c.kv_head].index({c.visible()}).transpose(0, 1))
                                  .sub_(delta[c.b][c.q_head].index({c.rows()}))
                                  .mul_(p)
                                  .mul_(sm_scale);
        dv[c.b][c.kv_head].index({c.visible()}).addmm_(p.transpose(0, 1), d_o);
        dk[c.b][c.kv_head].index({c.visible()}).addmm_(ds.transpose(0, 1), q_rows);
        dq[c.b][c.q_head].index({c.rows()}).copy_(at::matmul(ds, k_visible));
      });
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dgate.to(gate.scalar_type()).contiguous()};
}

}  // namespace gated_attention
}  // namespace musetalk_fast
