// What cpu_avx512.inc needs, included by its two units before they open their namespaces
// (a system header must never be included inside a namespace).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"
#include "half.h"
#include "philox.h"  // philox_rounds, on a lane type of the unit (internal linkage)
