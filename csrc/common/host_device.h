// Pointer-level code shared by the CPU (g++) and CUDA (nvcc) kernels: no torch headers here.
#pragma once

#if defined(__CUDACC__)
#define MTF_HOST_DEVICE __host__ __device__ __forceinline__
#define MTF_UNROLL _Pragma("unroll")
#else
#define MTF_HOST_DEVICE inline
#define MTF_UNROLL
#endif
