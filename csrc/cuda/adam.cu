// CUDA kernels of svi_kernels::adam_step (Adam / AdamW), one multi-tensor pass:
// reads p, g, m, v and writes p, m, v (28 B/param in fp32), and of its tensor-scalar variant
// adam_step_tensor (AMP loss scale, capturable; also writes g when unscaling). With
// max_exp_avg_sqs (AMSGrad) one more list is read and written (36 B/param in fp32). The moments
// may hold another dtype than the params (state_storage.h's pairs; bf16 moments are
// stochastically rounded when the call gives a state_seed), or int8 codes with their block scales
// (int8_apply.cuh; state_dtype="int8").
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>

#include "int8_apply.cuh"
#include "int8_lists.h"
#include "list_checks.h"
#include "multi_tensor_apply.cuh"
#include "state_dispatch.h"
#include "svi_kernels/adam_lists.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels {
namespace cuda {
namespace {

// One element of Adam, or of AMSGrad when max_v is the list at index `max_list`.
template <bool AMSGRAD, typename M, typename Coeffs>
__device__ __forceinline__ void adam_or_amsgrad(M* x, int max_list, const Coeffs& c, bool decoupled,
                                                bool has_weight_decay, bool maximize) {
  if constexpr (AMSGRAD) {
    math::adam_amsgrad_elem(x[0], x[1], x[2], x[3], x[max_list], c, decoupled, has_weight_decay, maximize);
  } else {
    math::adam_elem(x[0], x[1], x[2], x[3], c, decoupled, has_weight_decay, maximize);
  }
}

// adam_lists.h names the lists params, grads, then the state lists (exp_avgs, exp_avg_sqs[,
// max_exp_avg_sqs]): the first two share the params' dtype, the others the state dtype.
ListDtypes check_adam_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& max_exp_avg_sqs) {
  ListDtypes dtypes;
  svi_kernels::check_adam_lists<NamedList>(
      [op, &dtypes](std::initializer_list<NamedList> lists) {
        const at::ArrayRef<NamedList> all(lists);
        dtypes = check_lists(op, all.slice(0, 2), all.slice(2));
        return dtypes.param;
      },
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  return dtypes;
}

// The int8 state of an Adam call (checked, when asked for), else its float state's checked dtypes.
struct AdamState {
  Int8Call int8;
  ListDtypes dtypes;
};

AdamState check_adam_state(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& max_exp_avg_sqs,
                           const std::optional<at::TensorList>& exp_avg_scales,
                           const std::optional<at::TensorList>& exp_avg_sq_scales,
                           const std::optional<at::TensorList>& max_exp_avg_sq_scales, int64_t block_size) {
  AdamState state;
  const std::vector<Int8StateList> int8_lists = adam_int8_state(op, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                                exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales);
  state.int8 = int8_call(op, {{"params", params}, {"grads", grads}}, int8_lists, block_size);
  if (!state.int8.on) state.dtypes = check_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs);
  return state;
}

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, [4 max_exp_avg_sqs when AMSGRAD]; the
// state lists in SR list order (0 exp_avgs, 1 exp_avg_sqs, 2 max_exp_avg_sqs).
template <typename M, bool DECOUPLED, bool AMSGRAD>
struct AdamElem {
  static constexpr int kDepth = AMSGRAD ? 5 : 4;
  static constexpr int kReadMask = AMSGRAD ? 0b11111 : 0b1111;
  static constexpr int kWriteMask = AMSGRAD ? 0b11101 : 0b1101;
  static constexpr int kStateMask = AMSGRAD ? 0b11100 : 0b1100;
  static constexpr int kSignedStateMask = 0b100;  // int8 state: exp_avgs signed
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = false;

  math::AdamCoeffs<M> c;
  bool has_weight_decay;
  bool maximize;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
    adam_or_amsgrad<AMSGRAD>(x, 4, c, DECOUPLED, has_weight_decay, maximize);
    return M(0);
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, double bias_correction1,
                    double bias_correction2_sqrt, bool maximize,
                    const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
                    const std::optional<at::TensorList>& exp_avg_scales,
                    const std::optional<at::TensorList>& exp_avg_sq_scales,
                    const std::optional<at::TensorList>& max_exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "adam_step";
  const AdamState state = check_adam_state(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales,
                                           exp_avg_sq_scales, max_exp_avg_sq_scales, block_size);
  const StateRounding rounding = state_rounding(op, state_seed);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_state(op, state.int8, state.dtypes, rounding, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    // Host scalars in double, rounded once to the compute type (as the reference does).
    math::AdamCoeffs<M> c;
    c.one_minus_beta1 = static_cast<M>(1.0 - beta1);
    c.beta2 = static_cast<M>(beta2);
    c.one_minus_beta2 = static_cast<M>(1.0 - beta2);
    c.eps = static_cast<M>(eps);
    c.weight_decay = static_cast<M>(weight_decay);
    c.decay = static_cast<M>(1.0 - lr * weight_decay);
    c.step_size = static_cast<M>(lr / bias_correction1);
    c.bias_correction2_sqrt = static_cast<M>(bias_correction2_sqrt);
    const bool has_wd = weight_decay != 0.0;
    auto run = [&](const auto& lists, auto elem) { apply(lists, nullptr, elem, nullptr); };
    if (max_exp_avg_sqs.has_value()) {
      const std::array<at::TensorList, 5> lists{params, grads, exp_avgs, exp_avg_sqs, *max_exp_avg_sqs};
      if (decoupled) run(lists, AdamElem<M, true, true>{c, has_wd, maximize});
      else run(lists, AdamElem<M, false, true>{c, has_wd, maximize});
    } else {
      const std::array<at::TensorList, 4> lists{params, grads, exp_avgs, exp_avg_sqs};
      if (decoupled) run(lists, AdamElem<M, true, false>{c, has_wd, maximize});
      else run(lists, AdamElem<M, false, false>{c, has_wd, maximize});
    }
  });
}

// adam_step_tensor: lr, the step counts, the loss scale and the skip flag are read on the device,
// so the op never waits for the host (GradScaler without a sync; CUDA-graph capture). Lists:
// 0-3 as above, 4 state_steps, [5 max_exp_avg_sqs when AMSGRAD]. The steps ride in the address
// table as a list that is neither read nor written element-wise: each block reads its tensor's
// step once. State lists in SR list order: 2 exp_avgs, 3 exp_avg_sqs, 5 max_exp_avg_sqs.
template <typename M, bool DECOUPLED, bool UNSCALE, bool AMSGRAD>
struct AdamTensorElem {
  static constexpr int kDepth = AMSGRAD ? 6 : 5;
  static constexpr int kMax = AMSGRAD ? 0b100000 : 0;
  static constexpr int kReadMask = 0b01111 | kMax;
  static constexpr int kWriteMask = (UNSCALE ? 0b01111 : 0b01101) | kMax;  // unscaled grads are written back
  static constexpr int kStateMask = 0b01100 | kMax;
  static constexpr int kSignedStateMask = 0b00100;  // int8 state: exp_avgs signed
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = false;
  static constexpr bool kDeviceScalars = true;

  DeviceScalar lr, grad_scale, found_inf;
  double beta1, beta2, eps, weight_decay;
  bool steps_double, correct_bias, has_weight_decay, maximize;

  // The op with one tensor's coefficients, computed in double as the host computes them.
  struct Bound {
    math::AdamCoeffs<M> c;
    M grad_scale;
    bool skip, has_weight_decay, maximize;

    __device__ __forceinline__ bool skipped() const { return skip; }
    __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
      if constexpr (UNSCALE) x[1] = math::unscale_grad(x[1], grad_scale);  // stored back (write mask)
      adam_or_amsgrad<AMSGRAD>(x, 5, c, DECOUPLED, has_weight_decay, maximize);
      return M(0);
    }
  };

  template <typename Meta>
  __device__ __forceinline__ Bound for_tensor(const Meta& meta, int slot) const {
    Bound b{};
    b.has_weight_decay = has_weight_decay;
    b.maximize = maximize;
    b.skip = found_inf.get() != 0.0;
    if (b.skip) return b;
    const double lr_value = lr.get();
    double bc1 = 1.0, bc2_sqrt = 1.0;
    if (correct_bias) {
      const void* step = meta.addresses[4][slot];
      const double t = steps_double ? *static_cast<const double*>(step)
                                    : static_cast<double>(*static_cast<const float*>(step));
      math::adam_bias_corrections(t, beta1, beta2, bc1, bc2_sqrt);
    }
    b.c.one_minus_beta1 = static_cast<M>(1.0 - beta1);
    b.c.beta2 = static_cast<M>(beta2);
    b.c.one_minus_beta2 = static_cast<M>(1.0 - beta2);
    b.c.eps = static_cast<M>(eps);
    b.c.weight_decay = static_cast<M>(weight_decay);
    b.c.decay = static_cast<M>(1.0 - lr_value * weight_decay);
    b.c.step_size = static_cast<M>(lr_value / bc1);
    b.c.bias_correction2_sqrt = static_cast<M>(bc2_sqrt);
    b.grad_scale = static_cast<M>(grad_scale.get());
    return b;
  }
};

void adam_step_tensor_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                           double weight_decay, bool decoupled, bool correct_bias, bool maximize,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::TensorList>& max_exp_avg_sqs, std::optional<int64_t> state_seed,
                           const std::optional<at::TensorList>& exp_avg_scales,
                           const std::optional<at::TensorList>& exp_avg_sq_scales,
                           const std::optional<at::TensorList>& max_exp_avg_sq_scales, int64_t block_size) {
  constexpr const char* op = "adam_step_tensor";
  const AdamState state = check_adam_state(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales,
                                           exp_avg_sq_scales, max_exp_avg_sq_scales, block_size);
  const StateRounding rounding = state_rounding(op, state_seed);
  SVI_CHECK(state_steps.size() == params.size(), op, ": state_steps has ", state_steps.size(),
              " tensors but params has ", params.size());
  if (params.empty()) return;
  const at::Device device = params[0].device();
  bool steps_double = false;
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const bool is_double = check_device_scalar(op, "state_steps[" + std::to_string(i) + "]", state_steps[i], device);
    SVI_CHECK(i == 0 || is_double == steps_double, op, ": all state_steps must share one dtype");
    steps_double = is_double;
  }
  const c10::cuda::CUDAGuard guard(device);
  dispatch_state(op, state.int8, state.dtypes, rounding, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    auto run = [&](auto elem) {
      elem.lr = device_scalar(op, "lr_tensor", lr_tensor, device, lr);
      elem.grad_scale = device_scalar(op, "grad_scale", grad_scale, device, 1.0);
      elem.found_inf = device_scalar(op, "found_inf", found_inf, device, 0.0);
      elem.beta1 = beta1;
      elem.beta2 = beta2;
      elem.eps = eps;
      elem.weight_decay = weight_decay;
      elem.steps_double = steps_double;
      elem.correct_bias = correct_bias;
      elem.has_weight_decay = weight_decay != 0.0;
      elem.maximize = maximize;
      if constexpr (decltype(elem)::kDepth == 6) {
        const std::array<at::TensorList, 6> lists{params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                                  *max_exp_avg_sqs};
        apply(lists, nullptr, elem, nullptr);
      } else {
        const std::array<at::TensorList, 5> lists{params, grads, exp_avgs, exp_avg_sqs, state_steps};
        apply(lists, nullptr, elem, nullptr);
      }
    };
    const bool unscale = grad_scale.has_value();
    auto run_amsgrad = [&](auto amsgrad) {
      constexpr bool A = decltype(amsgrad)::value;
      if (decoupled && unscale) run(AdamTensorElem<M, true, true, A>{});
      else if (decoupled) run(AdamTensorElem<M, true, false, A>{});
      else if (unscale) run(AdamTensorElem<M, false, true, A>{});
      else run(AdamTensorElem<M, false, false, A>{});
    };
    if (max_exp_avg_sqs.has_value()) run_amsgrad(std::true_type{});
    else run_amsgrad(std::false_type{});
  });
}

}  // namespace
}  // namespace cuda
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) {
  m.impl("adam_step", &svi_kernels::cuda::adam_step_cuda);
  m.impl("adam_step_tensor", &svi_kernels::cuda::adam_step_tensor_cuda);
}
