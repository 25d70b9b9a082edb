// CUDA kernels of the Armijo line-search ops (ArmijoSGD, AdamSLS, LayerwiseAdamSLS):
//   ls_save_sgd / ls_save_adam   save w0 = p (Adam: update the moments first) and return the
//                                per-tensor sufficient-decrease sums as float32 [n] on the device;
//   ls_trial_sgd / ls_trial_adam p = w0 - eta_t * d, one eta per tensor (per-layer search);
//   ls_final_adam                p = w0 - (eta_t / bc1) * m / (sqrt(v_hat) + eps);
//   ls_final_adam_from_trial     the same from the trial point p = w0 - trial_eta * g / denom
//                                (in-place trials: w0 is not stored).
// The sums never leave the device here: block sums are added atomically into one float64
// slot per tensor and rounded to float32 once, so the caller decides when to sync.
// The Adam ops' moments may hold another dtype than the params (state_storage.h's pairs; w0 and
// dirs have the params' dtype); ls_save_adam stochastically rounds bf16 moments given a state_seed.
// They may also be int8 codes with their block scales (int8_apply.cuh; state_dtype="int8").
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "int8_apply.cuh"
#include "int8_lists.h"
#include "list_checks.h"
#include "multi_tensor_apply.cuh"
#include "state_dispatch.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 w0. Reads p, g; writes w0; sums g^2. Without w0 (kWithW0 false:
// ls_save_sgd given an empty w0, the Adam line searches' gradient check) it reads g only (params
// come for the list checks), writes nothing and sums g^2 the same way.
template <typename M, bool kWithW0>
struct SaveSgdElem {
  static constexpr int kDepth = kWithW0 ? 3 : 2;
  static constexpr int kReadMask = kWithW0 ? 0b011 : 0b010;
  static constexpr int kWriteMask = kWithW0 ? 0b100 : 0b000;
  static constexpr bool kReduce = true;
  static constexpr bool kWithScalars = false;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
    if constexpr (kWithW0) x[2] = x[0];
    return math::ls_sq(x[1]);
  }
};

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs[, 4 w0[, 5 dirs]] (kDepth 4, 5 or 6).
// Reads g, m, v (and p when saving w0); writes m, v (w0, and the search direction g / denom into
// dirs); sums g^2 / (sqrt(v_hat) + eps). Depth 4 is the in-place trials' save: p is not read.
// State: m (SR list 0), v (SR list 1).
template <typename M, int kLists>
struct SaveAdamElem {
  static constexpr int kDepth = kLists;
  static constexpr int kReadMask = kLists == 4 ? 0b001110 : 0b001111;
  static constexpr int kWriteMask = kLists == 6 ? 0b111100 : kLists == 5 ? 0b011100 : 0b001100;
  static constexpr int kStateMask = 0b001100;
  static constexpr int kSignedStateMask = 0b000100;  // int8 state: exp_avgs signed
  static constexpr bool kReduce = true;
  static constexpr bool kWithScalars = false;

  M one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
    if constexpr (kLists >= 5) x[4] = x[0];
    if constexpr (kLists == 6) {
      return math::ls_adam_prepare_dir_elem(x[1], x[2], x[3], x[5], one_minus_beta1, beta2, one_minus_beta2, eps,
                                            bias_correction2_sqrt);
    } else {
      return math::ls_adam_prepare_elem(x[1], x[2], x[3], one_minus_beta1, beta2, one_minus_beta2, eps,
                                        bias_correction2_sqrt);
    }
  }
};

// Lists: 0 params, 1 w0, 2 grads; scalar = eta of the tensor. Reads w0, g; writes p.
template <typename M>
struct TrialSgdElem {
  static constexpr int kDepth = 3;
  static constexpr int kReadMask = 0b110;
  static constexpr int kWriteMask = 0b001;
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = true;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M eta) const {
    x[0] = math::ls_trial_sgd_elem(x[1], x[2], eta);
    return M(0);
  }
};

// Lists: 0 params, 1 w0, 2 grads, 3 exp_avg_sqs (state); scalar = eta. Reads w0, g, v; writes p.
template <typename M>
struct TrialAdamElem {
  static constexpr int kDepth = 4;
  static constexpr int kReadMask = 0b1110;
  static constexpr int kWriteMask = 0b0001;
  static constexpr int kStateMask = 0b1000;
  static constexpr int kSignedStateMask = 0;  // int8 state: exp_avg_sqs unsigned
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = true;

  M eps, bias_correction2_sqrt;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M eta) const {
    x[0] = math::ls_trial_adam_elem(x[1], x[2], x[3], eta, eps, bias_correction2_sqrt);
    return M(0);
  }
};

// Lists: 0 params, 1 w0, 2 exp_avgs, 3 exp_avg_sqs (state); scalar = eta / bc1. Reads w0, m, v;
// writes p.
template <typename M>
struct FinalAdamElem {
  static constexpr int kDepth = 4;
  static constexpr int kReadMask = 0b1110;
  static constexpr int kWriteMask = 0b0001;
  static constexpr int kStateMask = 0b1100;
  static constexpr int kSignedStateMask = 0b0100;  // int8 state: exp_avgs signed
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = true;

  M eps, bias_correction2_sqrt;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M eta_over_bc1) const {
    x[0] = math::ls_final_adam_elem(x[1], x[2], x[3], eta_over_bc1, eps, bias_correction2_sqrt);
    return M(0);
  }
};

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs (state); scalar = eta / bc1, trial_eta a
// member. Reads p, g, m, v; writes p (the final step from the last in-place trial point).
template <typename M>
struct FinalFromTrialElem {
  static constexpr int kDepth = 4;
  static constexpr int kReadMask = 0b1111;
  static constexpr int kWriteMask = 0b0001;
  static constexpr int kStateMask = 0b1100;
  static constexpr int kSignedStateMask = 0b0100;  // int8 state: exp_avgs signed
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = true;

  M trial_eta, eps, bias_correction2_sqrt;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M eta_over_bc1) const {
    x[0] = math::ls_final_adam_from_trial_elem(x[0], x[1], x[2], x[3], trial_eta, eta_over_bc1, eps,
                                               bias_correction2_sqrt);
    return M(0);
  }
};

// The int8 state of an Adam line-search call over `lists` (checked, when asked for), else its float
// state's checked dtypes. `state`: the op's state lists (with their scale lists) in list order.
struct LsState {
  Int8Call int8;
  ListDtypes dtypes;
};

LsState check_ls_state(const char* op, at::ArrayRef<NamedList> lists, at::ArrayRef<Int8StateList> state,
                       int64_t block_size) {
  LsState s;
  s.int8 = int8_call(op, lists, state, block_size);
  if (!s.int8.on) {
    std::vector<NamedList> state_lists;
    for (const Int8StateList& l : state) state_lists.push_back({l.name, l.codes});
    s.dtypes = check_lists(op, lists, state_lists);
  }
  return s;
}

Int8StateList exp_avgs_state(at::TensorList exp_avgs, const std::optional<at::TensorList>& exp_avg_scales) {
  return {"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, true};
}

Int8StateList exp_avg_sqs_state(at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& exp_avg_sq_scales) {
  return {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false};
}

at::Tensor empty_sums() {
  return at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
}

// float64 accumulators, one per tensor, zeroed on the current stream.
at::Tensor sum_slots(const at::Tensor& like, size_t n) {
  return at::zeros({static_cast<int64_t>(n)}, like.options().dtype(at::kDouble));
}

// w0: one per parameter (p is saved there), or empty (only the sums: nothing is written).
at::Tensor ls_save_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList w0) {
  const bool with_w0 = !w0.empty();
  const at::ScalarType dtype = with_w0
      ? check_lists("ls_save_sgd", {{"params", params}, {"grads", grads}, {"w0", w0}})
      : check_lists("ls_save_sgd", {{"params", params}, {"grads", grads}});
  if (params.empty()) return empty_sums();
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor sums = sum_slots(params[0], params.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "svi_kernels::ls_save_sgd", [&] {
    using M = opmath_t<scalar_t>;
    if (with_w0) {
      const std::array<at::TensorList, 3> lists{params, grads, w0};
      multi_tensor_apply<scalar_t>(lists, nullptr, SaveSgdElem<M, true>{}, sums.data_ptr<double>());
    } else {
      const std::array<at::TensorList, 2> lists{params, grads};
      multi_tensor_apply<scalar_t>(lists, nullptr, SaveSgdElem<M, false>{}, sums.data_ptr<double>());
    }
  });
  return sums.to(at::kFloat);
}

// w0: one per parameter (p is saved there), or empty (p is not read); dirs: one per parameter (the
// search direction is written), or empty (it is not); only with w0.
at::Tensor ls_save_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList w0, at::TensorList dirs, double beta1,
                             double beta2, double eps, double bias_correction2_sqrt,
                             std::optional<int64_t> state_seed,
                             const std::optional<at::TensorList>& exp_avg_scales,
                             const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "ls_save_adam";
  const bool with_w0 = !w0.empty(), with_dirs = !dirs.empty();
  SVI_CHECK(with_w0 || !with_dirs, "ls_save_adam: dirs needs w0 (give both, or an empty dirs)");
  const Int8StateList state_lists[] = {exp_avgs_state(exp_avgs, exp_avg_scales),
                                       exp_avg_sqs_state(exp_avg_sqs, exp_avg_sq_scales)};
  const NamedList lists[] = {{"params", params}, {"grads", grads}, {"w0", w0}, {"dirs", dirs}};
  const LsState state =
      check_ls_state(op, at::ArrayRef<NamedList>(lists, with_dirs ? 4 : with_w0 ? 3 : 2), state_lists, block_size);
  const StateRounding rounding = state_rounding(op, state_seed);
  if (params.empty()) return empty_sums();
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor sums = sum_slots(params[0], params.size());
  dispatch_state(op, state.int8, state.dtypes, rounding, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    const M c[5] = {static_cast<M>(1.0 - beta1), static_cast<M>(beta2), static_cast<M>(1.0 - beta2),
                    static_cast<M>(eps), static_cast<M>(bias_correction2_sqrt)};
    auto run = [&](const auto& lists, auto elem) { apply(lists, nullptr, elem, sums.data_ptr<double>()); };
    if (with_dirs) {
      run(std::array<at::TensorList, 6>{params, grads, exp_avgs, exp_avg_sqs, w0, dirs},
          SaveAdamElem<M, 6>{c[0], c[1], c[2], c[3], c[4]});
    } else if (with_w0) {
      run(std::array<at::TensorList, 5>{params, grads, exp_avgs, exp_avg_sqs, w0},
          SaveAdamElem<M, 5>{c[0], c[1], c[2], c[3], c[4]});
    } else {
      run(std::array<at::TensorList, 4>{params, grads, exp_avgs, exp_avg_sqs},
          SaveAdamElem<M, 4>{c[0], c[1], c[2], c[3], c[4]});
    }
  });
  return sums.to(at::kFloat);
}

void ls_trial_sgd_cuda(at::TensorList params, at::TensorList w0, at::TensorList grads, at::ArrayRef<double> etas) {
  const at::ScalarType dtype = check_lists("ls_trial_sgd", {{"params", params}, {"w0", w0}, {"grads", grads}});
  check_scalars("ls_trial_sgd", "etas", etas, params.size());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "svi_kernels::ls_trial_sgd", [&] {
    using M = opmath_t<scalar_t>;
    const std::array<at::TensorList, 3> lists{params, w0, grads};
    multi_tensor_apply<scalar_t>(lists, etas.data(), TrialSgdElem<M>{}, nullptr);
  });
}

void ls_trial_adam_cuda(at::TensorList params, at::TensorList w0, at::TensorList grads, at::TensorList exp_avg_sqs,
                        at::ArrayRef<double> etas, double eps, double bias_correction2_sqrt,
                        const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "ls_trial_adam";
  const NamedList lists[] = {{"params", params}, {"w0", w0}, {"grads", grads}};
  const Int8StateList state_lists[] = {exp_avg_sqs_state(exp_avg_sqs, exp_avg_sq_scales)};
  const LsState state = check_ls_state(op, lists, state_lists, block_size);
  check_scalars(op, "etas", etas, params.size());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_state(op, state.int8, state.dtypes, {}, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    const TrialAdamElem<M> elem{static_cast<M>(eps), static_cast<M>(bias_correction2_sqrt)};
    apply(std::array<at::TensorList, 4>{params, w0, grads, exp_avg_sqs}, etas.data(), elem, nullptr);
  });
}

void ls_final_adam_cuda(at::TensorList params, at::TensorList w0, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::ArrayRef<double> etas, double eps, double bias_correction1, double bias_correction2_sqrt,
                        const std::optional<at::TensorList>& exp_avg_scales,
                        const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "ls_final_adam";
  const NamedList lists[] = {{"params", params}, {"w0", w0}};
  const Int8StateList state_lists[] = {exp_avgs_state(exp_avgs, exp_avg_scales),
                                       exp_avg_sqs_state(exp_avg_sqs, exp_avg_sq_scales)};
  const LsState state = check_ls_state(op, lists, state_lists, block_size);
  check_scalars(op, "etas", etas, params.size());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // eta / bc1 per tensor, in double on the host (the reference divides the Python floats).
  std::vector<double> eta_over_bc1(etas.begin(), etas.end());
  for (double& e : eta_over_bc1) e /= bias_correction1;
  dispatch_state(op, state.int8, state.dtypes, {}, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    const FinalAdamElem<M> elem{static_cast<M>(eps), static_cast<M>(bias_correction2_sqrt)};
    apply(std::array<at::TensorList, 4>{params, w0, exp_avgs, exp_avg_sqs}, eta_over_bc1.data(), elem, nullptr);
  });
}

void ls_final_adam_from_trial_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::ArrayRef<double> etas, double trial_eta, double eps,
                                   double bias_correction1, double bias_correction2_sqrt,
                                   const std::optional<at::TensorList>& exp_avg_scales,
                                   const std::optional<at::TensorList>& exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "ls_final_adam_from_trial";
  const NamedList lists[] = {{"params", params}, {"grads", grads}};
  const Int8StateList state_lists[] = {exp_avgs_state(exp_avgs, exp_avg_scales),
                                       exp_avg_sqs_state(exp_avg_sqs, exp_avg_sq_scales)};
  const LsState state = check_ls_state(op, lists, state_lists, block_size);
  check_scalars(op, "etas", etas, params.size());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<double> eta_over_bc1(etas.begin(), etas.end());
  for (double& e : eta_over_bc1) e /= bias_correction1;
  dispatch_state(op, state.int8, state.dtypes, {}, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    const FinalFromTrialElem<M> elem{static_cast<M>(trial_eta), static_cast<M>(eps),
                                     static_cast<M>(bias_correction2_sqrt)};
    apply(std::array<at::TensorList, 4>{params, grads, exp_avgs, exp_avg_sqs}, eta_over_bc1.data(), elem, nullptr);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) {
  m.impl("ls_save_sgd", &svi_kernels::cuda::ls_save_sgd_cuda);
  m.impl("ls_save_adam", &svi_kernels::cuda::ls_save_adam_cuda);
  m.impl("ls_trial_sgd", &svi_kernels::cuda::ls_trial_sgd_cuda);
  m.impl("ls_trial_adam", &svi_kernels::cuda::ls_trial_adam_cuda);
  m.impl("ls_final_adam", &svi_kernels::cuda::ls_final_adam_cuda);
  m.impl("ls_final_adam_from_trial", &svi_kernels::cuda::ls_final_adam_from_trial_cuda);
}
