#pragma once
// The interface between the ISA-neutral op code (adam.cpp, sgd.cpp, line_search.cpp) and the
// per-instruction-set builds of the element loops (isa_default.cpp, isa_avx2.cpp,
// isa_avx512.cpp). Each build fills one CpuKernels table; cpu_kernels() picks the best one the
// CPU supports, once. A kernel processes one segment: ptrs[k] is the segment's first element
// in the k-th tensor list of the op, n the element count, dtype the lists' dtype (or, for the
// ops with state lists, a SegmentStorage: the params' and the state's dtypes).
// Scalars travel in double (computed on the host as in torch) and are rounded to the compute
// type (float for fp32/fp16/bf16, double for fp64) inside the kernels.
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "svi_kernels/state_storage.h"

namespace svi_kernels::cpu {

// How the lists of one segment of a state-keeping op are stored: params and grads (and w0, dirs)
// as `param`, the state lists as `state`, an allowed pair of svi_kernels/state_storage.h.
// stochastic: the stores into bf16 state round stochastically, with the tensor's key
// sr_key(state_seed, tensor index) and `offset`, the segment's first element inside its tensor.
struct SegmentStorage {
  at::ScalarType param, state;
  bool stochastic = false;
  uint32_t key = 0;
  int64_t offset = 0;
};

struct AdamScalars {
  double one_minus_beta1, beta2, one_minus_beta2, eps;
  double weight_decay;  // L2 coefficient (decoupled == false)
  double decay;         // 1 - lr * weight_decay (decoupled == true)
  double step_size;     // lr / bias_correction1
  double bias_correction2_sqrt;
  bool decoupled, has_weight_decay, maximize;
  // AMP: divide the gradient by grad_scale first and write the unscaled gradient back.
  bool unscale = false;
  double grad_scale = 1.0;
  // AMSGrad: a fifth pointer, max_exp_avg_sqs, holds max(v) and feeds the denominator.
  bool amsgrad = false;
};

struct SgdScalars {
  double lr, momentum, weight_decay;
  bool nesterov, has_weight_decay, maximize;
  bool unscale = false;  // as in AdamScalars
  double grad_scale = 1.0;
  double dampening = 0.0;  // torch.optim.SGD's; 0 for a buffer's first step (update_math.h)
};

struct LsSgdSaveScalars {
  bool stream = false;  // write w0 with streaming stores (stream_policy.h)
  bool with_w0 = true;  // false: two pointers (params, grads), nothing is written, only the sum
};

struct LsAdamSaveScalars {
  double one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt;
  bool stream = false;  // write w0 (and dirs) with streaming stores (stream_policy.h)
  bool with_dirs = false;  // a sixth pointer, dirs, receives the search direction g / denom
  bool with_w0 = true;     // false: four pointers (params, grads, exp_avgs, exp_avg_sqs), p is not read
};

// Trial/final line-search steps: eta is the tensor's step size (eta / bias_correction1 for the
// final Adam step).
struct LsStepScalars {
  double eta, eps, bias_correction2_sqrt;
  bool stream = false;  // write p with streaming stores (stream_policy.h)
  double trial_eta = 0.0;  // ls_final_adam_from_trial: the step size of the trial point p is at
};

struct CpuKernels {
  const char* isa;  // "default", "avx2" or "avx512"
  // ptrs: params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs when amsgrad]
  // (grads written only when unscaling)
  void (*adam)(const SegmentStorage&, void* const* ptrs, int64_t n, const AdamScalars&);
  // ptrs: params, grads, momentum_buffers (grads written only when unscaling)
  void (*sgd_momentum)(const SegmentStorage&, void* const* ptrs, int64_t n, const SgdScalars&);
  // ptrs: params, grads[, w0 when with_w0]; returns the segment's sum of g^2 (stream: w0 by
  // streaming stores)
  double (*ls_save_sgd)(at::ScalarType, void* const* ptrs, int64_t n, const LsSgdSaveScalars&);
  // ptrs: params, grads, exp_avgs, exp_avg_sqs[, w0 when with_w0[, dirs when with_dirs]];
  // returns the segment's sum of g^2 / denom
  double (*ls_save_adam)(const SegmentStorage&, void* const* ptrs, int64_t n, const LsAdamSaveScalars&);
  // ptrs: params, w0, grads (eps and bias_correction2_sqrt unused)
  void (*ls_trial_sgd)(at::ScalarType, void* const* ptrs, int64_t n, const LsStepScalars&);
  // ptrs: params, w0, grads, exp_avg_sqs
  void (*ls_trial_adam)(const SegmentStorage&, void* const* ptrs, int64_t n, const LsStepScalars&);
  // ptrs: params, w0, exp_avgs, exp_avg_sqs
  void (*ls_final_adam)(const SegmentStorage&, void* const* ptrs, int64_t n, const LsStepScalars&);
  // ptrs: params, grads, exp_avgs, exp_avg_sqs (eta = eta / bias_correction1, trial_eta used)
  void (*ls_final_adam_from_trial)(const SegmentStorage&, void* const* ptrs, int64_t n, const LsStepScalars&);
};

// One table per build; avx2_kernels()/avx512_kernels() return nullptr when the compiler could
// not build that variant (non-x86, or a compiler without GCC's target pragma).
const CpuKernels* default_kernels();
const CpuKernels* avx2_kernels();
const CpuKernels* avx512_kernels();

// The table for this CPU. Honours ATEN_CPU_CAPABILITY=default|avx2|avx512 like torch does.
const CpuKernels& cpu_kernels();

}  // namespace svi_kernels::cpu
