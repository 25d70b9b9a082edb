#pragma once
// Input validation shared by the CPU ops: a fused call is a group of equal-length tensor lists.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <initializer_list>

namespace svi_kernels::cpu {

struct NamedList {
  const char* name;  // the schema's argument name, used in error messages
  at::TensorList tensors;
};

// Checks that the lists have one tensor per parameter, that tensors at one position have the
// same number of elements, and that every tensor is a dense, contiguous CPU tensor of one
// floating dtype (fp32, fp64, fp16, bf16). Returns that dtype (Undefined for empty lists).
at::ScalarType check_fused_group(const char* op, std::initializer_list<NamedList> lists);

// Checks that a per-tensor scalar list (the line-search step sizes) has one value per tensor.
void check_per_tensor_scalars(const char* op, const char* name, size_t count, size_t num_tensors);

}  // namespace svi_kernels::cpu
