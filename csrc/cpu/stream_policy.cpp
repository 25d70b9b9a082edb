// The size threshold of the streaming stores (see stream_policy.h).
#include "stream_policy.h"

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

namespace svi_kernels::cpu {

namespace {

constexpr int64_t kFallbackCacheBytes = int64_t{32} << 20;

// The L3 that CPU 0 shares, as Linux reports it ("32768K"). Not sysconf(_SC_LEVEL3_CACHE_SIZE):
// glibc derives that from CPUID, which a VM may fill with the host's figures (this dev VM: 384 MiB
// for a 32 MiB L3, which would have kept every call but bert-base-sized ones from streaming).
int64_t last_level_cache_bytes() {
  std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index3/size");
  std::string text;
  if (!(file >> text) || text.empty()) return kFallbackCacheBytes;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) return kFallbackCacheBytes;
  const int64_t scale = *end == 'K' ? int64_t{1} << 10 : *end == 'M' ? int64_t{1} << 20 : 1;
  return static_cast<int64_t>(value) * scale;
}

int64_t initial_threshold() {
  if (const char* env = std::getenv("SVI_KERNELS_STREAM_MIN_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && v >= 0) return static_cast<int64_t>(v);
  }
  return last_level_cache_bytes();
}

std::atomic<int64_t>& threshold() {
  static std::atomic<int64_t> bytes{initial_threshold()};
  return bytes;
}

}  // namespace

int64_t stream_min_bytes() { return threshold().load(std::memory_order_relaxed); }

int64_t set_stream_min_bytes(int64_t bytes) { return threshold().exchange(bytes, std::memory_order_relaxed); }

bool stream_stores_pay(int64_t bytes_per_list, int64_t lists) {
  return bytes_per_list * lists >= stream_min_bytes();
}

}  // namespace svi_kernels::cpu
