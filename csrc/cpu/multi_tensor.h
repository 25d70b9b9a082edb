#pragma once
// Multi-tensor harness of the CPU kernels: one call covers a whole list of tensors.
//
// The elements of all tensors are cut into segments (a tensor, an offset, a length) and the
// segments are packed into tasks of about kChunkElems elements: a large tensor gives many
// tasks, many small tensors share one. Tasks run under at::parallel_for (OpenMP), so one huge
// tensor and hundreds of tiny ones both keep every core busy (one parallel region per call). The plan depends only on the
// tensor sizes, never on the thread count, which makes per-segment reductions deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "svi_kernels/check.h"
#include "svi_kernels/state_storage.h"
#include "tensor_checks.h"

#include <array>
#include <initializer_list>
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
  plan.segments.reserve(numels.size());
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

// Calls f(segment_index, segment) for every segment of the plan, tasks in parallel.
template <typename F>
void parallel_plan(const ChunkPlan& plan, const F& f) {
  at::parallel_for(0, plan.num_tasks(), 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      for (int64_t s = plan.task_start[task]; s < plan.task_start[task + 1]; ++s) f(s, plan.segments[s]);
    }
  });
}

// Per-tensor totals of per-segment partial sums, added in segment order (thread-count
// independent), as the float32 [num_tensors] tensor the ls_save_* ops return.
inline at::Tensor plan_tensor_sums(const ChunkPlan& plan, int64_t num_tensors, const std::vector<double>& partial) {
  std::vector<double> total(num_tensors, 0.0);
  for (size_t s = 0; s < plan.segments.size(); ++s) total[plan.segments[s].tensor] += partial[s];
  at::Tensor out = at::empty({num_tensors}, at::TensorOptions().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  for (int64_t t = 0; t < num_tensors; ++t) dst[t] = static_cast<float>(total[t]);
  return out;
}

// The tensor lists of one fused call (at most kMaxLists), validated and turned into data
// pointers in ONE pass over the tensors: with 10,000 small tensors per list the op's own cost is
// reading each TensorImpl (a cache miss apiece), so each is read once, by plain field
// comparisons that build no error text. Anything the fast comparison does not accept goes to
// check_fused_group, which raises the precise error (before any tensor is modified).
// state_lists: bit k set when the k-th list holds optimizer state, which may have a dtype of its
// own (an allowed (param, state) pair, svi_kernels/state_storage.h).
constexpr size_t kMaxLists = 6;

class MultiTensor {
 public:
  MultiTensor(const char* op, std::initializer_list<NamedList> lists, unsigned state_lists = 0) {
    num_lists_ = lists.size();
    SVI_CHECK(num_lists_ >= 1 && num_lists_ <= kMaxLists, "svi_kernels::", op, ": internal error, bad list count");
    const at::TensorList first = lists.begin()->tensors;
    const size_t n = first.size();
    bool ok = true;
    for (const NamedList& l : lists) ok = ok && l.tensors.size() == n;
    if (ok && n > 0) {
      ok = first[0].defined() && supported_dtype(first[0].scalar_type());
      if (ok) gather(lists, n, state_lists);
      ok = ok && gathered_;
    }
    if (!ok) {
      dtypes_ = check_fused_group(op, lists, state_lists);  // throws on every input gather() refuses
      SVI_CHECK(n == 0, "svi_kernels::", op, ": internal error, the fast and the full argument checks disagree");
    }
    num_tensors_ = static_cast<int64_t>(n);
  }

  // The params' dtype (every list that is not state), and the state lists' dtype.
  at::ScalarType dtype() const { return dtypes_.param; }
  at::ScalarType state_dtype() const { return dtypes_.state; }
  bool empty() const { return num_tensors_ == 0; }
  const ChunkPlan& plan() const { return plan_; }
  // Bytes of one list of the params' dtype (every list has the same numels).
  int64_t bytes_per_list() const { return total_elems_ * elem_size_[0]; }
  int64_t num_segments() const { return static_cast<int64_t>(plan_.segments.size()); }

  // Calls f(segment_index, segment, ptrs) for every segment, tasks in parallel; ptrs[k]
  // points at the segment's first element in list k.
  template <typename F>
  void parallel_segments(const F& f) const {
    parallel_plan(plan_, [&](int64_t s, const Segment& seg) {
      std::array<void*, kMaxLists> ptrs;
      char* const* base = &base_[seg.tensor * num_lists_];
      for (size_t k = 0; k < num_lists_; ++k) ptrs[k] = base[k] + seg.offset * elem_size_[k];
      f(s, seg, ptrs.data());
    });
  }

  // The per-tensor sums of per-segment partial sums (plan_tensor_sums).
  at::Tensor per_tensor_sums(const std::vector<double>& partial) const {
    return plan_tensor_sums(plan_, num_tensors_, partial);
  }

 private:
  // What check_fused_group demands of each tensor, as field comparisons against list 0's
  // first tensor (whose dtype the caller has checked) and the first state list's; records the
  // pointers and numels. Leaves gathered_ false at the first tensor it does not accept.
  void gather(std::initializer_list<NamedList> lists, size_t n, unsigned state_lists) {
    const caffe2::TypeMeta dtype = lists.begin()->tensors[0].dtype();
    caffe2::TypeMeta state_dtype = dtype;
    std::array<caffe2::TypeMeta, kMaxLists> want;
    {
      size_t k = 0;
      for (const NamedList& l : lists) {
        if ((state_lists >> k) & 1u) {
          if (!l.tensors[0].defined()) return;
          state_dtype = l.tensors[0].dtype();  // every state list must match the first one's
          break;
        }
        ++k;
      }
      if (!state_pair_allowed(c10::typeMetaToScalarType(dtype), c10::typeMetaToScalarType(state_dtype))) return;
      for (k = 0; k < num_lists_; ++k) {
        want[k] = ((state_lists >> k) & 1u) ? state_dtype : dtype;
        elem_size_[k] = static_cast<int64_t>(want[k].itemsize());
      }
    }
    base_.resize(n * num_lists_);
    std::vector<int64_t> numels(n);
    for (size_t t = 0; t < n; ++t) {
      prefetch_ahead(lists, t, n);
      const int64_t numel = lists.begin()->tensors[t].numel();
      size_t k = 0;
      for (const NamedList& l : lists) {
        const at::Tensor& x = l.tensors[t];
        if (!x.defined()) return;
        c10::TensorImpl* impl = x.unsafeGetTensorImpl();
        if (impl->device_type() != c10::kCPU || impl->layout() != c10::kStrided || impl->dtype() != want[k] ||
            impl->numel() != numel || !impl->is_contiguous()) {
          return;
        }
        base_[t * num_lists_ + k++] = static_cast<char*>(impl->mutable_data());
      }
      numels[t] = numel;
      total_elems_ += numel;
    }
    dtypes_ = {c10::typeMetaToScalarType(dtype), c10::typeMetaToScalarType(state_dtype)};
    plan_ = plan_chunks(numels);
    gathered_ = true;
  }

  // Each tensor costs two cache misses here (its TensorImpl, then its StorageImpl for the data
  // pointer), which dominate the loop when tensors are small: fetch the TensorImpls
  // kImplAhead tensors ahead and the StorageImpls (whose address needs the TensorImpl)
  // kStorageAhead ahead, so the misses overlap instead of queueing.
  static void prefetch_ahead(std::initializer_list<NamedList> lists, size_t t, size_t n) {
    constexpr size_t kImplAhead = 24, kStorageAhead = 12;
    for (const NamedList& l : lists) {
      if (t + kImplAhead < n) {
        // The fields read span two cache lines of a TensorImpl: storage_ at its start, the
        // sizes, numel, dtype and device about 150 bytes in.
        const char* impl = reinterpret_cast<const char*>(l.tensors[t + kImplAhead].unsafeGetTensorImpl());
        prefetch(impl);
        prefetch(impl + 128);
      }
      if (t + kStorageAhead < n) {
        // A tensor without storage gives nullptr; prefetching it is a no-op, never a fault.
        prefetch(l.tensors[t + kStorageAhead].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      }
    }
  }

  static void prefetch(const void* p) {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    // Not __builtin_prefetch: GCC 13 dropped it from this loop (none in the object code).
    asm volatile("prefetcht0 (%0)" : : "r"(p));
#elif defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
  }

  ChunkPlan plan_;
  std::vector<char*> base_;  // base_[t * num_lists_ + k]: data of tensor t of list k
  size_t num_lists_ = 0;
  std::array<int64_t, kMaxLists> elem_size_{};
  int64_t num_tensors_ = 0;
  int64_t total_elems_ = 0;
  ListDtypes dtypes_;
  bool gathered_ = false;
};

}  // namespace svi_kernels::cpu
