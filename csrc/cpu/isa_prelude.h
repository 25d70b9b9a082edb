#pragma once
// Headers an ISA build needs, included BEFORE its target pragma: their inline functions
// (c10 Half/BFloat16 conversions, std library, ATen scalar math) are shared with the rest of
// the library and must stay baseline code wherever the linker keeps a single copy. Only
// at::vec (namespaced per ISA by CPU_CAPABILITY) and our loops are compiled after the pragma.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

// Per-ISA copies of the formula templates get internal linkage (see svi_hd.h); defined before
// kernel_table.h includes state_storage.h.
#define SVI_HD static inline

#include "kernel_table.h"
