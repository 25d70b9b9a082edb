// Fused momentum SGD step (the SVI-SGD base optimizer) over a list of CPU tensors.
#include "int8_state.h"
#include "kernel_table.h"
#include "multi_tensor.h"
#include "ops.h"
#include "segment_storage.h"
#include "tensor_checks.h"

namespace svi_kernels::cpu {

namespace {
constexpr unsigned kStateLists = 0b100;  // momentum_buffers

// The call's lists when the momentum buffers are int8 state (nullopt when they are float state).
std::optional<Int8Call> int8_lists(const char* op, at::TensorList params, at::TensorList grads,
                                   at::TensorList momentum_buffers, const std::optional<at::TensorList>& scales,
                                   int64_t block_size) {
  const Int8StateList state{"momentum_buffers", momentum_buffers, "momentum_buffer_scales", scales, true};
  if (!int8_state_requested({state})) return std::nullopt;
  return Int8Call(op, {{"params", params}, {"grads", grads}}, {state}, block_size);
}
}  // namespace

void sgd_momentum_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                       double momentum, bool nesterov, double weight_decay, bool maximize, double dampening,
                       std::optional<int64_t> state_seed, const std::optional<at::TensorList>& momentum_buffer_scales,
                       int64_t block_size) {
  SgdScalars s{lr, momentum, weight_decay, nesterov, weight_decay != 0.0, maximize};
  s.dampening = dampening;
  const std::optional<Int8Call> int8 =
      int8_lists("sgd_momentum_step", params, grads, momentum_buffers, momentum_buffer_scales, block_size);
  if (int8) return int8_sgd_momentum(*int8, s);
  const MultiTensor lists(
      "sgd_momentum_step", {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers}},
      kStateLists);
  const StateStores stores("sgd_momentum_step", lists, state_seed);
  if (lists.empty()) return;
  const auto kernel = cpu_kernels().sgd_momentum;
  lists.parallel_segments(
      [&](int64_t, const Segment& seg, void* const* ptrs) { kernel(stores(seg), ptrs, seg.length, s); });
}

void sgd_momentum_step_tensor(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, bool nesterov,
                              double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, double dampening,
                              std::optional<int64_t> state_seed,
                              const std::optional<at::TensorList>& momentum_buffer_scales, int64_t block_size) {
  constexpr const char* op = "sgd_momentum_step_tensor";
  const std::optional<Int8Call> int8 =
      int8_lists(op, params, grads, momentum_buffers, momentum_buffer_scales, block_size);
  std::optional<MultiTensor> lists;
  std::optional<StateStores> stores;
  if (!int8) {
    lists.emplace(op, std::initializer_list<NamedList>{{"params", params}, {"grads", grads},
                                                       {"momentum_buffers", momentum_buffers}},
                  kStateLists);
    stores.emplace(op, *lists, state_seed);
  }
  if ((int8 ? int8->empty() : lists->empty()) || step_skipped(op, found_inf)) return;
  if (lr_tensor.has_value()) lr = read_scalar(op, "lr_tensor", *lr_tensor);
  SgdScalars s{lr, momentum, weight_decay, nesterov, weight_decay != 0.0, maximize};
  s.dampening = dampening;
  if (grad_scale.has_value()) {
    s.unscale = true;
    s.grad_scale = read_scalar(op, "grad_scale", *grad_scale);
  }
  if (int8) return int8_sgd_momentum(*int8, s);
  const auto kernel = cpu_kernels().sgd_momentum;
  lists->parallel_segments(
      [&](int64_t, const Segment& seg, void* const* ptrs) { kernel((*stores)(seg), ptrs, seg.length, s); });
}

}  // namespace svi_kernels::cpu
