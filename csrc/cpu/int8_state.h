#pragma once
// int8 optimizer state on the CPU (state_dtype="int8", svi_kernels/int8_state.h has the format):
// the argument checks and the element loops of the state ops when their state lists hold 8-bit
// codes with float32 scales per block. A separate path: the float/bf16 state loops
// (adam_loop.h, ...) are untouched. Each segment of the chunk plan starts on a block boundary
// (kChunkElems is a multiple of every block size), so a block is never split between threads.
// Per block: the state is decoded into a float32 stack buffer, the update_math.h formula runs
// on it element by element, then the writers take the block's absmax and encode.
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "kernel_table.h"
#include "multi_tensor.h"
#include "tensor_checks.h"

namespace svi_kernels::cpu {

// One state list of an op: its codes and, when given, its scales.
struct Int8StateList {
  const char* name;         // "exp_avgs"
  at::TensorList codes;
  const char* scales_name;  // "exp_avg_scales"
  std::optional<at::TensorList> scales;
  bool is_signed;           // int8 codes (m, momentum buffers); else uint8 (v, max v)
};

// True when the call has int8 state: some scales list given, or some state list's first tensor
// holding int8/uint8 codes. The int8 path (Int8Call) then checks the rest.
bool int8_state_requested(std::initializer_list<Int8StateList> state);

// The checked lists of an op with int8 state: `plain` lists (params, grads, w0, dirs: one dtype,
// float32/float16/bfloat16) and the state lists, every tensor contiguous on the CPU, one tensor
// per parameter; raises before anything is written.
class Int8Call {
 public:
  static constexpr size_t kMaxPlain = 4, kMaxState = 3;

  Int8Call(const char* op, std::initializer_list<NamedList> plain, std::initializer_list<Int8StateList> state,
           int64_t block_size);

  bool empty() const { return num_tensors_ == 0; }
  at::ScalarType dtype() const { return dtype_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_segments() const { return static_cast<int64_t>(plan_.segments.size()); }

  // What a segment's loop gets: its first element in each plain and code list, and the scales of
  // its tensor (index them by block of the tensor: (offset + i) / block_size).
  struct Seg {
    void* plain[kMaxPlain];
    void* codes[kMaxState];
    float* scales[kMaxState];
    bool is_signed[kMaxState];
    int64_t offset, length, block_size;
  };

  // Calls f(segment_index, segment, seg) for every segment, tasks in parallel.
  template <typename F>
  void parallel_segments(const F& f) const {
    parallel_plan(plan_, [&](int64_t s, const Segment& seg) { f(s, seg, segment(seg)); });
  }

  // The per-tensor sums of per-segment partial sums (plan_tensor_sums).
  at::Tensor per_tensor_sums(const std::vector<double>& partial) const {
    return plan_tensor_sums(plan_, num_tensors_, partial);
  }

 private:
  Seg segment(const Segment& seg) const;

  ChunkPlan plan_;
  size_t num_plain_ = 0, num_state_ = 0;
  std::vector<char*> plain_;   // plain_[t * num_plain_ + k]
  std::vector<char*> codes_;   // codes_[t * num_state_ + k]
  std::vector<float*> scales_;  // scales_[t * num_state_ + k]
  bool is_signed_[kMaxState] = {};
  int64_t plain_elem_size_ = 0;
  int64_t num_tensors_ = 0;
  int64_t block_size_ = 0;
  at::ScalarType dtype_ = at::ScalarType::Undefined;
};

// The element loops of one build (int8_loops.h), with the signatures of the functions below.
struct Int8Loops {
  void (*adam)(const Int8Call&, const std::vector<AdamScalars>&);
  void (*sgd_momentum)(const Int8Call&, const SgdScalars&);
  at::Tensor (*ls_save_adam)(const Int8Call&, const LsAdamSaveScalars&);
  void (*ls_trial_adam)(const Int8Call&, c10::ArrayRef<double>, double, double);
  void (*ls_final_adam)(const Int8Call&, c10::ArrayRef<double>, double, double, double);
  void (*ls_final_adam_from_trial)(const Int8Call&, c10::ArrayRef<double>, double, double, double, double);
};

// The AVX2 and AVX-512 builds (int8_state_avx2.cpp, int8_state_avx512.cpp), or nullptr where the
// compiler could not build them.
const Int8Loops* avx2_int8_loops();
const Int8Loops* avx512_int8_loops();

// The op loops (the build int8_state.cpp picks). per_tensor: one scalar set per tensor, or one for all.
// Plain lists: params, grads; state: exp_avgs, exp_avg_sqs[, max_exp_avg_sqs when s.amsgrad].
void int8_adam(const Int8Call& call, const std::vector<AdamScalars>& per_tensor);
// Plain: params, grads; state: momentum_buffers.
void int8_sgd_momentum(const Int8Call& call, const SgdScalars& s);
// Plain: params, grads[, w0[, dirs]]; state: exp_avgs, exp_avg_sqs. Returns the per-tensor sums.
at::Tensor int8_ls_save_adam(const Int8Call& call, const LsAdamSaveScalars& s);
// Plain: params, w0, grads; state: exp_avg_sqs. etas per tensor.
void int8_ls_trial_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt);
// Plain: params, w0; state: exp_avgs, exp_avg_sqs.
void int8_ls_final_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction1,
                        double bias_correction2_sqrt);
// Plain: params, grads; state: exp_avgs, exp_avg_sqs.
void int8_ls_final_adam_from_trial(const Int8Call& call, c10::ArrayRef<double> etas, double trial_eta, double eps,
                                   double bias_correction1, double bias_correction2_sqrt);

}  // namespace svi_kernels::cpu
