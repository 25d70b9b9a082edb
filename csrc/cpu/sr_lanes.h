#pragma once
// Stochastic rounding of a float vector to bf16 (the bits of svi_kernels/state_storage.h), per
// ISA: the hash runs on uint32 lanes with integer SIMD (AVX2 / AVX-512: mullo, logical shifts,
// xor, add), lane by lane in the DEFAULT build. Included by vec_helpers.h, inside a per-ISA
// translation unit (namespace CPU_CAPABILITY). Vector and scalar paths give the same bits.
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "svi_kernels/state_storage.h"

namespace svi_kernels::cpu {
inline namespace CPU_CAPABILITY {

// One uint32 lane per float lane of Vectorized<float>.
struct U32Lanes {
  static constexpr int kLanes = at::vec::Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX512)
  __m512i v;
  static U32Lanes splat(uint32_t x) { return {_mm512_set1_epi32(static_cast<int>(x))}; }
  static U32Lanes iota() { return {_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}; }
  U32Lanes operator+(U32Lanes o) const { return {_mm512_add_epi32(v, o.v)}; }
  U32Lanes operator*(U32Lanes o) const { return {_mm512_mullo_epi32(v, o.v)}; }
  U32Lanes operator^(U32Lanes o) const { return {_mm512_xor_si512(v, o.v)}; }
  template <int kBits>
  U32Lanes shr() const { return {_mm512_srli_epi32(v, kBits)}; }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i v;
  static U32Lanes splat(uint32_t x) { return {_mm256_set1_epi32(static_cast<int>(x))}; }
  static U32Lanes iota() { return {_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)}; }
  U32Lanes operator+(U32Lanes o) const { return {_mm256_add_epi32(v, o.v)}; }
  U32Lanes operator*(U32Lanes o) const { return {_mm256_mullo_epi32(v, o.v)}; }
  U32Lanes operator^(U32Lanes o) const { return {_mm256_xor_si256(v, o.v)}; }
  template <int kBits>
  U32Lanes shr() const { return {_mm256_srli_epi32(v, kBits)}; }
#else
  uint32_t v[kLanes];
  template <typename F>
  static U32Lanes each(const F& f) {
    U32Lanes out;
    for (int j = 0; j < kLanes; ++j) out.v[j] = f(j);
    return out;
  }
  static U32Lanes splat(uint32_t x) { return each([x](int) { return x; }); }
  static U32Lanes iota() { return each([](int j) { return static_cast<uint32_t>(j); }); }
  U32Lanes operator+(U32Lanes o) const { return each([&](int j) { return v[j] + o.v[j]; }); }
  U32Lanes operator*(U32Lanes o) const { return each([&](int j) { return v[j] * o.v[j]; }); }
  U32Lanes operator^(U32Lanes o) const { return each([&](int j) { return v[j] ^ o.v[j]; }); }
  template <int kBits>
  U32Lanes shr() const { return each([&](int j) { return v[j] >> kBits; }); }
#endif
};

// svi_fmix32 of state_storage.h, lane by lane.
inline U32Lanes fmix32_lanes(U32Lanes x) {
  x = x ^ x.shr<16>();
  x = x * U32Lanes::splat(0x85EBCA6Bu);
  x = x ^ x.shr<13>();
  x = x * U32Lanes::splat(0xC2B2AE35u);
  return x ^ x.shr<16>();
}

// The random bits r of kLanes consecutive elements whose first has hash input `start`
// (sr_base + index * kSrIndexMul, state_storage.h).
inline U32Lanes sr_bits_lanes(uint32_t start) {
  const U32Lanes h = U32Lanes::splat(start) + U32Lanes::iota() * U32Lanes::splat(kSrIndexMul);
  return fmix32_lanes(h).shr<16>();
}

// x with float bits (bits(x) + r) & 0xFFFF0000 in every non-NaN lane, NaN lanes unchanged: a
// value bf16 holds exactly, so the ordinary (round-to-nearest) bf16 conversion after it stores
// sr_round_bf16_bits(x, r), and a NaN as the round-to-nearest store does.
inline at::vec::Vectorized<float> sr_truncate(const at::vec::Vectorized<float>& x, U32Lanes r) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = x;
  const __m512i s = _mm512_and_si512(_mm512_add_epi32(_mm512_castps_si512(f), r.v),
                                     _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), f, _mm512_castsi512_ps(s));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = x;
  const __m256i s = _mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(f), r.v),
                                     _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(f, _mm256_castsi256_ps(s), _mm256_cmp_ps(f, f, _CMP_ORD_Q));
#else
  __at_align__ float buf[U32Lanes::kLanes];
  x.store(buf);
  for (int j = 0; j < U32Lanes::kLanes; ++j) {
    if (buf[j] != buf[j]) continue;
    const uint32_t u = (svi_float_bits(buf[j]) + r.v[j]) & 0xFFFF0000u;
    std::memcpy(&buf[j], &u, sizeof u);
  }
  return at::vec::Vectorized<float>::loadu(buf);
#endif
}

// The scalar store: the bf16 SR gives element `index` of a segment whose hash input of element 0 is `base`.
inline c10::BFloat16 sr_round_scalar(float x, uint32_t base, int64_t index) {
  const uint32_t r = svi_fmix32(base + static_cast<uint32_t>(index) * kSrIndexMul) >> 16;
  return c10::BFloat16(sr_round_bf16_bits(x, r), c10::BFloat16::from_bits());
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
