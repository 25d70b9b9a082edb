// Host-only check of the CUDA multi-tensor launch plan (csrc/cuda/launch_plan.h).
// Built with g++ by tests/backends/test_cuda_launch_plan.py; needs no GPU and no torch.
//
// For many tensor-size lists it replays every launch the way the kernel reads its
// metadata and checks that each chunk of each non-empty tensor is visited exactly once,
// with the right addresses, list index and per-tensor scalar; that every launch but the
// last is full (blocks or tensor slots); and that the metadata fits the kernel-argument space.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "launch_plan.h"

using namespace svi_kernels::cuda;

static int failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      return;                                              \
    }                                                      \
  } while (0)

template <int DEPTH, bool SCALARS>
void check_plan(const std::string& name, const std::vector<int64_t>& numels) {
  using Meta = TensorListMeta<DEPTH, SCALARS>;
  static_assert(sizeof(Meta) + kOpArgBytes <= kParamBytes, "metadata too large");
  const size_t n = numels.size();
  // Fake, distinct base addresses: tensor t of list d starts at ((d + 1) << 56) | (t << 40).
  std::array<std::vector<void*>, DEPTH> addresses;
  for (int d = 0; d < DEPTH; ++d)
    for (size_t t = 0; t < n; ++t)
      addresses[d].push_back(reinterpret_cast<void*>((uint64_t(d + 1) << 56) | (uint64_t(t) << 40)));
  std::vector<double> scalars(n);
  for (size_t t = 0; t < n; ++t) scalars[t] = 0.5 + double(t);

  std::vector<std::vector<int>> hits(n);
  for (size_t t = 0; t < n; ++t) hits[t].assign(size_t((numels[t] + kChunkSize - 1) / kChunkSize), 0);

  struct LaunchInfo { int blocks; int slots; };
  std::vector<LaunchInfo> launches;
  bool bad = false;
  const int n_launches = plan_launches<DEPTH, SCALARS>(
      addresses, numels, SCALARS ? scalars.data() : nullptr, [&](const Meta& meta, int n_blocks) {
        int max_slot = -1;
        if (n_blocks <= 0 || n_blocks > kMaxBlocks) { bad = true; return; }
        for (int b = 0; b < n_blocks; ++b) {
          const int slot = meta.block_to_tensor[b];
          if (slot >= Meta::kMaxTensors) { bad = true; return; }
          max_slot = slot > max_slot ? slot : max_slot;
          const int t = meta.list_index[slot];
          if (t < 0 || size_t(t) >= n) { bad = true; return; }
          for (int d = 0; d < DEPTH; ++d)
            if (meta.addresses[d][slot] != addresses[d][t]) { bad = true; return; }
          if (meta.numel[slot] != numels[t]) { bad = true; return; }
          if (SCALARS && meta.scalars[slot] != scalars[t]) { bad = true; return; }
          const int64_t chunk = meta.block_to_chunk[b];
          const int64_t begin = chunk * kChunkSize;  // the kernel's 64-bit offset
          const int64_t left = meta.numel[slot] - begin;
          if (chunk < 0 || left <= 0) { bad = true; return; }
          hits[t][size_t(chunk)] += 1;
        }
        launches.push_back({n_blocks, max_slot + 1});
      });
  EXPECT(!bad, "%s: inconsistent metadata", name.c_str());
  EXPECT(n_launches == int(launches.size()), "%s: launch count", name.c_str());
  for (size_t t = 0; t < n; ++t)
    for (size_t c = 0; c < hits[t].size(); ++c)
      EXPECT(hits[t][c] == 1, "%s: tensor %zu chunk %zu visited %d times", name.c_str(), t, c, hits[t][c]);
  for (size_t l = 0; l + 1 < launches.size(); ++l)
    EXPECT(launches[l].blocks == kMaxBlocks || launches[l].slots == Meta::kMaxTensors,
           "%s: launch %zu is not full (%d blocks, %d slots) but is not the last", name.c_str(), l,
           launches[l].blocks, launches[l].slots);
  int64_t total_chunks = 0, non_empty = 0;
  for (size_t t = 0; t < n; ++t) { total_chunks += int64_t(hits[t].size()); non_empty += numels[t] > 0; }
  if (total_chunks == 0) EXPECT(n_launches == 0, "%s: launched for nothing", name.c_str());
  const int64_t lower = std::max((total_chunks + kMaxBlocks - 1) / kMaxBlocks,
                                 (non_empty + Meta::kMaxTensors - 1) / Meta::kMaxTensors);
  EXPECT(n_launches >= lower, "%s: fewer launches than possible?", name.c_str());
  std::printf("ok   %-40s depth=%d scalars=%d tensors=%zu chunks=%lld launches=%d (max %d tensors/launch)\n",
              name.c_str(), DEPTH, int(SCALARS), n, (long long)total_chunks, n_launches, Meta::kMaxTensors);
}

template <int DEPTH, bool SCALARS>
void check_all() {
  const int64_t C = kChunkSize;
  const int T = TensorListMeta<DEPTH, SCALARS>::kMaxTensors;
  check_plan<DEPTH, SCALARS>("empty list", {});
  check_plan<DEPTH, SCALARS>("one zero-size", {0});
  check_plan<DEPTH, SCALARS>("zero-size only", {0, 0, 0});
  check_plan<DEPTH, SCALARS>("sizes 0,1,7,4099,278011,0", {0, 1, 7, 4099, 278011, 0});
  check_plan<DEPTH, SCALARS>("zero-size last", {7, 4099, 0});
  check_plan<DEPTH, SCALARS>("exactly one chunk", {C});
  check_plan<DEPTH, SCALARS>("one chunk + 1", {C + 1});
  check_plan<DEPTH, SCALARS>("full launch of blocks", {C * kMaxBlocks});
  check_plan<DEPTH, SCALARS>("full launch of blocks + 1", {C * kMaxBlocks + 1, 0});
  check_plan<DEPTH, SCALARS>("tensor slots exactly full", std::vector<int64_t>(size_t(T), 3));
  check_plan<DEPTH, SCALARS>("tensor slots full + 1", std::vector<int64_t>(size_t(T + 1), 3));
  {
    // Slots fill up while the last tensor's chunks are still spilling over.
    std::vector<int64_t> s(size_t(T - 1), 5);
    s.push_back(C * 700 + 3);
    s.push_back(9);
    s.push_back(0);
    check_plan<DEPTH, SCALARS>("slots full with a spilling tensor", s);
  }
  {
    std::vector<int64_t> s;
    std::mt19937_64 rng(1234 + DEPTH);
    for (int i = 0; i < 333; ++i) {
      const int kind = int(rng() % 6);
      s.push_back(kind == 0 ? 0 : kind == 1 ? int64_t(rng() % 8) : kind == 2 ? int64_t(rng() % 5000)
                  : kind == 3 ? int64_t(rng() % (3 * C)) : kind == 4 ? 768 * 768 : int64_t(rng() % (40 * C)));
    }
    s.push_back(0);
    check_plan<DEPTH, SCALARS>("333 mixed tensors, zero-size last", s);
  }
  // More than 2^31 elements in one tensor: offsets must be 64-bit.
  check_plan<DEPTH, SCALARS>("huge tensor (3e9 elements)", {5, int64_t(3000000000LL), 0});
}

int main() {
  check_all<3, false>();  // sgd_momentum_step, ls_save_sgd
  check_all<3, true>();   // ls_trial_sgd
  check_all<4, false>();  // adam_step
  check_all<4, true>();   // ls_trial_adam, ls_final_adam
  check_all<5, false>();  // ls_save_adam
  check_all<6, false>();  // ls_save_adam with dirs
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all launch plans ok\n");
  return 0;
}
