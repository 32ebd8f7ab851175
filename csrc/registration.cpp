// The one TORCH_LIBRARY block: every schema of docs/ops.md, defined once.
//
// CPU kernels register below with TORCH_LIBRARY_IMPL; CUDA kernels written in CUDA C++ register
// from their cuda_glue.cpp, Triton kernels, fake (meta) impls and autograd from musetalk_fast/ops/.
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "engram/cpu.h"
#include "gated_attention/cpu.h"
#include "mhc/cpu.h"
#include "lightning_indexer/cpu.h"
#include "sinkhorn/cpu.h"
#include "sparse_attention/cpu.h"
#include "topk/cpu.h"

TORCH_LIBRARY(musetalk_fast, m) {
  // 1. Lightning indexer (DeepSeek Sparse Attention)
  m.def("lightning_indexer(Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke) -> Tensor");
  m.def("lightning_indexer_backward(Tensor grad, Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fp8_quantize(Tensor x, int? block=None, bool ue8m0=False) -> (Tensor, Tensor)");
  // 2. Top-k selection
  m.def("topk_indices(Tensor logits, int k, Tensor? ks=None, Tensor? ke=None, bool sorted=False) -> Tensor");
  // The CUDA C++ candidate of topk_indices, beside the Triton kernel for the benchmark (CUDA builds only).
  m.def("topk_indices_cudacpp(Tensor logits, int k, Tensor? ks=None, Tensor? ke=None, bool sorted=False) -> Tensor");
  m.def("lightning_indexer_topk(Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke, int topk) -> Tensor");
  // 3. Top-k sparse attention
  m.def("sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, float? sm_scale=None) -> (Tensor, Tensor)");
  m.def("sparse_attention_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, Tensor indices, Tensor out, Tensor lse, float? sm_scale) -> (Tensor, Tensor, Tensor)");
  // 4. Sigmoid-gated SDPA. The public op is composite over forward/backward ops that carry the
  //    row log-sum-exp, the one extra tensor the backward needs (docs/ops.md §4).
  m.def("gated_attention(Tensor q, Tensor k, Tensor v, Tensor gate, bool is_causal=False, float? scale=None) -> Tensor");
  m.def("gated_attention_forward(Tensor q, Tensor k, Tensor v, Tensor gate, bool is_causal, float? scale) -> (Tensor out, Tensor lse)");
  m.def("gated_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor gate, Tensor out, Tensor lse, bool is_causal, float? scale) -> (Tensor, Tensor, Tensor, Tensor)");
  //    Varlen: packed [T, H, D] sequences delimited by cu_seqlens (flash_attn_varlen_func's layout).
  m.def("gated_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal=False, float? scale=None) -> Tensor");
  m.def("gated_attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal, float? scale) -> (Tensor out, Tensor lse)");
  m.def("gated_attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor gate, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal, float? scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // 5. Sinkhorn mHC mixing
  m.def("sinkhorn(Tensor logits, int iters=20, float eps=1e-6) -> Tensor");
  m.def("sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor");
  // The CUDA C++ candidates of the same math, kept beside the Triton kernel so the benchmark can
  // pick the faster (registered only in CUDA builds).
  m.def("sinkhorn_cudacpp(Tensor logits, int iters=20, float eps=1e-6) -> Tensor");
  m.def("sinkhorn_backward_cudacpp(Tensor grad, Tensor logits, int iters, float eps) -> Tensor");
  // mhc_pre is composite over mhc_pre_forward, which also returns what its backward reads:
  // y = vec(x) @ phi / r and r (docs/ops.md §5).
  m.def("mhc_pre(Tensor x, Tensor phi, Tensor alpha, Tensor bias, int iters=20) -> (Tensor, Tensor, Tensor)");
  m.def("mhc_pre_forward(Tensor x, Tensor phi, Tensor alpha, Tensor bias, int iters) -> (Tensor x_in, Tensor h_post, Tensor h_res, Tensor y, Tensor r)");
  m.def("mhc_pre_backward(Tensor grad_x_in, Tensor grad_h_post, Tensor grad_h_res, Tensor x, Tensor phi, Tensor alpha, Tensor bias, Tensor y, Tensor r, int iters) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mhc_post(Tensor x, Tensor f_out, Tensor h_post, Tensor h_res) -> Tensor");
  m.def("mhc_post_backward(Tensor grad, Tensor x, Tensor f_out, Tensor h_post, Tensor h_res) -> (Tensor, Tensor, Tensor, Tensor)");
  // 6. Engram hashed n-gram memory
  m.def("engram_hash(Tensor ids, Tensor multipliers, Tensor moduli, Tensor offsets, int pad_id=0) -> Tensor");
  m.def("engram_gather(Tensor table, Tensor rows, bool sparse=False) -> Tensor");
  m.def("engram_lookup(Tensor ids, Tensor table, Tensor multipliers, Tensor moduli, Tensor offsets, int pad_id=0, bool sparse=False) -> Tensor");
  // The dense gradient of the table ([num_rows, E], deterministic); sparse=True builds its COO gradient from grad and rows.
  m.def("engram_gather_backward(Tensor grad, Tensor rows, SymInt num_rows) -> Tensor");
}

// A CPU kernel runs its ATen calls outside autocast: it picks its own precisions (float32 or float64
// accumulation), and under torch.autocast its internal matmuls would otherwise be cast to bf16, both
// losing precision in the forward and mixing dtypes in the backward (at::mm of bf16 and float: an error).
template <auto Kernel>
struct NoAutocast;

template <typename Result, typename... Args, Result (*Kernel)(Args...)>
struct NoAutocast<Kernel> {
  static Result call(Args... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return Kernel(std::forward<Args>(args)...);
  }
};

TORCH_LIBRARY_IMPL(musetalk_fast, CPU, m) {
  m.impl("sinkhorn", &NoAutocast<&musetalk_fast::sinkhorn::sinkhorn_cpu>::call);
  m.impl("sinkhorn_backward", &NoAutocast<&musetalk_fast::sinkhorn::sinkhorn_backward_cpu>::call);
  m.impl("gated_attention_forward", &NoAutocast<&musetalk_fast::gated_attention::forward_cpu>::call);
  m.impl("gated_attention_backward", &NoAutocast<&musetalk_fast::gated_attention::backward_cpu>::call);
  m.impl("engram_hash", &NoAutocast<&musetalk_fast::engram::engram_hash_cpu>::call);
  m.impl("engram_gather", &NoAutocast<&musetalk_fast::engram::engram_gather_cpu>::call);
  m.impl("engram_lookup", &NoAutocast<&musetalk_fast::engram::engram_lookup_cpu>::call);
  m.impl("engram_gather_backward", &NoAutocast<&musetalk_fast::engram::engram_gather_backward_cpu>::call);
  m.impl("mhc_pre_forward", &NoAutocast<&musetalk_fast::mhc::pre_forward_cpu>::call);
  m.impl("mhc_pre_backward", &NoAutocast<&musetalk_fast::mhc::pre_backward_cpu>::call);
  m.impl("mhc_post", &NoAutocast<&musetalk_fast::mhc::post_cpu>::call);
  m.impl("mhc_post_backward", &NoAutocast<&musetalk_fast::mhc::post_backward_cpu>::call);
  m.impl("lightning_indexer", &NoAutocast<&musetalk_fast::lightning_indexer::lightning_indexer_cpu>::call);
  m.impl("lightning_indexer_backward", &NoAutocast<&musetalk_fast::lightning_indexer::lightning_indexer_backward_cpu>::call);
  m.impl("fp8_quantize", &NoAutocast<&musetalk_fast::lightning_indexer::fp8_quantize_cpu>::call);
  m.impl("topk_indices", &NoAutocast<&musetalk_fast::topk::topk_indices_cpu>::call);
  m.impl("lightning_indexer_topk", &NoAutocast<&musetalk_fast::topk::lightning_indexer_topk_cpu>::call);
  m.impl("sparse_attention", &NoAutocast<&musetalk_fast::sparse_attention::sparse_attention_cpu>::call);
  m.impl("sparse_attention_backward", &NoAutocast<&musetalk_fast::sparse_attention::sparse_attention_backward_cpu>::call);
}

// `import musetalk_fast._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "musetalk_fast op registrations", -1, nullptr};
  return PyModule_Create(&module);
}
