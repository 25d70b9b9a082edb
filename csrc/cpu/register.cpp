// Registers the CPU kernels of the svi_kernels ops with the PyTorch dispatcher.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(svi_kernels, CPU, m) {
  m.impl("adam_step", &svi_kernels::cpu::adam_step);
  m.impl("sgd_momentum_step", &svi_kernels::cpu::sgd_momentum_step);
  m.impl("adam_step_tensor", &svi_kernels::cpu::adam_step_tensor);
  m.impl("sgd_momentum_step_tensor", &svi_kernels::cpu::sgd_momentum_step_tensor);
  m.impl("ls_save_sgd", &svi_kernels::cpu::ls_save_sgd);
  m.impl("ls_save_adam", &svi_kernels::cpu::ls_save_adam);
  m.impl("ls_trial_sgd", &svi_kernels::cpu::ls_trial_sgd);
  m.impl("ls_trial_adam", &svi_kernels::cpu::ls_trial_adam);
  m.impl("ls_final_adam", &svi_kernels::cpu::ls_final_adam);
  m.impl("ls_final_adam_from_trial", &svi_kernels::cpu::ls_final_adam_from_trial);
  m.impl("increment_steps", &svi_kernels::cpu::increment_steps);
}
