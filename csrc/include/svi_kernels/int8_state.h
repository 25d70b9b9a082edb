#pragma once
// Blockwise 8-bit optimizer state (state_dtype="int8", issue 24 phase 2), shared by the CPU and
// CUDA kernels; svi_kernels/backends/reference.py is the oracle and Triton mirrors it bit for bit.
// docs/kernels.md, "int8 state", says why this format.
//
// A state tensor of N elements is cut into blocks of B elements (B a power of two in [32, 4096],
// default 256), starting at its element 0; the last block may be short. Each block stores one
// float32 scale (the absmax of its decoded-domain values) and one 8-bit code per element:
//   signed codes (exp_avgs, momentum_buffers; int8, q in [-127, 127]):
//     decode  x = scale * s * s * sign(q),  s = |q| / 127                (float32, left to right)
//     encode  q = sign(y) * rint(127 * sqrt(|y| * inv))                  (a sqrt companding)
//   unsigned codes (exp_avg_sqs, max_exp_avg_sqs; uint8, q in [0, 255]):
//     decode  x = scale * (s * s) * (s * s),  s = q / 255
//     encode  q = rint(255 * sqrt(sqrt(y * inv)))                        (a fourth-root companding)
// where inv = 1 / scale (0 when scale == 0) and rint rounds half to even. Every step is one
// correctly rounded float32 operation in the order written (no FMA can form: no additions), so
// CUDA must use IEEE sqrtf and division (no fast-math) and Triton sqrt_rn / div_rn.
// Codes are clamped to [-127, 127] / [0, 255]; a NaN code value (a NaN in the block, or an inf
// value in a block whose scale is inf) is stored as code 0. A block holding a NaN gets scale NaN
// (the canonical quiet NaN, bits 0x7FC00000), so every value of it decodes to NaN, as a float32
// state would propagate it.
//
// A store into int8 state is three passes per block: the new float32 values (the unchanged
// update_math.h formulas, kept in registers/stack/shared memory), their absmax, the encode.

#include "svi_hd.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace svi_kernels {

constexpr int64_t kInt8BlockMin = 32;
constexpr int64_t kInt8BlockMax = 4096;
constexpr int64_t kInt8BlockDefault = 256;

// B must be a power of two in [kInt8BlockMin, kInt8BlockMax] (checked on the host before anything is written).
inline bool int8_block_size_valid(int64_t b) {
  return b >= kInt8BlockMin && b <= kInt8BlockMax && (b & (b - 1)) == 0;
}

// The length of a tensor's scales: ceil(numel / B).
SVI_HD int64_t int8_num_blocks(int64_t numel, int64_t block_size) { return (numel + block_size - 1) / block_size; }

// ------------------------------------------------------------------ decode
SVI_HD float int8_decode_signed(int8_t q, float scale) {
  const float s = static_cast<float>(q < 0 ? -static_cast<int>(q) : static_cast<int>(q)) / 127.0f;
  const float mag = scale * s * s;
  // * sign(q): exact negation for q < 0; for q == 0 both give scale * 0 * 0 (+0, or NaN for scale NaN/inf).
  return q < 0 ? -mag : mag;
}

SVI_HD float int8_decode_unsigned(uint8_t q, float scale) {
  const float s = static_cast<float>(q) / 255.0f;
  const float s2 = s * s;
  return scale * s2 * s2;
}

// ------------------------------------------------------------------ block scale
// The running absmax of a block: max(acc, |y|), NaN-propagating (start from acc = 0).
SVI_HD float int8_absmax_step(float acc, float y) {
  const float a = ::fabsf(y);
  return (a > acc || a != a) ? a : acc;
}

// The stored scale of a block whose absmax is `absmax`: itself, or the canonical quiet NaN.
SVI_HD float int8_scale_of(float absmax) {
  if (absmax != absmax) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(0x7FC00000u);
#else
    const uint32_t bits = 0x7FC00000u;
    float nan;
    std::memcpy(&nan, &bits, sizeof nan);
    return nan;
#endif
  }
  return absmax;
}

// The encoder's factor: 1 / scale, or 0 for an all-zero (or empty) block.
SVI_HD float int8_inv_scale(float scale) { return scale == 0.0f ? 0.0f : 1.0f / scale; }

// ------------------------------------------------------------------ encode
// rintf (round half to even) of a code value a >= 0 or NaN, up to the clamp that follows it: on
// the host, adding and removing 2^23 rounds a < 2^23 to an integer, half to even, in the default
// rounding mode (the same bits as rintf, checked for every float), and leaves a >= 2^23 at
// >= 2^23 and NaN at NaN, which the clamp then maps as it maps rintf's results. No libm call and
// no branch, so the CPU loops vectorise on baseline x86-64 (no roundps before SSE4.1).
SVI_HD float int8_round_code(float a) {
#if defined(__CUDA_ARCH__)
  return ::rintf(a);
#else
  return (a + 8388608.0f) - 8388608.0f;
#endif
}

SVI_HD int8_t int8_encode_signed(float y, float inv) {
  float a = int8_round_code(127.0f * ::sqrtf(::fabsf(y) * inv));
  a = a > 127.0f ? 127.0f : a;
  a = a >= 0.0f ? a : 0.0f;  // NaN -> 0 (selects, not branches: the CPU loops vectorise)
  const int q = static_cast<int>(a);
  return static_cast<int8_t>(y < 0.0f ? -q : q);
}

SVI_HD uint8_t int8_encode_unsigned(float y, float inv) {
  float a = int8_round_code(255.0f * ::sqrtf(::sqrtf(y * inv)));  // y * inv < 0 gives NaN
  a = a > 255.0f ? 255.0f : a;
  a = a >= 0.0f ? a : 0.0f;  // NaN (or y < 0) -> 0
  return static_cast<uint8_t>(static_cast<int>(a));
}

}  // namespace svi_kernels
