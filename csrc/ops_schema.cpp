// Declares the svi_kernels operator library. CPU kernels register in csrc/cpu,
// CUDA kernels in csrc/cuda; Python fake (meta) kernels live in
// svi_kernels/backends/compiled.py so torch.compile can trace the ops.
// Every op takes lists of tensors of ONE device and ONE dtype (a fused group),
// and launches once for the whole list.
//
// Optimizer state (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers) may have a dtype of
// its own: an allowed (param, state) pair of csrc/include/svi_kernels/state_storage.h, one dtype
// for all state lists of a call; arithmetic is float32 except for (float64, float64). The ops
// that write state take `int? state_seed=None` last: None rounds every store to nearest; given
// (0 <= state_seed < 2**31), the stores into bfloat16 state round stochastically with the bits
// of state_storage.h (the same in every backend).
//
// int8 state (issue 24 phase 2, svi_kernels/int8_state.h): the state lists hold 8-bit codes (int8
// for exp_avgs / momentum_buffers, uint8 for exp_avg_sqs / max_exp_avg_sqs) and each is paired
// with a float32 scales list (`<list>_scales`, one tensor of ceil(numel / block_size) elements per
// parameter), given iff the codes are int8/uint8; block_size is a power of two in [32, 4096].
// Params float32, float16 or bfloat16 (compute float32); state_seed is ignored for int8 state.
#include <torch/library.h>

TORCH_LIBRARY(svi_kernels, m) {
  // max_exp_avg_sqs given: AMSGrad (torch's amsgrad=True); max_v = max(max_v, v) feeds the
  // denominator instead of v. None: plain Adam.
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled, float bias_correction1, "
      "float bias_correction2_sqrt, bool maximize, Tensor(d!)[]? max_exp_avg_sqs=None, int? state_seed=None, "
      "Tensor(x!)[]? exp_avg_scales=None, Tensor(y!)[]? exp_avg_sq_scales=None, "
      "Tensor(z!)[]? max_exp_avg_sq_scales=None, int block_size=256) -> ()");
  m.def(
      "sgd_momentum_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, bool nesterov, float weight_decay, bool maximize, float dampening=0.0, "
      "int? state_seed=None, Tensor(x!)[]? momentum_buffer_scales=None, int block_size=256) -> ()");
  // Tensor-scalar variants for AMP (GradScaler) and CUDA-graph capture: lr (lr_tensor when given,
  // else lr), the per-parameter step counts (already incremented by the caller), the loss scale
  // and the skip flag are read from memory by the kernel, never by the host. When found_inf != 0
  // nothing is written; when grad_scale is given, grads are unscaled in place (g / grad_scale)
  // and the update uses the unscaled g.
  m.def(
      "adam_step_tensor(Tensor(a!)[] params, Tensor(g!)[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] state_steps, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool correct_bias, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)[]? max_exp_avg_sqs=None, int? state_seed=None, "
      "Tensor(x!)[]? exp_avg_scales=None, Tensor(y!)[]? exp_avg_sq_scales=None, "
      "Tensor(z!)[]? max_exp_avg_sq_scales=None, int block_size=256) -> ()");
  m.def(
      "sgd_momentum_step_tensor(Tensor(a!)[] params, Tensor(g!)[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, Tensor? lr_tensor, float momentum, bool nesterov, float weight_decay, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, float dampening=0.0, int? state_seed=None, "
      "Tensor(x!)[]? momentum_buffer_scales=None, int block_size=256) -> ()");
  // ls_save_sgd / ls_save_adam: w0 may be empty (nothing saved; Adam then does not read params),
  // ls_save_adam's dirs too (only with w0).
  m.def("ls_save_sgd(Tensor[] params, Tensor[] grads, Tensor(a!)[] w0) -> Tensor");
  m.def(
      "ls_save_adam(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, "
      "Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] w0, Tensor(d!)[] dirs, float beta1, float beta2, float eps, "
      "float bias_correction2_sqrt, int? state_seed=None, "
      "Tensor(x!)[]? exp_avg_scales=None, Tensor(y!)[]? exp_avg_sq_scales=None, int block_size=256) -> Tensor");
  m.def("ls_trial_sgd(Tensor(a!)[] params, Tensor[] w0, Tensor[] grads, float[] etas) -> ()");
  m.def(
      "ls_trial_adam(Tensor(a!)[] params, Tensor[] w0, Tensor[] grads, Tensor[] exp_avg_sqs, "
      "float[] etas, float eps, float bias_correction2_sqrt, Tensor[]? exp_avg_sq_scales=None, "
      "int block_size=256) -> ()");
  m.def(
      "ls_final_adam(Tensor(a!)[] params, Tensor[] w0, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "float[] etas, float eps, float bias_correction1, float bias_correction2_sqrt, "
      "Tensor[]? exp_avg_scales=None, Tensor[]? exp_avg_sq_scales=None, int block_size=256) -> ()");
  // The final Adam step from the last trial point p = w0 - trial_eta * g / (sqrt(v_hat) + eps) of
  // in-place trials (ls_trial_adam with w0 = params): p = (p + trial_eta * g / denom) - (eta_t / bc1)
  // * m / denom, with the start point recovered in the compute type (update_math.h).
  m.def(
      "ls_final_adam_from_trial(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "float[] etas, float trial_eta, float eps, float bias_correction1, float bias_correction2_sqrt, "
      "Tensor[]? exp_avg_scales=None, Tensor[]? exp_avg_sq_scales=None, int block_size=256) -> ()");
  // The float path's step counters (one-element CPU tensors): +1 each, new values returned.
  m.def("increment_steps(Tensor(a!)[] steps) -> float[]");
}
