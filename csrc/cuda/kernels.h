/* CUDA kernels of adamerge_fast: plain C launchers over raw pointers (no torch headers; see
 * bindings_cuda.cpp for the tensor checks and the torch.ops registration).
 *
 * Conventions: dtype codes AMF_*; every launcher enqueues on `stream` and returns cudaGetLastError() of its
 * launches (cudaSuccess when nothing had to run). Accumulation is float, or double when acc_double != 0.
 * Task-vector stacks are K slices of `numel` contiguous elements, slice k at delta0 + k * dstride elements.
 * Reductions are deterministic: fixed tiles, per-tile partial sums in double, combined in tile order by a
 * second kernel.
 */
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { AMF_F32 = 0, AMF_F64 = 1, AMF_F16 = 2, AMF_BF16 = 3 };

/* ------------------------------------------------------------------------------------------------- merge */
#define AMF_MERGE_TILE 2048 /* elements per block: 256 threads x 8 */

/* out[i] = base[i] + sum_k coefs[coef_off + k] * delta0[k * dstride + i] for i < numel, in base's dtype. */
typedef struct AmfMergeItem {
  void* out;
  const void* base;
  const void* delta0;
  int64_t dstride;  /* elements between task-vector slices */
  int64_t numel;
  int64_t tile0;    /* first tile of this item in a merge_many launch (prefix sum of tiles); 0 for one */
  int64_t coef_off; /* offset of this item's K coefficients (double) */
  int32_t base_dt;  /* dtype of base and out */
  int32_t delta_dt;
  int32_t acc_double;
  int32_t aligned; /* out, base, delta0 16-byte aligned and dstride * element size a multiple of 16 */
} AmfMergeItem;

static inline int64_t amf_merge_tiles(int64_t numel) { return (numel + AMF_MERGE_TILE - 1) / AMF_MERGE_TILE; }

/* One tensor: coefs is a device array of K doubles. */
cudaError_t amf_merge_one(AmfMergeItem item, const double* coefs, int K, cudaStream_t stream);

/* Many tensors, one launch per AMF_MANY_CHUNK of them: items is a HOST array of n items whose tile0 is the running
 * sum of the tiles before them; coefs a device array of n*K doubles. The items travel as a kernel parameter
 * (by value, no device table and no host-to-device copy), so the launches can be captured into a CUDA graph. */
#define AMF_MANY_CHUNK 40 /* items per launch: 40 x 72 bytes of parameters, under the 4 KB kernel-parameter limit */

typedef struct AmfMergeChunk {
  AmfMergeItem items[AMF_MANY_CHUNK]; /* tile0 relative to the chunk's first item */
  int32_t n;
} AmfMergeChunk;

cudaError_t amf_merge_many(const AmfMergeItem* items, int n, const double* coefs, int K, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------- dcoef */
#define AMF_DOT_TILE 8192 /* elements per block: 256 threads x 8 x 4 */

/* out[k] = <grad, delta0[k * dstride : k * dstride + numel]> */
typedef struct AmfDotItem {
  const void* grad;
  const void* delta0;
  int64_t dstride;
  int64_t numel;
  int64_t tile0; /* first tile (row of the partial-sum table) of this item */
  int32_t grad_dt;
  int32_t delta_dt;
  int32_t acc_double;
  int32_t aligned; /* grad, delta0 16-byte aligned and dstride * element size a multiple of 16 */
} AmfDotItem;

static inline int64_t amf_dot_tiles(int64_t numel) { return (numel + AMF_DOT_TILE - 1) / AMF_DOT_TILE; }

/* The per-tile partial sums of one output are reduced in two levels when there are more than AMF_REDUCE_CHUNK
 * tiles (chunks of AMF_REDUCE_CHUNK rows in parallel, then the chunk sums; fixed order): the scratch holds the
 * tiles' rows and the chunks' rows. amf_reduce_rows(tiles) rows of K doubles, at least 1. */
#define AMF_REDUCE_CHUNK 2048

static inline int64_t amf_reduce_rows(int64_t tiles) {
  const int64_t chunks = tiles > AMF_REDUCE_CHUNK ? (tiles + AMF_REDUCE_CHUNK - 1) / AMF_REDUCE_CHUNK : 0;
  return tiles + chunks > 0 ? tiles + chunks : 1;
}

/* partials: device scratch of amf_reduce_rows(tiles) * K doubles; out: device array of K doubles. */
cudaError_t amf_dcoef_one(AmfDotItem item, int K, double* partials, double* out, cudaStream_t stream);

typedef struct AmfDotChunk {
  AmfDotItem items[AMF_MANY_CHUNK]; /* tile0 relative to the chunk's first item */
  int32_t n;
} AmfDotChunk;

/* items: HOST array of n items, tile0 the running sum of the tiles before them (as for amf_merge_many, one launch
 * pair per AMF_MANY_CHUNK items, the items passed by value); partials: max(1, total_tiles) * K doubles;
 * out: n * K doubles (row i = item i). */
cudaError_t amf_dcoef_many(const AmfDotItem* items, int n, int64_t total_tiles, int K, double* partials, double* out,
                           cudaStream_t stream);

/* ----------------------------------------------------------------------------------------- merged matmul */
/* C[M, N] = A[M, R] @ B[R, N] (+ bias[N]) where B is the merged weight W = w0 + sum_k coefs[k] * tau[k]:
 *   trans = 1 (forward, y = x W^T):  W is [N, R] row-major, B[r, n] = W[n, r]
 *   trans = 0 (backward, dx = dy W): W is [R, N] row-major, B[r, n] = W[r, n]
 * The weight tiles are merged in shared memory and never written out. `splits` > 1 cuts R into that many
 * slices (more blocks for small M); then `workspace` (splits * M * N accumulators, float or double) holds
 * the partial products and a second kernel sums them in slice order. bias: device doubles or NULL. */
#define AMF_MM_BM 16
#define AMF_MM_BN 64
#define AMF_MM_BR 32

cudaError_t amf_merged_mm(const void* a, int a_dt, const void* w0, int w_dt, const void* tau, int tau_dt,
                          int64_t tau_kstride, const double* coefs, int K, int trans, const double* bias, void* c,
                          int c_dt, int64_t M, int64_t N, int64_t R, int acc_double, int splits, void* workspace,
                          cudaStream_t stream);

/* --------------------------------------------------------------------------------------------- dcoef_w */
/* out[k] = <dy^T x, tau[k]> = sum_{o,i} (sum_m dy[m,o] x[m,i]) tau[k,o,i], without forming dy^T x in memory:
 * each block computes a 32x32 tile of dy^T x and reduces it against the K tau tiles (partials per tile).
 * dy [M, OUT], x [M, IN], tau slices [OUT, IN]; partials: amf_reduce_rows(tiles) * K doubles; out: K doubles. */
#define AMF_DW_TILE 32

static inline int64_t amf_dcoef_w_tiles(int64_t OUT, int64_t IN) {
  return ((OUT + AMF_DW_TILE - 1) / AMF_DW_TILE) * ((IN + AMF_DW_TILE - 1) / AMF_DW_TILE);
}

cudaError_t amf_dcoef_w(const void* dy, int dy_dt, const void* x, int x_dt, const void* tau, int tau_dt,
                        int64_t tau_kstride, int K, int64_t M, int64_t OUT, int64_t IN, int acc_double,
                        double* partials, double* out, cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------- entropy */
/* out[n] = -sum_c p log p over row n of logits [N, C] (p = softmax), written as float or double (acc);
 * -inf logits contribute 0; a row of only -inf gives 0. */
cudaError_t amf_entropy_fwd(const void* logits, int dt, int64_t N, int64_t C, void* out, int acc_double,
                            cudaStream_t stream);

/* dlogits[n, c] = grad[n] * (-p (log p + H)) in the logits dtype; grad: N values in the acc dtype. */
cudaError_t amf_entropy_bwd(const void* grad, const void* logits, int dt, int64_t N, int64_t C, void* dlogits,
                            int acc_double, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
