#pragma once
// The SegmentStorage (kernel_table.h) of each segment of a call with state lists: the lists'
// dtypes and, when the op is given a state_seed and the state is bf16, the stochastic-rounding
// key of the segment's tensor and the segment's offset in it (svi_kernels/state_storage.h).
#include <cstdint>
#include <optional>

#include "kernel_table.h"
#include "multi_tensor.h"
#include "svi_kernels/check.h"
#include "svi_kernels/state_storage.h"

namespace svi_kernels::cpu {

class StateStores {
 public:
  // The readers: no seed, every store rounds to nearest.
  explicit StateStores(const MultiTensor& lists) : base_{lists.dtype(), lists.state_dtype()} {}

  // The writers: state_seed checked (0 <= seed < 2^31) before anything is written.
  StateStores(const char* op, const MultiTensor& lists, const std::optional<int64_t>& state_seed)
      : StateStores(lists) {
    if (!state_seed.has_value()) return;
    SVI_CHECK(*state_seed >= 0 && *state_seed < (int64_t{1} << 31), "svi_kernels::", op, ": state_seed must be in ",
              "[0, 2**31), got ", *state_seed);
    seed_ = static_cast<uint32_t>(*state_seed);
    base_.stochastic = base_.state == at::kBFloat16;
  }

  // The readers' storage: the dtypes only, the same for every segment.
  const SegmentStorage& dtypes() const { return base_; }

  SegmentStorage operator()(const Segment& seg) const {
    SegmentStorage st = base_;
    if (st.stochastic) {
      st.key = sr_key(seed_, static_cast<uint32_t>(seg.tensor));
      st.offset = seg.offset;
    }
    return st;
  }

 private:
  SegmentStorage base_;
  uint32_t seed_ = 0;
};

}  // namespace svi_kernels::cpu
