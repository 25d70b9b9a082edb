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

// flatten: everything the loop calls is inlined into each instantiation, whatever else the translation
// unit holds, so GCC's FMA contraction sees the same expression in the float and the GradScaler
// (kUnscale) path and they keep agreeing bit for bit (docs/kernels.md, "A caveat for maintainers").
// T: params and grads, TS: the state lists (kSr: bf16 state stored with stochastic rounding).
template <typename T, typename TS, bool kSr, bool kDecoupled, bool kWeightDecay, bool kMaximize, bool kUnscale,
          bool kAmsgrad>
__attribute__((flatten)) void adam_segment(const SegmentStorage& st, void* const* ptrs, int64_t n,
                                           const AdamScalars& s) {
  using Ops = std::conditional_t<kAmsgrad, Operands<T, T, TS, TS, TS>, Operands<T, T, TS, TS>>;
  using S = typename Ops::S;
  enum { P, G, M, V, MAXV };
  constexpr size_t kLists = Ops::N;
  constexpr unsigned kMax = kAmsgrad ? bit(MAXV) : 0u;
  constexpr unsigned kStore = bit(P) | bit(M) | bit(V) | kMax | (kUnscale ? bit(G) : 0u);
  Ops ops = operands_of<Ops>(ptrs);
  if constexpr (kSr) {
    ops.sr_base[M] = segment_sr_base(st, kSrExpAvgs);
    ops.sr_base[V] = segment_sr_base(st, kSrExpAvgSqs);
    if constexpr (kAmsgrad) ops.sr_base[MAXV] = segment_sr_base(st, kSrMaxExpAvgSqs);
  }
  const BothWidths<math::AdamCoeffs, S> coeffs{adam_coeffs<S, S>(s), adam_coeffs<Vectorized<S>, S>(s)};
  const S grad_scale = static_cast<S>(s.grad_scale);
  for_each_element<bit(P) | bit(G) | bit(M) | bit(V) | kMax, kStore, false, 0, 0, kSr ? (kStore & ~bit(P) & ~bit(G)) : 0u>(
      ops, n, [coeffs, grad_scale](auto& x) {
        using Val = std::decay_t<decltype(x[0])>;
        // adam_elem takes g by value: x[G] keeps the unscaled gradient for the store.
        if constexpr (kUnscale) x[G] = math::unscale_grad(x[G], Val(grad_scale));
        if constexpr (kAmsgrad) {
          math::adam_amsgrad_elem(x[P], x[G], x[M], x[V], x[kLists - 1], coeffs.template get<Val>(), kDecoupled,
                                  kWeightDecay, kMaximize);
        } else {
          math::adam_elem(x[P], x[G], x[M], x[V], coeffs.template get<Val>(), kDecoupled, kWeightDecay, kMaximize);
        }
      });
}

inline void adam_kernel(const SegmentStorage& st, void* const* ptrs, int64_t n, const AdamScalars& s) {
  dispatch_storage(st, [&](auto tag, auto state_tag, auto sr) {
    using T = typename decltype(tag)::type;
    using TS = typename decltype(state_tag)::type;
    with_flag(s.decoupled, [&](auto decoupled) {
      with_flag(s.has_weight_decay, [&](auto wd) {
        with_flag(s.maximize, [&](auto maximize) {
          with_flag(s.unscale, [&](auto unscale) {
            with_flag(s.amsgrad, [&](auto amsgrad) {
              adam_segment<T, TS, sr(), decoupled(), wd(), maximize(), unscale(), amsgrad()>(st, ptrs, n, s);
            });
          });
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
