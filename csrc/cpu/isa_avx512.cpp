// AVX-512 (F/BW/VL/DQ) build of the element loops: at::vec's 512-bit vectors. GCC's target
// pragma confines the instruction set to this file; kernel_select.cpp only calls it on CPUs
// that have it. Other compilers/architectures get no AVX-512 build (avx512_kernels() == nullptr).
#include "isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVI_CPU_AVX512_BUILT 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// The pragma enables the instructions but does not define __AVX__/__AVX512F__, which sleef.h
// (included by at::vec) needs to declare its vector functions; the loops call none of them.
#pragma push_macro("__AVX__")
#pragma push_macro("__AVX512F__")
#undef __AVX__
#define __AVX__ 1
#undef __AVX512F__
#define __AVX512F__ 1
#include <sleef.h>
#pragma pop_macro("__AVX512F__")
#pragma pop_macro("__AVX__")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SVI_CPU_ISA_NAME "avx512"
#include "isa_kernels.h"
#pragma GCC pop_options
#endif

namespace svi_kernels::cpu {
#ifdef SVI_CPU_AVX512_BUILT
const CpuKernels* avx512_kernels() { return &AVX512::kKernels; }
#else
const CpuKernels* avx512_kernels() { return nullptr; }
#endif
}  // namespace svi_kernels::cpu
