#pragma once
// Host side of the CUDA multi-tensor apply: the per-launch metadata and the loop
// that packs tensors and their chunks into as few launches as fit.
//
// Plain C++ (no CUDA, no torch) so tests/backends/cuda_launch_plan_check.cpp can
// compile it with g++ and check the packing on a machine without a GPU.
//
// One launch = one kernel grid of up to kMaxBlocks blocks; block b processes chunk
// block_to_chunk[b] (kChunkSize elements) of the tensor in slot block_to_tensor[b].
// The metadata travels by value as the kernel argument, so it must fit, together
// with the op's coefficients, in the 4 KB kernel-parameter space that every CUDA
// version guarantees.

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace svi_kernels {
namespace cuda {

constexpr int kChunkSize = 65536;   // elements per block (32 passes of 512 threads x ILP 4)
constexpr int kMaxBlocks = 320;     // blocks per launch
constexpr int kParamBytes = 4096;   // kernel-parameter limit on every CUDA version and arch
constexpr int kOpArgBytes = 256;    // reserved for the op's coefficients next to the metadata

// Tensor slots that fit: each slot holds DEPTH addresses, a numel, the caller's list
// index, and (optionally) one per-tensor scalar such as a line-search eta.
constexpr int max_tensors_per_launch(int depth, bool with_scalars) {
  const int per_tensor = depth * 8 + 8 + 4 + (with_scalars ? 8 : 0);
  const int budget = kParamBytes - kOpArgBytes - kMaxBlocks * (4 + 1) - 16;
  const int n = budget / per_tensor;
  return n > 255 ? 255 : n;  // block_to_tensor is one byte
}

template <int DEPTH, bool WITH_SCALARS>
struct TensorListMeta {
  static constexpr int kDepth = DEPTH;
  static constexpr bool kWithScalars = WITH_SCALARS;
  static constexpr int kMaxTensors = max_tensors_per_launch(DEPTH, WITH_SCALARS);

  void* addresses[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  double scalars[WITH_SCALARS ? kMaxTensors : 1];
  int32_t list_index[kMaxTensors];      // position in the caller's lists (reduction output slot)
  int32_t block_to_chunk[kMaxBlocks];   // chunk index inside its tensor (64-bit offset = chunk * kChunkSize)
  uint8_t block_to_tensor[kMaxBlocks];  // slot in this launch
};

// Packs the tensors into launches and calls launch(meta, n_blocks) for each.
// addresses[d][t] is tensor t of list d; numels[t] its element count (all lists agree);
// scalars (may be null) has one value per tensor. Zero-size tensors are skipped
// wherever they sit (first, middle, last); a tensor whose chunks do not all fit is
// continued in slot 0 of the next launch. Returns the number of launches.
template <int DEPTH, bool WITH_SCALARS, typename Launch>
int plan_launches(const std::array<std::vector<void*>, DEPTH>& addresses,
                  const std::vector<int64_t>& numels, const double* scalars, Launch&& launch) {
  using Meta = TensorListMeta<DEPTH, WITH_SCALARS>;
  Meta meta;
  int n_slots = 0;
  int n_blocks = 0;
  int n_launches = 0;
  const int n_tensors = static_cast<int>(numels.size());
  for (int t = 0; t < n_tensors; ++t) {
    const int64_t numel = numels[t];
    if (numel == 0) continue;
    int slot = n_slots++;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][slot] = addresses[d][t];
    meta.numel[slot] = numel;
    meta.list_index[slot] = t;
    if constexpr (WITH_SCALARS) meta.scalars[slot] = scalars[t];

    const int64_t n_chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < n_chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == n_chunks - 1;
      const bool blocks_full = n_blocks == kMaxBlocks;
      const bool slots_full = n_slots == Meta::kMaxTensors && last_chunk;
      if (!blocks_full && !slots_full) continue;
      launch(static_cast<const Meta&>(meta), n_blocks);
      ++n_launches;
      n_blocks = 0;
      if (last_chunk) {
        n_slots = 0;
      } else {  // the current tensor goes on in slot 0 of the next launch
        for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
        meta.numel[0] = meta.numel[slot];
        meta.list_index[0] = meta.list_index[slot];
        if constexpr (WITH_SCALARS) meta.scalars[0] = meta.scalars[slot];
        slot = 0;
        n_slots = 1;
      }
    }
  }
  // Blocks still queued (e.g. when the last tensors were empty, or just not full yet).
  if (n_blocks > 0) {
    launch(static_cast<const Meta&>(meta), n_blocks);
    ++n_launches;
  }
  return n_launches;
}

}  // namespace cuda
}  // namespace svi_kernels
