#pragma once
// SVI_HD: how the shared per-element functions (update_math.h, state_storage.h) are declared:
// __host__ __device__ under nvcc/hipcc, inline otherwise. A translation unit may predefine it:
// csrc/cpu/isa_*.cpp use `static inline` so that each instruction-set build keeps its own copies
// (no ODR merging).
#ifndef SVI_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SVI_HD __host__ __device__ __forceinline__
#else
#define SVI_HD inline
#endif
#endif
