#pragma once
// Momentum SGD element loop of one segment (per-ISA; see isa_kernels.h).
#include "kernel_table.h"
#include "vec_helpers.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

template <typename V, typename S>
math::SgdCoeffs<V> sgd_coeffs(const SgdScalars& s) {
  auto c = [](double x) { return V(static_cast<S>(x)); };
  return {c(s.lr), c(s.momentum), c(s.weight_decay), c(1.0 - s.dampening)};
}

template <typename T, bool kNesterov, bool kWeightDecay, bool kMaximize, bool kUnscale>
void sgd_momentum_segment(void* const* ptrs, int64_t n, const SgdScalars& s) {
  using S = at::opmath_type<T>;
  enum { P, G, B };
  constexpr unsigned kStore = bit(P) | bit(B) | (kUnscale ? bit(G) : 0u);
  const BothWidths<math::SgdCoeffs, S> coeffs{sgd_coeffs<S, S>(s), sgd_coeffs<Vectorized<S>, S>(s)};
  const S grad_scale = static_cast<S>(s.grad_scale);
  for_each_element<bit(P) | bit(G) | bit(B), kStore, false>(typed<T, 3>(ptrs), n, [coeffs, grad_scale](auto& x) {
    using Val = std::decay_t<decltype(x[0])>;
    if constexpr (kUnscale) x[G] = math::unscale_grad(x[G], Val(grad_scale));
    math::sgd_momentum_elem(x[P], x[G], x[B], coeffs.template get<Val>(), kNesterov, kWeightDecay, kMaximize);
  });
}

inline void sgd_momentum_kernel(at::ScalarType dtype, void* const* ptrs, int64_t n, const SgdScalars& s) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_flag(s.nesterov, [&](auto nesterov) {
      with_flag(s.has_weight_decay, [&](auto wd) {
        with_flag(s.maximize, [&](auto maximize) {
          with_flag(s.unscale, [&](auto unscale) {
            sgd_momentum_segment<T, nesterov(), wd(), maximize(), unscale()>(ptrs, n, s);
          });
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
