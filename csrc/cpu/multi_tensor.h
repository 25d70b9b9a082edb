#pragma once
// Multi-tensor harness of the CPU kernels: one call covers a whole list of tensors.
//
// The elements of all tensors are cut into segments (a tensor, an offset, a length) and the
// segments are packed into tasks of about kChunkElems elements: a large tensor gives many
// tasks, many small tensors share one. Tasks run under at::parallel_for (OpenMP), so one huge
// tensor and hundreds of tiny ones both keep every core busy. The plan depends only on the
// tensor sizes, never on the thread count, which makes per-segment reductions deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <vector>

namespace svi_kernels::cpu {

// Elements per task. A multiple of 64, so a segment that starts inside a tensor starts on a
// 64-byte cache line for every dtype (tensor storage itself is 64-byte aligned); large enough
// that the per-task overhead vanishes, small enough to balance two to a few dozen threads.
constexpr int64_t kChunkElems = 32768;

struct Segment {
  int64_t tensor;  // position in the lists
  int64_t offset;  // first element
  int64_t length;  // number of elements
};

struct ChunkPlan {
  std::vector<Segment> segments;
  std::vector<int64_t> task_start;  // task i owns segments [task_start[i], task_start[i + 1])

  int64_t num_tasks() const { return static_cast<int64_t>(task_start.size()) - 1; }
};

inline ChunkPlan plan_chunks(c10::ArrayRef<int64_t> numels, int64_t chunk_elems = kChunkElems) {
  ChunkPlan plan;
  plan.task_start.push_back(0);
  int64_t filled = 0;  // elements in the task being packed
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t off = 0; off < numels[t]; off += chunk_elems) {
      const int64_t len = std::min(chunk_elems, numels[t] - off);
      if (filled > 0 && filled + len > chunk_elems) {
        plan.task_start.push_back(static_cast<int64_t>(plan.segments.size()));
        filled = 0;
      }
      plan.segments.push_back({t, off, len});
      filled += len;
    }
  }
  if (filled > 0) plan.task_start.push_back(static_cast<int64_t>(plan.segments.size()));
  return plan;
}

// The N tensor lists of one fused call (already validated: same length, numel, dtype).
template <size_t N>
class MultiTensor {
 public:
  explicit MultiTensor(const std::array<at::TensorList, N>& lists) {
    const auto n = lists[0].size();
    elem_size_ = n > 0 ? static_cast<int64_t>(lists[0][0].element_size()) : 0;
    base_.resize(n * N);
    std::vector<int64_t> numels(n);
    for (size_t t = 0; t < n; ++t) {
      numels[t] = lists[0][t].numel();
      for (size_t k = 0; k < N; ++k) base_[t * N + k] = static_cast<char*>(lists[k][t].data_ptr());
    }
    plan_ = plan_chunks(numels);
    num_tensors_ = static_cast<int64_t>(n);
  }

  const ChunkPlan& plan() const { return plan_; }
  int64_t num_segments() const { return static_cast<int64_t>(plan_.segments.size()); }

  // Calls f(segment_index, segment, ptrs) for every segment, tasks in parallel; ptrs[k]
  // points at the segment's first element in list k.
  template <typename F>
  void parallel_segments(const F& f) const {
    at::parallel_for(0, plan_.num_tasks(), 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        for (int64_t s = plan_.task_start[task]; s < plan_.task_start[task + 1]; ++s) {
          const Segment& seg = plan_.segments[s];
          std::array<void*, N> ptrs;
          for (size_t k = 0; k < N; ++k) ptrs[k] = base_[seg.tensor * N + k] + seg.offset * elem_size_;
          f(s, seg, ptrs.data());
        }
      }
    });
  }

  // Per-tensor totals of per-segment partial sums, added in segment order (thread-count
  // independent), as the float32 [n_tensors] tensor the ls_save_* ops return.
  at::Tensor per_tensor_sums(const std::vector<double>& partial) const {
    std::vector<double> total(num_tensors_, 0.0);
    for (int64_t s = 0; s < num_segments(); ++s) total[plan_.segments[s].tensor] += partial[s];
    at::Tensor out = at::empty({num_tensors_}, at::TensorOptions().dtype(at::kFloat));
    float* dst = out.data_ptr<float>();
    for (int64_t t = 0; t < num_tensors_; ++t) dst[t] = static_cast<float>(total[t]);
    return out;
  }

 private:
  ChunkPlan plan_;
  std::vector<char*> base_;  // base_[t * N + k]: data of tensor t of list k
  int64_t elem_size_ = 0;
  int64_t num_tensors_ = 0;
};

}  // namespace svi_kernels::cpu
