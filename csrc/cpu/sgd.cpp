// Fused momentum SGD step (the SVI-SGD base optimizer) over a list of CPU tensors.
#include "kernel_table.h"
#include "multi_tensor.h"
#include "ops.h"
#include "tensor_checks.h"

namespace svi_kernels::cpu {

void sgd_momentum_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                       double momentum, bool nesterov, double weight_decay, bool maximize) {
  const at::ScalarType dtype = check_fused_group(
      "sgd_momentum_step", {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers}});
  if (params.empty()) return;
  const SgdScalars s{lr, momentum, weight_decay, nesterov, weight_decay != 0.0, maximize};
  const auto kernel = cpu_kernels().sgd_momentum;
  const MultiTensor<3> lists({params, grads, momentum_buffers});
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) { kernel(dtype, ptrs, seg.length, s); });
}

}  // namespace svi_kernels::cpu
