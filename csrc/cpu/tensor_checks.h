#pragma once
// Input validation shared by the CPU ops: a fused call is a group of equal-length tensor lists.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <initializer_list>
#include <optional>

namespace svi_kernels::cpu {

struct NamedList {
  const char* name;  // the schema's argument name, used in error messages
  at::TensorList tensors;
};

// The dtypes the CPU kernels are built for: fp32, fp64, fp16, bf16.
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtypes of a fused call: params/grads (and every list that is not state), and the state
// lists (`param` when the call has none).
struct ListDtypes {
  at::ScalarType param = at::ScalarType::Undefined;
  at::ScalarType state = at::ScalarType::Undefined;
};

// Checks that the lists have one tensor per parameter, that tensors at one position have the
// same number of elements, and that every tensor is a dense, contiguous CPU tensor of a
// floating dtype (fp32, fp64, fp16, bf16): one dtype for the lists not in state_lists (bit k:
// the k-th list holds optimizer state) and one for the state lists, an allowed (param, state)
// pair of svi_kernels/state_storage.h. Returns the two dtypes (Undefined for empty lists).
ListDtypes check_fused_group(const char* op, std::initializer_list<NamedList> lists, unsigned state_lists = 0);

// Checks that a per-tensor scalar list (the line-search step sizes) has one value per tensor.
void check_per_tensor_scalars(const char* op, const char* name, size_t count, size_t num_tensors);

// The value of a one-element float32/float64 CPU tensor (lr, a step count, the AMP loss scale or
// skip flag), read straight from memory: no device sync, no dispatch.
double read_scalar(const char* op, const char* name, const at::Tensor& t);

// found_inf given and non-zero: the step is skipped (GradScaler saw inf/nan in the gradients).
bool step_skipped(const char* op, const std::optional<at::Tensor>& found_inf);

}  // namespace svi_kernels::cpu
