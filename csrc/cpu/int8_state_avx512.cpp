// AVX-512 build of the int8 state loops (int8_loops.h), chosen where ATen's kernels use AVX-512.
// Its gain is in the codec, not the width: mask registers for the clamps and selects, and
// down-converting stores for the codes (1.5x the AVX2 build's adam step on an AMD EPYC, whose
// 512-bit square roots are no faster per element; docs/benchmarks.md). The target names no "fma"
// and fp-contract is off, because AVX-512F implies FMA in GCC and a contracted a * b + c would change
// the bits of the update_math.h formula: every build gives the reference's bits.
#include "isa_prelude.h"  // c10/std headers before the pragma; SVI_HD static inline in this file
#include "int8_state.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVI_INT8_AVX512_BUILT 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,prefer-vector-width=512")
#pragma GCC optimize("fp-contract=off")
#define SVI_INT8_ISA avx512
#include "int8_loops.h"
#pragma GCC pop_options
#endif

namespace svi_kernels::cpu {
#ifdef SVI_INT8_AVX512_BUILT
const Int8Loops* avx512_int8_loops() { return &avx512::kInt8Loops; }
#else
const Int8Loops* avx512_int8_loops() { return nullptr; }
#endif
}  // namespace svi_kernels::cpu
