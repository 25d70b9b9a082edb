#include "tensor_checks.h"

#include "svi_kernels/check.h"
#include "svi_kernels/state_storage.h"

namespace svi_kernels::cpu {

ListDtypes check_fused_group(const char* op, std::initializer_list<NamedList> lists, unsigned state_lists) {
  const NamedList& first = *lists.begin();
  const size_t n = first.tensors.size();
  for (const NamedList& l : lists) {
    SVI_CHECK(l.tensors.size() == n, "svi_kernels::", op, ": ", first.name, " has ", n, " tensors but ",
                l.name, " has ", l.tensors.size(), "; every list needs one tensor per parameter");
  }
  if (n == 0) return {};

  const at::ScalarType dtype = first.tensors[0].scalar_type();
  at::ScalarType state_dtype = at::ScalarType::Undefined;  // of the first state tensor checked
  const char* state_name = nullptr;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = first.tensors[i].numel();
    unsigned k = 0;
    for (const NamedList& l : lists) {
      const bool state = (state_lists >> k++) & 1u;
      const at::Tensor& t = l.tensors[i];
      SVI_CHECK(t.defined(), "svi_kernels::", op, ": ", l.name, "[", i, "] is an undefined tensor");
      SVI_CHECK(t.layout() == at::kStrided, "svi_kernels::", op, ": ", l.name, "[", i, "] has layout ",
                  t.layout(), "; the fused ops need dense tensors (sparse gradients are not supported)");
      SVI_CHECK(t.device().is_cpu(), "svi_kernels::", op, ": ", l.name, "[", i, "] is on ", t.device(),
                  "; the CPU kernel needs all tensors on the CPU");
      SVI_CHECK(!at::isComplexType(t.scalar_type()), "svi_kernels::", op, ": ", l.name, "[", i,
                  "] is complex (", t.scalar_type(), "); complex tensors are not supported, pass "
                  "torch.view_as_real views instead");
      SVI_CHECK(supported_dtype(t.scalar_type()), "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ",
                  t.scalar_type(), "; supported dtypes are float32, float64, float16 and bfloat16");
      if (!state) {
        SVI_CHECK(t.scalar_type() == dtype, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ",
                    t.scalar_type(), " but ", first.name, "[0] has ", dtype,
                    "; all tensors of one call must share a dtype (group them by dtype)");
      } else {
        SVI_CHECK(state_pair_allowed(dtype, t.scalar_type()), "svi_kernels::", op, ": ", l.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but ", first.name, "[0] has ", dtype,
                  "; the allowed (param, state) dtype pairs are ", kStatePairsText);
        if (state_name == nullptr) {
          state_dtype = t.scalar_type();
          state_name = l.name;
        }
        SVI_CHECK(t.scalar_type() == state_dtype, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ",
                  t.scalar_type(), " but ", state_name, "[0] has ", state_dtype,
                  "; all state lists of one call share one dtype, an allowed (param, state) dtype pair: ",
                  kStatePairsText);
      }
      SVI_CHECK(t.numel() == numel, "svi_kernels::", op, ": ", l.name, "[", i, "] has ", t.numel(),
                  " elements but ", first.name, "[", i, "] has ", numel);
      SVI_CHECK(t.is_contiguous(), "svi_kernels::", op, ": ", l.name, "[", i,
                  "] is not contiguous; the fused ops need contiguous tensors");
    }
  }
  return {dtype, state_name != nullptr ? state_dtype : dtype};
}

void check_per_tensor_scalars(const char* op, const char* name, size_t count, size_t num_tensors) {
  SVI_CHECK(count == num_tensors, "svi_kernels::", op, ": ", name, " has ", count, " values but there are ",
              num_tensors, " tensors; pass one value per tensor");
}

double read_scalar(const char* op, const char* name, const at::Tensor& t) {
  SVI_CHECK(t.defined(), "svi_kernels::", op, ": ", name, " is an undefined tensor");
  SVI_CHECK(t.device().is_cpu(), "svi_kernels::", op, ": ", name, " is on ", t.device(),
              "; the CPU kernel reads it from host memory, so it must be a CPU tensor");
  SVI_CHECK(t.numel() == 1, "svi_kernels::", op, ": ", name, " must have one element, got ", t.numel());
  SVI_CHECK(t.layout() == at::kStrided, "svi_kernels::", op, ": ", name, " must be a dense tensor");
  switch (t.scalar_type()) {
    case at::kFloat: return static_cast<double>(*t.const_data_ptr<float>());
    case at::kDouble: return *t.const_data_ptr<double>();
    default: break;
  }
  SVI_CHECK(false, "svi_kernels::", op, ": ", name, " must be float32 or float64, got ", t.scalar_type());
}

bool step_skipped(const char* op, const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && read_scalar(op, "found_inf", *found_inf) != 0.0;
}

}  // namespace svi_kernels::cpu
