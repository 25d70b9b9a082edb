// AVX2 build of the int8 state loops (int8_loops.h): GCC's target pragma without "fma", so the
// update formula keeps the bits of the baseline build and of the reference. int8_state.cpp calls
// it only where ATen's kernels use AVX2 or AVX-512.
#include "isa_prelude.h"  // c10/std headers before the pragma; SVI_HD static inline in this file
#include "int8_state.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVI_INT8_AVX2_BUILT 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define SVI_INT8_ISA avx2
#include "int8_loops.h"
#pragma GCC pop_options
#endif

namespace svi_kernels::cpu {
#ifdef SVI_INT8_AVX2_BUILT
const Int8Loops* avx2_int8_loops() { return &avx2::kInt8Loops; }
#else
const Int8Loops* avx2_int8_loops() { return nullptr; }
#endif
}  // namespace svi_kernels::cpu
