// CUDA C++ top-k by radix select, one block per row (the candidate beside the Triton kernel of
// kernels/topk.py; the benchmark compares them). A float maps to an unsigned key of its width with the
// float's order (flip every bit of a negative, the sign bit of a positive). The k-th largest key is found
// 8 bits at a time from the top: a 256-bin shared-memory histogram of the next digit of the keys that
// match the digits found so far, then the digit where the count from the top reaches k. The keys above
// it are all written, then ties until k. A row with k or fewer finite keys writes them all.
#include <cstdint>

#include "topk/cuda.h"

namespace musetalk_fast {
namespace topk {
namespace {

constexpr int kThreads = 1024;
constexpr int kBins = 256;

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
};

template <typename T>
__device__ __forceinline__ typename KeyOf<T>::type order_key(T x) {
  using Key = typename KeyOf<T>::type;
  constexpr int kBits = 8 * sizeof(Key);
  Key bits;
  memcpy(&bits, &x, sizeof(Key));
  const Key sign = Key(1) << (kBits - 1);
  return (bits & sign) ? ~bits : (bits | sign);
}

// __launch_bounds__: the launch uses kThreads threads, so the compiler must fit the kernel in 64 registers
// a thread (65536 / 1024); without it nothing stops a build from taking more and every launch then failing
// with "too many resources requested" (sm_90a and sm_80 builds take about 30 today).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    radix_select_kernel(const T* __restrict__ logits, int64_t keys, int64_t row_stride, const int32_t* __restrict__ ks,
                        const int32_t* __restrict__ ke, int64_t k, int32_t* __restrict__ out) {
  using Key = typename KeyOf<T>::type;
  constexpr int kBits = 8 * sizeof(Key);
  __shared__ int hist[kBins];
  __shared__ Key chosen_prefix;
  __shared__ int64_t chosen_remaining;
  __shared__ int64_t valid_total;
  __shared__ int above_count;
  __shared__ int tie_count;

  const int64_t row = blockIdx.x;
  const int64_t lo = ks ? ks[row] : 0;
  const int64_t hi = ke ? ke[row] : keys;
  const T* x = logits + row * row_stride;
  int32_t* row_out = out + row * k;

  Key prefix = 0;
  int64_t remaining = k;
  for (int step = 0; step < kBits / 8; ++step) {
    const int shift = kBits - 8 * (step + 1);
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      const T v = x[i];
      if (!isfinite(v)) continue;
      const Key key = order_key(v);
      if (step > 0 && (key >> (shift + 8)) != (prefix >> (shift + 8))) continue;
      atomicAdd(&hist[(key >> shift) & 0xFF], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // 256 bins: one thread scans them from the top
      int64_t above = 0;
      int digit = 0;
      for (int d = kBins - 1; d >= 0; --d) {
        if (above + hist[d] >= remaining) {
          digit = d;
          break;
        }
        above += hist[d];
      }
      if (step == 0) {
        int64_t total = 0;
        for (int d = 0; d < kBins; ++d) total += hist[d];
        valid_total = total;
      }
      chosen_prefix = prefix | (Key(digit) << shift);
      chosen_remaining = remaining - above;
      above_count = 0;
      tie_count = 0;
    }
    __syncthreads();
    prefix = chosen_prefix;
    remaining = chosen_remaining;
  }
  if (valid_total <= k) prefix = 0;  // k or fewer valid keys: every valid key is above 0, take them all
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const T v = x[i];
    if (isfinite(v) && order_key(v) > prefix) row_out[atomicAdd(&above_count, 1)] = static_cast<int32_t>(i);
  }
  __syncthreads();
  const int64_t ties_wanted = k - above_count;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const T v = x[i];
    if (!isfinite(v) || order_key(v) != prefix) continue;
    const int slot = atomicAdd(&tie_count, 1);
    if (slot < ties_wanted) row_out[above_count + slot] = static_cast<int32_t>(i);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_radix_select(const T* logits, int64_t rows, int64_t keys, int64_t row_stride, const int32_t* ks,
                                const int32_t* ke, int64_t k, int32_t* out, cudaStream_t stream) {
  if (rows == 0 || keys == 0 || k == 0) return cudaSuccess;
  radix_select_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, keys, row_stride, ks, ke, k, out);
  return cudaGetLastError();
}

template cudaError_t launch_radix_select<float>(const float*, int64_t, int64_t, int64_t, const int32_t*,
                                                const int32_t*, int64_t, int32_t*, cudaStream_t);
template cudaError_t launch_radix_select<double>(const double*, int64_t, int64_t, int64_t, const int32_t*,
                                                 const int32_t*, int64_t, int32_t*, cudaStream_t);

}  // namespace topk
}  // namespace musetalk_fast
