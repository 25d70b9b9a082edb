#pragma once
// Device side of the CUDA multi-tensor apply for int8 optimizer state (state_dtype="int8", issue 24
// phase 2; the format: svi_kernels/int8_state.h). The element ops are the ones of the float state
// kernels (adam.cu, sgd.cu, line_search.cu: update_math.h's formulas, unchanged); only the way the
// state lists are loaded and stored differs: a state list holds 8-bit codes (int8 for the lists in
// the op's kSignedStateMask: exp_avgs / momentum_buffers; uint8 for the others: exp_avg_sqs,
// max_exp_avg_sqs) plus one float32 scale per quantisation block of B elements.
//
// Work split (int8_tiles.h, the index arithmetic, host-checkable). One CUDA block = one chunk of
// kChunkSize elements of one tensor (launch_plan.h, as for float state), walked in tiles of
// kInt8Tile = kBlockSize * kInt8PerThread = 4096 elements:
// thread t owns the kInt8PerThread consecutive elements [8t, 8t + 8) of the tile. A chunk starts
// at a multiple of kChunkSize and a tile at a multiple of kInt8Tile inside it, both multiples of
// every allowed B (B | 4096 | 65536), so each quantisation block of the tensor lies inside one
// tile of one chunk: the B / 8 consecutive threads [jB/8, (j+1)B/8) of the tile hold block j of
// the tile, whole. A store into a state list then is, per tile:
//   1. decode the old state, run the element op (the new values stay in registers);
//   2. each thread's absmax over its elements, then over the B / 8 threads of its block (warp
//      shuffles up to 32 threads, i.e. B <= 256; shared memory across the warps above that);
//   3. encode with that block's scale; the block's first thread writes the scale.
// Elements past the tensor's end (its last block may be short) are neither loaded nor stored and
// count as 0 in the absmax; every thread takes part in every reduction (shuffles with a full
// mask, __syncthreads), whether it holds elements or not.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "launch_plan.h"
#include "multi_tensor_apply.cuh"
#include "state_dispatch.h"
#include "int8_lists.h"
#include "int8_tiles.h"
#include "svi_kernels/int8_state.h"

namespace svi_kernels {
namespace cuda {

static_assert(kInt8Threads == kBlockSize, "int8_tiles.h splits the tiles over the kernel's threads");
static_assert(kInt8PerThread % kILP == 0, "a thread's elements are whole vectors");

// f(std::integral_constant<int, i>{}) for i = 0 .. N-1: per-list code whose types depend on the list.
template <typename F, int... Is>
__device__ __forceinline__ void static_for_impl(F& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

constexpr int popcount_mask(int mask) {
  int n = 0;
  for (; mask != 0; mask &= mask - 1) ++n;
  return n;
}

// Position of list d among the lists of `mask` below it (state list d's scale list; written state
// list d's absmax slot).
constexpr int rank_in_mask(int mask, int d) { return popcount_mask(mask & ((1 << d) - 1)); }

// The lists of an element op that hold signed codes (int8: exp_avgs, momentum_buffers); its other
// state lists hold unsigned codes (uint8). Every op that runs on int8 state declares it.
template <typename Op, typename = void>
struct HasSignedStateMask : std::false_type {};
template <typename Op>
struct HasSignedStateMask<Op, std::void_t<decltype(Op::kSignedStateMask)>> : std::true_type {};

template <bool SIGNED>
using int8_code_t = std::conditional_t<SIGNED, int8_t, uint8_t>;

__device__ __forceinline__ float int8_decode(int8_t q, float scale) { return int8_decode_signed(q, scale); }
__device__ __forceinline__ float int8_decode(uint8_t q, float scale) { return int8_decode_unsigned(q, scale); }

template <typename C>
__device__ __forceinline__ C int8_encode(float y, float inv) {
  if constexpr (std::is_same_v<C, int8_t>) return int8_encode_signed(y, inv);
  else return int8_encode_unsigned(y, inv);
}

// The threads [k * group, (k + 1) * group) hold one quantisation block (group = B / kInt8PerThread,
// a power of two in [4, kBlockSize]): each a[w] becomes the absmax over the block (NaN-propagating,
// int8_absmax_step), in every thread of the group. Called by all threads of the CUDA block.
template <int NW>
__device__ __forceinline__ void group_absmax(float (&a)[NW], int group) {
  const int width = int8_shuffle_width(group);  // a group of <= 32 threads is aligned inside one warp
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int w = 0; w < NW; ++w) a[w] = int8_absmax_step(a[w], __shfl_xor_sync(0xffffffffu, a[w], offset));
  }
  if (group <= 32) return;  // the same for every thread of the CUDA block
  __shared__ float warp_max[NW][kBlockSize / 32];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int w = 0; w < NW; ++w) warp_max[w][warp] = a[w];
  }
  __syncthreads();
  const int warps = group / 32;
  const int first = int8_first_warp(warp, group);
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    float m = warp_max[w][first];
    for (int k = 1; k < warps; ++k) m = int8_absmax_step(m, warp_max[w][first + k]);
    a[w] = m;
  }
  __syncthreads();  // warp_max is written again by the next tile
}

// kInt8PerThread values of list element type E at p[0..cnt) into x (cnt == kInt8PerThread and
// `vec`: as whole vectors), converted by `conv`.
template <typename E, typename Conv>
__device__ __forceinline__ void int8_load(const E* p, bool vec, int cnt, float (&x)[kInt8PerThread], Conv conv) {
  if (vec && cnt == kInt8PerThread) {
#pragma unroll
    for (int h = 0; h < kInt8PerThread / kILP; ++h) {
      const Vec<E> v = reinterpret_cast<const Vec<E>*>(p)[h];
#pragma unroll
      for (int j = 0; j < kILP; ++j) x[h * kILP + j] = conv(v.val[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kInt8PerThread; ++j) x[j] = j < cnt ? conv(p[j]) : 0.0f;
  }
}

// The reverse: conv(x[j]) into p[0..cnt).
template <typename E, typename Conv>
__device__ __forceinline__ void int8_store(E* p, bool vec, int cnt, const float (&x)[kInt8PerThread], Conv conv) {
  if (vec && cnt == kInt8PerThread) {
#pragma unroll
    for (int h = 0; h < kInt8PerThread / kILP; ++h) {
      Vec<E> v;
#pragma unroll
      for (int j = 0; j < kILP; ++j) v.val[j] = conv(x[h * kILP + j]);
      reinterpret_cast<Vec<E>*>(p)[h] = v;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kInt8PerThread; ++j)
      if (j < cnt) p[j] = conv(x[j]);
  }
}

// One CUDA block = one chunk of one tensor (as multi_tensor_kernel). Lists: the op's kDepth lists
// (state lists: codes), then one float32 scale list per state list, in list order (meta.addresses
// [kDepth + s]). log2_block: log2(B).
template <typename T, typename ElemOp, typename Meta>
__global__ void __launch_bounds__(kBlockSize)
multi_tensor_int8_kernel(const Meta meta, const ElemOp op, double* sums, const int log2_block) {
  constexpr int D = ElemOp::kDepth;
  constexpr int kRead = ElemOp::kReadMask;
  constexpr int kWrite = ElemOp::kWriteMask;
  constexpr int kState = StateMaskOf<ElemOp>::value;
  constexpr int kSigned = ElemOp::kSignedStateMask;
  constexpr int kStateWrite = kState & kWrite;
  constexpr int NW = popcount_mask(kStateWrite);
  static_assert(Meta::kDepth == D + popcount_mask(kState), "one scale list per state list");
  static_assert((kSigned & ~kState) == 0, "signed code lists are state lists");
  static_assert((kStateWrite & ~kRead) == 0, "a written state list is read first (its old value)");

  const int slot = meta.block_to_tensor[blockIdx.x];
  const auto& tensor_op = op_for_tensor(op, meta, slot);
  if constexpr (HasDeviceScalars<ElemOp>::value) {
    if (tensor_op.skipped()) return;  // the whole CUDA block (the flag is per tensor): no reduction follows
  }
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - begin;
  const int n = left < kChunkSize ? static_cast<int>(left) : kChunkSize;
  const int group = int8_group_threads(log2_block);

  char* chunk[D];
  bool vec = true;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const int64_t bytes = has_bit(kState, d) ? 1 : static_cast<int64_t>(sizeof(T));
    chunk[d] = static_cast<char*>(meta.addresses[d][slot]) + begin * bytes;
    if (has_bit(kRead | kWrite, d))
      vec = vec && (has_bit(kState, d) ? vec_aligned(reinterpret_cast<const int8_t*>(chunk[d]))
                                       : vec_aligned(reinterpret_cast<const T*>(chunk[d])));
  }
  float scalar = 0.0f;
  if constexpr (Meta::kWithScalars) scalar = static_cast<float>(meta.scalars[slot]);
  double acc = 0.0;

  for (int tile = 0; tile < n; tile += kInt8Tile) {  // the same trip count in every thread
    const Int8Slice slice = int8_slice(begin, n, tile, static_cast<int>(threadIdx.x), log2_block);
    const int off = slice.off, cnt = slice.cnt;  // this thread's first element (in the chunk), count
    const int64_t qblock = slice.qblock;          // their quantisation block (in the tensor)

    float x[D][kInt8PerThread];
    static_for<D>([&](auto dc) {
      constexpr int d = decltype(dc)::value;
      if constexpr (!has_bit(kRead, d)) {
#pragma unroll
        for (int j = 0; j < kInt8PerThread; ++j) x[d][j] = 0.0f;
      } else if constexpr (has_bit(kState, d)) {
        using C = int8_code_t<has_bit(kSigned, d)>;
        const float* scales = static_cast<const float*>(meta.addresses[D + rank_in_mask(kState, d)][slot]);
        const float scale = cnt > 0 ? scales[qblock] : 0.0f;
        int8_load(reinterpret_cast<const C*>(chunk[d]) + off, vec, cnt, x[d],
                  [scale](C q) { return int8_decode(q, scale); });
      } else {
        int8_load(reinterpret_cast<const T*>(chunk[d]) + off, vec, cnt, x[d],
                  [](T v) { return static_cast<float>(v); });
      }
    });

#pragma unroll
    for (int j = 0; j < kInt8PerThread; ++j)
      if (j < cnt) run_elem<ElemOp::kReduce>(tensor_op, x, j, scalar, acc);

    if constexpr (NW > 0) {
      float amax[NW];
      static_for<D>([&](auto dc) {
        constexpr int d = decltype(dc)::value;
        if constexpr (has_bit(kStateWrite, d)) {
          float a = 0.0f;
#pragma unroll
          for (int j = 0; j < kInt8PerThread; ++j)
            if (j < cnt) a = int8_absmax_step(a, x[d][j]);
          amax[rank_in_mask(kStateWrite, d)] = a;
        }
      });
      group_absmax(amax, group);
      static_for<D>([&](auto dc) {
        constexpr int d = decltype(dc)::value;
        if constexpr (has_bit(kStateWrite, d)) {
          using C = int8_code_t<has_bit(kSigned, d)>;
          const float scale = int8_scale_of(amax[rank_in_mask(kStateWrite, d)]);
          const float inv = int8_inv_scale(scale);
          int8_store(reinterpret_cast<C*>(chunk[d]) + off, vec, cnt, x[d],
                     [inv](float y) { return int8_encode<C>(y, inv); });
          // The block's first thread (it holds elements iff the block has any in this tensor).
          if (int8_scale_writer(slice, log2_block))
            static_cast<float*>(meta.addresses[D + rank_in_mask(kState, d)][slot])[qblock] = scale;
        }
      });
    }
    static_for<D>([&](auto dc) {
      constexpr int d = decltype(dc)::value;
      if constexpr (has_bit(kWrite, d) && !has_bit(kState, d))
        int8_store(reinterpret_cast<T*>(chunk[d]) + off, vec, cnt, x[d], [](float y) { return static_cast<T>(y); });
    });
  }
  if constexpr (ElemOp::kReduce) block_sum_to(acc, sums + meta.list_index[slot]);
}

// Runs op over every element of the lists with int8 state (on the current device): the lists in
// the op's kStateMask hold codes (int8 in kSignedStateMask, else uint8) with their scales in
// int8.lists (one float32 tensor of int8_num_blocks(numel, block_size) elements per param), the
// others T (float32, float16 or bfloat16; compute in float32). Checked by the caller
// (int8_lists.h); as multi_tensor_apply otherwise.
template <typename T, typename ElemOp, size_t N_LISTS>
int multi_tensor_int8_apply(const std::array<at::TensorList, N_LISTS>& lists, const Int8Scales& int8,
                            const double* scalar_values, const ElemOp& op, double* sums) {
  constexpr size_t N_SCALES = static_cast<size_t>(popcount_mask(StateMaskOf<ElemOp>::value));
  static_assert(N_SCALES >= 1 && N_SCALES <= 3, "an op on int8 state has one to three state lists");
  std::array<at::TensorList, N_SCALES> scales;
  for (size_t s = 0; s < N_SCALES; ++s) scales[s] = int8.lists[s];
  const int64_t block_size = int8.block_size;
  constexpr int D = static_cast<int>(N_LISTS);
  constexpr int DS = D + static_cast<int>(N_SCALES);
  constexpr bool kWithScalars = ElemOp::kWithScalars;
  using Meta = TensorListMeta<DS, kWithScalars>;
  static_assert(HasSignedStateMask<ElemOp>::value, "an op on int8 state declares kSignedStateMask");
  static_assert(std::is_same_v<opmath_t<T>, float>, "int8 state computes in float32");
  static_assert(sizeof(Meta) + sizeof(ElemOp) + sizeof(double*) + sizeof(int) <= kParamBytes,
                "kernel arguments exceed the 4 KB parameter space");
  int log2_block = 0;
  while ((int64_t{1} << log2_block) < block_size) ++log2_block;
  const size_t n = lists[0].size();
  std::array<std::vector<void*>, DS> addresses;
  std::vector<int64_t> numels(n);
  for (int d = 0; d < DS; ++d) {
    addresses[d].resize(n);
    for (size_t t = 0; t < n; ++t) addresses[d][t] = d < D ? lists[d][t].data_ptr() : scales[d - D][t].data_ptr();
  }
  for (size_t t = 0; t < n; ++t) numels[t] = lists[0][t].numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return plan_launches<DS, kWithScalars>(addresses, numels, scalar_values, [&](const Meta& meta, int n_blocks) {
    multi_tensor_int8_kernel<T><<<n_blocks, kBlockSize, 0, stream>>>(meta, op, sums, log2_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Calls body.template operator()<T>(apply) with T the params' C++ type and apply(lists, scalars,
// op, sums) the multi-tensor apply of the call's state: int8 (int8.on; T float32, float16 or
// bfloat16) or the checked float (param, state) dtype pair `dtypes`, stored with `rounding`.
template <typename Body>
void dispatch_state(const char* op, const Int8Call& int8, const ListDtypes& dtypes, StateRounding rounding,
                    Body&& body) {
  if (int8.on) {
    dispatch_int8_params(int8.dtype, [&]<typename scalar_t>() {
      body.template operator()<scalar_t>([&](const auto& lists, const double* scalars, const auto& elem, double* sums) {
        multi_tensor_int8_apply<scalar_t>(lists, int8.scales, scalars, elem, sums);
      });
    });
  } else {
    dispatch_state_pair(op, dtypes, [&]<typename scalar_t, typename state_t>() {
      body.template operator()<scalar_t>([&](const auto& lists, const double* scalars, const auto& elem, double* sums) {
        multi_tensor_apply<scalar_t, state_t>(lists, scalars, elem, sums, rounding);
      });
    });
  }
}

}  // namespace cuda
}  // namespace svi_kernels
