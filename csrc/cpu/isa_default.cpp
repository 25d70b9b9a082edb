// Baseline build of the element loops (at::vec's generic vectors, compiled for the default
// target); used when the CPU lacks AVX2 or ATEN_CPU_CAPABILITY=default.
#include "isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define SVI_CPU_ISA_NAME "default"
#include "isa_kernels.h"

namespace svi_kernels::cpu {
const CpuKernels* default_kernels() { return &DEFAULT::kKernels; }
}  // namespace svi_kernels::cpu
