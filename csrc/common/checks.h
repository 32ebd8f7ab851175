// Argument checks shared by the CPU glue: each error names the argument.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace musetalk_fast {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A dtype as Python spells it (float32, not Float), so C++ and Python checks say the same thing.
inline std::string dtype_name(at::ScalarType t) {
  return std::string(c10::getDtypeNames(t).first);  // a string_view in newer torch, a string in older
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name,
                   " must be float16, bfloat16, float32 or float64, got ", dtype_name(t.scalar_type()));
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have rank ", rank, ", got shape ", t.sizes());
}

// The dtype every kernel computes in: float64 stays float64 (for gradcheck), the rest float32.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace musetalk_fast
