#pragma once
// Line-search element loops of one segment (per-ISA; see isa_kernels.h): save (w0 <- p and
// the sufficient-decrease sum), trial points, and the final Adam step. Their write-only outputs
// (w0 and, in fp32/fp64, d of a save; p of a trial or final step) use streaming stores when the
// op asks (`stream`).
#include "kernel_table.h"
#include "vec_helpers.h"
#include "svi_kernels/update_math.h"

#include <cstring>

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

template <typename V>
struct LsAdamSaveCoeffs {
  V one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt;
};

template <typename V>
struct LsStepCoeffs {
  V eta, eps, bias_correction2_sqrt, trial_eta;
};

template <typename V, typename S>
LsAdamSaveCoeffs<V> ls_adam_save_coeffs(const LsAdamSaveScalars& s) {
  auto c = [](double x) { return V(static_cast<S>(x)); };
  return {c(s.one_minus_beta1), c(s.beta2), c(s.one_minus_beta2), c(s.eps), c(s.bias_correction2_sqrt)};
}

template <typename V, typename S>
LsStepCoeffs<V> ls_step_coeffs(const LsStepScalars& s) {
  auto c = [](double x) { return V(static_cast<S>(x)); };
  return {c(s.eta), c(s.eps), c(s.bias_correction2_sqrt), c(s.trial_eta)};
}

// w0 <- p: write-only, so streamed on large calls (see stream_policy.h). fp16/bf16 saves copy
// in this separate pass (bytes unchanged, whatever the values); fp32/fp64 saves store w0 from the
// element loop (save_w0_in_loop).
template <typename T>
void save_copy(void* w0, const void* p, int64_t n, bool stream) {
  if (kHasStreamStores && stream && vector_aligned<T>(w0)) {
    stream_copy(static_cast<T*>(w0), static_cast<const T*>(p), n);
    stream_fence();
  } else {
    std::memcpy(w0, p, n * sizeof(T));
  }
}

// fp32/fp64: the element loop loads p and stores it to w0 as it goes (a vector load and store
// change no bits), one pass over the segment instead of a copy pass and then the loop: on
// 2^24 fp32 elements, AVX-512, 5-21% less time for ls_save_sgd and 9-17% for ls_save_adam with
// dirs (1 and 2 threads, paired runs). fp16/bf16 would round-trip p through float there (a
// signalling NaN would come back quiet), so they keep save_copy.
template <typename T>
constexpr bool save_w0_in_loop = std::is_same_v<T, at::opmath_type<T>>;

// The gradient check (ls_save_sgd without w0) only reads g: a core's reads in flight, more than
// the memory, seem to bound a read-only stream. Prefetching 8 KiB ahead in software took 13-27%
// off it (2^24 fp32, AVX-512 EPYC, 1 and 2 threads, paired runs; 4 KiB: 10%). The loops that also
// write got slower with it (8 KiB: save with w0 +12%, trial +10% time), so they do not prefetch.
constexpr int64_t kReadOnlyPrefetch = 8192;

template <typename T>
double ls_save_sgd_segment(void* const* ptrs, int64_t n, const LsSgdSaveScalars& s) {
  enum { P, G, W0 };
  const auto sq = [](auto& x) { return math::ls_sq(x[G]); };
  // Every form runs the same reducing loop over g (same lanes, same order): the same sums to the
  // bit with and without w0.
  if (!s.with_w0) return for_each_element<bit(G), 0, true, 0, kReadOnlyPrefetch>(typed<T, 2>(ptrs), n, sq);
  if constexpr (save_w0_in_loop<T>) {
    return for_each_element_streaming<bit(P) | bit(G), bit(W0), bit(W0), true>(
        s.stream, typed<T, 3>(ptrs), n, [sq](auto& x) {
          x[W0] = x[P];
          return sq(x);
        });
  } else {
    save_copy<T>(ptrs[W0], ptrs[P], n, s.stream);
    return for_each_element<bit(G), 0, true>(typed<T, 3>(ptrs), n, sq);
  }
}

// T: params, grads, w0 and dirs; TS: exp_avgs and exp_avg_sqs (kSr: bf16, stochastic rounding).
template <typename T, typename TS, bool kSr>
double ls_save_adam_segment(const SegmentStorage& st, void* const* ptrs, int64_t n, const LsAdamSaveScalars& s) {
  enum { P, G, M, V, W0, D };
  using Ops = Operands<T, T, TS, TS, T, T>;  // the first 4 or 5 when there are fewer lists
  using S = typename Ops::S;
  const BothWidths<LsAdamSaveCoeffs, S> coeffs{ls_adam_save_coeffs<S, S>(s), ls_adam_save_coeffs<Vectorized<S>, S>(s)};
  constexpr unsigned kIn = bit(G) | bit(M) | bit(V), kMoments = bit(M) | bit(V);
  constexpr unsigned kSrMoments = kSr ? kMoments : 0u;
  const auto prepare = [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    return math::ls_adam_prepare_elem(x[G], x[M], x[V], c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.eps,
                                      c.bias_correction2_sqrt);
  };
  const auto prepare_dir = [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    return math::ls_adam_prepare_dir_elem(x[G], x[M], x[V], x[D], c.one_minus_beta1, c.beta2, c.one_minus_beta2,
                                          c.eps, c.bias_correction2_sqrt);
  };
  const auto lists = [&](auto count) {
    auto ops = operands_of<typename Ops::template First<decltype(count)::value>>(ptrs);
    if constexpr (kSr) {
      ops.sr_base[M] = segment_sr_base(st, kSrExpAvgs);
      ops.sr_base[V] = segment_sr_base(st, kSrExpAvgSqs);
    }
    return ops;
  };
  using Four = std::integral_constant<size_t, 4>;
  using Five = std::integral_constant<size_t, 5>;
  using Six = std::integral_constant<size_t, 6>;
  // Without w0 (the in-place trials' save): the moments and the sum only, p is not read.
  if (!s.with_w0) return for_each_element<kIn, kMoments, true, 0, 0, kSrMoments>(lists(Four{}), n, prepare);
  if constexpr (save_w0_in_loop<T>) {
    // w0 and d are write-only: both streamed on large calls. (With the copy in its own pass,
    // streaming d next to the moments' ordinary stores once measured slower at one thread; with
    // w0 in the loop, 2 threads, streaming d took 6% off the time of storing it normally.)
    const auto with_w0 = [](const auto& f) {
      return [f](auto& x) {
        x[W0] = x[P];
        return f(x);
      };
    };
    if (!s.with_dirs) {
      return for_each_element_streaming<kIn | bit(P), kMoments | bit(W0), bit(W0), true, kSrMoments>(
          s.stream, lists(Five{}), n, with_w0(prepare));
    }
    return for_each_element_streaming<kIn | bit(P), kMoments | bit(W0) | bit(D), bit(W0) | bit(D), true, kSrMoments>(
        s.stream, lists(Six{}), n, with_w0(prepare_dir));
  } else {
    save_copy<T>(ptrs[W0], ptrs[P], n, s.stream);
    if (!s.with_dirs) return for_each_element<kIn, kMoments, true, 0, 0, kSrMoments>(lists(Five{}), n, prepare);
    return for_each_element<kIn, kMoments | bit(D), true, 0, 0, kSrMoments>(lists(Six{}), n, prepare_dir);
  }
}

template <typename T>
void ls_trial_sgd_segment(void* const* ptrs, int64_t n, const LsStepScalars& s) {
  using S = at::opmath_type<T>;
  enum { P, W0, G };
  const BothWidths<LsStepCoeffs, S> coeffs{ls_step_coeffs<S, S>(s), ls_step_coeffs<Vectorized<S>, S>(s)};
  for_each_element_streaming<bit(W0) | bit(G), bit(P), bit(P), false>(s.stream, typed<T, 3>(ptrs), n, [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    x[P] = math::ls_trial_sgd_elem(x[W0], x[G], c.eta);
  });
}

// The reader loops: T for params, w0 and grads, TS for exp_avgs and exp_avg_sqs.
template <typename T, typename TS>
void ls_trial_adam_segment(void* const* ptrs, int64_t n, const LsStepScalars& s) {
  using Ops = Operands<T, T, T, TS>;
  using S = typename Ops::S;
  enum { P, W0, G, V };
  const BothWidths<LsStepCoeffs, S> coeffs{ls_step_coeffs<S, S>(s), ls_step_coeffs<Vectorized<S>, S>(s)};
  for_each_element_streaming<bit(W0) | bit(G) | bit(V), bit(P), bit(P), false>(
      s.stream, operands_of<Ops>(ptrs), n, [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    x[P] = math::ls_trial_adam_elem(x[W0], x[G], x[V], c.eta, c.eps, c.bias_correction2_sqrt);
  });
}

template <typename T, typename TS>
void ls_final_adam_segment(void* const* ptrs, int64_t n, const LsStepScalars& s) {
  using Ops = Operands<T, T, TS, TS>;
  using S = typename Ops::S;
  enum { P, W0, M, V };
  const BothWidths<LsStepCoeffs, S> coeffs{ls_step_coeffs<S, S>(s), ls_step_coeffs<Vectorized<S>, S>(s)};
  for_each_element_streaming<bit(W0) | bit(M) | bit(V), bit(P), bit(P), false>(
      s.stream, operands_of<Ops>(ptrs), n, [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    x[P] = math::ls_final_adam_elem(x[W0], x[M], x[V], c.eta, c.eps, c.bias_correction2_sqrt);
  });
}

template <typename T, typename TS>
void ls_final_adam_from_trial_segment(void* const* ptrs, int64_t n, const LsStepScalars& s) {
  using Ops = Operands<T, T, TS, TS>;
  using S = typename Ops::S;
  enum { P, G, M, V };
  const BothWidths<LsStepCoeffs, S> coeffs{ls_step_coeffs<S, S>(s), ls_step_coeffs<Vectorized<S>, S>(s)};
  // p is read and written: no streaming stores (they pay only for write-only outputs).
  for_each_element<bit(P) | bit(G) | bit(M) | bit(V), bit(P), false>(operands_of<Ops>(ptrs), n, [coeffs](auto& x) {
    const auto& c = coeffs.template get<std::decay_t<decltype(x[0])>>();
    x[P] = math::ls_final_adam_from_trial_elem(x[P], x[G], x[M], x[V], c.trial_eta, c.eta, c.eps,
                                               c.bias_correction2_sqrt);
  });
}

// Type-erased entries of the CpuKernels table.
inline double ls_save_sgd_kernel(at::ScalarType dtype, void* const* ptrs, int64_t n, const LsSgdSaveScalars& s) {
  return dispatch_dtype(dtype,
                        [&](auto tag) { return ls_save_sgd_segment<typename decltype(tag)::type>(ptrs, n, s); });
}

inline double ls_save_adam_kernel(const SegmentStorage& st, void* const* ptrs, int64_t n,
                                  const LsAdamSaveScalars& s) {
  return dispatch_storage(st, [&](auto tag, auto state_tag, auto sr) {
    return ls_save_adam_segment<typename decltype(tag)::type, typename decltype(state_tag)::type, sr()>(st, ptrs, n, s);
  });
}

inline void ls_trial_sgd_kernel(at::ScalarType dtype, void* const* ptrs, int64_t n, const LsStepScalars& s) {
  dispatch_dtype(dtype, [&](auto tag) { ls_trial_sgd_segment<typename decltype(tag)::type>(ptrs, n, s); });
}

// Calls segment<T, TS>(ptrs, n, s) for the segment's dtype pair (the readers: no SR).
#define SVI_LS_READER_KERNEL(name)                                                                       \
  inline void name##_kernel(const SegmentStorage& st, void* const* ptrs, int64_t n, const LsStepScalars& s) { \
    dispatch_pair(st.param, st.state, [&](auto tag, auto state_tag) {                                   \
      name##_segment<typename decltype(tag)::type, typename decltype(state_tag)::type>(ptrs, n, s);      \
    });                                                                                                  \
  }
SVI_LS_READER_KERNEL(ls_trial_adam)
SVI_LS_READER_KERNEL(ls_final_adam)
SVI_LS_READER_KERNEL(ls_final_adam_from_trial)
#undef SVI_LS_READER_KERNEL

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
