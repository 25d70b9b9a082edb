#pragma once
// CPU kernels of the svi_kernels ops (schemas in csrc/ops_schema.cpp), registered in register.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace svi_kernels::cpu {

// The float32 scales lists of int8 state (svi_kernels/int8_state.h); nullopt for float state.
using ScaleLists = std::optional<at::TensorList>;

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               double bias_correction1, double bias_correction2_sqrt, bool maximize,
               const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
               const ScaleLists& exp_avg_scales, const ScaleLists& exp_avg_sq_scales,
               const ScaleLists& max_exp_avg_sq_scales, int64_t block_size);

void sgd_momentum_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                       double momentum, bool nesterov, double weight_decay, bool maximize, double dampening,
                       std::optional<int64_t> state_seed, const ScaleLists& momentum_buffer_scales,
                       int64_t block_size);

// AMP / capturable variants: lr (lr_tensor when given), the steps, grad_scale and found_inf are
// read from CPU memory by the op; see csrc/ops_schema.cpp. The ops that write state take
// state_seed: given, the stores into bf16 state round stochastically (state_storage.h). The
// trailing scales and block_size: int8 state (svi_kernels/int8_state.h, int8_state.h here).
void adam_step_tensor(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool correct_bias, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
                      const ScaleLists& exp_avg_scales, const ScaleLists& exp_avg_sq_scales,
                      const ScaleLists& max_exp_avg_sq_scales, int64_t block_size);

void sgd_momentum_step_tensor(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, bool nesterov,
                              double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, double dampening,
                              std::optional<int64_t> state_seed,
                              const ScaleLists& momentum_buffer_scales, int64_t block_size);

// w0: one tensor per parameter that receives p, or empty: then nothing is written and only the
// per-tensor sums of g^2 are returned (the Adam line searches' gradient check, 4 B/param in fp32).
at::Tensor ls_save_sgd(at::TensorList params, at::TensorList grads, at::TensorList w0);

// w0: one tensor per parameter that receives p, or empty (p is not read: the in-place trials' save).
// dirs: empty, or one tensor per parameter that receives the search direction g / denom (needs w0).
at::Tensor ls_save_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList w0, at::TensorList dirs, double beta1, double beta2,
                        double eps, double bias_correction2_sqrt, std::optional<int64_t> state_seed,
                        const ScaleLists& exp_avg_scales, const ScaleLists& exp_avg_sq_scales, int64_t block_size);

void ls_trial_sgd(at::TensorList params, at::TensorList w0, at::TensorList grads, c10::ArrayRef<double> etas);

void ls_trial_adam(at::TensorList params, at::TensorList w0, at::TensorList grads, at::TensorList exp_avg_sqs,
                   c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt,
                   const ScaleLists& exp_avg_sq_scales, int64_t block_size);

void ls_final_adam(at::TensorList params, at::TensorList w0, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   c10::ArrayRef<double> etas, double eps, double bias_correction1, double bias_correction2_sqrt,
                   const ScaleLists& exp_avg_scales, const ScaleLists& exp_avg_sq_scales, int64_t block_size);

// The final Adam step from the trial point p = w0 - trial_eta * g / denom (in-place trials: no w0).
void ls_final_adam_from_trial(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, c10::ArrayRef<double> etas, double trial_eta, double eps,
                              double bias_correction1, double bias_correction2_sqrt,
                              const ScaleLists& exp_avg_scales, const ScaleLists& exp_avg_sq_scales,
                              int64_t block_size);

std::vector<double> increment_steps(at::TensorList steps);

}  // namespace svi_kernels::cpu
