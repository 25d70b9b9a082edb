// CUDA kernel of svi_kernels::sgd_momentum_step (momentum / Nesterov SGD, the SVI-SGD base),
// one multi-tensor pass: reads p, g, buf and writes p, buf (20 B/param in fp32).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "list_checks.h"
#include "multi_tensor_apply.cuh"
#include "svi_kernels/update_math.h"

namespace svi_kernels {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 momentum_buffers.
template <typename M, bool NESTEROV>
struct SgdMomentumElem {
  static constexpr int kDepth = 3;
  static constexpr int kReadMask = 0b111;
  static constexpr int kWriteMask = 0b101;
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
                            double lr, double momentum, bool nesterov, double weight_decay, bool maximize) {
  const at::ScalarType dtype = check_lists(
      "sgd_momentum_step", {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers}});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "svi_kernels::sgd_momentum_step", [&] {
    using M = opmath_t<scalar_t>;
    math::SgdCoeffs<M> c;
    c.lr = static_cast<M>(lr);
    c.momentum = static_cast<M>(momentum);
    c.weight_decay = static_cast<M>(weight_decay);
    const bool has_wd = weight_decay != 0.0;
    const std::array<at::TensorList, 3> lists{params, grads, momentum_buffers};
    if (nesterov) {
      multi_tensor_apply<scalar_t>(lists, nullptr, SgdMomentumElem<M, true>{c, has_wd, maximize}, nullptr);
    } else {
      multi_tensor_apply<scalar_t>(lists, nullptr, SgdMomentumElem<M, false>{c, has_wd, maximize}, nullptr);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) {
  m.impl("sgd_momentum_step", &svi_kernels::cuda::sgd_momentum_step_cuda);
}
