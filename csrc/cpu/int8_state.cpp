// int8 optimizer state on the CPU: argument checks, and the choice of the loops' build (int8_loops.h).
#include "int8_state.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include "svi_kernels/check.h"
#include "svi_kernels/int8_state.h"
#include "svi_kernels/update_math.h"

// The loops of this build (baseline x86-64); int8_state_avx2.cpp builds them for AVX2 (no FMA).
#define SVI_INT8_ISA baseline
#include "int8_loops.h"

namespace svi_kernels::cpu {

static_assert(kChunkElems % kInt8BlockMax == 0, "a segment must start on a block boundary for every block size");

namespace {

bool is_code_dtype(at::ScalarType t) { return t == at::kChar || t == at::kByte; }

// What every tensor of the call must be: defined, dense, contiguous, on the CPU.
void check_plain_tensor(const char* op, const char* name, size_t i, const at::Tensor& t) {
  SVI_CHECK(t.defined(), "svi_kernels::", op, ": ", name, "[", i, "] is an undefined tensor");
  SVI_CHECK(t.layout() == at::kStrided, "svi_kernels::", op, ": ", name, "[", i, "] has layout ", t.layout(),
            "; the fused ops need dense tensors (sparse gradients are not supported)");
  SVI_CHECK(t.device().is_cpu(), "svi_kernels::", op, ": ", name, "[", i, "] is on ", t.device(),
            "; the CPU kernel needs all tensors on the CPU");
  SVI_CHECK(t.is_contiguous(), "svi_kernels::", op, ": ", name, "[", i,
            "] is not contiguous; the fused ops need contiguous tensors");
}

void check_count(const char* op, const char* first, size_t n, const char* name, size_t count) {
  SVI_CHECK(count == n, "svi_kernels::", op, ": ", first, " has ", n, " tensors but ", name, " has ", count,
            "; every list needs one tensor per parameter");
}

}  // namespace

bool int8_state_requested(std::initializer_list<Int8StateList> state) {
  for (const Int8StateList& l : state) {
    if (l.scales.has_value()) return true;
    if (!l.codes.empty() && l.codes[0].defined() && is_code_dtype(l.codes[0].scalar_type())) return true;
  }
  return false;
}

Int8Call::Int8Call(const char* op, std::initializer_list<NamedList> plain, std::initializer_list<Int8StateList> state,
                   int64_t block_size)
    : num_plain_(plain.size()), num_state_(state.size()), block_size_(block_size) {
  SVI_CHECK(num_plain_ >= 1 && num_plain_ <= kMaxPlain && num_state_ >= 1 && num_state_ <= kMaxState,
            "svi_kernels::", op, ": internal error, bad list count");
  SVI_CHECK(int8_block_size_valid(block_size), "svi_kernels::", op,
            ": block_size must be a power of two in [32, 4096] (the int8 state's elements per scale), got ",
            block_size);
  const NamedList& first = *plain.begin();
  const size_t n = first.tensors.size();
  for (const NamedList& l : plain) check_count(op, first.name, n, l.name, l.tensors.size());
  size_t k = 0;
  for (const Int8StateList& l : state) {
    check_count(op, first.name, n, l.name, l.codes.size());
    SVI_CHECK(l.scales.has_value(), "svi_kernels::", op, ": int8 state needs ", l.scales_name,
              " (float32, one tensor of ceil(numel / block_size) elements per parameter) beside the ", l.name,
              " codes; it is None (give every state list of the call its scales, or none and float state)");
    check_count(op, first.name, n, l.scales_name, l.scales->size());
    is_signed_[k++] = l.is_signed;
  }
  num_tensors_ = static_cast<int64_t>(n);
  if (n == 0) return;

  dtype_ = first.tensors[0].scalar_type();
  SVI_CHECK(dtype_ == at::kFloat || dtype_ == at::kHalf || dtype_ == at::kBFloat16, "svi_kernels::", op, ": ",
            first.name, "[0] has dtype ", dtype_, "; int8 state needs float32, float16 or bfloat16 params");
  plain_elem_size_ = static_cast<int64_t>(c10::elementSize(dtype_));
  plain_.reserve(n * num_plain_);
  codes_.reserve(n * num_state_);
  scales_.reserve(n * num_state_);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = first.tensors[i].numel();
    for (const NamedList& l : plain) {
      const at::Tensor& t = l.tensors[i];
      check_plain_tensor(op, l.name, i, t);
      SVI_CHECK(t.scalar_type() == dtype_, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ", t.scalar_type(),
                " but ", first.name, "[0] has ", dtype_, "; all tensors of one call must share a dtype");
      SVI_CHECK(t.numel() == numel, "svi_kernels::", op, ": ", l.name, "[", i, "] has ", t.numel(),
                " elements but ", first.name, "[", i, "] has ", numel);
      plain_.push_back(static_cast<char*>(t.data_ptr()));
    }
    const int64_t blocks = int8_num_blocks(numel, block_size);
    for (const Int8StateList& l : state) {
      const at::Tensor& q = l.codes[i];
      check_plain_tensor(op, l.name, i, q);
      const at::ScalarType want = l.is_signed ? at::kChar : at::kByte;
      SVI_CHECK(q.scalar_type() == want, "svi_kernels::", op, ": ", l.name, "[", i, "] has dtype ", q.scalar_type(),
                "; with int8 state (", l.scales_name, " given) ", l.name, " hold ", want,
                " codes (int8 for exp_avgs and momentum_buffers, uint8 for exp_avg_sqs and max_exp_avg_sqs)");
      SVI_CHECK(q.numel() == numel, "svi_kernels::", op, ": ", l.name, "[", i, "] has ", q.numel(),
                " elements but ", first.name, "[", i, "] has ", numel);
      const at::Tensor& sc = (*l.scales)[i];
      check_plain_tensor(op, l.scales_name, i, sc);
      SVI_CHECK(sc.scalar_type() == at::kFloat, "svi_kernels::", op, ": ", l.scales_name, "[", i, "] has dtype ",
                sc.scalar_type(), "; int8 state scales are float32");
      SVI_CHECK(sc.dim() == 1 && sc.numel() == blocks, "svi_kernels::", op, ": ", l.scales_name, "[", i, "] has ",
                sc.dim(), " dimension(s) and ", sc.numel(), " elements but ", l.name, "[", i, "] has ", numel,
                " elements: with block_size ", block_size,
                " it needs shape [", blocks, "] (one scale per block)");
      codes_.push_back(static_cast<char*>(q.data_ptr()));
      scales_.push_back(sc.data_ptr<float>());
    }
    numels[i] = numel;
  }
  plan_ = plan_chunks(numels);
}

Int8Call::Seg Int8Call::segment(const Segment& seg) const {
  Seg s{};
  for (size_t k = 0; k < num_plain_; ++k) {
    s.plain[k] = plain_[seg.tensor * num_plain_ + k] + seg.offset * plain_elem_size_;
  }
  for (size_t k = 0; k < num_state_; ++k) {
    s.codes[k] = codes_[seg.tensor * num_state_ + k] + seg.offset;
    s.scales[k] = scales_[seg.tensor * num_state_ + k];
    s.is_signed[k] = is_signed_[k];
  }
  s.offset = seg.offset;
  s.length = seg.length;
  s.block_size = block_size_;
  return s;
}

namespace {

// The widest build that the CPU kernels use (cpu_kernels() made that choice from the CPU and
// ATEN_CPU_CAPABILITY) and that exists; the same bits from each.
const Int8Loops* choose_loops() {
  const std::string isa = cpu_kernels().isa;
  if (isa == "avx512" && avx512_int8_loops() != nullptr) return avx512_int8_loops();
  if (isa != "default" && avx2_int8_loops() != nullptr) return avx2_int8_loops();
  return &baseline::kInt8Loops;
}

const Int8Loops& loops() {
  static const Int8Loops* const chosen = choose_loops();
  return *chosen;
}

}  // namespace

void int8_adam(const Int8Call& call, const std::vector<AdamScalars>& per_tensor) { loops().adam(call, per_tensor); }

void int8_sgd_momentum(const Int8Call& call, const SgdScalars& s) { loops().sgd_momentum(call, s); }

at::Tensor int8_ls_save_adam(const Int8Call& call, const LsAdamSaveScalars& s) { return loops().ls_save_adam(call, s); }

void int8_ls_trial_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction2_sqrt) {
  loops().ls_trial_adam(call, etas, eps, bias_correction2_sqrt);
}

void int8_ls_final_adam(const Int8Call& call, c10::ArrayRef<double> etas, double eps, double bias_correction1,
                        double bias_correction2_sqrt) {
  loops().ls_final_adam(call, etas, eps, bias_correction1, bias_correction2_sqrt);
}

void int8_ls_final_adam_from_trial(const Int8Call& call, c10::ArrayRef<double> etas, double trial_eta, double eps,
                                   double bias_correction1, double bias_correction2_sqrt) {
  loops().ls_final_adam_from_trial(call, etas, trial_eta, eps, bias_correction1, bias_correction2_sqrt);
}

}  // namespace svi_kernels::cpu
