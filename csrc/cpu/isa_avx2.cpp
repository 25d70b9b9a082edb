// AVX2+FMA+F16C build of the element loops: at::vec's 256-bit vectors. GCC's target pragma
// confines the instruction set to this file; kernel_select.cpp only calls it on CPUs that
// have it. Other compilers/architectures get no AVX2 build (avx2_kernels() == nullptr).
#include "isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVI_CPU_AVX2_BUILT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but does not define __AVX__, which sleef.h
// (included by at::vec) needs to declare its vector functions; the loops call none of them.
#pragma push_macro("__AVX__")
#undef __AVX__
#define __AVX__ 1
#include <sleef.h>
#pragma pop_macro("__AVX__")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SVI_CPU_ISA_NAME "avx2"
#include "isa_kernels.h"
#pragma GCC pop_options
#endif

namespace svi_kernels::cpu {
#ifdef SVI_CPU_AVX2_BUILT
const CpuKernels* avx2_kernels() { return &AVX2::kKernels; }
#else
const CpuKernels* avx2_kernels() { return nullptr; }
#endif
}  // namespace svi_kernels::cpu
