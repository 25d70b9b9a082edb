#pragma once
// Argument checks shared by the CUDA ops: every list has one tensor per param,
// all on one CUDA device, one floating dtype, and laid out densely in the same
// order as the param (so walking raw memory pairs up the same elements).

#include <ATen/core/Tensor.h>
#include "svi_kernels/check.h"

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

// The first list is the reference (params); returns its dtype (kFloat when empty).
inline at::ScalarType check_lists(const char* op, std::initializer_list<NamedList> lists) {
  const NamedList& first = *lists.begin();
  const size_t n = first.second.size();
  for (const NamedList& l : lists)
    SVI_CHECK(l.second.size() == n, op, ": ", l.first, " has ", l.second.size(), " tensors but ",
                first.first, " has ", n);
  if (n == 0) return at::kFloat;
  const at::Tensor& p0 = first.second[0];
  SVI_CHECK(p0.defined() && p0.is_cuda(), op, ": expected CUDA tensors, got ", first.first,
              "[0] on ", p0.defined() ? p0.device().str() : std::string("<undefined>"));
  const at::ScalarType dtype = p0.scalar_type();
  SVI_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": supported dtypes are float32, float64, float16 and bfloat16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = first.second[i];
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.second[i];
      SVI_CHECK(t.defined(), op, ": ", l.first, "[", i, "] is undefined");
      SVI_CHECK(t.layout() == at::kStrided, op, ": ", l.first, "[", i, "] must be a strided (dense) tensor");
      SVI_CHECK(t.device() == p0.device(), op, ": all tensors must be on ", p0.device(), ", but ", l.first,
                  "[", i, "] is on ", t.device());
      SVI_CHECK(t.scalar_type() == dtype, op, ": all tensors must have dtype ", dtype, ", but ", l.first,
                  "[", i, "] has ", t.scalar_type());
      SVI_CHECK(t.numel() == ref.numel(), op, ": ", l.first, "[", i, "] has ", t.numel(),
                  " elements but ", first.first, "[", i, "] has ", ref.numel());
      SVI_CHECK(same_dense_layout(t, ref), op, ": ", l.first, "[", i,
                  "] must be contiguous (or dense with the same strides as ", first.first, "[", i, "])");
    }
  }
  return dtype;
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
