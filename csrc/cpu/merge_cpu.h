// Shared declarations of the CPU kernels (merge_cpu.cpp: drivers and bindings; merge_kernels.inc: the loops,
// compiled once per instruction set: baseline in merge_cpu.cpp, AVX2 in merge_cpu_avx2.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// The AVX2 copy of the loops is built with GCC's target pragma on x86 (no -march flag: the choice is made at
// run time with __builtin_cpu_supports, so the binary stays portable). Other compilers/CPUs: baseline only.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define AMF_CPU_AVX2 1
#else
#define AMF_CPU_AVX2 0
#endif

namespace amf {
namespace cpu {

struct MergeItem;
using MergeFn = void (*)(const MergeItem&, int64_t, int64_t);

// out[i] = base[i] + sum_k c[k] * deltas[k][i] for i in a range of [0, numel)
struct MergeItem {
  void* out;
  const void* base;
  const char* d0;   // slice k of the task vectors starts at d0 + k * dstride (bytes)
  int64_t dstride;  // bytes
  int64_t numel;
  int K;
  int bytes_per_elem;  // memory traffic per element (reads + write), for the thread count
  int out_esize;       // bytes per output element
  bool prefault;       // out is freshly allocated: touch its pages before streaming into them
  const float* cf;     // coefficients (fp32 accumulation)
  const double* cd;    // coefficients (fp64 accumulation)
  MergeFn fn;
};

struct DotItem;
using DotFn = void (*)(const DotItem&, int64_t, int64_t, double*);

// part[k] = <g[b:e], deltas[k][b:e]>
struct DotItem {
  const void* g;
  const char* d0;
  int64_t dstride;  // bytes
  int64_t numel;
  int K;
  int bytes_per_elem;
  int64_t part0;  // index of this item's first chunk in the partial-sum table
  DotFn fn;
};

// out[b:e] = merge(...) of the MergeItem and part[k] = <g[b:e], deltas[k][b:e]> in one pass (fp32 g)
using MergeDotFn = void (*)(const MergeItem&, const float*, int64_t, int64_t, double*);

// The kernels of one instruction set: pick the loop for a dtype combination (and K, for merge).
#define AMF_DECLARE_ISA(NS)                                                         \
  namespace NS {                                                                    \
  MergeFn pick_merge(at::ScalarType b, at::ScalarType d, bool dbl, int64_t K);      \
  DotFn pick_dot(at::ScalarType g, at::ScalarType d, bool dbl, int64_t K);         \
  MergeDotFn pick_merge_dot(at::ScalarType b, at::ScalarType d, int64_t K);         \
  }
AMF_DECLARE_ISA(base)
#if AMF_CPU_AVX2
AMF_DECLARE_ISA(avx2)
#endif
#undef AMF_DECLARE_ISA

}  // namespace cpu
}  // namespace amf
