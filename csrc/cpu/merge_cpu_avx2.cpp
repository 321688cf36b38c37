// The AVX2 copy of the CPU loops (see merge_kernels.inc, qmerge_kernels.inc), chosen at run time when the CPU has AVX2.
#include "merge_cpu.h"

#if AMF_CPU_AVX2
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2")
#define AMF_ISA avx2
#define AMF_Q_AVX2 1
#include "merge_kernels.inc"
#include "qmerge_kernels.inc"
#undef AMF_Q_AVX2
#undef AMF_ISA
#pragma GCC pop_options
#endif
