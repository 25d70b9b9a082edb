#pragma once
// The CpuKernels table of one instruction-set build. Included by isa_default.cpp, isa_avx2.cpp
// and isa_avx512.cpp after they have set CPU_CAPABILITY (and the matching target pragma), so
// each build's code lives in its own namespace svi_kernels::cpu::<ISA> and cannot be merged
// with another build's by the linker.
#include "adam_loop.h"
#include "line_search_loop.h"
#include "sgd_loop.h"

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

// constexpr: filled at compile time, so no static initializer runs ISA-specific code at load.
constexpr CpuKernels kKernels{
    SVI_CPU_ISA_NAME,  adam_kernel,          sgd_momentum_kernel,  ls_save_sgd_kernel,
    ls_save_adam_kernel, ls_trial_sgd_kernel, ls_trial_adam_kernel, ls_final_adam_kernel,
    ls_final_adam_from_trial_kernel,
};

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
