// CUDA kernels of adamerge_fast (torch-free; launchers declared in kernels.h).
//
//  merge        one block per 2048-element tile, 8 consecutive elements per thread, 16-byte vector loads and
//               stores when every pointer of the item is aligned; all K task vectors in one pass. merge_many
//               is one launch over the tiles of up to AMF_MANY_CHUNK tensors (item table passed by value as a
//               __grid_constant__ kernel parameter, binary search): CUDA-graph capturable, no host-to-device copy.
//  dcoef        per-tile partial dot products for groups of 8 task vectors (grad read once for K <= 8), a
//               deterministic block reduction to one double per (tile, k), then a second kernel that sums
//               the tiles of each (item, k) in a fixed order.
//  merged_mm    C = A @ B with B tiles merged from w0 + sum_k c_k tau_k in shared memory (fp32/fp64
//               accumulation), optional split over the reduction dimension with an ordered second pass.
//  dcoef_w      32x32 tiles of dy^T x in registers, reduced against the K tau tiles: partials per tile.
//  entropy      one block per row, two sweeps over the columns (max, then sum e and sum e*(z-max)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <string.h>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------- dtype conversions
template <class A>
struct Acc;

template <>
struct Acc<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
  static __device__ __forceinline__ float from(double v) { return static_cast<float>(v); }
  static __device__ __forceinline__ float from(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float from(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <>
struct Acc<double> {
  static __device__ __forceinline__ double from(float v) { return static_cast<double>(v); }
  static __device__ __forceinline__ double from(double v) { return v; }
  static __device__ __forceinline__ double from(__half v) { return static_cast<double>(__half2float(v)); }
  static __device__ __forceinline__ double from(__nv_bfloat16 v) {
    return static_cast<double>(__bfloat162float(v));
  }
};

__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void st(double* p, float v) { *p = static_cast<double>(v); }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void st(__half* p, double v) { *p = __float2half_rn(static_cast<float>(v)); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, double v) { *p = __float2bfloat16_rn(static_cast<float>(v)); }

// Element i of a buffer of runtime dtype dt (warp-uniform branch), as the accumulator type.
template <class A>
__device__ __forceinline__ A ld_dt(const void* p, int64_t i, int dt) {
  switch (dt) {
    case AMF_F32: return Acc<A>::from(static_cast<const float*>(p)[i]);
    case AMF_F64: return Acc<A>::from(static_cast<const double*>(p)[i]);
    case AMF_F16: return Acc<A>::from(static_cast<const __half*>(p)[i]);
    default: return Acc<A>::from(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

template <class A>
__device__ __forceinline__ void st_dt(void* p, int64_t i, int dt, A v) {
  switch (dt) {
    case AMF_F32: st(static_cast<float*>(p) + i, v); break;
    case AMF_F64: st(static_cast<double*>(p) + i, v); break;
    case AMF_F16: st(static_cast<__half*>(p) + i, v); break;
    default: st(static_cast<__nv_bfloat16*>(p) + i, v); break;
  }
}

// 8 consecutive elements, loaded/stored as 16-byte vectors (the pointer must be 16-byte aligned).
template <class T>
struct alignas(16) V8 {
  T v[8];
};

// ------------------------------------------------------------------------------- deterministic reductions
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // lane 0 holds the sum
}

template <class A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block of a value per thread; every thread gets the result. Fixed tree: deterministic.
template <class A>
__device__ A block_sum(A v, A* sh /* kWarps */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A t = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += sh[w];
  return t;
}

template <class A>
__device__ A block_max(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A t = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) t = fmax(t, sh[w]);
  return t;
}

// dst[i] = block sum of v[i] for i < kn (as double), in a fixed order. All threads must call it.
template <class A>
__device__ void block_sum8(A (&v)[8], int kn, double* dst) {
  __shared__ double sh[kWarps][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const A s = warp_sum(v[i]);
    if (lane == 0) sh[warp][i] = static_cast<double>(s);
  }
  __syncthreads();
  if (threadIdx.x < kn) {
    double t = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += sh[w][threadIdx.x];
    dst[threadIdx.x] = t;
  }
  __syncthreads();  // sh is reused by the next call
}

// ------------------------------------------------------------------------------------------------- merge
template <class TB, class TD, class A>
__device__ __forceinline__ void merge_tile(const AmfMergeItem& it, int64_t tile, const double* __restrict__ coefs,
                                           int K) {
  const int64_t n = it.numel;
  const int64_t start = tile * AMF_MERGE_TILE + static_cast<int64_t>(threadIdx.x) * 8;
  if (start >= n) return;
  const TB* __restrict__ base = static_cast<const TB*>(it.base);
  TB* __restrict__ out = static_cast<TB*>(it.out);
  const TD* __restrict__ d0 = static_cast<const TD*>(it.delta0);
  const double* __restrict__ c = coefs + it.coef_off;
  A acc[8];
  if (it.aligned && start + 8 <= n) {
    const V8<TB> b = *reinterpret_cast<const V8<TB>*>(base + start);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = Acc<A>::from(b.v[i]);
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const A ck = static_cast<A>(c[k]);
      const V8<TD> d = *reinterpret_cast<const V8<TD>*>(d0 + k * it.dstride + start);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += ck * Acc<A>::from(d.v[i]);
    }
    V8<TB> o;
#pragma unroll
    for (int i = 0; i < 8; ++i) st(&o.v[i], acc[i]);
    *reinterpret_cast<V8<TB>*>(out + start) = o;
  } else {
    const int m = static_cast<int>(n - start < 8 ? n - start : 8);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < m) acc[i] = Acc<A>::from(base[start + i]);
    for (int k = 0; k < K; ++k) {
      const A ck = static_cast<A>(c[k]);
      const TD* dk = d0 + k * it.dstride + start;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < m) acc[i] += ck * Acc<A>::from(dk[i]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < m) st(out + start + i, acc[i]);
  }
}

#define AMF_CODE(b, d) ((b) * 4 + (d))

// fp64 accumulation, any storage dtypes (runtime switches; no vector loads).
__device__ void merge_tile_dyn(const AmfMergeItem& it, int64_t tile, const double* __restrict__ coefs, int K) {
  const int64_t n = it.numel;
  const int64_t start = tile * AMF_MERGE_TILE + static_cast<int64_t>(threadIdx.x) * 8;
  if (start >= n) return;
  const int m = static_cast<int>(n - start < 8 ? n - start : 8);
  const double* __restrict__ c = coefs + it.coef_off;
  double acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < m) acc[i] = ld_dt<double>(it.base, start + i, it.base_dt);
  for (int k = 0; k < K; ++k) {
    const double ck = c[k];
    const int64_t off = k * it.dstride + start;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < m) acc[i] += ck * ld_dt<double>(it.delta0, off + i, it.delta_dt);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < m) st_dt<double>(it.out, start + i, it.base_dt, acc[i]);
}

__device__ __forceinline__ void merge_dispatch(const AmfMergeItem& it, int64_t tile, const double* coefs, int K) {
  const int code = AMF_CODE(it.base_dt, it.delta_dt);
  if (it.acc_double) {  // fp64 accumulation (rare): one generic kernel with per-element dtype switches
    merge_tile_dyn(it, tile, coefs, K);
  } else {  // the host sets acc_double whenever a dtype is fp64
    switch (code) {
#define AMF_M(BD, DD, TB, TD) \
  case AMF_CODE(BD, DD): merge_tile<TB, TD, float>(it, tile, coefs, K); break;
      AMF_M(AMF_F32, AMF_F32, float, float)
      AMF_M(AMF_F32, AMF_F16, float, __half)
      AMF_M(AMF_F32, AMF_BF16, float, __nv_bfloat16)
      AMF_M(AMF_F16, AMF_F32, __half, float)
      AMF_M(AMF_F16, AMF_F16, __half, __half)
      AMF_M(AMF_F16, AMF_BF16, __half, __nv_bfloat16)
      AMF_M(AMF_BF16, AMF_F32, __nv_bfloat16, float)
      AMF_M(AMF_BF16, AMF_F16, __nv_bfloat16, __half)
      AMF_M(AMF_BF16, AMF_BF16, __nv_bfloat16, __nv_bfloat16)
#undef AMF_M
      default: break;
    }
  }
}

__global__ void __launch_bounds__(kThreads) merge_one_kernel(AmfMergeItem it, const double* coefs, int K) {
  merge_dispatch(it, blockIdx.x, coefs, K);
}

// The last item whose first tile is <= tile (items sorted by tile0; empty items share a tile0 with the next).
template <class Item>
__device__ __forceinline__ int find_item(const Item* __restrict__ items, int n, int64_t tile) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (items[mid].tile0 <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The chunk is a __grid_constant__ parameter: indexed in the constant bank where it arrives, never copied.
__global__ void __launch_bounds__(kThreads)
    merge_many_kernel(const __grid_constant__ AmfMergeChunk chunk, const double* coefs, int K) {
  const int64_t tile = blockIdx.x;
  const AmfMergeItem& it = chunk.items[find_item(chunk.items, chunk.n, tile)];
  merge_dispatch(it, tile - it.tile0, coefs, K);
}

// ------------------------------------------------------------------------------------------------- dcoef
// part[k] for k < K: this tile's <grad, delta_k>. Groups of 8 task vectors per sweep over the tile.
template <class TG, class TD, class A>
__device__ void dot_tile(const AmfDotItem& it, int64_t tile, int K, double* __restrict__ part) {
  const int64_t n = it.numel;
  const int64_t t0 = tile * AMF_DOT_TILE;
  const TG* __restrict__ g = static_cast<const TG*>(it.grad);
  const TD* __restrict__ d0 = static_cast<const TD*>(it.delta0);
  for (int kg = 0; kg < K; kg += 8) {
    const int kn = K - kg < 8 ? K - kg : 8;
    A s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = 0;
    for (int r = 0; r < AMF_DOT_TILE / (kThreads * 8); ++r) {
      const int64_t start = t0 + (static_cast<int64_t>(r) * kThreads + threadIdx.x) * 8;
      if (start >= n) break;
      A gv[8];
      if (it.aligned && start + 8 <= n) {
        const V8<TG> gg = *reinterpret_cast<const V8<TG>*>(g + start);
#pragma unroll
        for (int e = 0; e < 8; ++e) gv[e] = Acc<A>::from(gg.v[e]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < kn) {
            const V8<TD> dd = *reinterpret_cast<const V8<TD>*>(d0 + (kg + i) * it.dstride + start);
#pragma unroll
            for (int e = 0; e < 8; ++e) s[i] += gv[e] * Acc<A>::from(dd.v[e]);
          }
        }
      } else {
        const int m = static_cast<int>(n - start < 8 ? n - start : 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) gv[e] = e < m ? Acc<A>::from(g[start + e]) : A(0);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < kn) {
            const TD* dk = d0 + (kg + i) * it.dstride + start;
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (e < m) s[i] += gv[e] * Acc<A>::from(dk[e]);
          }
        }
      }
    }
    block_sum8(s, kn, part + kg);
  }
}

// fp64 accumulation, any storage dtypes (runtime switches; no vector loads).
__device__ void dot_tile_dyn(const AmfDotItem& it, int64_t tile, int K, double* __restrict__ part) {
  const int64_t n = it.numel;
  const int64_t t0 = tile * AMF_DOT_TILE;
  for (int kg = 0; kg < K; kg += 8) {
    const int kn = K - kg < 8 ? K - kg : 8;
    double s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = 0;
    for (int r = 0; r < AMF_DOT_TILE / (kThreads * 8); ++r) {
      const int64_t start = t0 + (static_cast<int64_t>(r) * kThreads + threadIdx.x) * 8;
      if (start >= n) break;
      const int m = static_cast<int>(n - start < 8 ? n - start : 8);
      for (int e = 0; e < m; ++e) {
        const double gv = ld_dt<double>(it.grad, start + e, it.grad_dt);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < kn) s[i] += gv * ld_dt<double>(it.delta0, (kg + i) * it.dstride + start + e, it.delta_dt);
      }
    }
    block_sum8(s, kn, part + kg);
  }
}

__device__ __forceinline__ void dot_dispatch(const AmfDotItem& it, int64_t tile, int K, double* part) {
  const int code = AMF_CODE(it.grad_dt, it.delta_dt);
  if (it.acc_double) {
    dot_tile_dyn(it, tile, K, part);
  } else {
    switch (code) {
#define AMF_D(GD, DD, TG, TD) \
  case AMF_CODE(GD, DD): dot_tile<TG, TD, float>(it, tile, K, part); break;
      AMF_D(AMF_F32, AMF_F32, float, float)
      AMF_D(AMF_F32, AMF_F16, float, __half)
      AMF_D(AMF_F32, AMF_BF16, float, __nv_bfloat16)
      AMF_D(AMF_F16, AMF_F32, __half, float)
      AMF_D(AMF_F16, AMF_F16, __half, __half)
      AMF_D(AMF_F16, AMF_BF16, __half, __nv_bfloat16)
      AMF_D(AMF_BF16, AMF_F32, __nv_bfloat16, float)
      AMF_D(AMF_BF16, AMF_F16, __nv_bfloat16, __half)
      AMF_D(AMF_BF16, AMF_BF16, __nv_bfloat16, __nv_bfloat16)
#undef AMF_D
      default: break;
    }
  }
}

__global__ void __launch_bounds__(kThreads) dot_one_kernel(AmfDotItem it, int K, double* part) {
  dot_dispatch(it, blockIdx.x, K, part + static_cast<int64_t>(blockIdx.x) * K);
}

// Tiles [0, n_tiles) of the chunk, whose partial-sum rows start at row tile_base of part.
__global__ void __launch_bounds__(kThreads)
    dot_many_kernel(const __grid_constant__ AmfDotChunk chunk, int64_t tile_base, int K, double* part) {
  const int64_t tile = blockIdx.x;
  const AmfDotItem& it = chunk.items[find_item(chunk.items, chunk.n, tile)];
  dot_dispatch(it, tile - it.tile0, K, part + (tile_base + tile) * K);
}

// Block sum of part[t * K + k] over the tiles t in [t0, t1), in a fixed order (deterministic); thread 0 gets it.
__device__ __forceinline__ double reduce_tiles(const double* __restrict__ part, int64_t t0, int64_t t1, int K, int k) {
  __shared__ double sh[kWarps];
  double s = 0.0;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) s += part[t * K + k];
  return block_sum(s, sh);
}

// out[k] = sum over tiles [0, n_tiles) of part[t * K + k]. One block per k.
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const double* __restrict__ part, int64_t n_tiles,
                                                                   int K, double* out) {
  const double s = reduce_tiles(part, 0, n_tiles, K, blockIdx.x);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Level 1 of a long reduction: out[c * K + k] = sum of part[t * K + k] over the chunk c of AMF_REDUCE_CHUNK tiles.
// One block per (c, k).
__global__ void __launch_bounds__(kThreads) reduce_chunks_kernel(const double* __restrict__ part, int64_t n_tiles,
                                                                 int K, double* out) {
  const int64_t c = blockIdx.x / K;
  const int k = static_cast<int>(blockIdx.x % K);
  const int64_t t0 = c * AMF_REDUCE_CHUNK;
  const int64_t t1 = t0 + AMF_REDUCE_CHUNK < n_tiles ? t0 + AMF_REDUCE_CHUNK : n_tiles;
  const double s = reduce_tiles(part, t0, t1, K, k);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// out[k] = sum of the first n_tiles rows of part (amf_reduce_rows(n_tiles) rows of scratch), in two levels when long.
void reduce_rows(double* part, int64_t n_tiles, int K, double* out, cudaStream_t stream) {
  if (n_tiles > AMF_REDUCE_CHUNK) {
    const int64_t chunks = (n_tiles + AMF_REDUCE_CHUNK - 1) / AMF_REDUCE_CHUNK;
    double* level1 = part + n_tiles * K;
    reduce_chunks_kernel<<<static_cast<unsigned>(chunks * K), kThreads, 0, stream>>>(part, n_tiles, K, level1);
    reduce_partials_kernel<<<static_cast<unsigned>(K), kThreads, 0, stream>>>(level1, chunks, K, out);
  } else {
    reduce_partials_kernel<<<static_cast<unsigned>(K), kThreads, 0, stream>>>(part, n_tiles, K, out);
  }
}

// out[item * K + k] = sum over the tiles of chunk item `item` of part[t * K + k]. One block per (item, k).
__global__ void __launch_bounds__(kThreads) reduce_chunk_kernel(const double* __restrict__ part,
                                                                const __grid_constant__ AmfDotChunk chunk,
                                                                int64_t tile_base, int K, double* out) {
  const int item = blockIdx.x / K, k = blockIdx.x % K;
  const int64_t t0 = tile_base + chunk.items[item].tile0;
  const double s = reduce_tiles(part, t0, t0 + (chunk.items[item].numel + AMF_DOT_TILE - 1) / AMF_DOT_TILE, K, k);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// ------------------------------------------------------------------------------------------- merged mm
// Block tile: BM rows of C x BN columns, reduction dimension in steps of BR. Thread (ty, tx) = (tid / 16,
// tid % 16) computes C[ty][tx + 16 j] for j < 4.
template <class A, bool TRANS>
__global__ void __launch_bounds__(kThreads)
    merged_mm_kernel(const void* __restrict__ a, int a_dt, const void* __restrict__ w0, int w_dt,
                     const void* __restrict__ tau, int tau_dt, int64_t tau_kstride, const double* __restrict__ coefs,
                     int K, const double* __restrict__ bias, void* __restrict__ c, int c_dt, int64_t M, int64_t N,
                     int64_t R, int64_t r_per_split, A* __restrict__ ws) {
  constexpr int BM = AMF_MM_BM, BN = AMF_MM_BN, BR = AMF_MM_BR;
  __shared__ A As[BM][BR + 1];
  __shared__ A Bs[BR][BN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t rb = static_cast<int64_t>(blockIdx.z) * r_per_split;
  const int64_t re = rb + r_per_split < R ? rb + r_per_split : R;
  // the merged weight W: [N, R] when TRANS (B[r, n] = W[n, r]), [R, N] otherwise (B[r, n] = W[r, n])
  const int64_t ldw = TRANS ? R : N;
  A acc[4] = {0, 0, 0, 0};
  for (int64_t r0 = rb; r0 < re; r0 += BR) {
    // A tile [BM, BR]: 512 elements, 2 per thread, consecutive threads along r (row-major A)
#pragma unroll
    for (int u = 0; u < (BM * BR) / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int mm = idx / BR, rr = idx % BR;
      const int64_t m = m0 + mm, r = r0 + rr;
      As[mm][rr] = (m < M && r < re) ? ld_dt<A>(a, m * R + r, a_dt) : A(0);
    }
    // B tile [BR, BN] merged on the fly: 2048 elements, 8 per thread, coalesced along W's rows (not unrolled:
    // the per-element dtype switches would multiply the code size)
#pragma unroll 1
    for (int u = 0; u < (BR * BN) / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      int rr, nn;
      if (TRANS) {
        rr = idx % BR;
        nn = idx / BR;
      } else {
        nn = idx % BN;
        rr = idx / BN;
      }
      const int64_t r = r0 + rr, nc = n0 + nn;
      A w = 0;
      if (r < re && nc < N) {
        const int64_t off = TRANS ? nc * ldw + r : r * ldw + nc;
        w = ld_dt<A>(w0, off, w_dt);
#pragma unroll 1
        for (int k = 0; k < K; ++k) w += static_cast<A>(coefs[k]) * ld_dt<A>(tau, k * tau_kstride + off, tau_dt);
      }
      Bs[rr][nn] = w;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < BR; ++rr) {
      const A av = As[ty][rr];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += av * Bs[rr][tx + 16 * j];
    }
    __syncthreads();
  }
  const int64_t m = m0 + ty;
  if (m >= M) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t nc = n0 + tx + 16 * j;
    if (nc >= N) continue;
    if (ws != nullptr) {
      ws[(static_cast<int64_t>(blockIdx.z) * M + m) * N + nc] = acc[j];
    } else {
      const A v = acc[j] + (bias != nullptr ? static_cast<A>(bias[nc]) : A(0));
      st_dt<A>(c, m * N + nc, c_dt, v);
    }
  }
}

// c[m, n] = sum_s ws[s, m, n] (in slice order) + bias[n]
template <class A>
__global__ void __launch_bounds__(kThreads) split_sum_kernel(const A* __restrict__ ws, int splits,
                                                             const double* __restrict__ bias, void* c, int c_dt,
                                                             int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    A v = 0;
    for (int s = 0; s < splits; ++s) v += ws[s * total + i];
    if (bias != nullptr) v += static_cast<A>(bias[i % N]);
    st_dt<A>(c, i, c_dt, v);
  }
}

// ---------------------------------------------------------------------------------------------- dcoef_w
// Thread (oo, io) = (tid / 32, tid % 32) holds G[oo + 8 j][io] for j < 4 of the block's 32x32 tile of dy^T x.
template <class A>
__global__ void __launch_bounds__(kThreads)
    dcoef_w_kernel(const void* __restrict__ dy, int dy_dt, const void* __restrict__ x, int x_dt,
                   const void* __restrict__ tau, int tau_dt, int64_t tau_kstride, int K, int64_t M, int64_t OUT,
                   int64_t IN, double* __restrict__ part) {
  constexpr int T = AMF_DW_TILE;  // 32
  __shared__ A Dy[T][T + 1];
  __shared__ A X[T][T + 1];
  const int tid = threadIdx.x;
  const int io = tid % 32, oo = tid / 32;
  const int64_t tiles_i = (IN + T - 1) / T;
  const int64_t tile = blockIdx.x;
  const int64_t o0 = (tile / tiles_i) * T, i0 = (tile % tiles_i) * T;
  A g[4] = {0, 0, 0, 0};
  for (int64_t m0 = 0; m0 < M; m0 += T) {
#pragma unroll
    for (int u = 0; u < (T * T) / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int mm = idx / T, cc = idx % T;
      const int64_t m = m0 + mm;
      Dy[mm][cc] = (m < M && o0 + cc < OUT) ? ld_dt<A>(dy, m * OUT + o0 + cc, dy_dt) : A(0);
      X[mm][cc] = (m < M && i0 + cc < IN) ? ld_dt<A>(x, m * IN + i0 + cc, x_dt) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < T; ++mm) {
      const A xv = X[mm][io];
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] += Dy[mm][oo + 8 * j] * xv;
    }
    __syncthreads();
  }
  const int64_t i = i0 + io;
  for (int kg = 0; kg < K; kg += 8) {
    const int kn = K - kg < 8 ? K - kg : 8;
    A s[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      s[q] = 0;
      if (q < kn && i < IN) {
        const int64_t kb = static_cast<int64_t>(kg + q) * tau_kstride;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t o = o0 + oo + 8 * j;
          if (o < OUT) s[q] += g[j] * ld_dt<A>(tau, kb + o * IN + i, tau_dt);
        }
      }
    }
    block_sum8(s, kn, part + tile * K + kg);
  }
}

// ---------------------------------------------------------------------------------------------- entropy
template <class A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -INFINITY;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -static_cast<double>(INFINITY);
}

// Row statistics: max z, s = sum exp(z - max), t = sum exp(z - max) * (z - max); -inf entries skipped. fmax ignores
// a NaN entry, but its exp(z - max) makes s NaN (and a +inf max makes inf - inf = NaN).
template <class A>
__device__ void row_stats(const void* logits, int dt, int64_t row, int64_t C, A* sh, A& mx, A& s, A& t) {
  const int64_t b = row * C;
  A m = neg_inf<A>();
  for (int64_t j = threadIdx.x; j < C; j += kThreads) m = fmax(m, ld_dt<A>(logits, b + j, dt));
  mx = block_max(m, sh);
  A ls = 0, lt = 0;
  if (mx != neg_inf<A>()) {
    for (int64_t j = threadIdx.x; j < C; j += kThreads) {
      const A z = ld_dt<A>(logits, b + j, dt);
      if (z == neg_inf<A>()) continue;
      const A d = z - mx;
      const A e = exp(d);
      ls += e;
      lt += e * d;
    }
  }
  s = block_sum(ls, sh);
  t = block_sum(lt, sh);
}

template <class A>
__global__ void __launch_bounds__(kThreads) entropy_fwd_kernel(const void* logits, int dt, int64_t C, A* out) {
  __shared__ A sh[kWarps];
  A mx, s, t;
  row_stats<A>(logits, dt, blockIdx.x, C, sh, mx, s, t);
  // H = log s - E[z - max]. s > 0 fails for a row of only -inf (s = 0) and for a row with a NaN or a +inf (the NaN,
  // or inf - inf, makes s NaN): H = NaN there, as softmax of such a row is NaN.
  if (threadIdx.x == 0) out[blockIdx.x] = s > A(0) ? log(s) - t / s : static_cast<A>(NAN);
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    entropy_bwd_kernel(const A* __restrict__ grad, const void* logits, int dt, int64_t C, void* dlogits) {
  __shared__ A sh[kWarps];
  A mx, s, t;
  const int64_t row = blockIdx.x;
  row_stats<A>(logits, dt, row, C, sh, mx, s, t);
  const int64_t b = row * C;
  if (!(s > A(0))) {  // H is NaN (every entry -inf, or a NaN or +inf in the row): a NaN gradient in every entry
    for (int64_t j = threadIdx.x; j < C; j += kThreads) st_dt<A>(dlogits, b + j, dt, static_cast<A>(NAN));
    return;
  }
  const A logs = log(s);
  const A h = logs - t / s;
  const A gr = grad[row];
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const A z = ld_dt<A>(logits, b + j, dt);
    A v = 0;
    if (z != neg_inf<A>()) {
      const A logp = z - mx - logs;
      v = -gr * exp(logp) * (logp + h);
    }
    st_dt<A>(dlogits, b + j, dt, v);
  }
}

inline unsigned grid1(int64_t blocks) { return static_cast<unsigned>(blocks); }

// Items [c0, c0 + AMF_MANY_CHUNK) of a multi-tensor call as one by-value chunk, tile0 relative to its first item.
// Sets `first` to the call-wide tile the chunk starts at; returns the chunk's number of tiles of `tile_elems`.
template <class Chunk, class Item>
int64_t fill_chunk(Chunk& chunk, const Item* items, int n, int c0, int64_t tile_elems, int64_t& first) {
  memset(&chunk, 0, sizeof(chunk));
  chunk.n = n - c0 < AMF_MANY_CHUNK ? n - c0 : AMF_MANY_CHUNK;
  first = items[c0].tile0;
  for (int i = 0; i < chunk.n; ++i) {
    chunk.items[i] = items[c0 + i];
    chunk.items[i].tile0 -= first;
  }
  const Item& last = chunk.items[chunk.n - 1];
  return last.tile0 + (last.numel + tile_elems - 1) / tile_elems;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ launchers
extern "C" {

cudaError_t amf_merge_one(AmfMergeItem item, const double* coefs, int K, cudaStream_t stream) {
  const int64_t tiles = amf_merge_tiles(item.numel);
  if (tiles == 0) return cudaSuccess;
  item.tile0 = 0;
  merge_one_kernel<<<grid1(tiles), kThreads, 0, stream>>>(item, coefs, K);
  return cudaGetLastError();
}

cudaError_t amf_merge_many(const AmfMergeItem* items, int n, const double* coefs, int K, cudaStream_t stream) {
  for (int c0 = 0; c0 < n; c0 += AMF_MANY_CHUNK) {
    AmfMergeChunk chunk;
    int64_t first = 0;
    const int64_t tiles = fill_chunk(chunk, items, n, c0, AMF_MERGE_TILE, first);
    if (tiles > 0) merge_many_kernel<<<grid1(tiles), kThreads, 0, stream>>>(chunk, coefs, K);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t amf_dcoef_one(AmfDotItem item, int K, double* partials, double* out, cudaStream_t stream) {
  const int64_t tiles = amf_dot_tiles(item.numel);
  item.tile0 = 0;
  if (tiles > 0) dot_one_kernel<<<grid1(tiles), kThreads, 0, stream>>>(item, K, partials);
  reduce_rows(partials, tiles, K, out, stream);
  return cudaGetLastError();
}

cudaError_t amf_dcoef_many(const AmfDotItem* items, int n, int64_t total_tiles, int K, double* partials, double* out,
                           cudaStream_t stream) {
  (void)total_tiles;  // the partial-sum rows of item i start at items[i].tile0
  for (int c0 = 0; c0 < n; c0 += AMF_MANY_CHUNK) {
    AmfDotChunk chunk;
    int64_t first = 0;
    const int64_t tiles = fill_chunk(chunk, items, n, c0, AMF_DOT_TILE, first);
    if (tiles > 0) dot_many_kernel<<<grid1(tiles), kThreads, 0, stream>>>(chunk, first, K, partials);
    reduce_chunk_kernel<<<grid1(static_cast<int64_t>(chunk.n) * K), kThreads, 0, stream>>>(
        partials, chunk, first, K, out + static_cast<int64_t>(c0) * K);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t amf_merged_mm(const void* a, int a_dt, const void* w0, int w_dt, const void* tau, int tau_dt,
                          int64_t tau_kstride, const double* coefs, int K, int trans, const double* bias, void* c,
                          int c_dt, int64_t M, int64_t N, int64_t R, int acc_double, int splits, void* workspace,
                          cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (splits < 1 || workspace == nullptr) splits = 1;
  // slices of the reduction dimension, whole BR steps each
  const int64_t steps = (R + AMF_MM_BR - 1) / AMF_MM_BR;
  int64_t per = ((steps + splits - 1) / splits) * AMF_MM_BR;
  if (per == 0) per = AMF_MM_BR;
  const int64_t used = R == 0 ? 1 : (R + per - 1) / per;
  const dim3 grid(grid1((N + AMF_MM_BN - 1) / AMF_MM_BN), grid1((M + AMF_MM_BM - 1) / AMF_MM_BM),
                  grid1(used));
  const bool split = used > 1;
#define AMF_MM(A, TR)                                                                                       \
  merged_mm_kernel<A, TR><<<grid, kThreads, 0, stream>>>(a, a_dt, w0, w_dt, tau, tau_dt, tau_kstride, coefs, K, \
                                                         bias, c, c_dt, M, N, R, per,                         \
                                                         split ? static_cast<A*>(workspace) : nullptr)
  if (acc_double) {
    if (trans) AMF_MM(double, true);
    else AMF_MM(double, false);
  } else {
    if (trans) AMF_MM(float, true);
    else AMF_MM(float, false);
  }
#undef AMF_MM
  if (split) {
    int64_t blocks = (M * N + kThreads - 1) / kThreads;
    if (blocks > 65535) blocks = 65535;
    if (acc_double)
      split_sum_kernel<double><<<grid1(blocks), kThreads, 0, stream>>>(static_cast<const double*>(workspace),
                                                                       static_cast<int>(used), bias, c, c_dt, M, N);
    else
      split_sum_kernel<float><<<grid1(blocks), kThreads, 0, stream>>>(static_cast<const float*>(workspace),
                                                                      static_cast<int>(used), bias, c, c_dt, M, N);
  }
  return cudaGetLastError();
}

cudaError_t amf_dcoef_w(const void* dy, int dy_dt, const void* x, int x_dt, const void* tau, int tau_dt,
                        int64_t tau_kstride, int K, int64_t M, int64_t OUT, int64_t IN, int acc_double,
                        double* partials, double* out, cudaStream_t stream) {
  const int64_t tiles = amf_dcoef_w_tiles(OUT, IN);
  if (tiles > 0) {
    if (acc_double)
      dcoef_w_kernel<double><<<grid1(tiles), kThreads, 0, stream>>>(dy, dy_dt, x, x_dt, tau, tau_dt, tau_kstride, K,
                                                                    M, OUT, IN, partials);
    else
      dcoef_w_kernel<float><<<grid1(tiles), kThreads, 0, stream>>>(dy, dy_dt, x, x_dt, tau, tau_dt, tau_kstride, K,
                                                                   M, OUT, IN, partials);
  }
  reduce_rows(partials, tiles, K, out, stream);
  return cudaGetLastError();
}

cudaError_t amf_entropy_fwd(const void* logits, int dt, int64_t N, int64_t C, void* out, int acc_double,
                            cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (acc_double)
    entropy_fwd_kernel<double><<<grid1(N), kThreads, 0, stream>>>(logits, dt, C, static_cast<double*>(out));
  else
    entropy_fwd_kernel<float><<<grid1(N), kThreads, 0, stream>>>(logits, dt, C, static_cast<float*>(out));
  return cudaGetLastError();
}

cudaError_t amf_entropy_bwd(const void* grad, const void* logits, int dt, int64_t N, int64_t C, void* dlogits,
                            int acc_double, cudaStream_t stream) {
  if (N == 0 || C == 0) return cudaSuccess;
  if (acc_double)
    entropy_bwd_kernel<double><<<grid1(N), kThreads, 0, stream>>>(static_cast<const double*>(grad), logits, dt, C,
                                                                  dlogits);
  else
    entropy_bwd_kernel<float><<<grid1(N), kThreads, 0, stream>>>(static_cast<const float*>(grad), logits, dt, C,
                                                                 dlogits);
  return cudaGetLastError();
}

}  // extern "C"
