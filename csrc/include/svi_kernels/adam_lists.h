#pragma once
// The tensor lists of the Adam ops under their schema names, for the CPU and CUDA argument checks:
// params, grads, exp_avgs, exp_avg_sqs, and max_exp_avg_sqs when AMSGrad is on.
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>

namespace svi_kernels {

// `check` is the backend's list checker, called with std::initializer_list<NamedList>
// (NamedList: that backend's {name, tensors} pair); returns the dtype it reports.
template <typename NamedList, typename Check>
at::ScalarType check_adam_lists(const Check& check, at::TensorList params, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                const std::optional<at::TensorList>& max_exp_avg_sqs) {
  if (max_exp_avg_sqs.has_value()) {
    return check(std::initializer_list<NamedList>{{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                                  {"exp_avg_sqs", exp_avg_sqs},
                                                  {"max_exp_avg_sqs", *max_exp_avg_sqs}});
  }
  return check(std::initializer_list<NamedList>{
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
}

}  // namespace svi_kernels
