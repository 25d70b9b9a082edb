// Picks the instruction-set build of the element loops once, at the first call.
#include "kernel_table.h"

#include <ATen/Version.h>

#include <string>

namespace svi_kernels::cpu {

namespace {

// torch's own choice (honours ATEN_CPU_CAPABILITY), so the CPU kernels never use a wider ISA
// than ATen does in the same process.
const CpuKernels* choose() {
  const std::string torch_isa = at::get_cpu_capability();
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (torch_isa == "AVX512" && avx512 && avx512_kernels() != nullptr) return avx512_kernels();
  if ((torch_isa == "AVX512" || torch_isa == "AVX2") && avx2 && avx2_kernels() != nullptr) return avx2_kernels();
#endif
  return default_kernels();
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels* const chosen = choose();
  return *chosen;
}

}  // namespace svi_kernels::cpu
