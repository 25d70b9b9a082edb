// Fused Adam/AdamW step over a list of CPU tensors.
#include "int8_state.h"
#include "kernel_table.h"
#include "multi_tensor.h"
#include "ops.h"
#include "segment_storage.h"
#include "tensor_checks.h"
#include "svi_kernels/adam_lists.h"
#include "svi_kernels/update_math.h"

#include <optional>
#include <string>
#include <vector>

namespace svi_kernels::cpu {
namespace {

// exp_avgs, exp_avg_sqs and max_exp_avg_sqs (lists 2, 3, 4) hold state.
constexpr unsigned kStateLists = 0b11100;

// The Adam lists (4, or 5 with AMSGrad's max_exp_avg_sqs last), checked and gathered in one pass.
MultiTensor adam_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& max_exp_avg_sqs) {
  std::optional<MultiTensor> lists;
  svi_kernels::check_adam_lists<NamedList>(
      [&](std::initializer_list<NamedList> named) {
        lists.emplace(op, named, kStateLists);
        return lists->dtype();
      },
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  return std::move(*lists);
}

// The Adam lists when the moments are int8 state (nullopt when they are float state).
std::optional<Int8Call> int8_adam_lists(const char* op, at::TensorList params, at::TensorList grads,
                                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                        const std::optional<at::TensorList>& max_exp_avg_sqs,
                                        const std::optional<at::TensorList>& exp_avg_scales,
                                        const std::optional<at::TensorList>& exp_avg_sq_scales,
                                        const std::optional<at::TensorList>& max_exp_avg_sq_scales,
                                        int64_t block_size) {
  const Int8StateList m{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, true};
  const Int8StateList v{"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false};
  const std::initializer_list<NamedList> plain{{"params", params}, {"grads", grads}};
  if (max_exp_avg_sqs.has_value()) {
    const Int8StateList maxv{"max_exp_avg_sqs", *max_exp_avg_sqs, "max_exp_avg_sq_scales", max_exp_avg_sq_scales,
                             false};
    if (!int8_state_requested({m, v, maxv})) return std::nullopt;
    return Int8Call(op, plain, {m, v, maxv}, block_size);
  }
  SVI_CHECK(!max_exp_avg_sq_scales.has_value(), "svi_kernels::", op,
            ": max_exp_avg_sq_scales given without max_exp_avg_sqs");
  if (!int8_state_requested({m, v})) return std::nullopt;
  return Int8Call(op, plain, {m, v}, block_size);
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               double bias_correction1, double bias_correction2_sqrt, bool maximize,
               const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
               const std::optional<at::TensorList>& exp_avg_scales,
               const std::optional<at::TensorList>& exp_avg_sq_scales,
               const std::optional<at::TensorList>& max_exp_avg_sq_scales, int64_t block_size) {
  // Host scalars in double, as torch computes them (see update_math.h).
  AdamScalars s{
      1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, lr / bias_correction1,
      bias_correction2_sqrt, decoupled, weight_decay != 0.0, maximize};
  s.amsgrad = max_exp_avg_sqs.has_value();
  const std::optional<Int8Call> int8 =
      int8_adam_lists("adam_step", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales,
                      exp_avg_sq_scales, max_exp_avg_sq_scales, block_size);
  if (int8) return int8_adam(*int8, {s});
  const MultiTensor lists = adam_lists("adam_step", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  const StateStores stores("adam_step", lists, state_seed);
  if (lists.empty()) return;
  const auto kernel = cpu_kernels().adam;
  lists.parallel_segments(
      [&](int64_t, const Segment& seg, void* const* ptrs) { kernel(stores(seg), ptrs, seg.length, s); });
}

void adam_step_tensor(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool correct_bias, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
                      const std::optional<at::TensorList>& exp_avg_scales,
                      const std::optional<at::TensorList>& exp_avg_sq_scales,
                      const std::optional<at::TensorList>& max_exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "adam_step_tensor";
  const std::optional<Int8Call> int8 =
      int8_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                      max_exp_avg_sq_scales, block_size);
  std::optional<MultiTensor> lists;
  std::optional<StateStores> stores;
  if (!int8) {
    lists.emplace(adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs));
    stores.emplace(op, *lists, state_seed);
  }
  check_per_tensor_scalars(op, "state_steps", state_steps.size(), params.size());
  if ((int8 ? int8->empty() : lists->empty()) || step_skipped(op, found_inf)) return;
  if (lr_tensor.has_value()) lr = read_scalar(op, "lr_tensor", *lr_tensor);
  // One scalar set per tensor: the step count (hence the bias corrections) is per parameter.
  // The same double arithmetic as adam_step's Python caller, so both paths agree bit for bit.
  std::vector<AdamScalars> per_tensor;
  per_tensor.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    double bc1 = 1.0, bc2_sqrt = 1.0;
    if (correct_bias) {
      const std::string name = "state_steps[" + std::to_string(i) + "]";
      math::adam_bias_corrections(read_scalar(op, name.c_str(), state_steps[i]), beta1, beta2, bc1, bc2_sqrt);
    }
    AdamScalars s{1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, lr / bc1,
                  bc2_sqrt, decoupled, weight_decay != 0.0, maximize};
    if (grad_scale.has_value()) {
      s.unscale = true;
      s.grad_scale = read_scalar(op, "grad_scale", *grad_scale);
    }
    s.amsgrad = max_exp_avg_sqs.has_value();
    per_tensor.push_back(s);
  }
  if (int8) return int8_adam(*int8, per_tensor);
  const auto kernel = cpu_kernels().adam;
  lists->parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) {
    kernel((*stores)(seg), ptrs, seg.length, per_tensor[seg.tensor]);
  });
}

}  // namespace svi_kernels::cpu
