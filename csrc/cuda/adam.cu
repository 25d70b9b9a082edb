// CUDA kernel of svi_kernels::adam_step (Adam / AdamW), one multi-tensor pass:
// reads p, g, m, v and writes p, m, v (28 B/param in fp32).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "list_checks.h"
#include "multi_tensor_apply.cuh"
#include "svi_kernels/update_math.h"

namespace svi_kernels {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs.
template <typename M, bool DECOUPLED>
struct AdamElem {
  static constexpr int kDepth = 4;
  static constexpr int kReadMask = 0b1111;
  static constexpr int kWriteMask = 0b1101;
  static constexpr bool kReduce = false;
  static constexpr bool kWithScalars = false;

  math::AdamCoeffs<M> c;
  bool has_weight_decay;
  bool maximize;

  __device__ __forceinline__ M operator()(M (&x)[kDepth], M) const {
    math::adam_elem(x[0], x[1], x[2], x[3], c, DECOUPLED, has_weight_decay, maximize);
    return M(0);
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, double bias_correction1,
                    double bias_correction2_sqrt, bool maximize) {
  const at::ScalarType dtype = check_lists("adam_step", {{"params", params}, {"grads", grads},
                                                         {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "svi_kernels::adam_step", [&] {
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
    const std::array<at::TensorList, 4> lists{params, grads, exp_avgs, exp_avg_sqs};
    if (decoupled) {
      multi_tensor_apply<scalar_t>(lists, nullptr, AdamElem<M, true>{c, has_wd, maximize}, nullptr);
    } else {
      multi_tensor_apply<scalar_t>(lists, nullptr, AdamElem<M, false>{c, has_wd, maximize}, nullptr);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace svi_kernels

TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) {
  m.impl("adam_step", &svi_kernels::cuda::adam_step_cuda);
}
