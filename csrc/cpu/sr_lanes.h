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

// The bf16 vector of the two float vectors lo, hi (lo's elements first) stochastically rounded
// with the random bits r_lo, r_hi: bits (float_bits(x) + r) >> 16 packed to 16 bits in one pass
// (no second rounding). NaN lanes get what at::vec's round-to-nearest conversion gives them
// (0xFFFF on AVX2/AVX-512), so a NaN is stored alike with and without a seed.
inline at::vec::Vectorized<c10::BFloat16> sr_pack_bf16(const at::vec::Vectorized<float>& lo,
                                                        const at::vec::Vectorized<float>& hi, U32Lanes r_lo,
                                                        U32Lanes r_hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto bits16 = [](__m512 f, __m512i r) {
    const __m512i t = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(f), r), 16);
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), t);
  };
  // packus interleaves 128-bit lanes of its operands; the permute puts lo's elements first.
  const __m512i packed = _mm512_packus_epi32(bits16(lo, r_lo.v), bits16(hi, r_hi.v));
  return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), packed);
#elif defined(CPU_CAPABILITY_AVX2)
  const auto bits16 = [](__m256 f, __m256i r) {
    const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(f), r), 16);
    return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));
  };
  const __m256i packed = _mm256_packus_epi32(bits16(lo, r_lo.v), bits16(hi, r_hi.v));
  return _mm256_permute4x64_epi64(packed, 0xd8);
#else
  constexpr int kW = U32Lanes::kLanes;
  __at_align__ float f[2 * kW];
  __at_align__ c10::BFloat16 out[2 * kW];
  lo.store(f);
  hi.store(f + kW);
  for (int j = 0; j < 2 * kW; ++j) {
    const uint32_t r = j < kW ? r_lo.v[j] : r_hi.v[j - kW];
    out[j] = c10::BFloat16(sr_round_bf16_bits(f[j], r), c10::BFloat16::from_bits());
  }
  return at::vec::Vectorized<c10::BFloat16>::loadu(out);
#endif
}

// The scalar store: the bf16 SR gives element `index` of a segment whose hash input of element 0 is `base`.
inline c10::BFloat16 sr_round_scalar(float x, uint32_t base, int64_t index) {
  const uint32_t r = svi_fmix32(base + static_cast<uint32_t>(index) * kSrIndexMul) >> 16;
  return c10::BFloat16(sr_round_bf16_bits(x, r), c10::BFloat16::from_bits());
}

}  // namespace CPU_CAPABILITY
}  // namespace svi_kernels::cpu
