#pragma once
// Adam/AdamW element loop of one segment (per-ISA; see isa_kernels.h).
#include "kernel_table.h"
#include "vec_helpers.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

template <typename V, typename S>
math::AdamCoeffs<V> adam_coeffs(const AdamScalars& s) {
  auto c = [](double x) { return V(static_cast<S>(x)); };
  return {c(s.one_minus_beta1), c(s.beta2),     c(s.one_minus_beta2), c(s.eps),
          c(s.weight_decay),    c(s.decay),     c(s.step_size),       c(s.bias_correction2_sqrt)};
}

template <typename T, bool kDecoupled, bool kWeightDecay, bool kMaximize>
void adam_segment(void* const* ptrs, int64_t n, const AdamScalars& s) {
  using S = at::opmath_type<T>;
  enum { P, G, M, V };
  const BothWidths<math::AdamCoeffs, S> coeffs{adam_coeffs<S, S>(s), adam_coeffs<Vectorized<S>, S>(s)};
  for_each_element<bit(P) | bit(G) | bit(M) | bit(V), bit(P) | bit(M) | bit(V), false>(
      typed<T, 4>(ptrs), n, [coeffs](auto& x) {
        using Val = std::decay_t<decltype(x[0])>;
        math::adam_elem(x[P], x[G], x[M], x[V], coeffs.template get<Val>(), kDecoupled, kWeightDecay, kMaximize);
      });
}

inline void adam_kernel(at::ScalarType dtype, void* const* ptrs, int64_t n, const AdamScalars& s) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_flag(s.decoupled, [&](auto decoupled) {
      with_flag(s.has_weight_decay, [&](auto wd) {
        with_flag(s.maximize, [&](auto maximize) {
          adam_segment<T, decoupled(), wd(), maximize()>(ptrs, n, s);
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
