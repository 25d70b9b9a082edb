// The size threshold of the streaming stores (see stream_policy.h).
#include "stream_policy.h"

#include <atomic>
#include <cstdlib>

#if defined(__linux__)
#include <unistd.h>
#endif

namespace svi_kernels::cpu {

namespace {

constexpr int64_t kFallbackCacheBytes = int64_t{32} << 20;

int64_t initial_threshold() {
  if (const char* env = std::getenv("SVI_KERNELS_STREAM_MIN_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && v >= 0) return static_cast<int64_t>(v);
  }
#if defined(__linux__) && defined(_SC_LEVEL3_CACHE_SIZE)
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return static_cast<int64_t>(l3);
#endif
  return kFallbackCacheBytes;
}

std::atomic<int64_t>& threshold() {
  static std::atomic<int64_t> bytes{initial_threshold()};
  return bytes;
}

}  // namespace

int64_t stream_min_bytes() { return threshold().load(std::memory_order_relaxed); }

int64_t set_stream_min_bytes(int64_t bytes) { return threshold().exchange(bytes, std::memory_order_relaxed); }

bool stream_stores_pay(at::TensorList params, int64_t lists) {
  int64_t bytes = 0;
  for (const at::Tensor& t : params) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes * lists >= stream_min_bytes();
}

}  // namespace svi_kernels::cpu
