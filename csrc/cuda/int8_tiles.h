#pragma once
// Index arithmetic of the int8-state kernel (int8_apply.cuh): which elements a thread holds, which
// quantisation block they belong to, which threads reduce one block's absmax and which one writes
// its scale. Plain C++ (SVI_HD) so that a host program can check it against a per-tensor
// reference without a GPU, as launch_plan.h is checked.
//
// One CUDA block of kInt8Threads threads runs one chunk (launch_plan.h: kChunkSize elements from a
// multiple of kChunkSize) in tiles of kInt8Tile elements; thread t holds the kInt8PerThread
// consecutive elements [tile + 8t, tile + 8t + 8) of the chunk. Every allowed block size B divides
// kInt8Tile and kChunkSize, so a quantisation block never straddles a tile or a chunk, and its
// elements are held by the B / 8 consecutive threads of one group (aligned to B / 8).

#include <cstdint>

#include "launch_plan.h"
#include "svi_kernels/int8_state.h"
#include "svi_kernels/svi_hd.h"

namespace svi_kernels {
namespace cuda {

constexpr int kInt8Threads = 512;                           // threads per CUDA block (= kBlockSize)
constexpr int kInt8PerThread = 8;                           // consecutive elements per thread per tile
constexpr int kInt8Tile = kInt8Threads * kInt8PerThread;    // elements per tile
static_assert(kInt8BlockMin % kInt8PerThread == 0, "a thread's elements must lie in one quantisation block");
static_assert(kInt8Tile % kInt8BlockMax == 0, "a tile must hold whole quantisation blocks");
static_assert(kChunkSize % kInt8Tile == 0, "a chunk must hold whole tiles");
static_assert(kInt8BlockMin / kInt8PerThread <= 32 && 32 % (kInt8BlockMin / kInt8PerThread) == 0,
              "the threads of a small block share a warp");
static_assert(kInt8Threads % 32 == 0, "whole warps");

// What thread `thread` holds in the tile at `tile` of a chunk of n elements that starts at
// element `begin` of its tensor: its first element `off` (in the chunk), how many elements `cnt`
// (0 past the tensor's end), and their quantisation block `qblock` (in the tensor).
struct Int8Slice {
  int off;
  int cnt;
  int64_t qblock;
};

SVI_HD Int8Slice int8_slice(int64_t begin, int n, int tile, int thread, int log2_block) {
  Int8Slice s;
  s.off = tile + thread * kInt8PerThread;
  s.cnt = n - s.off < 0 ? 0 : (n - s.off < kInt8PerThread ? n - s.off : kInt8PerThread);
  s.qblock = (begin + s.off) >> log2_block;
  return s;
}

// The threads per quantisation block (a power of two in [4, kInt8Threads]).
SVI_HD int int8_group_threads(int log2_block) { return (1 << log2_block) / kInt8PerThread; }

// The shuffle width of the in-warp reduction: the group, or a whole warp for larger groups.
SVI_HD int int8_shuffle_width(int group) { return group < 32 ? group : 32; }

// For a group of more than 32 threads: the first of its warps (the shared-memory step).
SVI_HD int int8_first_warp(int warp, int group) { return warp - warp % (group / 32); }

// Whether the thread writes its block's scale: the block's first thread, when the block has
// elements in this tensor (a block past the tensor's end has none, and no scale).
SVI_HD bool int8_scale_writer(const Int8Slice& s, int log2_block) {
  return s.cnt > 0 && (s.off & ((1 << log2_block) - 1)) == 0;
}

}  // namespace cuda
}  // namespace svi_kernels
