// SVI_CHECK(cond, parts...): TORCH_CHECK with a message assembled by string concatenation.
//
// Why not TORCH_CHECK's own formatting: c10::str writes the parts through std::ostringstream,
// and on one PyTorch build (2.11.0+cu130 on Ubuntu 24.04, GCC 13.3, seen on an H100 machine) an
// extension that formats a number that way crashes with SIGSEGV inside the stream, so every
// argument check became a crash; a minimal load_inline extension crashed the same way. Handed one
// std::string, c10::str returns it untouched, and the c10::Error is built inside libc10.
// The message is only assembled when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <type_traits>

namespace svi_kernels::detail {

inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::kStrided: s += "Strided"; return;
    case c10::kSparse: s += "Sparse"; return;
    case c10::kSparseCsr: s += "SparseCsr"; return;
    case c10::kSparseCsc: s += "SparseCsc"; return;
    case c10::kSparseBsr: s += "SparseBsr"; return;
    case c10::kSparseBsc: s += "SparseBsc"; return;
    case c10::kMkldnn: s += "Mkldnn"; return;
    default: s += "layout #" + std::to_string(static_cast<int>(v)); return;
  }
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace svi_kernels::detail

#define SVI_CHECK(cond, ...) TORCH_CHECK((cond), ::svi_kernels::detail::message(__VA_ARGS__))
