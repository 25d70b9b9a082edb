// CUDA kernel of svi_kernels::sgd_momentum_step (momentum / Nesterov SGD, the SVI-SGD base),
// one multi-tensor pass: reads p, g, buf and writes p, buf (20 B/param in fp32). The momentum
// buffers may hold another dtype than the params (state_storage.h's pairs; bf16 buffers are
// stochastically rounded when the call gives a state_seed), or int8 codes with their block scales
// (int8_apply.cuh; state_dtype="int8").
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "int8_apply.cuh"
#include "int8_lists.h"
#include "list_checks.h"
#include "multi_tensor_apply.cuh"
#include "state_dispatch.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels {
namespace cuda {
namespace {

// The int8 state of an SGD call (checked, when asked for), else its float state's checked dtypes.
struct SgdState {
  Int8Call int8;
  ListDtypes dtypes;
};

SgdState check_sgd_state(const char* op, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const std::optional<at::TensorList>& momentum_buffer_scales, int64_t block_size) {
  SgdState state;
  const NamedList lists[] = {{"params", params}, {"grads", grads}};
  const Int8StateList int8_lists[] = {
      {"momentum_buffers", momentum_buffers, "momentum_buffer_scales", momentum_buffer_scales, true}};
  state.int8 = int8_call(op, lists, int8_lists, block_size);
  if (!state.int8.on) state.dtypes = check_lists(op, lists, {{"momentum_buffers", momentum_buffers}});
  return state;
}

// Lists: 0 params, 1 grads, 2 momentum_buffers (state, SR list 0).
template <typename M, bool NESTEROV>
struct SgdMomentumElem {
  static constexpr int kDepth = 3;
  static constexpr int kReadMask = 0b111;
  static constexpr int kWriteMask = 0b101;
  static constexpr int kStateMask = 0b100;
  static constexpr int kSignedStateMask = 0b100;  // int8 state: signed codes
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = false;

  math::SgdCoeffs<M> c;
  bool has_weight_decay;
  bool maximize;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
    math::sgd_momentum_elem(x[0], x[1], x[2], c, NESTEROV, has_weight_decay, maximize);
    return M(0);
  }
};

void sgd_momentum_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            double lr, double momentum, bool nesterov, double weight_decay, bool maximize,
                            double dampening, std::optional<int64_t> state_seed,
                            const std::optional<at::TensorList>& momentum_buffer_scales, int64_t block_size) {
  constexpr const char* op = "sgd_momentum_step";
  const SgdState state = check_sgd_state(op, params, grads, momentum_buffers, momentum_buffer_scales, block_size);
  const StateRounding rounding = state_rounding(op, state_seed);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_state(op, state.int8, state.dtypes, rounding, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    math::SgdCoeffs<M> c;
    c.lr = static_cast<M>(lr);
    c.momentum = static_cast<M>(momentum);
    c.weight_decay = static_cast<M>(weight_decay);
    c.one_minus_dampening = static_cast<M>(1.0 - dampening);
    const bool has_wd = weight_decay != 0.0;
    const std::array<at::TensorList, 3> lists{params, grads, momentum_buffers};
    if (nesterov) apply(lists, nullptr, SgdMomentumElem<M, true>{c, has_wd, maximize}, nullptr);
    else apply(lists, nullptr, SgdMomentumElem<M, false>{c, has_wd, maximize}, nullptr);
  });
}

// sgd_momentum_step_tensor: lr, the loss scale and the skip flag are read on the device (AMP
// without a host sync; CUDA-graph capture). Lists as above.
template <typename M, bool NESTEROV, bool UNSCALE>
struct SgdMomentumTensorElem {
  static constexpr int kDepth = 3;
  static constexpr int kReadMask = 0b111;
  static constexpr int kWriteMask = UNSCALE ? 0b111 : 0b101;  // unscaled grads are written back
  static constexpr int kStateMask = 0b100;
  static constexpr int kSignedStateMask = 0b100;  // int8 state: signed codes
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = false;
  static constexpr bool kDeviceScalars = true;

  DeviceScalar lr, grad_scale, found_inf;
  double momentum, weight_decay, dampening;
  bool has_weight_decay, maximize;

  struct Bound {
    math::SgdCoeffs<M> c;
    M grad_scale;
    bool skip, has_weight_decay, maximize;

    __device__ __forceinline__ bool skipped() const { return skip; }
    __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
      if constexpr (UNSCALE) x[1] = math::unscale_grad(x[1], grad_scale);
      math::sgd_momentum_elem(x[0], x[1], x[2], c, NESTEROV, has_weight_decay, maximize);
      return M(0);
    }
  };

  template <typename Meta>
  __device__ __forceinline__ Bound for_tensor(const Meta&, int) const {
    Bound b{};
    b.has_weight_decay = has_weight_decay;
    b.maximize = maximize;
    b.skip = found_inf.get() != 0.0;
    b.c.lr = static_cast<M>(lr.get());
    b.c.momentum = static_cast<M>(momentum);
    b.c.weight_decay = static_cast<M>(weight_decay);
    b.c.one_minus_dampening = static_cast<M>(1.0 - dampening);
    b.grad_scale = static_cast<M>(grad_scale.get());
    return b;
  }
};

void sgd_momentum_step_tensor_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                   double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                                   bool nesterov, double weight_decay, bool maximize,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf, double dampening,
                                   std::optional<int64_t> state_seed,
                                   const std::optional<at::TensorList>& momentum_buffer_scales, int64_t block_size) {
  constexpr const char* op = "sgd_momentum_step_tensor";
  const SgdState state = check_sgd_state(op, params, grads, momentum_buffers, momentum_buffer_scales, block_size);
  const StateRounding rounding = state_rounding(op, state_seed);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  dispatch_state(op, state.int8, state.dtypes, rounding, [&]<typename scalar_t>(auto apply) {
    using M = opmath_t<scalar_t>;
    const std::array<at::TensorList, 3> lists{params, grads, momentum_buffers};
    auto run = [&](auto elem) {
      elem.lr = device_scalar(op, "lr_tensor", lr_tensor, device, lr);
      elem.grad_scale = device_scalar(op, "grad_scale", grad_scale, device, 1.0);
      elem.found_inf = device_scalar(op, "found_inf", found_inf, device, 0.0);
      elem.momentum = momentum;
      elem.weight_decay = weight_decay;
      elem.dampening = dampening;
      elem.has_weight_decay = weight_decay != 0.0;
      elem.maximize = maximize;
      apply(lists, nullptr, elem, nullptr);
    };
    const bool unscale = grad_scale.has_value();
    if (nesterov && unscale) run(SgdMomentumTensorElem<M, true, true>{});
    else if (nesterov) run(SgdMomentumTensorElem<M, true, false>{});
    else if (unscale) run(SgdMomentumTensorElem<M, false, true>{});
    else run(SgdMomentumTensorElem<M, false, false>{});
  });
}

}  // namespace
}  // namespace cuda
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) {
  m.impl("sgd_momentum_step", &svi_kernels::cuda::sgd_momentum_step_cuda);
  m.impl("sgd_momentum_step_tensor", &svi_kernels::cuda::sgd_momentum_step_tensor_cuda);
}
