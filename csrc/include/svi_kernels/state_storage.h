#pragma once
// How optimizer state (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers) may be stored,
// shared by the CPU and CUDA kernels (Triton and svi_kernels/backends/reference.py mirror it):
// the (param dtype, state dtype) pairs the ops accept, and the stochastic-rounding (SR) bits of a
// store into a bfloat16 state list when the op is given a state_seed. docs/kernels.md, "State
// storage", says why SR: with beta2 = 0.999 an update of v is below half a bf16 ulp, so rounding
// to nearest would freeze it.
//
// The SR bits are uint32 arithmetic (wrapping), the same in every backend bit for bit:
//   key_t    = fmix32(seed + t * 0x9E3779B9)                         t: tensor index in the call
//   r(t,l,i) = fmix32(key_t + l * 0x7F4A7C15 + i * 0x9E3779B1) >> 16  l: list id, i: flat index in t
//   bf16 bits = (float_bits(x) + r) >> 16, or x rounded to nearest when x is NaN.
// E[stored] = x for finite x: the 16 dropped bits are rounded up with probability (their value) / 2^16.

#include "svi_hd.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <cstring>

namespace svi_kernels {

// ------------------------------------------------------------------ allowed dtype pairs
// (param/grad dtype T, state dtype TS): same dtype (today's), fp32 params with bf16 state, and
// fp16/bf16 params with fp32 state. The compute type is float32 except for (f64, f64).
inline bool state_pair_allowed(c10::ScalarType param, c10::ScalarType state) {
  if (param == state) {
    return param == c10::kFloat || param == c10::kDouble || param == c10::kHalf || param == c10::kBFloat16;
  }
  return (param == c10::kFloat && state == c10::kBFloat16) ||
         ((param == c10::kHalf || param == c10::kBFloat16) && state == c10::kFloat);
}

// For error messages.
constexpr const char* kStatePairsText =
    "(float32, float32), (float64, float64), (float16, float16), (bfloat16, bfloat16), "
    "(float32, bfloat16), (float16, float32), (bfloat16, float32)";

// ------------------------------------------------------------------ stochastic rounding
// List ids l of the SR bits.
enum SrList : uint32_t { kSrExpAvgs = 0, kSrMomentumBuffers = 0, kSrExpAvgSqs = 1, kSrMaxExpAvgSqs = 2 };

constexpr uint32_t kSrTensorMul = 0x9E3779B9u;
constexpr uint32_t kSrListMul = 0x7F4A7C15u;
constexpr uint32_t kSrIndexMul = 0x9E3779B1u;

// MurmurHash3's 32-bit finalizer (logical shifts, wrapping multiplies).
SVI_HD uint32_t svi_fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The key of tensor t of a call given state_seed (0 <= seed < 2^31).
SVI_HD uint32_t sr_key(uint32_t seed, uint32_t tensor) { return svi_fmix32(seed + tensor * kSrTensorMul); }

// The hash input of element 0 of list l: sr_bits(key, l, i) == svi_fmix32(sr_base(key, l) + i * kSrIndexMul) >> 16,
// so a loop over consecutive elements can add kSrIndexMul per element.
SVI_HD uint32_t sr_base(uint32_t key, uint32_t list) { return key + list * kSrListMul; }

// The 16 random bits r (0..65535) of element i (flat index inside its tensor, wrapped to uint32) of list l.
SVI_HD uint32_t sr_bits(uint32_t key, uint32_t list, uint32_t index) {
  return svi_fmix32(sr_base(key, list) + index * kSrIndexMul) >> 16;
}

SVI_HD uint32_t svi_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// bf16 bits of x rounded to nearest, ties to even (quiet NaN 0x7FC0 for NaN, as c10::BFloat16).
SVI_HD uint16_t svi_bf16_bits_nearest(float x) {
  const uint32_t u = svi_float_bits(x);
  if (x != x) return static_cast<uint16_t>(0x7FC0u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// bf16 bits of x stochastically rounded with the random bits r (sr_bits); NaN rounds to nearest.
SVI_HD uint16_t sr_round_bf16_bits(float x, uint32_t r) {
  if (x != x) return svi_bf16_bits_nearest(x);
  return static_cast<uint16_t>((svi_float_bits(x) + r) >> 16);
}

}  // namespace svi_kernels
