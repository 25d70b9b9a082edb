#pragma once
// The element loops of int8 state (int8_state.h), built twice: int8_state.cpp includes this in
// namespace `baseline` (baseline x86-64), int8_state_avx2.cpp in namespace `avx2` under GCC's
// target pragma "avx2,f16c" -- without FMA, so that no contraction changes the bits of the
// update_math.h formula (every build gives the reference's bits). The loops are written so that
// GCC vectorises them (restrict pointers, selects, an integer absmax).
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "int8_state.h"
#include "svi_kernels/check.h"
#include "svi_kernels/int8_state.h"
#include "svi_kernels/update_math.h"

#ifndef SVI_INT8_ISA
#error "define SVI_INT8_ISA (the namespace of this build) before including int8_loops.h"
#endif

namespace svi_kernels::cpu {
namespace SVI_INT8_ISA {
namespace {

// ------------------------------------------------------------------ blocks
// The loops below call the codec of svi_kernels/int8_state.h element by element; written over
// restrict pointers (codes are char-typed, so they could alias the floats otherwise) they
// vectorise on baseline x86-64.
template <typename Q>
void decode_codes(const Q* __restrict q, int64_t len, float scale, float* __restrict out) {
  for (int64_t j = 0; j < len; ++j) {
    if constexpr (std::is_signed_v<Q>) out[j] = int8_decode_signed(q[j], scale);
    else out[j] = int8_decode_unsigned(q[j], scale);
  }
}

template <typename Q>
void encode_codes(const float* __restrict y, int64_t len, float inv, Q* __restrict q) {
  for (int64_t j = 0; j < len; ++j) {
    if constexpr (std::is_signed_v<Q>) q[j] = int8_encode_signed(y[j], inv);
    else q[j] = int8_encode_unsigned(y[j], inv);
  }
}

// int8_absmax_step over the block: max |y| compared as the bits of |y| (non-negative floats order
// as their bits, and any NaN's bits exceed +inf's), an integer max that vectorises; then
// int8_scale_of (NaN -> the canonical NaN). The same scale as the float fold.
float block_scale(const float* __restrict y, int64_t len) {
  int32_t most = 0;
  for (int64_t j = 0; j < len; ++j) {
    int32_t bits;
    std::memcpy(&bits, &y[j], sizeof bits);
    bits &= 0x7FFFFFFF;
    most = bits > most ? bits : most;
  }
  float absmax;
  std::memcpy(&absmax, &most, sizeof absmax);
  return int8_scale_of(absmax);
}

void decode_block(const Int8Call::Seg& sg, size_t k, int64_t b0, int64_t len, float scale, float* out) {
  if (sg.is_signed[k]) decode_codes(static_cast<const int8_t*>(sg.codes[k]) + b0, len, scale, out);
  else decode_codes(static_cast<const uint8_t*>(sg.codes[k]) + b0, len, scale, out);
}

// Encodes the block's new values y into the codes; returns its scale.
float encode_block(const Int8Call::Seg& sg, size_t k, int64_t b0, int64_t len, const float* y) {
  const float scale = block_scale(y, len);
  const float inv = int8_inv_scale(scale);
  if (sg.is_signed[k]) encode_codes(y, len, inv, static_cast<int8_t*>(sg.codes[k]) + b0);
  else encode_codes(y, len, inv, static_cast<uint8_t*>(sg.codes[k]) + b0);
  return scale;
}

// Runs f(i, x) for every element i of the segment, x[k] the decoded float32 value of state list
// k; kWrite: f updates x and each block is encoded back (codes and scale) once f has seen all of it.
template <size_t K, bool kWrite, typename F>
void for_each_block(const Int8Call::Seg& sg, const F& f) {
  float buf[K][kInt8BlockMax];
  const int64_t bs = sg.block_size;
  for (int64_t b0 = 0; b0 < sg.length; b0 += bs) {
    const int64_t len = std::min(bs, sg.length - b0);
    const int64_t blk = (sg.offset + b0) / bs;
    for (size_t k = 0; k < K; ++k) decode_block(sg, k, b0, len, sg.scales[k][blk], buf[k]);
    for (int64_t j = 0; j < len; ++j) {
      float x[K];
      for (size_t k = 0; k < K; ++k) x[k] = buf[k][j];
      f(b0 + j, x);
      if constexpr (kWrite) {
        for (size_t k = 0; k < K; ++k) buf[k][j] = x[k];
      }
    }
    if constexpr (kWrite) {
      for (size_t k = 0; k < K; ++k) sg.scales[k][blk] = encode_block(sg, k, b0, len, buf[k]);
    }
  }
}

// f(T{}) for the params' dtype.
template <typename F>
void with_param_type(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    default: SVI_CHECK(false, "svi_kernels: internal error, int8 state with params of dtype ", t);
  }
}

template <typename T>
T* list(const Int8Call::Seg& sg, size_t k) {
  return static_cast<T*>(sg.plain[k]);
}

float f32(double x) { return static_cast<float>(x); }

// f(std::true_type) or f(std::false_type): a runtime flag made a template argument, so the
// element loop holds no branch on it.
template <typename F>
void with_flag(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// ------------------------------------------------------------------ writers
template <typename T, bool kAmsgrad, bool kDecoupled, bool kWeightDecay, bool kUnscale>
void adam_segment(const Int8Call::Seg& sg, const AdamScalars& s) {
  T* p = list<T>(sg, 0);
  T* g = list<T>(sg, 1);
  const math::AdamCoeffs<float> c{f32(s.one_minus_beta1), f32(s.beta2),     f32(s.one_minus_beta2),
                                  f32(s.eps),             f32(s.weight_decay), f32(s.decay),
                                  f32(s.step_size),       f32(s.bias_correction2_sqrt)};
  const float grad_scale = f32(s.grad_scale);
  for_each_block<kAmsgrad ? 3 : 2, true>(sg, [&](int64_t i, float* x) {
    float pv = static_cast<float>(p[i]);
    float gv = static_cast<float>(g[i]);
    if constexpr (kUnscale) {
      gv = math::unscale_grad(gv, grad_scale);
      g[i] = static_cast<T>(gv);
    }
    if constexpr (kAmsgrad) {
      math::adam_amsgrad_elem(pv, gv, x[0], x[1], x[2], c, kDecoupled, kWeightDecay, s.maximize);
    } else {
      math::adam_elem(pv, gv, x[0], x[1], c, kDecoupled, kWeightDecay, s.maximize);
    }
    p[i] = static_cast<T>(pv);
  });
}

template <typename T>
void sgd_momentum_segment(const Int8Call::Seg& sg, const SgdScalars& s) {
  T* p = list<T>(sg, 0);
  T* g = list<T>(sg, 1);
  const math::SgdCoeffs<float> c{f32(s.lr), f32(s.momentum), f32(s.weight_decay), f32(1.0 - s.dampening)};
  const float grad_scale = f32(s.grad_scale);
  for_each_block<1, true>(sg, [&](int64_t i, float* x) {
    float pv = static_cast<float>(p[i]);
    float gv = static_cast<float>(g[i]);
    if (s.unscale) {
      gv = math::unscale_grad(gv, grad_scale);
      g[i] = static_cast<T>(gv);
    }
    math::sgd_momentum_elem(pv, gv, x[0], c, s.nesterov, s.has_weight_decay, s.maximize);
    p[i] = static_cast<T>(pv);
  });
}

template <typename T>
double ls_save_adam_segment(const Int8Call::Seg& sg, const LsAdamSaveScalars& s) {
  const T* p = list<T>(sg, 0);
  const T* g = list<T>(sg, 1);
  T* w0 = s.with_w0 ? list<T>(sg, 2) : nullptr;
  T* dirs = s.with_dirs ? list<T>(sg, 3) : nullptr;
  const float one_minus_beta1 = f32(s.one_minus_beta1), beta2 = f32(s.beta2), one_minus_beta2 = f32(s.one_minus_beta2),
              eps = f32(s.eps), bc2_sqrt = f32(s.bias_correction2_sqrt);
  double sum = 0.0;
  for_each_block<2, true>(sg, [&](int64_t i, float* x) {
    if (w0 != nullptr) w0[i] = p[i];  // a copy of the bits
    const float gv = static_cast<float>(g[i]);
    float d;
    sum += math::ls_adam_prepare_dir_elem(gv, x[0], x[1], d, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt);
    if (dirs != nullptr) dirs[i] = static_cast<T>(d);
  });
  return sum;
}

// ------------------------------------------------------------------ readers
template <typename T>
void ls_trial_adam_segment(const Int8Call::Seg& sg, float eta, float eps, float bc2_sqrt) {
  T* p = list<T>(sg, 0);
  const T* w0 = list<T>(sg, 1);  // may be p itself (in-place trials): read before p is written
  const T* g = list<T>(sg, 2);
  for_each_block<1, false>(sg, [&](int64_t i, float* x) {
    p[i] = static_cast<T>(math::ls_trial_adam_elem(static_cast<float>(w0[i]), static_cast<float>(g[i]), x[0], eta,
                                                   eps, bc2_sqrt));
  });
}

template <typename T>
void ls_final_adam_segment(const Int8Call::Seg& sg, float eta_over_bc1, float eps, float bc2_sqrt) {
  T* p = list<T>(sg, 0);
  const T* w0 = list<T>(sg, 1);
  for_each_block<2, false>(sg, [&](int64_t i, float* x) {
    p[i] = static_cast<T>(math::ls_final_adam_elem(static_cast<float>(w0[i]), x[0], x[1], eta_over_bc1, eps, bc2_sqrt));
  });
}

template <typename T>
void ls_final_adam_from_trial_segment(const Int8Call::Seg& sg, float trial_eta, float eta_over_bc1, float eps,
                                      float bc2_sqrt) {
  T* p = list<T>(sg, 0);
  const T* g = list<T>(sg, 1);
  for_each_block<2, false>(sg, [&](int64_t i, float* x) {
    p[i] = static_cast<T>(math::ls_final_adam_from_trial_elem(static_cast<float>(p[i]), static_cast<float>(g[i]), x[0],
                                                              x[1], trial_eta, eta_over_bc1, eps, bc2_sqrt));
  });
}

void adam(const Int8Call& call, const std::vector<AdamScalars>& per_tensor) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment& seg, const Int8Call::Seg& sg) {
      const AdamScalars& s = per_tensor.size() == 1 ? per_tensor[0] : per_tensor[seg.tensor];
      with_flag(s.amsgrad, [&](auto amsgrad) {
        with_flag(s.decoupled, [&](auto decoupled) {
          with_flag(s.has_weight_decay, [&](auto wd) {
            with_flag(s.unscale, [&](auto unscale) {
              // maximize stays a runtime flag (a negation): half the instantiations.
              adam_segment<T, amsgrad(), decoupled(), wd(), unscale()>(sg, s);
            });
          });
        });
      });
    });
  });
}

void sgd_momentum(const Int8Call& call, const SgdScalars& s) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment&, const Int8Call::Seg& sg) { sgd_momentum_segment<T>(sg, s); });
  });
}

at::Tensor ls_save_adam_op(const Int8Call& call, const LsAdamSaveScalars& s) {
  if (call.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  std::vector<double> partial(call.num_segments(), 0.0);
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t k, const Segment&, const Int8Call::Seg& sg) {
      partial[k] = ls_save_adam_segment<T>(sg, s);
    });
  });
  return call.per_tensor_sums(partial);
}

void ls_trial_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment& seg, const Int8Call::Seg& sg) {
      ls_trial_adam_segment<T>(sg, f32(etas[seg.tensor]), f32(eps), f32(bias_correction2_sqrt));
    });
  });
}

void ls_final_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction1,
                        double bias_correction2_sqrt) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment& seg, const Int8Call::Seg& sg) {
      // The final step moves by (eta / bias_correction1), computed in double (as the float path).
      ls_final_adam_segment<T>(sg, f32(etas[seg.tensor] / bias_correction1), f32(eps), f32(bias_correction2_sqrt));
    });
  });
}

void ls_final_adam_from_trial(const Int8Call& call, c10::ArrayRef<double> etas, double trial_eta, double eps,
                                   double bias_correction1, double bias_correction2_sqrt) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment& seg, const Int8Call::Seg& sg) {
      ls_final_adam_from_trial_segment<T>(sg, f32(trial_eta), f32(etas[seg.tensor] / bias_correction1), f32(eps),
                                          f32(bias_correction2_sqrt));
    });
  });
}

}  // namespace

const Int8Loops kInt8Loops{&adam, &sgd_momentum, &ls_save_adam_op, &ls_trial_adam, &ls_final_adam,
                           &ls_final_adam_from_trial};

}  // namespace SVI_INT8_ISA
}  // namespace svi_kernels::cpu
