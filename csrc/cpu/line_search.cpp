// Fused Armijo line-search ops over a list of CPU tensors: (a) save w0 and the
// sufficient-decrease sums, (b) trial points, (c) the final Adam step.
#include "int8_state.h"
#include "kernel_table.h"
#include "multi_tensor.h"
#include "ops.h"
#include "segment_storage.h"
#include "stream_policy.h"
#include "tensor_checks.h"

#include <vector>

#include "svi_kernels/check.h"

namespace svi_kernels::cpu {

namespace {

at::Tensor no_sums() { return at::empty({0}, at::TensorOptions().dtype(at::kFloat)); }

// An in-place call (w0 is p itself: the optimizers' trials) reads p before it writes it, so the
// cache lines are already owned and streaming stores would only evict them.
bool in_place(at::TensorList params, at::TensorList w0) {
  return !params.empty() && !w0.empty() && params[0].data_ptr() == w0[0].data_ptr();
}

// The moments' lists of an Adam line-search op (m: exp_avgs, when the op reads them).
Int8StateList m_list(at::TensorList exp_avgs, const std::optional<at::TensorList>& scales) {
  return {"exp_avgs", exp_avgs, "exp_avg_scales", scales, true};
}
Int8StateList v_list(at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& scales) {
  return {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", scales, false};
}

}  // namespace

at::Tensor ls_save_sgd(at::TensorList params, at::TensorList grads, at::TensorList w0) {
  // w0: one per parameter (p is saved there), or empty (only the sums: a read-only gradient check).
  const bool with_w0 = !w0.empty();
  const MultiTensor lists = with_w0 ? MultiTensor("ls_save_sgd", {{"params", params}, {"grads", grads}, {"w0", w0}})
                                    : MultiTensor("ls_save_sgd", {{"params", params}, {"grads", grads}});
  if (lists.empty()) return no_sums();
  const at::ScalarType dtype = lists.dtype();
  const auto kernel = cpu_kernels().ls_save_sgd;
  const LsSgdSaveScalars sc{with_w0 && stream_stores_pay(lists.bytes_per_list(), 3), with_w0};
  std::vector<double> partial(lists.num_segments(), 0.0);
  lists.parallel_segments(
      [&](int64_t s, const Segment& seg, void* const* ptrs) { partial[s] = kernel(dtype, ptrs, seg.length, sc); });
  return lists.per_tensor_sums(partial);
}

at::Tensor ls_save_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList w0, at::TensorList dirs, double beta1, double beta2,
                        double eps, double bias_correction2_sqrt, std::optional<int64_t> state_seed,
                        const std::optional<at::TensorList>& exp_avg_scales,
                        const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  // w0: one per parameter (p is saved there), or empty (p is not read: the in-place trials' save).
  // dirs: one per parameter (the search direction is written), or empty (it is not); only with w0.
  const bool with_w0 = !w0.empty(), with_dirs = !dirs.empty();
  SVI_CHECK(with_w0 || !with_dirs, "ls_save_adam: dirs needs w0 (give both, or an empty dirs)");
  const Int8StateList m = m_list(exp_avgs, exp_avg_scales), v = v_list(exp_avg_sqs, exp_avg_sq_scales);
  if (int8_state_requested({m, v})) {
    constexpr const char* op = "ls_save_adam";
    const Int8Call call =
        with_dirs ? Int8Call(op, {{"params", params}, {"grads", grads}, {"w0", w0}, {"dirs", dirs}}, {m, v}, block_size)
        : with_w0 ? Int8Call(op, {{"params", params}, {"grads", grads}, {"w0", w0}}, {m, v}, block_size)
                  : Int8Call(op, {{"params", params}, {"grads", grads}}, {m, v}, block_size);
    return int8_ls_save_adam(call, LsAdamSaveScalars{1.0 - beta1, beta2, 1.0 - beta2, eps, bias_correction2_sqrt,
                                                     false, with_dirs, with_w0});
  }
  // exp_avgs and exp_avg_sqs (lists 2, 3) hold state; w0 and dirs have the params' dtype.
  constexpr unsigned kState = 0b1100;
  const MultiTensor lists = with_dirs
      ? MultiTensor("ls_save_adam", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                     {"exp_avg_sqs", exp_avg_sqs}, {"w0", w0}, {"dirs", dirs}}, kState)
      : with_w0 ? MultiTensor("ls_save_adam", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                               {"exp_avg_sqs", exp_avg_sqs}, {"w0", w0}}, kState)
                : MultiTensor("ls_save_adam", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                               {"exp_avg_sqs", exp_avg_sqs}}, kState);
  const StateStores stores("ls_save_adam", lists, state_seed);
  if (lists.empty()) return no_sums();
  const LsAdamSaveScalars sc{1.0 - beta1, beta2, 1.0 - beta2, eps, bias_correction2_sqrt,
                             with_w0 && stream_stores_pay(lists.bytes_per_list(), with_dirs ? 6 : 5), with_dirs,
                             with_w0};
  const auto kernel = cpu_kernels().ls_save_adam;
  std::vector<double> partial(lists.num_segments(), 0.0);
  lists.parallel_segments(
      [&](int64_t s, const Segment& seg, void* const* ptrs) { partial[s] = kernel(stores(seg), ptrs, seg.length, sc); });
  return lists.per_tensor_sums(partial);
}

void ls_trial_sgd(at::TensorList params, at::TensorList w0, at::TensorList grads, c10::ArrayRef<double> etas) {
  const MultiTensor lists("ls_trial_sgd", {{"params", params}, {"w0", w0}, {"grads", grads}});
  check_per_tensor_scalars("ls_trial_sgd", "etas", etas.size(), params.size());
  if (lists.empty()) return;
  const at::ScalarType dtype = lists.dtype();
  const auto kernel = cpu_kernels().ls_trial_sgd;
  const bool stream = !in_place(params, w0) && stream_stores_pay(lists.bytes_per_list(), 3);
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) {
    kernel(dtype, ptrs, seg.length, LsStepScalars{etas[seg.tensor], 0.0, 1.0, stream});
  });
}

void ls_trial_adam(at::TensorList params, at::TensorList w0, at::TensorList grads, at::TensorList exp_avg_sqs,
                   c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt,
                   const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  const Int8StateList v = v_list(exp_avg_sqs, exp_avg_sq_scales);
  if (int8_state_requested({v})) {
    const Int8Call call("ls_trial_adam", {{"params", params}, {"w0", w0}, {"grads", grads}}, {v}, block_size);
    check_per_tensor_scalars("ls_trial_adam", "etas", etas.size(), params.size());
    return int8_ls_trial_adam(call, etas, eps, bias_correction2_sqrt);
  }
  const MultiTensor lists(
      "ls_trial_adam", {{"params", params}, {"w0", w0}, {"grads", grads}, {"exp_avg_sqs", exp_avg_sqs}}, 0b1000);
  check_per_tensor_scalars("ls_trial_adam", "etas", etas.size(), params.size());
  if (lists.empty()) return;
  const SegmentStorage st = StateStores(lists).dtypes();
  const auto kernel = cpu_kernels().ls_trial_adam;
  const bool stream = !in_place(params, w0) && stream_stores_pay(lists.bytes_per_list(), 4);
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) {
    kernel(st, ptrs, seg.length, LsStepScalars{etas[seg.tensor], eps, bias_correction2_sqrt, stream});
  });
}

void ls_final_adam(at::TensorList params, at::TensorList w0, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   c10::ArrayRef<double> etas, double eps, double bias_correction1, double bias_correction2_sqrt,
                   const std::optional<at::TensorList>& exp_avg_scales,
                   const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  const Int8StateList m = m_list(exp_avgs, exp_avg_scales), v = v_list(exp_avg_sqs, exp_avg_sq_scales);
  if (int8_state_requested({m, v})) {
    const Int8Call call("ls_final_adam", {{"params", params}, {"w0", w0}}, {m, v}, block_size);
    check_per_tensor_scalars("ls_final_adam", "etas", etas.size(), params.size());
    return int8_ls_final_adam(call, etas, eps, bias_correction1, bias_correction2_sqrt);
  }
  const MultiTensor lists(
      "ls_final_adam", {{"params", params}, {"w0", w0}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, 0b1100);
  check_per_tensor_scalars("ls_final_adam", "etas", etas.size(), params.size());
  if (lists.empty()) return;
  const SegmentStorage st = StateStores(lists).dtypes();
  const auto kernel = cpu_kernels().ls_final_adam;
  const bool stream = !in_place(params, w0) && stream_stores_pay(lists.bytes_per_list(), 4);
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) {
    // The final step moves by (eta / bias_correction1) along the momentum, computed in double.
    kernel(st, ptrs, seg.length, LsStepScalars{etas[seg.tensor] / bias_correction1, eps, bias_correction2_sqrt, stream});
  });
}

void ls_final_adam_from_trial(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, c10::ArrayRef<double> etas, double trial_eta, double eps,
                              double bias_correction1, double bias_correction2_sqrt,
                              const std::optional<at::TensorList>& exp_avg_scales,
                              const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  const Int8StateList m = m_list(exp_avgs, exp_avg_scales), v = v_list(exp_avg_sqs, exp_avg_sq_scales);
  if (int8_state_requested({m, v})) {
    const Int8Call call("ls_final_adam_from_trial", {{"params", params}, {"grads", grads}}, {m, v}, block_size);
    check_per_tensor_scalars("ls_final_adam_from_trial", "etas", etas.size(), params.size());
    return int8_ls_final_adam_from_trial(call, etas, trial_eta, eps, bias_correction1, bias_correction2_sqrt);
  }
  const MultiTensor lists("ls_final_adam_from_trial", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                                       {"exp_avg_sqs", exp_avg_sqs}}, 0b1100);
  check_per_tensor_scalars("ls_final_adam_from_trial", "etas", etas.size(), params.size());
  if (lists.empty()) return;
  const SegmentStorage st = StateStores(lists).dtypes();
  const auto kernel = cpu_kernels().ls_final_adam_from_trial;
  lists.parallel_segments([&](int64_t, const Segment& seg, void* const* ptrs) {
    LsStepScalars sc{etas[seg.tensor] / bias_correction1, eps, bias_correction2_sqrt, false};
    sc.trial_eta = trial_eta;
    kernel(st, ptrs, seg.length, sc);
  });
}

}  // namespace svi_kernels::cpu
