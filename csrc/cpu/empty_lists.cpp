// A call whose tensor lists are all empty carries no device, so the dispatcher cannot pick the
// CPU (or CUDA) kernel; it uses the CompositeExplicitAutograd kernel registered here. It
// returns nothing to do (an empty float32 tensor of sums for ls_save_*). The same kernel is
// reached for non-empty lists on a device that has no kernel, and then says so.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "svi_kernels/check.h"

namespace svi_kernels {
namespace {

void empty_lists_or_no_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  auto args = torch::jit::last(*stack, num_args);
  // Sparse tensors also land here (no SparseCPU/SparseCUDA kernel): name the culprit.
  for (size_t a = 0; a < num_args; ++a) {
    if (!args[a].isTensorList()) continue;
    const auto list = args[a].toTensorList();
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor t = list.get(i);
      SVI_CHECK(!t.defined() || t.layout() == at::kStrided, schema.name(), ": ", schema.arguments()[a].name(),
                  "[", i, "] has layout ", t.layout(),
                  "; the fused ops need dense tensors (sparse gradients are not supported)");
    }
  }
  for (size_t a = 0; a < num_args; ++a) {
    if (!args[a].isTensorList() || args[a].toTensorList().size() == 0) continue;
    SVI_CHECK(false, schema.name(), ": no kernel for tensors on ", args[a].toTensorList().get(0).device(),
                " in this build of svi_kernels._C");
  }
  torch::jit::drop(*stack, num_args);
  if (!schema.returns().empty()) torch::jit::push(*stack, at::empty({0}, at::TensorOptions().dtype(at::kFloat)));
}

}  // namespace
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CompositeExplicitAutograd, m) {
  for (const char* name : {"adam_step", "sgd_momentum_step", "adam_step_tensor", "sgd_momentum_step_tensor",
                           "ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam", "ls_final_adam",
                           "ls_final_adam_from_trial"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&svi_kernels::empty_lists_or_no_kernel>());
  }
}
