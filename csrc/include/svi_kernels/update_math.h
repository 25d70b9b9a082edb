#pragma once
// The one per-element formula of every update in svi_kernels.
//
// csrc/cpu instantiates these templates with float/double (scalar tail) and
// at::vec::Vectorized<float>/<double> (vector body); csrc/cuda instantiates them
// with float/double in registers. svi_kernels/triton mirrors the same expression
// order, and svi_kernels/backends/reference.py is the plain PyTorch oracle.
// docs/kernels.md is the formula table all of them cite.
//
// Only + - * / , svi_sqrt() and svi_max() are used, so V may be a scalar or a SIMD vector.
// Coefficients arrive already broadcast to V (the caller does it once per chunk).
// Low-precision params (fp16/bf16) are converted to float before these are called.

#include "svi_hd.h"

#include <cmath>

namespace svi_kernels {
namespace math {

// Scalar sqrt for host and device; the CPU code adds an overload for
// at::vec::Vectorized (declared before this header's templates are instantiated).
SVI_HD float svi_sqrt(float x) { return ::sqrtf(x); }
SVI_HD double svi_sqrt(double x) { return ::sqrt(x); }
// Scalar max that propagates NaN like torch.maximum; the CPU code adds a vector overload.
SVI_HD float svi_max(float a, float b) { return (a > b || a != a) ? a : b; }
SVI_HD double svi_max(double a, double b) { return (a > b || a != a) ? a : b; }

// ---------------------------------------------------------------- Adam / AdamW
// Matches torch.optim.AdamW (decoupled) and torch.optim.Adam (L2) for one element.
// Host computes (in double): step_size = lr / (1 - beta1^t),
//   bias_correction2_sqrt = sqrt(1 - beta2^t), decay = 1 - lr * weight_decay.
// Without bias correction (original BERT Adam) both corrections are 1.
template <typename V>
struct AdamCoeffs {
  V one_minus_beta1;        // 1 - beta1
  V beta2;
  V one_minus_beta2;        // 1 - beta2
  V eps;
  V weight_decay;           // used only for L2 (decoupled == false)
  V decay;                  // 1 - lr * weight_decay, used only when decoupled
  V step_size;              // lr / bias_correction1
  V bias_correction2_sqrt;
};

// Bias corrections from the step count t, in double, as torch computes them on the host:
// bc1 = 1 - beta1^t, bc2_sqrt = sqrt(1 - beta2^t). The capturable kernels call this with the
// step read from device memory (on the host for CPU tensors).
SVI_HD void adam_bias_corrections(double step, double beta1, double beta2, double& bc1, double& bc2_sqrt) {
  bc1 = 1.0 - ::pow(beta1, step);
  bc2_sqrt = ::sqrt(1.0 - ::pow(beta2, step));
}

// AMSGRAD (torch's amsgrad=True): max_v = max(max_v, v) after the v update, and the
// denominator uses max_v instead of v. Without AMSGRAD max_v is neither read nor written.
template <bool AMSGRAD, typename V>
SVI_HD void adam_elem_impl(V& p, V g, V& m, V& v, V& max_v, const AdamCoeffs<V>& c,
                           bool decoupled, bool has_weight_decay, bool maximize) {
  if (maximize) g = V(0) - g;
  if (has_weight_decay) {
    if (decoupled) p = p * c.decay;
    else g = g + c.weight_decay * p;
  }
  m = m + c.one_minus_beta1 * (g - m);            // torch.lerp for weight < 0.5
  v = c.beta2 * v + c.one_minus_beta2 * (g * g);
  V second = v;
  if constexpr (AMSGRAD) {
    max_v = svi_max(max_v, v);
    second = max_v;
  }
  V denom = svi_sqrt(second) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

template <typename V>
SVI_HD void adam_elem(V& p, V g, V& m, V& v, const AdamCoeffs<V>& c,
                      bool decoupled, bool has_weight_decay, bool maximize) {
  adam_elem_impl<false>(p, g, m, v, v, c, decoupled, has_weight_decay, maximize);
}

template <typename V>
SVI_HD void adam_amsgrad_elem(V& p, V g, V& m, V& v, V& max_v, const AdamCoeffs<V>& c,
                              bool decoupled, bool has_weight_decay, bool maximize) {
  adam_elem_impl<true>(p, g, m, v, max_v, c, decoupled, has_weight_decay, maximize);
}

// ------------------------------------------------- momentum SGD (SVI-SGD base)
// Matches torch.optim.SGD(momentum, dampening, nesterov, weight_decay) given a zero-initialised
// buffer that takes its first step undamped (mu * 0 + 1 * g == g, torch's buffer = g; the
// caller passes dampening 0 for new buffers). one_minus_dampening == 1 is exact (1 * g == g).
template <typename V>
struct SgdCoeffs {
  V lr;
  V momentum;
  V weight_decay;
  V one_minus_dampening;
};

template <typename V>
SVI_HD void sgd_momentum_elem(V& p, V g, V& buf, const SgdCoeffs<V>& c,
                              bool nesterov, bool has_weight_decay, bool maximize) {
  if (maximize) g = V(0) - g;
  if (has_weight_decay) g = g + c.weight_decay * p;
  buf = c.momentum * buf + c.one_minus_dampening * g;
  V d = nesterov ? g + c.momentum * buf : buf;
  p = p - c.lr * d;
}

// ------------------------------------------------------------- AMP (GradScaler)
// A gradient of the scaled loss, unscaled before the update: g / scale. The callers write the
// unscaled g back to the gradient (as torch's fused optimizers do) and then call adam_elem or
// sgd_momentum_elem with it, so the update itself is the unscaled formula above.
template <typename V>
SVI_HD V unscale_grad(V g, V grad_scale) { return g / grad_scale; }

// ------------------------------------------------------------- line search
// (a) SGD: save w0 = p and accumulate ||g||^2 (the caller sums g * g).
template <typename V>
SVI_HD V ls_sq(V g) { return g * g; }

// (a) Adam: update the moments before the search, and return the preconditioned term
// g^2 / (sqrt(v_hat) + eps) for the sufficient-decrease sum; d = g / (sqrt(v_hat) + eps) is the
// search direction (the same denom and division as ls_trial_adam_elem, so d is its direction to
// the last bit when stored in the compute type): a trial is then ls_trial_sgd_elem(w0, d, eta),
// 12 instead of 16 B/param.
template <typename V>
SVI_HD V ls_adam_prepare_dir_elem(V g, V& m, V& v, V& d, V one_minus_beta1, V beta2,
                                  V one_minus_beta2, V eps, V bias_correction2_sqrt) {
  m = m + one_minus_beta1 * (g - m);
  v = beta2 * v + one_minus_beta2 * (g * g);
  V denom = svi_sqrt(v) / bias_correction2_sqrt + eps;
  d = g / denom;
  return (g * g) / denom;
}

// The same without the direction (the unused division is dead code).
template <typename V>
SVI_HD V ls_adam_prepare_elem(V g, V& m, V& v, V one_minus_beta1, V beta2,
                              V one_minus_beta2, V eps, V bias_correction2_sqrt) {
  V d;
  return ls_adam_prepare_dir_elem(g, m, v, d, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt);
}

// (b) trial points: p = w0 - eta * d, with d = g (SGD) or g / (sqrt(v_hat) + eps) (Adam). The
// line-search optimizers call them in place (w0 is p itself, eta the change of step size since
// the last trial), so no start point is stored (docs/kernels.md, "In-place trials").
template <typename V>
SVI_HD V ls_trial_sgd_elem(V w0, V g, V eta) { return w0 - eta * g; }

template <typename V>
SVI_HD V ls_trial_adam_elem(V w0, V g, V v, V eta, V eps, V bias_correction2_sqrt) {
  V denom = svi_sqrt(v) / bias_correction2_sqrt + eps;
  return w0 - eta * (g / denom);
}

// (c) final Adam step from w0 with momentum: p = w0 - (eta / bc1) * m / (sqrt(v_hat) + eps).
// The host passes eta_over_bc1 = eta / bias_correction1.
template <typename V>
SVI_HD V ls_final_adam_elem(V w0, V m, V v, V eta_over_bc1, V eps, V bias_correction2_sqrt) {
  V denom = svi_sqrt(v) / bias_correction2_sqrt + eps;
  return w0 - eta_over_bc1 * (m / denom);
}

// (c') the same final step taken from the last trial point p = w0 - trial_eta * g / denom, with
// neither w0 nor the direction stored (in-place trials, docs/kernels.md): the start point is
// recovered in the compute type (not stored) as p + trial_eta * (g / denom), the inverse of
// ls_trial_adam_elem, and the final step taken from it. Reads p, g, m, v; writes p.
template <typename V>
SVI_HD V ls_final_adam_from_trial_elem(V p, V g, V m, V v, V trial_eta, V eta_over_bc1, V eps,
                                       V bias_correction2_sqrt) {
  V denom = svi_sqrt(v) / bias_correction2_sqrt + eps;
  V w0 = p + trial_eta * (g / denom);
  return w0 - eta_over_bc1 * (m / denom);
}

}  // namespace math
}  // namespace svi_kernels
