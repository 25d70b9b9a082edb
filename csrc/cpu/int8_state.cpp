// int8 optimizer state on the CPU: argument checks and element loops (see int8_state.h).
#include "int8_state.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "svi_kernels/check.h"
#include "svi_kernels/int8_state.h"
#include "svi_kernels/update_math.h"

namespace svi_kernels::cpu {

static_assert(kChunkElems % kInt8BlockMax == 0, "a segment must start on a block boundary for every block size");

namespace {

bool is_code_dtype(at::ScalarType t) { return t == at::kChar || t == at::kByte; }

// What every tensor of the call must be: defined, dense, contiguous, on the CPU.
void check_plain_tensor(const char* op, const char* name, size_t i, const at::Tensor& t) {
  SVI_CHECK(t.defined(), "svi_kernels::", op, ": ", name, "[", i, "] is an undefined tensor");
  SVI_CHECK(t.layout() == at::kStrided, "svi_kernels::", op, ": ", name, "[", i, "] has layout ", t.layout(),
            "; the fused ops need dense tensors (sparse gradients are not supported)");
  SVI_CHECK(t.device().is_cpu(), "svi_kernels::", op, ": ", name, "[", i, "] is on ", t.device(),
            "; the CPU kernel needs all tensors on the CPU");
  SVI_CHECK(t.is_contiguous(), "svi_kernels::", op, ": ", name, "[", i,
            "] is not contiguous; the fused ops need contiguous tensors");
}

void check_count(const char* op, const char* first, size_t n, const char* name, size_t count) {
  SVI_CHECK(count == n, "svi_kernels::", op, ": ", first, " has ", n, " tensors but ", name, " has ", count,
            "; every list needs one tensor per parameter");
}

}  // namespace

bool int8_state_requested(std::initializer_list<Int8StateList> state) {
  for (const Int8StateList& l : state) {
    if (l.scales.has_value()) return true;
    if (!l.codes.empty() && l.codes[0].defined() && is_code_dtype(l.codes[0].scalar_type())) return true;
  }
  return false;
}

Int8Call::Int8Call(const char* op, std::initializer_list<NamedList> plain, std::initializer_list<Int8StateList> state,
                   int64_t block_size)
    : num_plain_(plain.size()), num_state_(state.size()), block_size_(block_size) {
  SVI_CHECK(num_plain_ >= 1 && num_plain_ <= kMaxPlain && num_state_ >= 1 && num_state_ <= kMaxState,
            "svi_kernels::", op, ": internal error, bad list count");
  SVI_CHECK(int8_block_size_valid(block_size), "svi_kernels::", op,
            ": block_size must be a power of two in [32, 4096] (the int8 state's elements per scale), got ",
            block_size);
  const NamedList& first = *plain.begin();
  const size_t n = first.tensors.size();
  for (const NamedList& l : plain) check_count(op, first.name, n, l.name, l.tensors.size());
  size_t k = 0;
  for (const Int8StateList& l : state) {
    check_count(op, first.name, n, l.name, l.codes.size());
    SVI_CHECK(l.scales.has_value(), "svi_kernels::", op, ": int8 state needs ", l.scales_name,
              " (float32, one tensor of ceil(numel / block_size) elements per parameter) beside the ", l.name,
              " codes; it is None (give every state list of the call its scales, or none and float state)");
    check_count(op, first.name, n, l.scales_name, l.scales->size());
    is_signed_[k++] = l.is_signed;
  }
  num_tensors_ = static_cast<int64_t>(n);
  if (n == 0) return;

  dtype_ = first.tensors[0].scalar_type();
  SVI_CHECK(dtype_ == at::kFloat || dtype_ == at::kHalf || dtype_ == at::kBFloat16, "svi_kernels::", op, ": ",
            first.name, "[0] has dtype ", dtype_, "; int8 state needs float32, float16 or bfloat16 params");
  plain_elem_size_ = static_cast<int64_t>(c10::elementSize(dtype_));
  plain_.reserve(n * num_plain_);
  codes_.reserve(n * num_state_);
  scales_.reserve(n * num_state_);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = first.tensors[i].numel();
    for (const NamedList& l : plain) {
      const at::Tensor& t = l.tensors[i];
      check_plain_tensor(op, l.name, i, t);
      SVI_CHECK(t.scalar_type() == dtype_, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ", t.scalar_type(),
                " but ", first.name, "[0] has ", dtype_, "; all tensors of one call must share a dtype");
      SVI_CHECK(t.numel() == numel, "svi_kernels::", op, ": ", l.name, "[", i, "] has ", t.numel(),
                " elements but ", first.name, "[", i, "] has ", numel);
      plain_.push_back(static_cast<char*>(t.data_ptr()));
    }
    const int64_t blocks = int8_num_blocks(numel, block_size);
    for (const Int8StateList& l : state) {
      const at::Tensor& q = l.codes[i];
      check_plain_tensor(op, l.name, i, q);
      const at::ScalarType want = l.is_signed ? at::kChar : at::kByte;
      SVI_CHECK(q.scalar_type() == want, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ", q.scalar_type(),
                "; with int8 state (", l.scales_name, " given) ", l.name, " hold ", want,
                " codes (int8 for exp_avgs and momentum_buffers, uint8 for exp_avg_sqs and max_exp_avg_sqs)");
      SVI_CHECK(q.numel() == numel, "svi_kernels::", op, ": ", l.name, "[", i, "] has ", q.numel(),
                " elements but ", first.name, "[", i, "] has ", numel);
      const at::Tensor& sc = (*l.scales)[i];
      check_plain_tensor(op, l.scales_name, i, sc);
      SVI_CHECK(sc.scalar_type() == at::kFloat, "svi_kernels::", op, ": ", l.scales_name, "[", i, "] has dtype ",
                sc.scalar_type(), "; int8 state scales are float32");
      SVI_CHECK(sc.dim() == 1 && sc.numel() == blocks, "svi_kernels::", op, ": ", l.scales_name, "[", i, "] has ",
                sc.dim(), " dimension(s) and ", sc.numel(), " elements but ", l.name, "[", i, "] has ", numel,
                " elements: with block_size ", block_size,
                " it needs shape [", blocks, "] (one scale per block)");
      codes_.push_back(static_cast<char*>(q.data_ptr()));
      scales_.push_back(sc.data_ptr<float>());
    }
    numels[i] = numel;
  }
  plan_ = plan_chunks(numels);
}

Int8Call::Seg Int8Call::segment(const Segment& seg) const {
  Seg s{};
  for (size_t k = 0; k < num_plain_; ++k) {
    s.plain[k] = plain_[seg.tensor * num_plain_ + k] + seg.offset * plain_elem_size_;
  }
  for (size_t k = 0; k < num_state_; ++k) {
    s.codes[k] = codes_[seg.tensor * num_state_ + k] + seg.offset;
    s.scales[k] = scales_[seg.tensor * num_state_ + k];
    s.is_signed[k] = is_signed_[k];
  }
  s.offset = seg.offset;
  s.length = seg.length;
  s.block_size = block_size_;
  return s;
}

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

}  // namespace

void int8_adam(const Int8Call& call, const std::vector<AdamScalars>& per_tensor) {
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

void int8_sgd_momentum(const Int8Call& call, const SgdScalars& s) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment&, const Int8Call::Seg& sg) { sgd_momentum_segment<T>(sg, s); });
  });
}

at::Tensor int8_ls_save_adam(const Int8Call& call, const LsAdamSaveScalars& s) {
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

void int8_ls_trial_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt) {
  if (call.empty()) return;
  with_param_type(call.dtype(), [&](auto tag) {
    using T = decltype(tag);
    call.parallel_segments([&](int64_t, const Segment& seg, const Int8Call::Seg& sg) {
      ls_trial_adam_segment<T>(sg, f32(etas[seg.tensor]), f32(eps), f32(bias_correction2_sqrt));
    });
  });
}

void int8_ls_final_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction1,
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

void int8_ls_final_adam_from_trial(const Int8Call& call, c10::ArrayRef<double> etas, double trial_eta, double eps,
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

}  // namespace svi_kernels::cpu
