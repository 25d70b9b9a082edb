#pragma once
// Argument checks shared by the CUDA ops: every list has one tensor per param,
// all on one CUDA device, one floating dtype (the state lists: one state dtype paired
// with the params', svi_kernels/state_storage.h), and laid out densely in the same
// order as the param (so walking raw memory pairs up the same elements).

#include <ATen/core/Tensor.h>
#include "svi_kernels/check.h"
#include "svi_kernels/state_storage.h"

#include <initializer_list>
#include <string>
#include <utility>

namespace svi_kernels {
namespace cuda {

using NamedList = std::pair<const char*, at::TensorList>;

inline bool same_dense_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.is_contiguous() && ref.is_contiguous()) return true;
  return t.is_non_overlapping_and_dense() && t.strides() == ref.strides();
}

// Each list has first's number of tensors, and each tensor is defined, strided, on `device`, of
// dtype `dtype` (checked when `check_dtype`), with first's tensor's numel and dense layout.
inline void check_tensors(const char* op, const NamedList& first, at::ArrayRef<NamedList> lists,
                          const at::Device& device, at::ScalarType dtype, bool check_dtype) {
  const size_t n = first.second.size();
  for (const NamedList& l : lists)
    SVI_CHECK(l.second.size() == n, op, ": ", l.first, " has ", l.second.size(), " tensors but ",
                first.first, " has ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = first.second[i];
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.second[i];
      SVI_CHECK(t.defined(), op, ": ", l.first, "[", i, "] is undefined");
      SVI_CHECK(t.layout() == at::kStrided, op, ": ", l.first, "[", i, "] must be a strided (dense) tensor");
      SVI_CHECK(t.device() == device, op, ": all tensors must be on ", device, ", but ", l.first,
                  "[", i, "] is on ", t.device());
      SVI_CHECK(!check_dtype || t.scalar_type() == dtype, op, ": all tensors must have dtype ", dtype, ", but ",
                  l.first, "[", i, "] has ", t.scalar_type());
      SVI_CHECK(t.numel() == ref.numel(), op, ": ", l.first, "[", i, "] has ", t.numel(),
                  " elements but ", first.first, "[", i, "] has ", ref.numel());
      SVI_CHECK(same_dense_layout(t, ref), op, ": ", l.first, "[", i,
                  "] must be contiguous (or dense with the same strides as ", first.first, "[", i, "])");
    }
  }
}

// The device and dtype of the first tensor of the reference list (params), checked to be CUDA and
// one of the dtypes the kernels are built for. The list must not be empty.
inline at::ScalarType check_first(const char* op, const NamedList& first) {
  const at::Tensor& p0 = first.second[0];
  SVI_CHECK(p0.defined() && p0.is_cuda(), op, ": expected CUDA tensors, got ", first.first,
              "[0] on ", p0.defined() ? p0.device().str() : std::string("<undefined>"));
  const at::ScalarType dtype = p0.scalar_type();
  SVI_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": supported dtypes are float32, float64, float16 and bfloat16, got ", dtype);
  return dtype;
}

// The first list is the reference (params); returns its dtype (kFloat when empty). Every tensor
// of every list has that dtype.
inline at::ScalarType check_lists(const char* op, std::initializer_list<NamedList> lists) {
  const NamedList& first = *lists.begin();
  if (first.second.empty()) {
    check_tensors(op, first, lists, at::Device(at::kCUDA), at::kFloat, false);  // only the list lengths
    return at::kFloat;
  }
  const at::ScalarType dtype = check_first(op, first);
  check_tensors(op, first, lists, first.second[0].device(), dtype, true);
  return dtype;
}

// The dtypes of an op that keeps optimizer state: T of the params-like lists, TS of the state lists.
struct ListDtypes {
  at::ScalarType param = at::kFloat;
  at::ScalarType state = at::kFloat;
};

// Lists of an op with optimizer state: `lists` (params first, then grads, w0, dirs) share the
// params' dtype T; `state_lists` (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers) share
// one state dtype TS, and (T, TS) must be one of state_storage.h's pairs. Otherwise as check_lists
// (one tensor per param in every list, one device, same numel and layout). {kFloat, kFloat} when empty.
inline ListDtypes check_lists(const char* op, at::ArrayRef<NamedList> lists, at::ArrayRef<NamedList> state_lists) {
  const NamedList& first = lists.front();
  const NamedList& first_state = state_lists.front();
  SVI_CHECK(first_state.second.size() == first.second.size(), op, ": ", first_state.first, " has ",
              first_state.second.size(), " tensors but ", first.first, " has ", first.second.size());
  if (first.second.empty()) {
    check_tensors(op, first, lists, at::Device(at::kCUDA), at::kFloat, false);
    check_tensors(op, first, state_lists, at::Device(at::kCUDA), at::kFloat, false);
    return {};
  }
  ListDtypes dtypes;
  dtypes.param = check_first(op, first);
  const at::Device device = first.second[0].device();
  check_tensors(op, first, lists, device, dtypes.param, true);
  const at::Tensor& s0 = first_state.second[0];
  SVI_CHECK(s0.defined(), op, ": ", first_state.first, "[0] is undefined");
  dtypes.state = s0.scalar_type();
  for (const NamedList& l : state_lists) {
    for (size_t i = 0; i < l.second.size(); ++i) {
      const at::Tensor& t = l.second[i];
      if (!t.defined()) continue;  // reported by check_tensors below
      SVI_CHECK(state_pair_allowed(dtypes.param, t.scalar_type()), op, ": ", l.first, "[", i, "] has dtype ",
                  t.scalar_type(), " but ", first.first, "[0] has ", dtypes.param,
                  "; the allowed (param, state) dtype pairs are ", kStatePairsText);
      SVI_CHECK(t.scalar_type() == dtypes.state, op, ": ", l.first, "[", i, "] has dtype ", t.scalar_type(), " but ",
                  first_state.first, "[0] has ", dtypes.state,
                  "; all state lists of one call share one dtype, an allowed (param, state) dtype pair: ",
                  kStatePairsText);
    }
  }
  check_tensors(op, first, state_lists, device, dtypes.state, true);
  return dtypes;
}

inline void check_scalars(const char* op, const char* name, at::ArrayRef<double> values, size_t n) {
  SVI_CHECK(values.size() == n, op, ": ", name, " has ", values.size(), " values but there are ", n, " tensors");
}

// A one-element float32/float64 tensor on `device` that a kernel reads in place (lr, a step
// count, the AMP loss scale or skip flag). Returns whether it is float64.
inline bool check_device_scalar(const char* op, const std::string& name, const at::Tensor& t,
                                const at::Device& device) {
  SVI_CHECK(t.defined(), op, ": ", name, " is undefined");
  SVI_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the tensors are on ", device,
              "; the kernel reads it from device memory (move it with .to(device))");
  SVI_CHECK(t.numel() == 1 && t.layout() == at::kStrided, op, ": ", name, " must be a dense one-element tensor");
  SVI_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kDouble;
}

}  // namespace cuda
}  // namespace svi_kernels
