// Host check of the int8-state CUDA kernel's work split (csrc/cuda/int8_tiles.h, used by
// int8_apply.cuh) with the real launch plan (launch_plan.h): the kernel's phases are replayed
// thread by thread (load + element op + local absmax; the in-warp xor butterfly; the shared-memory
// step across a group's warps; encode and the scale writer) and the codes, scales and params are
// compared bit for bit with a plain per-tensor blockwise reference (int8_state.h's codec, the
// update_math.h Adam formula); every element and every scale must be written exactly once.
#include "int8_tiles.h"
#include "launch_plan.h"
#include "svi_kernels/int8_state.h"
#include "svi_kernels/update_math.h"
#include <cstdio>
#include <cstring>
#include <cmath>
#include <random>
#include <vector>
#include <array>
using namespace svi_kernels;
using namespace svi_kernels::cuda;
constexpr int kBlockSize = kInt8Threads, K = kInt8PerThread, kTile = kInt8Tile;

struct Tensor { std::vector<float> p, g; std::vector<int8_t> m; std::vector<uint8_t> v; std::vector<float> ms, vs; };
static math::AdamCoeffs<float> coeffs() {
  math::AdamCoeffs<float> c; c.one_minus_beta1 = 0.1f; c.beta2 = 0.999f; c.one_minus_beta2 = 0.001f; c.eps = 1e-8f;
  c.weight_decay = 0.01f; c.decay = 1.f - 1e-3f * 0.01f; c.step_size = 1e-3f / 0.1f; c.bias_correction2_sqrt = 0.0316f;
  return c;
}
static long long writes_codes, writes_scales;

// reference: per tensor, blocks of B from element 0
static void reference(Tensor& t, int B) {
  const auto c = coeffs(); const int64_t n = t.p.size();
  for (int64_t b0 = 0; b0 < n; b0 += B) {
    const int64_t b1 = std::min<int64_t>(n, b0 + B); const int64_t q = b0 / B;
    std::vector<float> ym(b1 - b0), yv(b1 - b0);
    float am = 0, av = 0;
    for (int64_t i = b0; i < b1; ++i) {
      float m = int8_decode_signed(t.m[i], t.ms[q]), v = int8_decode_unsigned(t.v[i], t.vs[q]);
      math::adam_elem(t.p[i], t.g[i], m, v, c, true, true, false);
      ym[i - b0] = m; yv[i - b0] = v; am = int8_absmax_step(am, m); av = int8_absmax_step(av, v);
    }
    const float sm = int8_scale_of(am), sv = int8_scale_of(av);
    for (int64_t i = b0; i < b1; ++i) { t.m[i] = int8_encode_signed(ym[i - b0], int8_inv_scale(sm)); t.v[i] = int8_encode_unsigned(yv[i - b0], int8_inv_scale(sv)); }
    t.ms[q] = sm; t.vs[q] = sv;
  }
}

// emulation of multi_tensor_int8_kernel for one CUDA block (one chunk)
static void kernel_block(Tensor& t, int64_t chunk, int log2_block, std::vector<int>& touched, std::vector<int>& scale_touched) {
  const auto c = coeffs();
  const int64_t begin = chunk * kChunkSize; const int64_t left = (int64_t)t.p.size() - begin;
  const int n = left < kChunkSize ? (int)left : kChunkSize;
  const int group = int8_group_threads(log2_block);
  for (int tile = 0; tile < n; tile += kTile) {
    static float x[4][kBlockSize][K]; static float am[kBlockSize], av[kBlockSize]; static int cnts[kBlockSize], offs[kBlockSize]; static int64_t qb[kBlockSize];
    for (int th = 0; th < kBlockSize; ++th) {  // phase 1: load, compute, local absmax
      const Int8Slice sl = int8_slice(begin, n, tile, th, log2_block);
      const int off = sl.off, cnt = sl.cnt; const int64_t q = sl.qblock; cnts[th] = cnt; offs[th] = off; qb[th] = q;
      const float sm = cnt > 0 ? t.ms.at(q) : 0.f, sv = cnt > 0 ? t.vs.at(q) : 0.f;
      float a = 0, b = 0;
      for (int j = 0; j < K; ++j) {
        if (j >= cnt) { for (int d = 0; d < 4; ++d) x[d][th][j] = 0; continue; }
        const int64_t i = begin + off + j;
        float p = t.p[i], g = t.g[i], m = int8_decode_signed(t.m[i], sm), v = int8_decode_unsigned(t.v[i], sv);
        math::adam_elem(p, g, m, v, c, true, true, false);
        x[0][th][j] = p; x[2][th][j] = m; x[3][th][j] = v;
        a = int8_absmax_step(a, m); b = int8_absmax_step(b, v);
      }
      am[th] = a; av[th] = b;
    }
    // phase 2: butterfly within `width` lanes (__shfl_xor_sync: all lanes read, then all write)
    const int width = int8_shuffle_width(group);
    for (int o = width / 2; o > 0; o /= 2) {
      float na[kBlockSize], nb[kBlockSize];
      for (int th = 0; th < kBlockSize; ++th) {
        const int src = th ^ o; if (src / 32 != th / 32) { std::printf("shuffle leaves warp\n"); std::exit(1); }
        na[th] = int8_absmax_step(am[th], am[src]); nb[th] = int8_absmax_step(av[th], av[src]);
      }
      std::memcpy(am, na, sizeof am); std::memcpy(av, nb, sizeof av);
    }
    if (group > 32) {  // phase 3: shared memory across the group's warps
      float wm[kBlockSize / 32], wv[kBlockSize / 32];
      for (int w = 0; w < kBlockSize / 32; ++w) { wm[w] = am[32 * w]; wv[w] = av[32 * w]; }
      const int warps = group / 32;
      for (int th = 0; th < kBlockSize; ++th) {
        const int warp = th / 32, first = int8_first_warp(warp, group); float a = wm[first], b = wv[first];
        if (first % warps != 0 || first + warps > kBlockSize / 32) { std::printf("bad warp group\n"); std::exit(1); }
        for (int k = 1; k < warps; ++k) { a = int8_absmax_step(a, wm[first + k]); b = int8_absmax_step(b, wv[first + k]); }
        am[th] = a; av[th] = b;
      }
    }
    for (int th = 0; th < kBlockSize; ++th) {  // phase 4: encode, scale by the block's first thread
      const int cnt = cnts[th], off = offs[th]; const int64_t q = qb[th];
      const float sm = int8_scale_of(am[th]), sv = int8_scale_of(av[th]);
      for (int j = 0; j < cnt; ++j) {
        const int64_t i = begin + off + j;
        if ((i >> log2_block) != q) { std::printf("thread straddles blocks\n"); std::exit(1); }
        t.p[i] = x[0][th][j]; t.m[i] = int8_encode_signed(x[2][th][j], int8_inv_scale(sm));
        t.v[i] = int8_encode_unsigned(x[3][th][j], int8_inv_scale(sv)); ++touched[i]; ++writes_codes;
      }
      if (int8_scale_writer(Int8Slice{off, cnt, q}, log2_block)) { t.ms[q] = sm; t.vs[q] = sv; ++scale_touched[q]; ++writes_scales; }
    }
  }
}

int main() {
  std::mt19937 rng(7); std::normal_distribution<float> nd(0.f, 1.f);
  const std::vector<std::vector<int64_t>> cases = {
      {1}, {0, 5, 0}, {31, 32, 33}, {255, 256, 257, 4095, 4096, 4097}, {65535, 65536, 65537},
      {3 * 65536 + 4000, 7, 100000}, {330 * 65536 + 17},  // more chunks than one launch holds (B = 256 only)
      std::vector<int64_t>(200, 1000),                      // more tensors than one launch holds (slots)
  };
  int failures = 0; long long checked = 0;
  for (int log2b = 5; log2b <= 12; ++log2b) {
    const int B = 1 << log2b;
    for (const auto& sizes : cases) {
      if (sizes[0] > 100 * 65536 && B != 256) continue;
      std::vector<Tensor> dev(sizes.size()), ref;
      for (size_t k = 0; k < sizes.size(); ++k) {
        Tensor& t = dev[k]; const int64_t n = sizes[k]; const int64_t nb = int8_num_blocks(n, B);
        t.p.resize(n); t.g.resize(n); t.m.resize(n); t.v.resize(n); t.ms.resize(nb); t.vs.resize(nb);
        for (int64_t i = 0; i < n; ++i) { t.p[i] = nd(rng); t.g[i] = nd(rng); t.m[i] = (int8_t)(rng() % 255 - 127); t.v[i] = (uint8_t)(rng() % 256); }
        for (int64_t q = 0; q < nb; ++q) { t.ms[q] = std::fabs(nd(rng)); t.vs[q] = std::fabs(nd(rng)); }
        if (n > 100 && k == 0) t.g[n / 2] = NAN;  // a NaN block
      }
      ref = dev;
      for (auto& t : ref) reference(t, B);
      // plan_launches with DEPTH = 4 lists + 2 scale lists, addresses = tensor index
      std::array<std::vector<void*>, 6> addr; std::vector<int64_t> numels;
      for (int d = 0; d < 6; ++d) for (size_t k = 0; k < sizes.size(); ++k) addr[d].push_back((void*)(uintptr_t)(k + 1));
      for (auto n : sizes) numels.push_back(n);
      std::vector<std::vector<int>> touched(sizes.size()), stouched(sizes.size());
      for (size_t k = 0; k < sizes.size(); ++k) { touched[k].assign(sizes[k], 0); stouched[k].assign(int8_num_blocks(sizes[k], B), 0); }
      plan_launches<6, false>(addr, numels, nullptr, [&](const TensorListMeta<6, false>& meta, int n_blocks) {
        for (int b = 0; b < n_blocks; ++b) {
          const int slot = meta.block_to_tensor[b]; const size_t k = (uintptr_t)meta.addresses[4][slot] - 1;  // a scale list's address
          if (meta.numel[slot] != sizes[k] || (size_t)meta.list_index[slot] != k) { std::printf("meta mismatch\n"); std::exit(1); }
          kernel_block(dev[k], meta.block_to_chunk[b], log2b, touched[k], stouched[k]);
        }
      });
      for (size_t k = 0; k < sizes.size(); ++k) {
        for (int x : touched[k]) if (x != 1) { ++failures; break; }
        for (int x : stouched[k]) if (x != 1) { ++failures; break; }
        if (std::memcmp(dev[k].p.data(), ref[k].p.data(), 4 * sizes[k]) || std::memcmp(dev[k].m.data(), ref[k].m.data(), sizes[k]) ||
            std::memcmp(dev[k].v.data(), ref[k].v.data(), sizes[k]) ||
            std::memcmp(dev[k].ms.data(), ref[k].ms.data(), 4 * dev[k].ms.size()) || std::memcmp(dev[k].vs.data(), ref[k].vs.data(), 4 * dev[k].vs.size())) {
          ++failures; std::printf("MISMATCH B=%d tensor %zu n=%lld\n", B, k, (long long)sizes[k]);
        }
        checked += sizes[k];
      }
    }
  }
  std::printf("%s: %lld elements over 8 block sizes x %zu size sets; %lld code writes, %lld scale writes, %d failures\n",
              failures ? "FAIL" : "OK", checked, cases.size(), writes_codes, writes_scales, failures);
  return failures != 0;
}
