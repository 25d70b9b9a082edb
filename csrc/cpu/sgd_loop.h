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

// T: params and grads, TS: the momentum buffers (kSr: bf16 buffers stored with stochastic rounding).
template <typename T, typename TS, bool kSr, bool kNesterov, bool kWeightDecay, bool kMaximize, bool kUnscale>
void sgd_momentum_segment(const SegmentStorage& st, void* const* ptrs, int64_t n, const SgdScalars& s) {
  using Ops = Operands<T, T, TS>;
  using S = typename Ops::S;
  enum { P, G, B };
  constexpr unsigned kStore = bit(P) | bit(B) | (kUnscale ? bit(G) : 0u);
  Ops ops = operands_of<Ops>(ptrs);
  if constexpr (kSr) ops.sr_base[B] = segment_sr_base(st, kSrMomentumBuffers);
  const BothWidths<math::SgdCoeffs, S> coeffs{sgd_coeffs<S, S>(s), sgd_coeffs<Vectorized<S>, S>(s)};
  const S grad_scale = static_cast<S>(s.grad_scale);
  for_each_element<bit(P) | bit(G) | bit(B), kStore, false, 0, 0, kSr ? bit(B) : 0u>(
      ops, n, [coeffs, grad_scale](auto& x) {
        using Val = std::decay_t<decltype(x[0])>;
        if constexpr (kUnscale) x[G] = math::unscale_grad(x[G], Val(grad_scale));
        math::sgd_momentum_elem(x[P], x[G], x[B], coeffs.template get<Val>(), kNesterov, kWeightDecay, kMaximize);
      });
}

inline void sgd_momentum_kernel(const SegmentStorage& st, void* const* ptrs, int64_t n, const SgdScalars& s) {
  dispatch_storage(st, [&](auto tag, auto state_tag, auto sr) {
    using T = typename decltype(tag)::type;
    using TS = typename decltype(state_tag)::type;
    with_flag(s.nesterov, [&](auto nesterov) {
      with_flag(s.has_weight_decay, [&](auto wd) {
        with_flag(s.maximize, [&](auto maximize) {
          with_flag(s.unscale, [&](auto unscale) {
            sgd_momentum_segment<T, TS, sr(), nesterov(), wd(), maximize(), unscale()>(st, ptrs, n, s);
          });
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
