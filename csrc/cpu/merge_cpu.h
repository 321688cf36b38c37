// Shared declarations of the CPU kernels (merge_cpu.cpp / qmerge_cpu.cpp: drivers and bindings of the dense /
// quantized ops; merge_kernels.inc and qmerge_kernels.inc: the loops, compiled once per instruction set: baseline in
// merge_cpu.cpp, AVX2 in merge_cpu_avx2.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// ------------------------------------------------------------------------- quantized task vectors
// One [R, C] stack of K quantized task vectors (adamerge_fast/ops/quant.py): int8 (bits 8) with one fp32 scale
// per row, value = s[k][r] * q[k][r][c]; int4 (bits 4) with an fp32 scale and a uint8 zero point per group of gs
// columns, value = s[k][r][g] * (q - z[k][r][g]), column c in byte c/2 (low nibble for even c). Slice k of each
// part starts at its pointer + k * its task stride; rows of a slice are contiguous (qrow bytes, G groups).
struct QItem;
// merge: out[r][c] = base[r][c] + sum_k cf[k] * deq_k[r][c] over rows [r0, r1), columns [c0, c1) (c0 even)
using QMergeFn = void (*)(const QItem&, int64_t r0, int64_t r1, int64_t c0, int64_t c1);
// dot: part[k] = sum over the same range of g[r][c] * deq_k[r][c], k < K (K <= 8; generic int4 loop: <= 4)
using QDotFn = void (*)(const QItem&, int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* part);

struct QItem {
  void* out;          // merge: [R, C] contiguous in the base dtype; merge_dot too
  const void* base;   // merge: base [R, C] contiguous; dot: the gradient [R, C] contiguous
  const float* g;     // merge_dot: the fp32 gradient [R, C] contiguous
  const char* q0;     // packed values of task 0
  int64_t qk;         // bytes between task slices of the packed values
  int64_t qrow;       // bytes per row (C for int8, ceil(C/2) for int4)
  const float* s0;    // scales of task 0: [R] (int8) or [R, G] (int4)
  int64_t sk;         // elements between task slices of the scales
  const uint8_t* z0;  // int4 zero points of task 0: [R, G]
  int64_t zk;         // elements between task slices of the zero points
  int64_t R, C, G, gs;
  int K;
  int bytes_per_elem;  // memory traffic per element (for the thread count)
  int out_esize;
  bool prefault;       // out is freshly allocated: touch its pages before streaming into them
  const float* cf;     // coefficients (fp32)
  QMergeFn merge;
  QDotFn dot;          // dot, or (with `out` and `g`) merge_dot: the merge and the dot in one pass
};

// The kernels of one instruction set: pick the loop for a dtype combination (and K, for merge).
#define AMF_DECLARE_ISA(NS)                                                         \
  namespace NS {                                                                    \
  MergeFn pick_merge(at::ScalarType b, at::ScalarType d, bool dbl, int64_t K);      \
  DotFn pick_dot(at::ScalarType g, at::ScalarType d, bool dbl, int64_t K);         \
  MergeDotFn pick_merge_dot(at::ScalarType b, at::ScalarType d, int64_t K);         \
  QMergeFn pick_qmerge(at::ScalarType b, int bits, int64_t K);                      \
  QDotFn pick_qdot(at::ScalarType g, int bits, int64_t K);                          \
  QDotFn pick_qmerge_dot(at::ScalarType b, int bits, int64_t K);                    \
  }
AMF_DECLARE_ISA(base)
#if AMF_CPU_AVX2
AMF_DECLARE_ISA(avx2)
#endif
#undef AMF_DECLARE_ISA

// True when the AVX2 copy of the loops runs here (merge_cpu.cpp; ADAMERGE_CPU_ISA=base forces the baseline).
bool use_avx2();

// Each OpenMP thread gets at least this much memory traffic: below it, waking threads costs more than it
// saves (and on an oversubscribed machine a late thread stalls the whole call at the closing barrier).
constexpr int64_t BYTES_PER_THREAD = int64_t(16) << 20;

inline int threads_for(int64_t bytes) {
  if (at::in_parallel_region()) return 1;
  const int64_t want = bytes / BYTES_PER_THREAD;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, at::get_num_threads())));
}

// Map the pages of a fresh output chunk before the kernel streams into it: a first-touch page fault in the
// middle of the K+2 concurrent streams stalls them all (measured: ~1.5x the cost of the same faults taken in
// a tight loop). Only bytes of this chunk are written (zeros, overwritten by the kernel right after).
inline void touch_pages(void* out, int64_t nbytes) {
  volatile char* p = static_cast<volatile char*>(out);
  for (int64_t off = 0; off < nbytes; off += 4096) p[off] = 0;
  if (nbytes > 0) p[nbytes - 1] = 0;
}

}  // namespace cpu
}  // namespace amf
