// The AVX2 copy of the CPU loops (see merge_kernels.inc, qmerge_kernels.inc), chosen at run time when the CPU has
// AVX2 and FMA.
#include "merge_cpu.h"

#if AMF_CPU_AVX2
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

#pragma GCC push_options
// fma for the explicit _mm256_fmadd_ps of the quantized dots (qmerge_avx2.inc); fp-contract=off keeps every other
// multiply and add separate, as in the baseline copy (merges bitwise equal across the copies).
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=off")
#define AMF_ISA avx2
#define AMF_Q_AVX2 1
#include "merge_kernels.inc"
#include "qmerge_kernels.inc"
#undef AMF_Q_AVX2
#undef AMF_ISA
#pragma GCC pop_options
#endif
