#pragma once
// SIMD plumbing of the element loops: sqrt for at::vec::Vectorized, loads/stores that convert
// fp16/bf16 to float and back, a segment loop (vector body + scalar tail) and a lane-wise
// double accumulator. Included only by isa_kernels.h, i.e. inside a per-ISA translation unit
// that has set CPU_CAPABILITY; everything here lives in that ISA's namespace.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernel_table.h"
#include "sr_lanes.h"

namespace at::vec {
inline namespace CPU_CAPABILITY {
// svi_kernels/update_math.h calls svi_sqrt(v) unqualified; argument-dependent lookup finds
// this overload for vectors (the scalar ones live next to the formulas).
template <typename T>
inline Vectorized<T> svi_sqrt(const Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
inline Vectorized<T> svi_max(const Vectorized<T>& a, const Vectorized<T>& b) {
  return maximum(a, b);  // propagates NaN, like torch.maximum
}
}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// How an operand stored as T is read and written in compute type S, in steps of kVecs S-vectors:
// fp32 and fp64 map each vector to one vector; one fp16/bf16 vector holds two float vectors.
template <typename T, typename S, int kVecs>
struct VecIO {
  using Vec = Vectorized<S>;
  static constexpr bool kReduced = !std::is_same_v<S, T>;
  static_assert(!kReduced || kVecs == 2, "an fp16/bf16 vector holds two float vectors");

  static void load(const T* src, Vec (&out)[kVecs]) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(src));
      out[0] = lo;
      out[1] = hi;
    } else {
      for (int j = 0; j < kVecs; ++j) out[j] = Vec::loadu(src + j * Vec::size());
    }
  }

  // kStream: by streaming stores (stream_store below).
  template <bool kStream>
  static void store(T* dst, const Vec (&in)[kVecs]);
};

// The element loops' operands: their storage types (one per tensor list), data pointers and,
// for the operands stored with stochastic rounding, the SR hash input of the segment's element 0
// (sr_base + offset * kSrIndexMul, state_storage.h). The compute type S is float, or double
// when every operand is double (the (f64, f64) pair); a vector step holds kVecs S-vectors: 2 when
// an operand is fp16/bf16, else 1. Same-dtype operands compile to the one-dtype loop of old.
template <typename Ops, typename Seq>
struct FirstOperands;

template <typename... Ts>
struct Operands {
  static constexpr size_t N = sizeof...(Ts);
  template <size_t k>
  using T = std::tuple_element_t<k, std::tuple<Ts...>>;
  using S = std::conditional_t<(std::is_same_v<Ts, double> && ...), double, float>;
  static_assert(std::is_same_v<S, double> || (!std::is_same_v<Ts, double> && ...), "fp64 mixes with nothing");
  static constexpr int kVecs = (!std::is_same_v<Ts, S> || ...) ? 2 : 1;
  using Vec = Vectorized<S>;
  static constexpr int64_t kStep = kVecs * Vec::size();

  std::array<void*, N> ptr;
  std::array<uint32_t, N> sr_base{};

  // The operands 0..K-1 (the calls that leave the last lists out).
  template <size_t K>
  using First = typename FirstOperands<Operands, std::make_index_sequence<K>>::type;
};

template <typename Ops, size_t... I>
struct FirstOperands<Ops, std::index_sequence<I...>> {
  using type = Operands<typename Ops::template T<I>...>;
};

// Streaming (non-temporal) stores. An ordinary store first reads the destination's cache line
// (read-for-ownership), so a write-only output costs a read and a write; a streaming store
// writes the line straight to memory. That saves a quarter of a trial's traffic (16 -> 12
// B/param for p = w0 - eta*g) but only pays when the output would not be read back from cache
// soon (large calls; see stream_policy.h). They need the destination aligned to the vector
// width and are weakly ordered: stream_fence() before the data is handed to another thread.
// The DEFAULT build has none (kHasStreamStores == false) and stores normally.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasStreamStores = true;

template <typename T>
inline void stream_store(T* dst, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(dst, v);
  else if constexpr (std::is_same_v<T, double>) _mm512_stream_pd(dst, v);
  else _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);  // Half/BFloat16: integer lanes
#else
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(dst, v);
  else if constexpr (std::is_same_v<T, double>) _mm256_stream_pd(dst, v);
  else _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
#endif
}

inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kHasStreamStores = false;

template <typename T>
inline void stream_store(T* dst, const Vectorized<T>& v) {
  v.store(dst);
}

inline void stream_fence() {}
#endif

template <typename T, typename S, int kVecs>
template <bool kStream>
void VecIO<T, S, kVecs>::store(T* dst, const Vec (&in)[kVecs]) {
  if constexpr (kReduced) {
    const Vectorized<T> packed = at::vec::convert_from_float<T>(in[0], in[1]);
    if constexpr (kStream) stream_store(dst, packed);
    else packed.store(dst);
  } else {
    for (int j = 0; j < kVecs; ++j) {
      if constexpr (kStream) stream_store(dst + j * Vec::size(), in[j]);
      else in[j].store(dst + j * Vec::size());
    }
  }
}

template <typename T>
inline bool vector_aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % sizeof(Vectorized<T>) == 0;
}

// dst <- src for n elements, dst written by streaming stores (dst vector-aligned; the caller
// checks). Bytes are copied unchanged: the vector load/store does no arithmetic.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  constexpr int64_t kW = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + kW <= n; i += kW) stream_store(dst + i, Vectorized<T>::loadu(src + i));
  if (i < n) std::memcpy(dst + i, src + i, (n - i) * sizeof(T));
}

template <size_t N, typename F>
inline void static_for(F&& f) {
  [&]<size_t... K>(std::index_sequence<K...>) {
    (f(std::integral_constant<size_t, K>{}), ...);
  }(std::make_index_sequence<N>{});
}

template <typename T, size_t N>
inline std::array<T*, N> typed(void* const* ptrs) {
  std::array<T*, N> out;
  for (size_t k = 0; k < N; ++k) out[k] = static_cast<T*>(ptrs[k]);
  return out;
}

constexpr unsigned bit(unsigned k) { return 1u << k; }

// Sums vector terms lane by lane in double, so the total of a segment does not depend on
// where the vector body ends; the scalar tail adds its terms in order after it. On AVX2/AVX-512
// the lanes are double vectors (a float vector widened into two), so a reduction costs a
// conversion and an add per vector instead of a store and one scalar add per lane; each lane
// sees the same additions in the same order as the scalar form, hence the same bits.
template <typename S>
struct LaneSum {
  using Vec = Vectorized<S>;
  static constexpr int kLanes = Vec::size();
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kWide = std::is_same_v<S, float> || std::is_same_v<S, double>;
#else
  static constexpr bool kWide = false;
#endif
  static constexpr int kAcc = std::is_same_v<S, float> ? 2 : 1;  // double vectors per S vector
  Vectorized<double> acc[kAcc];  // at::vec's default constructor leaves the lanes unset
  double lanes[kLanes] = {};

  LaneSum() {
    for (auto& a : acc) a = Vectorized<double>(0.0);
  }

  void add(const Vec& x) {
    if constexpr (kWide) {
      if constexpr (std::is_same_v<S, double>) {
        acc[0] = acc[0] + x;
      } else {
#if defined(CPU_CAPABILITY_AVX512)
        const __m512 v = x;
        acc[0] = acc[0] + Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        acc[1] = acc[1] + Vectorized<double>(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
        const __m256 v = x;
        acc[0] = acc[0] + Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        acc[1] = acc[1] + Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#endif
      }
    } else {
      __at_align__ S buf[kLanes];
      x.store(buf);
      for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(buf[j]);
    }
  }

  double total() const {
    __at_align__ double wide[kLanes];
    const double* l = lanes;
    if constexpr (kWide) {
      for (int a = 0; a < kAcc; ++a) acc[a].store(wide + a * Vectorized<double>::size());
      l = wide;
    }
    double s = 0.0;
    for (int j = 0; j < kLanes; ++j) s += l[j];
    return s;
  }
};

struct NoSum {
  double total() const { return 0.0; }
};

// A software prefetch of the cache line `ahead` bytes past p (a hint: never faults, also past
// the end of an allocation).
inline void prefetch_ahead(const void* p, int64_t ahead) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(static_cast<const char*>(p) + ahead);
#else
  (void)p;
  (void)ahead;
#endif
}

// Applies body to every element of a segment of N operands. Operand k is read if bit k of
// kLoad is set and written back if bit k of kStore is set; in the vector body with a streaming
// store if bit k of kStream is set too (see stream_store: the caller checks alignment and
// fences; for_each_element_streaming does both); with stochastic rounding to bf16 if bit k of
// kSr is set (sr_lanes.h; the operand is bf16), else rounded to nearest. body receives
// std::array<V, N>& with V = Vectorized<S> in the vector body and V = S in the scalar tail, and
// returns void or (when kReduce) the element's term of the segment sum, which is then returned
// in double. kPrefetch > 0: the vector body also prefetches each operand it reads kPrefetch bytes
// ahead (a hint; the arithmetic and its order are the same either way).
template <unsigned kLoad, unsigned kStore, bool kReduce, unsigned kStream = 0, int64_t kPrefetch = 0,
          unsigned kSr = 0, typename... Ts, typename Body>
inline double for_each_element(const Operands<Ts...>& ops, int64_t n, const Body& body) {
  using Ops = Operands<Ts...>;
  using S = typename Ops::S;
  using Vec = typename Ops::Vec;
  constexpr size_t N = Ops::N;
  constexpr int kVecs = Ops::kVecs;
  const std::array<void*, N> p = ops.ptr;  // a local copy stays in registers across the stores
  const auto ptr_of = [&p](auto k) { return static_cast<typename Ops::template T<decltype(k)::value>*>(p[k]); };
  // Only a reducing loop holds the accumulator: the others compile exactly as without one.
  std::conditional_t<kReduce, LaneSum<S>, NoSum> vsum;
  // One vector step over kStep elements, element i of the segment first: operand k read from and
  // written to at[k] (the segment at i, or the tail's buffer: kTail, ordinary stores, no prefetch);
  // on_terms(x) receives the step's vectors after the body when kReduce.
  const auto vector_step = [&](const std::array<void*, N>& at, int64_t i, auto tail, const auto& on_terms) {
    constexpr bool kTail = decltype(tail)::value;
    const auto at_k = [&at](auto k) { return static_cast<typename Ops::template T<decltype(k)::value>*>(at[k]); };
    std::array<Vec, N> x[kVecs];
    static_for<N>([&](auto k) {
      using IO = VecIO<typename Ops::template T<k>, S, kVecs>;
      if constexpr (!kTail && kPrefetch > 0 && (kLoad & bit(k)) != 0) prefetch_ahead(at_k(k), kPrefetch);
      if constexpr ((kLoad & bit(k)) != 0) {
        Vec v[kVecs];
        IO::load(at_k(k), v);
        for (int j = 0; j < kVecs; ++j) x[j][k] = v[j];
      }
    });
    Vec terms[kVecs];
    for (int j = 0; j < kVecs; ++j) {
      if constexpr (kReduce) terms[j] = body(x[j]);
      else body(x[j]);
    }
    if constexpr (kReduce) on_terms(terms);
    static_for<N>([&](auto k) {
      using IO = VecIO<typename Ops::template T<k>, S, kVecs>;
      if constexpr ((kStore & bit(k)) != 0) {
        if constexpr ((kSr & bit(k)) != 0) {
          static_assert(std::is_same_v<typename Ops::template T<k>, at::BFloat16> && (kStream & bit(k)) == 0,
                        "SR stores into bf16 state (read and written: no streaming store)");
          const uint32_t start = ops.sr_base[k] + static_cast<uint32_t>(i) * kSrIndexMul;
          constexpr uint32_t kNext = static_cast<uint32_t>(Vec::size()) * kSrIndexMul;
          sr_pack_bf16(x[0][k], x[1][k], sr_bits_lanes(start), sr_bits_lanes(start + kNext)).store(at_k(k));
        } else {
          Vec v[kVecs];
          for (int j = 0; j < kVecs; ++j) v[j] = x[j][k];
          IO::template store<!kTail && (kStream & bit(k)) != 0>(at_k(k), v);
        }
      }
    });
  };
  int64_t i = 0;
  for (; i + Ops::kStep <= n; i += Ops::kStep) {
    std::array<void*, N> at;
    static_for<N>([&](auto k) { at[k] = ptr_of(k) + i; });
    vector_step(at, i, std::false_type{}, [&vsum](const auto& terms) {
      if constexpr (kReduce) {
        for (int j = 0; j < kVecs; ++j) vsum.add(terms[j]);
      }
    });
  }
  // The tail (fewer than kStep elements) through the same vector code, on a zero-padded copy: every
  // element of a tensor gets the same operations whichever segment it falls in, and where the segment
  // ends (a shard's or a chunk's size) cannot change a bit (FMA contraction differs between vector and
  // scalar code). Its terms are added in element order, in double, as a scalar tail would add them.
  double tail_sum = 0.0;
  if (i < n) {
    const int64_t rest = n - i;
    alignas(64) unsigned char buf[N][Ops::kStep * sizeof(double)];
    std::array<void*, N> at;
    static_for<N>([&](auto k) {
      using T = typename Ops::template T<k>;
      at[k] = buf[k];
      std::memset(buf[k], 0, sizeof(buf[k]));
      if constexpr ((kLoad & bit(k)) != 0) std::memcpy(buf[k], ptr_of(k) + i, rest * sizeof(T));
    });
    vector_step(at, i, std::true_type{}, [&](const auto& terms) {
      S lanes[Ops::kStep];
      for (int j = 0; j < kVecs; ++j) terms[j].store(lanes + j * Vec::size());
      for (int64_t e = 0; e < rest; ++e) tail_sum += static_cast<double>(lanes[e]);
    });
    static_for<N>([&](auto k) {
      using T = typename Ops::template T<k>;
      if constexpr ((kStore & bit(k)) != 0) std::memcpy(ptr_of(k) + i, buf[k], rest * sizeof(T));
    });
  }
  if constexpr (kReduce) return vsum.total() + tail_sum;
  else return 0.0;
}

// N operands of one dtype T.
template <typename T, size_t N, typename = std::make_index_sequence<N>>
struct SameType;
template <typename T, size_t N, size_t... K>
struct SameType<T, N, std::index_sequence<K...>> {
  using type = Operands<std::conditional_t<(K >= 0), T, T>...>;
};

template <typename T, size_t N>
inline typename SameType<T, N>::type same_type(const std::array<T*, N>& ptr) {
  typename SameType<T, N>::type ops;
  for (size_t k = 0; k < N; ++k) ops.ptr[k] = ptr[k];
  return ops;
}

// The loop over N operands of one dtype.
template <unsigned kLoad, unsigned kStore, bool kReduce, unsigned kStream = 0, int64_t kPrefetch = 0, typename T,
          size_t N, typename Body>
inline double for_each_element(const std::array<T*, N>& ptr, int64_t n, const Body& body) {
  return for_each_element<kLoad, kStore, kReduce, kStream, kPrefetch>(same_type(ptr), n, body);
}

// for_each_element with the write-only outputs in kStream stored by streaming stores when
// `stream` is set, this build has them and every such output is vector-aligned (a view may
// start anywhere); otherwise with ordinary stores. The values written are the same either way.
template <unsigned kLoad, unsigned kStore, unsigned kStream, bool kReduce, unsigned kSr = 0, typename... Ts,
          typename Body>
inline double for_each_element_streaming(bool stream, const Operands<Ts...>& ops, int64_t n, const Body& body) {
  using Ops = Operands<Ts...>;
  static_assert((kStream & ~kStore) == 0 && (kStream & kLoad) == 0, "only write-only outputs stream");
  if constexpr (kHasStreamStores) {
    bool aligned = true;
    static_for<Ops::N>([&](auto k) {
      if constexpr ((kStream & bit(k)) != 0) {
        aligned = aligned && vector_aligned<typename Ops::template T<k>>(ops.ptr[k]);
      }
    });
    if (stream && aligned) {
      const double sum = for_each_element<kLoad, kStore, kReduce, kStream, 0, kSr>(ops, n, body);
      stream_fence();
      return sum;
    }
  }
  return for_each_element<kLoad, kStore, kReduce, 0, 0, kSr>(ops, n, body);
}

template <unsigned kLoad, unsigned kStore, unsigned kStream, bool kReduce, typename T, size_t N, typename Body>
inline double for_each_element_streaming(bool stream, const std::array<T*, N>& ptr, int64_t n, const Body& body) {
  return for_each_element_streaming<kLoad, kStore, kStream, kReduce>(stream, same_type(ptr), n, body);
}

// Calls f(type_tag<T>) for the dtypes the kernels support (validated by the caller).
template <typename T>
struct type_tag {
  using type = T;
};

template <typename F>
inline auto dispatch_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(type_tag<float>{});
    case at::kDouble: return f(type_tag<double>{});
    case at::kHalf: return f(type_tag<at::Half>{});
    case at::kBFloat16: return f(type_tag<at::BFloat16>{});
    default: break;
  }
  // check_fused_group() admits only the four dtypes above. (No TORCH_CHECK here: its string
  // helpers would be instantiated under this build's target pragma and shared by the linker.)
  std::abort();
}

// Calls f(type_tag<T>, type_tag<TS>) for the allowed (param, state) dtype pairs of
// svi_kernels/state_storage.h (validated by the caller): the same dtype, (fp32, bf16),
// (fp16, fp32) and (bf16, fp32). Only these pairs are instantiated.
template <typename F>
inline auto dispatch_pair(at::ScalarType param, at::ScalarType state, const F& f) {
  if (param == state) return dispatch_dtype(param, [&](auto tag) { return f(tag, tag); });
  if (param == at::kFloat && state == at::kBFloat16) return f(type_tag<float>{}, type_tag<at::BFloat16>{});
  if (param == at::kHalf && state == at::kFloat) return f(type_tag<at::Half>{}, type_tag<float>{});
  if (param == at::kBFloat16 && state == at::kFloat) return f(type_tag<at::BFloat16>{}, type_tag<float>{});
  std::abort();  // see dispatch_dtype
}

// Turns a runtime flag into a compile-time one, so the formulas' branches fold away.
template <typename F>
inline auto with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// The state-writing kernels' dispatch: f(type_tag<T>, type_tag<TS>, kSr) with kSr a
// std::bool_constant, true when the bf16 state is stored with stochastic rounding.
template <typename F>
inline auto dispatch_storage(const SegmentStorage& st, const F& f) {
  return dispatch_pair(st.param, st.state, [&](auto t, auto ts) {
    if constexpr (std::is_same_v<typename decltype(ts)::type, at::BFloat16>) {
      return with_flag(st.stochastic, [&](auto sr) { return f(t, ts, sr); });
    } else {
      return f(t, ts, std::false_type{});
    }
  });
}

// The SR hash input of the segment's first element in state list `list` (SrList).
inline uint32_t segment_sr_base(const SegmentStorage& st, uint32_t list) {
  return sr_base(st.key, list) + static_cast<uint32_t>(st.offset) * kSrIndexMul;
}

// The Operands of a segment from the op's pointers (list order); sr_base left for the caller.
template <typename Ops>
inline Ops operands_of(void* const* ptrs) {
  Ops ops;
  for (size_t k = 0; k < Ops::N; ++k) ops.ptr[k] = ptrs[k];
  return ops;
}

// A coefficient struct of update_math.h in both widths: scalar for the tail, vector for the body.
template <template <typename> class Coeffs, typename S>
struct BothWidths {
  Coeffs<S> scalar;
  Coeffs<Vectorized<S>> vector;

  template <typename V>
  const Coeffs<V>& get() const {
    if constexpr (std::is_same_v<V, S>) return scalar;
    else return vector;
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
