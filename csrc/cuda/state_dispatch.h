#pragma once
// Compile-time types of a checked (param dtype, state dtype) pair, the CUDA ops' replacement for
// AT_DISPATCH_FLOATING_TYPES_AND2 where the state lists may hold another dtype than the params
// (svi_kernels/state_storage.h lists the pairs; check_lists(op, lists, state_lists) refused the others).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "list_checks.h"

namespace svi_kernels {
namespace cuda {

// Calls f.template operator()<T, TS>() (f: a lambda `[&]<typename scalar_t, typename state_t>() {...}`)
// with the C++ types of dtypes.param and dtypes.state.
template <typename F>
void dispatch_state_pair(const char* op, const ListDtypes& dtypes, F&& f) {
  using c10::BFloat16;
  using c10::Half;
  const at::ScalarType p = dtypes.param, s = dtypes.state;
  if (p == at::kFloat && s == at::kFloat) return f.template operator()<float, float>();
  if (p == at::kDouble && s == at::kDouble) return f.template operator()<double, double>();
  if (p == at::kHalf && s == at::kHalf) return f.template operator()<Half, Half>();
  if (p == at::kBFloat16 && s == at::kBFloat16) return f.template operator()<BFloat16, BFloat16>();
  if (p == at::kFloat && s == at::kBFloat16) return f.template operator()<float, BFloat16>();
  if (p == at::kHalf && s == at::kFloat) return f.template operator()<Half, float>();
  if (p == at::kBFloat16 && s == at::kFloat) return f.template operator()<BFloat16, float>();
  SVI_CHECK(false, op, ": no kernel for params of dtype ", p, " with state of dtype ", s,
            "; the supported (param, state) dtype pairs are ", kStatePairsText);
}

}  // namespace cuda
}  // namespace svi_kernels
