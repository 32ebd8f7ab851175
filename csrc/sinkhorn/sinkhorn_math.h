// Sinkhorn projection of one n x n matrix (mHC, arXiv 2512.24880, eq. 9), pointer level.
//
// Forward: P = exp(L - max L), then `iters` rounds of (normalise columns, normalise rows), each
// normalisation y = x / (sum x + eps) along one axis. The same functions run in the CPU kernel
// (one matrix per loop iteration) and the CUDA kernel (one matrix per thread).
//
// Backward of one normalisation, with S = sum x + eps:  dx = (dy - <dy, y>) / S  along the axis.
// The backward needs each step's input. Given `states` (2*iters*n*n scratch, the CPU's choice) it
// stores them in one forward pass: O(iters n^2). Without (states = nullptr, the GPU's choice:
// a thread's registers hold one matrix, not 40) it recomputes each from the logits:
// O(iters^2 n^2) arithmetic, no per-iteration memory.
#pragma once

#include "../common/host_device.h"

namespace musetalk_fast {
namespace sinkhorn {

// Largest n the kernels take: each matrix lives in per-thread arrays of kMaxN * kMaxN values.
constexpr int kMaxN = 16;

template <typename T>
MTF_HOST_DEVICE T exp_(T x);
template <>
MTF_HOST_DEVICE float exp_<float>(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return __builtin_expf(x);
#endif
}
template <>
MTF_HOST_DEVICE double exp_<double>(double x) {
  return __builtin_exp(x);
}

// p = exp(logits - max(logits)); returns the max.
template <typename T>
MTF_HOST_DEVICE T exp_shifted(const T* logits, T* p, int n) {
  T max_logit = logits[0];
  for (int i = 1; i < n * n; ++i) max_logit = logits[i] > max_logit ? logits[i] : max_logit;
  for (int i = 0; i < n * n; ++i) p[i] = exp_<T>(logits[i] - max_logit);
  return max_logit;
}

// Step `step` of the unrolled iteration: even steps normalise columns, odd steps rows.
template <typename T>
MTF_HOST_DEVICE void normalise(T* p, int n, int step, T eps) {
  const bool columns = (step % 2) == 0;
  for (int a = 0; a < n; ++a) {
    T sum = eps;
    for (int b = 0; b < n; ++b) sum += columns ? p[b * n + a] : p[a * n + b];
    const T inv = T(1) / sum;
    for (int b = 0; b < n; ++b) (columns ? p[b * n + a] : p[a * n + b]) *= inv;
  }
}

template <typename T>
MTF_HOST_DEVICE void forward(const T* logits, T* p, int n, int iters, T eps) {
  exp_shifted(logits, p, n);
  for (int step = 0; step < 2 * iters; ++step) normalise(p, n, step, eps);
}

// grad (n*n) holds dL/dP on entry and dL/dlogits on exit; x is n*n scratch; states is either
// nullptr or 2*iters*n*n scratch.
template <typename T>
MTF_HOST_DEVICE void backward(const T* logits, T* grad, T* x, T* states, int n, int iters, T eps) {
  const int nn = n * n;
  if (states != nullptr) {  // states[s] = the input of step s
    exp_shifted(logits, x, n);
    for (int step = 0; step < 2 * iters; ++step) {
      for (int i = 0; i < nn; ++i) states[step * nn + i] = x[i];
      normalise(x, n, step, eps);
    }
  }
  for (int step = 2 * iters - 1; step >= 0; --step) {
    if (states != nullptr) {
      for (int i = 0; i < nn; ++i) x[i] = states[step * nn + i];
    } else {
      exp_shifted(logits, x, n);
      for (int s = 0; s < step; ++s) normalise(x, n, s, eps);
    }
    // x is the input of `step`: backpropagate grad through y = x / S along its axis.
    const bool columns = (step % 2) == 0;
    for (int a = 0; a < n; ++a) {
      T sum = eps;
      for (int b = 0; b < n; ++b) sum += columns ? x[b * n + a] : x[a * n + b];
      const T inv = T(1) / sum;
      T dot = 0;  // <dy, y>
      for (int b = 0; b < n; ++b) {
        const int i = columns ? b * n + a : a * n + b;
        dot += grad[i] * x[i] * inv;
      }
      for (int b = 0; b < n; ++b) {
        const int i = columns ? b * n + a : a * n + b;
        grad[i] = (grad[i] - dot) * inv;
      }
    }
  }
  // Through p = exp(L - max L): dL_i = g_i p_i - [i is a max] * sum_j g_j p_j / (#maxima),
  // the max's share split over ties as torch's amax backward does.
  const T max_logit = exp_shifted(logits, x, n);
  T total = 0;
  int maxima = 0;
  for (int i = 0; i < n * n; ++i) {
    grad[i] *= x[i];
    total += grad[i];
    maxima += logits[i] == max_logit;
  }
  for (int i = 0; i < n * n; ++i) {
    if (logits[i] == max_logit) grad[i] -= total / T(maxima);
  }
}

}  // namespace sinkhorn
}  // namespace musetalk_fast
