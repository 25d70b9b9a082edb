// Fused Adam/AdamW step over a list of CPU tensors.
#include "kernel_table.h"
#include "multi_tensor.h"
#include "ops.h"
#include "tensor_checks.h"

namespace svi_kernels::cpu {

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               double bias_correction1, double bias_correction2_sqrt, bool maximize) {
  const at::ScalarType dtype = check_fused_group(
      "adam_step", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  if (params.empty()) return;
  // Host scalars in double, as torch computes them (see update_math.h).
  const AdamScalars s{
      1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, lr / bias_correction1,
      bias_correction2_sqrt, decoupled, weight_decay != 0.0, maximize};
  const auto kernel = cpu_kernels().adam;
  const MultiTensor<4> lists({params, grads, exp_avgs, exp_avg_sqs});
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) { kernel(dtype, ptrs, seg.length, s); });
}

}  // namespace svi_kernels::cpu
