#pragma once
// Argument checks of the CUDA ops on int8 state (state_dtype="int8", svi_kernels/int8_state.h):
// whether a call asks for it, and that its code lists, scale lists and block size fit the params,
// all before anything is written (the same refusals as the CPU ops).

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "list_checks.h"
#include "svi_kernels/check.h"
#include "svi_kernels/int8_state.h"

namespace svi_kernels {
namespace cuda {

// One state list of an op: its codes, its scale list (absent: nullopt) and whether its codes are
// signed (int8: exp_avgs, momentum_buffers) or unsigned (uint8: exp_avg_sqs, max_exp_avg_sqs).
struct Int8StateList {
  const char* name;
  at::TensorList codes;
  const char* scales_name;
  std::optional<at::TensorList> scales;
  bool is_signed;
};

inline bool is_int8_code_dtype(at::ScalarType t) { return t == at::kChar || t == at::kByte; }

// A call asks for int8 state when it gives a scale list or a state list holds int8/uint8 codes
// (check_int8_lists then refuses a call that does so only in part).
inline bool int8_state_requested(at::ArrayRef<Int8StateList> state) {
  for (const Int8StateList& s : state) {
    if (s.scales.has_value()) return true;
    for (const at::Tensor& t : s.codes)
      if (t.defined() && is_int8_code_dtype(t.scalar_type())) return true;
  }
  return false;
}

// Blocks run over the flat element order (as on the CPU and in the reference), so an int8-state
// call takes contiguous tensors only (float state also takes dense ones of one shared layout).
inline void check_contiguous(const char* op, const char* name, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i)
    SVI_CHECK(tensors[i].is_contiguous(), op, ": ", name, "[", i,
              "] is not contiguous; with int8 state every tensor must be contiguous (the quantisation blocks "
              "run over the flat element order)");
}

// `lists`: params first, then the other lists of the params' dtype (grads, w0, dirs); `state`: the
// op's state lists in its list order. Checks that every state list holds codes of its dtype with
// its scales (one float32 tensor of int8_num_blocks(numel, block_size) elements per param, on the
// params' device, contiguous), that block_size is a power of two in [32, 4096], that the params are
// float32/float16/bfloat16, that every tensor is contiguous, and otherwise what check_lists checks.
// Returns the params' dtype (kFloat when empty).
inline at::ScalarType check_int8_lists(const char* op, at::ArrayRef<NamedList> lists,
                                       at::ArrayRef<Int8StateList> state, int64_t block_size) {
  SVI_CHECK(int8_block_size_valid(block_size), op, ": block_size must be a power of two in [", kInt8BlockMin, ", ",
            kInt8BlockMax, "], got ", block_size);
  const NamedList& first = lists.front();
  const size_t n = first.second.size();
  for (const Int8StateList& s : state) {
    const at::ScalarType want = s.is_signed ? at::kChar : at::kByte;
    SVI_CHECK(s.scales.has_value(), op, ": int8 state (a scale list or int8/uint8 codes given) needs the scales of ",
              "every state list, but ", s.scales_name, " is None (give every state list of the call its scales, or ",
              "none and float state)");
    SVI_CHECK(s.codes.size() == n, op, ": ", s.name, " has ", s.codes.size(), " tensors but ", first.first, " has ", n);
    SVI_CHECK(s.scales->size() == n, op, ": ", s.scales_name, " has ", s.scales->size(), " tensors but ", first.first,
              " has ", n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = s.codes[i];
      SVI_CHECK(t.defined(), op, ": ", s.name, "[", i, "] is undefined");
      SVI_CHECK(t.scalar_type() == want, op, ": with int8 state (", s.scales_name, " given) ", s.name, " holds ",
                want == at::kChar ? "int8" : "uint8", " codes, but ", s.name, "[", i, "] has dtype ", t.scalar_type());
    }
  }
  if (n == 0) {
    check_tensors(op, first, lists, at::Device(at::kCUDA), at::kFloat, false);  // only the list lengths
    return at::kFloat;
  }
  const at::ScalarType dtype = check_first(op, first);
  SVI_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
            ": int8 state needs float32, float16 or bfloat16 params, got ", dtype);
  const at::Device device = first.second[0].device();
  check_tensors(op, first, lists, device, dtype, true);
  for (const NamedList& l : lists) check_contiguous(op, l.first, l.second);
  for (const Int8StateList& s : state) {
    check_tensors(op, first, {NamedList{s.name, s.codes}}, device, s.is_signed ? at::kChar : at::kByte, true);
    check_contiguous(op, s.name, s.codes);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& sc = (*s.scales)[i];
      const int64_t want = int8_num_blocks(first.second[i].numel(), block_size);
      SVI_CHECK(sc.defined(), op, ": ", s.scales_name, "[", i, "] is undefined");
      SVI_CHECK(sc.device() == device, op, ": all tensors must be on ", device, ", but ", s.scales_name, "[", i,
                "] is on ", sc.device());
      SVI_CHECK(sc.scalar_type() == at::kFloat, op, ": ", s.scales_name, "[", i, "] must be float32, got ",
                sc.scalar_type());
      SVI_CHECK(sc.layout() == at::kStrided && sc.is_contiguous(), op, ": ", s.scales_name, "[", i,
                "] must be a contiguous tensor");
      SVI_CHECK(sc.dim() == 1 && sc.numel() == want, op, ": ", s.scales_name, "[", i, "] has ", sc.dim(),
                " dimension(s) and ", sc.numel(), " elements but ", first.first, "[", i, "] has ",
                first.second[i].numel(), " elements: with block_size ", block_size, " it needs shape [", want,
                "] (one scale per block)");
    }
  }
  return dtype;
}

// The scale lists of a call with int8 state, in the order of its state lists (exp_avgs /
// momentum_buffers, exp_avg_sqs, max_exp_avg_sqs; an op uses the first popcount(kStateMask)), and
// its block size.
struct Int8Scales {
  std::array<at::TensorList, 3> lists{};
  int64_t block_size = kInt8BlockDefault;
};

// How a call stores its state: `on` (int8 state, checked: params of dtype `dtype`, scales) or not
// (float state: the caller checks its lists as before).
struct Int8Call {
  bool on = false;
  at::ScalarType dtype = at::kFloat;
  Int8Scales scales;
};

inline Int8Call int8_call(const char* op, at::ArrayRef<NamedList> lists, at::ArrayRef<Int8StateList> state,
                          int64_t block_size) {
  Int8Call call;
  if (!int8_state_requested(state)) return call;
  call.on = true;
  call.dtype = check_int8_lists(op, lists, state, block_size);
  call.scales.block_size = block_size;
  for (size_t s = 0; s < state.size(); ++s) call.scales.lists[s] = *state[s].scales;
  return call;
}

// The state lists of the Adam ops (exp_avgs, exp_avg_sqs, and max_exp_avg_sqs under AMSGrad) with
// their scale lists; a max_exp_avg_sq_scales without max_exp_avg_sqs is refused.
inline std::vector<Int8StateList> adam_int8_state(const char* op, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                                  const std::optional<at::TensorList>& max_exp_avg_sqs,
                                                  const std::optional<at::TensorList>& exp_avg_scales,
                                                  const std::optional<at::TensorList>& exp_avg_sq_scales,
                                                  const std::optional<at::TensorList>& max_exp_avg_sq_scales) {
  SVI_CHECK(max_exp_avg_sqs.has_value() || !max_exp_avg_sq_scales.has_value(), op,
            ": max_exp_avg_sq_scales given without max_exp_avg_sqs (AMSGrad off)");
  std::vector<Int8StateList> state{{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, true},
                                   {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false}};
  if (max_exp_avg_sqs.has_value())
    state.push_back({"max_exp_avg_sqs", *max_exp_avg_sqs, "max_exp_avg_sq_scales", max_exp_avg_sq_scales, false});
  return state;
}

// Calls f.template operator()<T>() (f: a lambda `[&]<typename scalar_t>() {...}`) with the C++ type
// of a checked int8-state param dtype (float32, float16, bfloat16).
template <typename F>
void dispatch_int8_params(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) return f.template operator()<float>();
  if (dtype == at::kHalf) return f.template operator()<c10::Half>();
  if (dtype == at::kBFloat16) return f.template operator()<c10::BFloat16>();
}

}  // namespace cuda
}  // namespace svi_kernels
