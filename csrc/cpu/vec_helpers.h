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
#include <type_traits>
#include <utility>

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

// How a tensor of dtype T is read and written in compute type S = opmath(T): fp32 and fp64
// map one vector to one vector; one fp16/bf16 vector holds two float vectors.
template <typename T>
struct VecIO {
  using S = at::opmath_type<T>;
  using Vec = Vectorized<S>;
  static constexpr bool kReduced = !std::is_same_v<S, T>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kStep = kVecs * Vec::size();  // elements per vector step

  static void load(const T* src, Vec (&out)[kVecs]) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(src));
      out[0] = lo;
      out[1] = hi;
    } else {
      out[0] = Vec::loadu(src);
    }
  }

  static void store(T* dst, const Vec (&in)[kVecs]) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(in[0], in[1]).store(dst);
    } else {
      in[0].store(dst);
    }
  }
};

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
// where the vector body ends; the scalar tail adds its terms in order after it.
template <typename S>
struct LaneSum {
  using Vec = Vectorized<S>;
  double lanes[Vec::size()] = {};

  void add(const Vec& x) {
    __at_align__ S buf[Vec::size()];
    x.store(buf);
    for (int j = 0; j < Vec::size(); ++j) lanes[j] += static_cast<double>(buf[j]);
  }

  double total() const {
    double s = 0.0;
    for (int j = 0; j < Vec::size(); ++j) s += lanes[j];
    return s;
  }
};

// Applies body to every element of a segment of N operands. Operand k is read if bit k of
// kLoad is set and written back if bit k of kStore is set. body receives std::array<V, N>&
// with V = Vectorized<S> in the vector body and V = S in the scalar tail, and returns void
// or (when kReduce) the element's term of the segment sum, which is then returned in double.
template <unsigned kLoad, unsigned kStore, bool kReduce, typename T, size_t N, typename Body>
inline double for_each_element(const std::array<T*, N>& ptr, int64_t n, const Body& body) {
  using IO = VecIO<T>;
  using S = typename IO::S;
  using Vec = typename IO::Vec;
  const std::array<T*, N> p = ptr;  // a local copy stays in registers across the stores
  LaneSum<S> vsum;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    std::array<Vec, N> x[IO::kVecs];
    static_for<N>([&](auto k) {
      if constexpr ((kLoad & bit(k)) != 0) {
        Vec v[IO::kVecs];
        IO::load(p[k] + i, v);
        for (int j = 0; j < IO::kVecs; ++j) x[j][k] = v[j];
      }
    });
    for (int j = 0; j < IO::kVecs; ++j) {
      if constexpr (kReduce) vsum.add(body(x[j]));
      else body(x[j]);
    }
    static_for<N>([&](auto k) {
      if constexpr ((kStore & bit(k)) != 0) {
        Vec v[IO::kVecs];
        for (int j = 0; j < IO::kVecs; ++j) v[j] = x[j][k];
        IO::store(p[k] + i, v);
      }
    });
  }
  double tail_sum = 0.0;
  for (; i < n; ++i) {
    std::array<S, N> x{};
    static_for<N>([&](auto k) {
      if constexpr ((kLoad & bit(k)) != 0) x[k] = static_cast<S>(p[k][i]);
    });
    if constexpr (kReduce) tail_sum += static_cast<double>(body(x));
    else body(x);
    static_for<N>([&](auto k) {
      if constexpr ((kStore & bit(k)) != 0) p[k][i] = static_cast<T>(x[k]);
    });
  }
  return kReduce ? vsum.total() + tail_sum : 0.0;
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

// Turns a runtime flag into a compile-time one, so the formulas' branches fold away.
template <typename F>
inline auto with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
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
