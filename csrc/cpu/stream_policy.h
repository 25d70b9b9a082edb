#pragma once
// When the line-search ops write their write-only outputs (w0 of a save, p of a trial or of
// the final step) with streaming stores (vec_helpers.h). A streaming store skips reading the
// line before writing it (saves 4 of 16 B/param in an SGD trial), but leaves nothing in cache:
// it pays when the call touches more bytes than the last-level cache holds, because then its
// first outputs are evicted before the call even ends; a smaller call keeps its outputs cached
// for the forward pass that reads them next, so it stores normally.
#include <cstdint>

namespace svi_kernels::cpu {

// True when `lists` tensor lists of `bytes_per_list` bytes each touch at least stream_min_bytes().
bool stream_stores_pay(int64_t bytes_per_list, int64_t lists);

// The threshold: SVI_KERNELS_STREAM_MIN_BYTES if set, else the size of the L3 that CPU 0 shares
// (Linux sysfs; 32 MiB where there is none to read).
int64_t stream_min_bytes();

// Changes the threshold (tests force both paths with 0 and a huge value); returns the old one.
int64_t set_stream_min_bytes(int64_t bytes);

}  // namespace svi_kernels::cpu
