#pragma once
// Device side of the CUDA multi-tensor apply, shared by every op in csrc/cuda.
//
// An op is a small "element op" struct (see adam.cu) that says which of its DEPTH
// tensor lists it reads and writes, which of them hold optimizer state (kStateMask: stored
// as the state dtype, which may differ from the params'; bf16 state may be stochastically
// rounded, svi_kernels/state_storage.h), whether it sums a per-element term per tensor,
// and what it does to one element in opmath registers (float for fp16/bf16/fp32,
// double for fp64). The formulas themselves come from svi_kernels/update_math.h.
// One generic kernel runs any element op over one chunk per block; launch_plan.h
// packs tensors and chunks into as few launches as fit. int8 state (codes + block scales) runs the
// same element ops through int8_apply.cuh.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "launch_plan.h"
#include "list_checks.h"
#include "svi_kernels/state_storage.h"

namespace svi_kernels {
namespace cuda {

constexpr int kBlockSize = 512;
constexpr int kILP = 4;  // elements per thread per pass; one 16-byte load for fp32
static_assert(kChunkSize % kILP == 0, "a chunk must split into whole vectors");

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

// kILP consecutive elements moved with one vector load/store.
template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T val[kILP];
};

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

constexpr bool has_bit(int mask, int d) { return (mask >> d) & 1; }

// An element op with kDeviceScalars = true reads some of its coefficients from device memory
// (lr, step counts, AMP loss scale and skip flag; see adam.cu). Each block then asks it once for
// the op of its tensor, op.for_tensor(meta, slot), and returns at once if that op is skipped().
template <typename Op, typename = void>
struct HasDeviceScalars : std::false_type {};
template <typename Op>
struct HasDeviceScalars<Op, std::void_t<decltype(Op::kDeviceScalars)>> : std::bool_constant<Op::kDeviceScalars> {};

// The op itself (a reference: ops without device scalars run exactly as before), or the op
// bound to one tensor's device scalars (a value).
template <typename Op, typename Meta>
__device__ __forceinline__ decltype(auto) op_for_tensor(const Op& op, const Meta& meta, int slot) {
  if constexpr (HasDeviceScalars<Op>::value) return op.for_tensor(meta, slot);
  else return op;
}

// A float32/float64 value the kernel reads from device memory, or a value fixed by the host
// (ptr == nullptr): lr may be a device tensor or a number; an absent found_inf reads as 0.
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  double value = 0.0;

  __device__ __forceinline__ double get() const {
    if (ptr == nullptr) return value;
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

// Host side: the DeviceScalar of an optional one-element tensor (checked to be on `device`),
// or of `fallback` when there is none.
inline DeviceScalar device_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                  const at::Device& device, double fallback) {
  DeviceScalar s;
  s.value = fallback;
  if (t.has_value()) {
    s.is_double = check_device_scalar(op, name, *t, device);
    s.ptr = t->const_data_ptr();
  }
  return s;
}

// Sum over the block, then one atomicAdd per block into the tensor's slot.
// Accumulating in double keeps the fp32 result independent of the block order
// in practice (the slots are rounded to float32 once, afterwards).
__device__ __forceinline__ void block_sum_to(double value, double* out) {
  __shared__ double warp_sums[kBlockSize / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0 && value != 0.0) atomicAdd(out, value);
  }
}

// The lists an element op keeps optimizer state in (bit d: list d), stored as the state type TS;
// the others hold the param type T. Ops without kStateMask have none (TS must then be T).
template <typename Op, typename = void>
struct StateMaskOf : std::integral_constant<int, 0> {};
template <typename Op>
struct StateMaskOf<Op, std::void_t<decltype(Op::kStateMask)>> : std::integral_constant<int, Op::kStateMask> {};

// The SR list id l of state list d: the state lists in list order are l = 0, 1, 2, so an op
// orders them exp_avgs / momentum_buffers, exp_avg_sqs, max_exp_avg_sqs (state_storage.h, SrList).
constexpr uint32_t sr_list_of(int state_mask, int d) {
  uint32_t l = 0;
  for (int k = 0; k < d; ++k) l += has_bit(state_mask, k) ? 1u : 0u;
  return l;
}

// How a call stores its state lists: rounded to nearest (no state_seed), or, given a seed, with
// stochastic rounding into bf16 state (state_storage.h; fp32/fp16/fp64 state always to nearest).
struct StateRounding {
  bool stochastic = false;
  uint32_t seed = 0;
};

// Host side: the rounding of an op's optional state_seed (0 <= seed < 2^31, checked).
inline StateRounding state_rounding(const char* op, std::optional<int64_t> state_seed) {
  StateRounding r;
  if (!state_seed.has_value()) return r;
  SVI_CHECK(*state_seed >= 0 && *state_seed < (int64_t{1} << 31), op, ": state_seed must be in [0, 2**31), got ",
            *state_seed);
  r.stochastic = true;
  r.seed = static_cast<uint32_t>(*state_seed);
  return r;
}

// A value of state list `list` stored as TS: bf16 with stochastic rounding when the call has a
// seed (key: the tensor's sr_key; index: the element's flat index in its tensor), else to nearest.
template <typename TS, typename M>
__device__ __forceinline__ TS to_state(M x, bool stochastic, uint32_t key, uint32_t list, int64_t index) {
  if constexpr (std::is_same_v<TS, c10::BFloat16>) {
    if (stochastic) {
      const uint32_t r = sr_bits(key, list, static_cast<uint32_t>(index));
      return TS(sr_round_bf16_bits(static_cast<float>(x), r), TS::from_bits());
    }
  }
  return static_cast<TS>(x);
}

// Runs the element op on element j of x (x[d][j]: the value of list d), in place, and adds its
// per-element term to acc when the op reduces (kReduce: the element op's; a bound op does not say).
template <bool kReduce, typename Op, typename M, int D, int K>
__device__ __forceinline__ void run_elem(const Op& op, M (&x)[D][K], int j, M scalar, double& acc) {
  M e[D];
#pragma unroll
  for (int d = 0; d < D; ++d) e[d] = x[d][j];
  const M term = op(e, scalar);
  if constexpr (kReduce) acc += static_cast<double>(term);
#pragma unroll
  for (int d = 0; d < D; ++d) x[d][j] = e[d];
}

// One block = one chunk of one tensor. Offsets into the tensor are 64-bit
// (chunk * kChunkSize); offsets inside a chunk fit in int. Lists in ElemOp's kStateMask hold TS,
// the others T; values are loaded into M registers, the op runs, and writes are stored back in
// each list's own type (state lists through to_state).
template <typename T, typename TS, typename ElemOp, typename Meta>
__global__ void __launch_bounds__(kBlockSize)
multi_tensor_kernel(const Meta meta, const ElemOp op, double* sums, const StateRounding rounding) {
  using M = opmath_t<T>;
  constexpr int D = ElemOp::kDepth;
  constexpr int kRead = ElemOp::kReadMask;
  constexpr int kWrite = ElemOp::kWriteMask;
  constexpr int kState = StateMaskOf<ElemOp>::value;
  static_assert(D == Meta::kDepth, "element op and metadata disagree on the number of lists");

  const int slot = meta.block_to_tensor[blockIdx.x];
  const auto& tensor_op = op_for_tensor(op, meta, slot);
  if constexpr (HasDeviceScalars<ElemOp>::value) {
    if (tensor_op.skipped()) return;  // the whole block: no reduction follows (kReduce is false)
  }
  // block_to_chunk is the chunk's index inside its tensor (also when the tensor continues from an
  // earlier launch), so begin + (offset in the chunk) is the element's flat index in the tensor.
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - begin;
  const int n = left < kChunkSize ? static_cast<int>(left) : kChunkSize;
  // list_index: the tensor's index in the op's lists (not its slot in this launch).
  const uint32_t key = rounding.stochastic ? sr_key(rounding.seed, static_cast<uint32_t>(meta.list_index[slot])) : 0u;

  // List d of this chunk: at chunk[d], as ptr(d) when it holds T, as sptr(d) when it holds TS (a
  // state list). One byte-address array (not one per type) keeps the register count of before.
  char* chunk[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const int64_t bytes = has_bit(kState, d) ? static_cast<int64_t>(sizeof(TS)) : static_cast<int64_t>(sizeof(T));
    chunk[d] = static_cast<char*>(meta.addresses[d][slot]) + begin * bytes;
  }
  auto ptr = [&](int d) { return reinterpret_cast<T*>(chunk[d]); };
  auto sptr = [&](int d) { return reinterpret_cast<TS*>(chunk[d]); };
  M scalar = M(0);
  if constexpr (Meta::kWithScalars) scalar = static_cast<M>(meta.scalars[slot]);

  double acc = 0.0;
  bool aligned = n % kILP == 0;
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (has_bit(kRead | kWrite, d))
      aligned = aligned && (has_bit(kState, d) ? vec_aligned(sptr(d)) : vec_aligned(ptr(d)));

  if (aligned) {
    // Vector path: thread i owns elements [kILP*i, kILP*i + kILP) of each pass.
    for (int i = threadIdx.x; i < n / kILP; i += blockDim.x) {
      M x[D][kILP];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (has_bit(kRead, d)) {
          if (has_bit(kState, d)) {
            const Vec<TS> v = reinterpret_cast<const Vec<TS>*>(sptr(d))[i];
#pragma unroll
            for (int j = 0; j < kILP; ++j) x[d][j] = static_cast<M>(v.val[j]);
          } else {
            const Vec<T> v = reinterpret_cast<const Vec<T>*>(ptr(d))[i];
#pragma unroll
            for (int j = 0; j < kILP; ++j) x[d][j] = static_cast<M>(v.val[j]);
          }
        } else {
#pragma unroll
          for (int j = 0; j < kILP; ++j) x[d][j] = M(0);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) run_elem<ElemOp::kReduce>(tensor_op, x, j, scalar, acc);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (!has_bit(kWrite, d)) continue;
        if (has_bit(kState, d)) {
          // Element j of this vector is element kILP*i + j of the chunk.
          const int64_t first = begin + static_cast<int64_t>(kILP) * i;
          Vec<TS> v;
#pragma unroll
          for (int j = 0; j < kILP; ++j)
            v.val[j] = to_state<TS>(x[d][j], rounding.stochastic, key, sr_list_of(kState, d), first + j);
          reinterpret_cast<Vec<TS>*>(sptr(d))[i] = v;
        } else {
          Vec<T> v;
#pragma unroll
          for (int j = 0; j < kILP; ++j) v.val[j] = static_cast<T>(x[d][j]);
          reinterpret_cast<Vec<T>*>(ptr(d))[i] = v;
        }
      }
    }
  } else {
    // Tail/unaligned path: element loads strided by the block so warps stay coalesced.
    for (int base = 0; base < n; base += blockDim.x * kILP) {
      M x[D][kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int idx = base + threadIdx.x + j * blockDim.x;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          if (!has_bit(kRead, d) || idx >= n) x[d][j] = M(0);
          else if (has_bit(kState, d)) x[d][j] = static_cast<M>(sptr(d)[idx]);
          else x[d][j] = static_cast<M>(ptr(d)[idx]);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int idx = base + threadIdx.x + j * blockDim.x;  // element idx of the chunk
        if (idx < n) {
          M e[D];
#pragma unroll
          for (int d = 0; d < D; ++d) e[d] = x[d][j];
          const M term = tensor_op(e, scalar);
          if constexpr (ElemOp::kReduce) acc += static_cast<double>(term);
#pragma unroll
          for (int d = 0; d < D; ++d) {
            if (!has_bit(kWrite, d)) continue;
            if (has_bit(kState, d))
              sptr(d)[idx] = to_state<TS>(e[d], rounding.stochastic, key, sr_list_of(kState, d), begin + idx);
            else
              ptr(d)[idx] = static_cast<T>(e[d]);
          }
        }
      }
    }
  }
  if constexpr (ElemOp::kReduce) block_sum_to(acc, sums + meta.list_index[slot]);
}

// Runs op over every element of the lists (on the current device): the lists in the op's
// kStateMask hold TS, the others T. One launch per kMaxBlocks chunks or per Meta::kMaxTensors
// tensors. sums: device doubles, one per tensor, for reducing ops (else null). rounding: how state
// lists are stored (ops that do not write state pass none).
template <typename T, typename TS = T, typename ElemOp, size_t N_LISTS>
int multi_tensor_apply(const std::array<at::TensorList, N_LISTS>& lists, const double* scalars,
                       const ElemOp& op, double* sums, StateRounding rounding = {}) {
  constexpr int DEPTH = static_cast<int>(N_LISTS);
  constexpr bool kWithScalars = ElemOp::kWithScalars;
  using Meta = TensorListMeta<DEPTH, kWithScalars>;
  static_assert(StateMaskOf<ElemOp>::value != 0 || std::is_same_v<T, TS>, "an op without state lists has one dtype");
  static_assert(std::is_same_v<opmath_t<T>, opmath_t<TS>>, "params and state share the compute type");
  static_assert(sizeof(Meta) + sizeof(ElemOp) + sizeof(double*) + sizeof(StateRounding) <= kParamBytes,
                "kernel arguments exceed the 4 KB parameter space");
  const size_t n = lists[0].size();
  std::array<std::vector<void*>, DEPTH> addresses;
  std::vector<int64_t> numels(n);
  for (int d = 0; d < DEPTH; ++d) {
    addresses[d].resize(n);
    for (size_t t = 0; t < n; ++t) addresses[d][t] = lists[d][t].data_ptr();
  }
  for (size_t t = 0; t < n; ++t) numels[t] = lists[0][t].numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return plan_launches<DEPTH, kWithScalars>(addresses, numels, scalars, [&](const Meta& meta, int n_blocks) {
    multi_tensor_kernel<T, TS><<<n_blocks, kBlockSize, 0, stream>>>(meta, op, sums, rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace svi_kernels
