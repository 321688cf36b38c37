// CUDA implementations of the k_* ops: tensor checks, layout, dtype codes, then the plain-C launchers of
// kernels.cu on the current stream. Compiled only in a CUDA build (setup.py defines ADAMERGE_WITH_CUDA).
#ifdef ADAMERGE_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace amf {
namespace cuda {
namespace {

// merged_linear: batches that fit one row tile of the fused kernel run it (the weight tiles are merged in shared
// memory and read once); larger batches would re-read the K+1 weights once per row tile, so they merge the
// weight once into a scratch tensor and call the cuBLAS matmul instead.
constexpr int64_t FUSED_MAX_M = AMF_MM_BM;
constexpr int64_t SPLIT_WORKSPACE_MAX = int64_t(64) << 20;  // bytes

int dt_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return AMF_F32;
    case at::kDouble: return AMF_F64;
    case at::kHalf: return AMF_F16;
    case at::kBFloat16: return AMF_BF16;
    default: TORCH_CHECK(false, "adamerge_fast: unsupported dtype ", t);
  }
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

cudaStream_t cur_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int sm_count(const at::Device& dev) {
  static int cache[64] = {0};
  const int idx = dev.index() < 0 ? 0 : dev.index();
  if (idx < 64 && cache[idx] > 0) return cache[idx];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, idx) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 80;
  }
  if (idx < 64) cache[idx] = n;
  return n;
}

void check_cuda_float(const char* op, const std::string& name, const at::Tensor& t) {
  check_defined_float(op, name, t);
  check_device_type(op, name, t, at::kCUDA);
}


// ------------------------------------------------------------------------------------------ merge / dcoef
// One dcoef work item: K dot products of g with the slices of d, starting at tile tile0 of the launch.
AmfDotItem make_dot_item(const at::Tensor& g, const Stack& d, const at::Tensor& grad, const at::Tensor& deltas,
                         bool acc_double, int64_t tile0) {
  const int64_t esz = static_cast<int64_t>(d.t.element_size());
  AmfDotItem it;
  std::memset(&it, 0, sizeof(it));
  it.grad = g.const_data_ptr();
  it.delta0 = d.t.const_data_ptr();
  it.dstride = d.kstride;
  it.numel = g.numel();
  it.tile0 = tile0;
  it.grad_dt = dt_code(grad.scalar_type());
  it.delta_dt = dt_code(deltas.scalar_type());
  it.acc_double = acc_double;
  it.aligned = aligned16(it.grad) && aligned16(it.delta0) && (d.kstride * esz) % 16 == 0;
  return it;
}

// One merge work item: out <- b + sum_k coef[coef_off + k] * d[k], starting at tile tile0 of the launch.
AmfMergeItem make_merge_item(const at::Tensor& o, const at::Tensor& b, const Stack& d, const at::Tensor& base,
                             const at::Tensor& deltas, at::ScalarType coef_type, int64_t tile0, int64_t coef_off) {
  const int64_t esz = static_cast<int64_t>(d.t.element_size());
  AmfMergeItem it;
  std::memset(&it, 0, sizeof(it));
  it.out = o.data_ptr();
  it.base = b.const_data_ptr();
  it.delta0 = d.t.const_data_ptr();
  it.dstride = d.kstride;
  it.numel = b.numel();
  it.tile0 = tile0;
  it.coef_off = coef_off;
  it.base_dt = dt_code(base.scalar_type());
  it.delta_dt = dt_code(deltas.scalar_type());
  it.acc_double = acc_of({base.scalar_type(), deltas.scalar_type(), coef_type}) == at::kDouble;
  it.aligned = aligned16(it.out) && aligned16(it.base) && aligned16(it.delta0) && (d.kstride * esz) % 16 == 0;
  return it;
}

at::Tensor merge_impl(const char* op, const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coef,
                      const std::optional<at::Tensor>& out) {
  check_cuda_float(op, "base", base);
  check_defined_float(op, "deltas", deltas);
  check_defined_float(op, "coef", coef);
  check_device(op, "deltas", deltas, base.device(), "base");
  check_device(op, "coef", coef, base.device(), "base");
  const int64_t K = check_stack(op, "deltas", deltas, "base", base);
  check_coef(op, "coef", coef, K);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor o;
  if (out.has_value() && out->defined()) {
    check_out(op, "out", *out, base);
    o = *out;
  } else {
    o = at::empty(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (base.numel() == 0) return o;
  const at::Tensor b = base.contiguous();
  const Stack d = as_stack(deltas);
  const at::Tensor cd = coef.to(at::kDouble).contiguous();
  const AmfMergeItem it = make_merge_item(o, b, d, base, deltas, coef.scalar_type(), /*tile0=*/0, /*coef_off=*/0);
  check_launch(amf_merge_one(it, cd.const_data_ptr<double>(), static_cast<int>(K), cur_stream()), op);
  return o;
}

// [K] in the accumulation dtype of (grad, deltas)
at::Tensor dcoef_impl(const char* op, const at::Tensor& grad, const at::Tensor& deltas) {
  check_cuda_float(op, "grad", grad);
  check_defined_float(op, "deltas", deltas);
  check_device(op, "deltas", deltas, grad.device(), "grad");
  const int64_t K = check_stack(op, "deltas", deltas, "grad", grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType acc = acc_of({grad.scalar_type(), deltas.scalar_type()});
  const at::Tensor g = grad.contiguous();
  const Stack d = as_stack(deltas);
  const int64_t tiles = amf_dot_tiles(g.numel());
  const auto dopt = grad.options().dtype(at::kDouble);
  at::Tensor part = at::empty({amf_reduce_rows(tiles) * K}, dopt);
  at::Tensor res = at::empty({K}, dopt);
  const AmfDotItem it = make_dot_item(g, d, grad, deltas, acc == at::kDouble, /*tile0=*/0);
  check_launch(amf_dcoef_one(it, static_cast<int>(K), part.data_ptr<double>(), res.data_ptr<double>(), cur_stream()),
               op);
  return acc == at::kDouble ? res : res.to(acc);
}

at::Tensor k_merge_cuda(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coef,
                        const std::optional<at::Tensor>& out) {
  return merge_impl("k_merge", base, deltas, coef, out);
}

at::Tensor k_dcoef_cuda(const at::Tensor& grad, const at::Tensor& deltas) { return dcoef_impl("k_dcoef", grad, deltas); }

std::vector<at::Tensor> k_merge_many_cuda(at::TensorList bases, at::TensorList deltas, const at::Tensor& coefs,
                                          std::optional<at::TensorList> outs) {
  const char* op = "k_merge_many";
  const size_t n = bases.size();
  check_cuda_float(op, "coefs", coefs);
  const int64_t K = check_merge_many_args(op, bases, deltas, coefs, outs);
  const c10::cuda::CUDAGuard guard(coefs.device());
  std::vector<at::Tensor> res;
  res.reserve(n);
  std::vector<at::Tensor> keep;
  keep.reserve(2 * n);
  std::vector<AmfMergeItem> items;
  items.reserve(n);
  int64_t tiles = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string bn = idx("bases", i), dn = idx("deltas", i);
    check_defined_float(op, bn, bases[i]);
    check_defined_float(op, dn, deltas[i]);
    check_device(op, bn, bases[i], coefs.device(), "coefs");
    check_device(op, dn, deltas[i], coefs.device(), "coefs");
    const at::Tensor o = merge_many_item_out(op, i, bases[i], deltas[i], K, outs);
    res.push_back(o);
    if (bases[i].numel() == 0) continue;
    keep.push_back(bases[i].contiguous());
    const at::Tensor& b = keep.back();
    const Stack d = as_stack(deltas[i]);
    keep.push_back(d.t);
    const AmfMergeItem it =
        make_merge_item(o, b, d, bases[i], deltas[i], coefs.scalar_type(), tiles, static_cast<int64_t>(i) * K);
    items.push_back(it);
    tiles += amf_merge_tiles(it.numel);
  }
  if (items.empty()) return res;
  const at::Tensor cd = coefs.to(at::kDouble).contiguous();
  // the items travel as kernel parameters (amf_merge_many): nothing is copied to the device, capture-safe
  check_launch(amf_merge_many(items.data(), static_cast<int>(items.size()), cd.const_data_ptr<double>(),
                              static_cast<int>(K), cur_stream()),
               op);
  return res;
}

at::Tensor k_dcoef_many_cuda(at::TensorList grads, at::TensorList deltas) {
  const char* op = "k_dcoef_many";
  const size_t n = grads.size();
  TORCH_CHECK(deltas.size() == n, op, ": got ", n, " grads but ", deltas.size(), " deltas");
  TORCH_CHECK(n > 0, op, ": needs at least one tensor");
  for (size_t i = 0; i < n; ++i) {
    check_cuda_float(op, idx("grads", i), grads[i]);
    check_defined_float(op, idx("deltas", i), deltas[i]);
    check_device(op, idx("grads", i), grads[i], grads[0].device(), "grads[0]");
    check_device(op, idx("deltas", i), deltas[i], grads[0].device(), "grads[0]");
  }
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const int64_t K = check_stack(op, "deltas[0]", deltas[0], "grads[0]", grads[0]);
  at::ScalarType acc = at::kFloat;
  std::vector<at::Tensor> keep;
  keep.reserve(2 * n);
  std::vector<AmfDotItem> items;
  items.reserve(n);
  int64_t tiles = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType a = dcoef_many_item_check(op, i, grads[i], deltas[i], K);
    if (a == at::kDouble) acc = at::kDouble;
    keep.push_back(grads[i].contiguous());
    const at::Tensor& g = keep.back();
    const Stack d = as_stack(deltas[i]);
    keep.push_back(d.t);
    const AmfDotItem it = make_dot_item(g, d, grads[i], deltas[i], a == at::kDouble, tiles);
    items.push_back(it);
    tiles += amf_dot_tiles(it.numel);
  }
  const auto dopt = grads[0].options().dtype(at::kDouble);
  at::Tensor part = at::empty({std::max<int64_t>(tiles, 1) * K}, dopt);
  at::Tensor res = at::empty({static_cast<int64_t>(n), K}, dopt);
  // the items travel as kernel parameters (amf_dcoef_many): nothing is copied to the device, capture-safe
  check_launch(amf_dcoef_many(items.data(), static_cast<int>(n), tiles, static_cast<int>(K), part.data_ptr<double>(),
                              res.data_ptr<double>(), cur_stream()),
               op);
  return acc == at::kDouble ? res : res.to(acc);
}

// ------------------------------------------------------------------------------------------ merged linear
struct Linear {
  int64_t M, IN, OUT, K;
};

Linear check_linear(const char* op, const at::Tensor& x, const char* xname, const at::Tensor& w0,
                    const at::Tensor& tau_w, const at::Tensor& coef_w) {
  check_cuda_float(op, xname, x);
  check_defined_float(op, "w0", w0);
  check_defined_float(op, "tau_w", tau_w);
  check_defined_float(op, "coef_w", coef_w);
  check_device(op, "w0", w0, x.device(), xname);
  check_device(op, "tau_w", tau_w, x.device(), xname);
  check_device(op, "coef_w", coef_w, x.device(), xname);
  TORCH_CHECK(w0.dim() == 2, op, ": w0 must be [out, in], got ", shape_str(w0.sizes()));
  const int64_t K = check_stack(op, "tau_w", tau_w, "w0", w0);
  check_coef(op, "coef_w", coef_w, K);
  TORCH_CHECK(x.dim() == 2, op, ": ", xname, " must be 2-D, got ", shape_str(x.sizes()));
  return {x.size(0), w0.size(1), w0.size(0), K};
}

int choose_splits(int64_t M, int64_t N, int64_t R, bool dbl, const at::Device& dev) {
  const int64_t blocks = ((N + AMF_MM_BN - 1) / AMF_MM_BN) * ((M + AMF_MM_BM - 1) / AMF_MM_BM);
  const int64_t target = 2 * static_cast<int64_t>(sm_count(dev));
  const int64_t steps = (R + AMF_MM_BR - 1) / AMF_MM_BR;
  int64_t s = blocks >= target ? 1 : (target + blocks - 1) / blocks;
  s = std::min<int64_t>(s, std::max<int64_t>(steps, 1));
  s = std::min<int64_t>(s, 64);
  const int64_t per = M * N * (dbl ? 8 : 4);
  if (per > 0) s = std::min<int64_t>(s, std::max<int64_t>(SPLIT_WORKSPACE_MAX / per, 1));
  return static_cast<int>(std::max<int64_t>(s, 1));
}

// C[M, N] = A[M, R] @ B (B = merged weight, transposed when trans) + bias, on the fused kernel.
void fused_mm(const char* op, const at::Tensor& a, const at::Tensor& w0, const at::Tensor& tau_w,
              const at::Tensor& coef_w, bool trans, const at::Tensor& bias_d, at::Tensor& c, int64_t M, int64_t N,
              int64_t R, bool dbl) {
  const at::Tensor ac = a.contiguous();
  const at::Tensor wc = w0.contiguous();
  const Stack t = as_stack(tau_w);
  const at::Tensor cd = coef_w.to(at::kDouble).contiguous();
  const int splits = choose_splits(M, N, R, dbl, a.device());
  at::Tensor ws;
  if (splits > 1) ws = at::empty({static_cast<int64_t>(splits) * M * N}, a.options().dtype(dbl ? at::kDouble : at::kFloat));
  check_launch(amf_merged_mm(ac.const_data_ptr(), dt_code(a.scalar_type()), wc.const_data_ptr(),
                             dt_code(w0.scalar_type()), t.t.const_data_ptr(), dt_code(tau_w.scalar_type()), t.kstride,
                             cd.const_data_ptr<double>(), static_cast<int>(t.t.size(0)), trans ? 1 : 0,
                             bias_d.defined() ? bias_d.const_data_ptr<double>() : nullptr, c.data_ptr(),
                             dt_code(c.scalar_type()), M, N, R, dbl ? 1 : 0, splits,
                             ws.defined() ? ws.data_ptr() : nullptr, cur_stream()),
               op);
}

at::Tensor k_merged_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& tau_w,
                                    const at::Tensor& coef_w, const std::optional<at::Tensor>& b0,
                                    const std::optional<at::Tensor>& tau_b, const std::optional<at::Tensor>& coef_b) {
  const char* op = "k_merged_linear_fwd";
  const Linear L = check_linear(op, x, "x", w0, tau_w, coef_w);
  TORCH_CHECK(x.size(1) == L.IN, op, ": x must be [M, in=", L.IN, "], got ", shape_str(x.sizes()));
  const bool has_b0 = b0.has_value() && b0->defined();
  const bool has_tb = tau_b.has_value() && tau_b->defined();
  const bool has_cb = coef_b.has_value() && coef_b->defined();
  TORCH_CHECK(has_tb == has_cb, op, ": tau_b and coef_b must be given together");
  TORCH_CHECK(!has_tb || has_b0, op, ": tau_b given without b0");
  if (has_b0) {
    check_defined_float(op, "b0", *b0);
    check_device(op, "b0", *b0, x.device(), "x");
    TORCH_CHECK(b0->dim() == 1 && b0->size(0) == L.OUT, op, ": b0 must be [out=", L.OUT, "], got ",
                shape_str(b0->sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor b;  // the merged bias in b0's dtype
  if (has_b0) b = has_tb ? merge_impl(op, *b0, *tau_b, *coef_b, std::nullopt) : *b0;
  if (L.M > FUSED_MAX_M) {  // merge the weight once, then cuBLAS
    const at::Tensor w = merge_impl(op, w0, tau_w, coef_w, std::nullopt).to(x.scalar_type());
    return at::linear(x, w, has_b0 ? std::optional<at::Tensor>(b.to(x.scalar_type())) : std::nullopt);
  }
  const bool dbl = acc_of({x.scalar_type(), w0.scalar_type(), tau_w.scalar_type(), coef_w.scalar_type()}) ==
                   at::kDouble;
  at::Tensor bias_d;
  if (has_b0) bias_d = b.to(x.scalar_type()).to(at::kDouble).contiguous();  // as F.linear: bias in x.dtype
  at::Tensor y = at::empty({L.M, L.OUT}, x.options().memory_format(at::MemoryFormat::Contiguous));
  fused_mm(op, x, w0, tau_w, coef_w, /*trans=*/true, bias_d, y, L.M, L.OUT, L.IN, dbl);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_merged_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w0, const at::Tensor& tau_w, const at::Tensor& coef_w,
    const std::optional<at::Tensor>& tau_b, bool need_dx, bool need_dcoef_w, bool need_dcoef_b) {
  const char* op = "k_merged_linear_bwd";
  const Linear L = check_linear(op, x, "x", w0, tau_w, coef_w);
  TORCH_CHECK(x.size(1) == L.IN, op, ": x must be [M, in=", L.IN, "], got ", shape_str(x.sizes()));
  check_cuda_float(op, "dy", dy);
  check_device(op, "dy", dy, x.device(), "x");
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == L.M && dy.size(1) == L.OUT, op, ": dy must be [M=", L.M, ", out=", L.OUT,
              "], got ", shape_str(dy.sizes()));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = acc_of({w0.scalar_type(), x.scalar_type()});
  const at::Tensor empty = at::empty({0}, dy.options().dtype(acc));
  at::Tensor dx = empty, dcw = empty, dcb = empty;
  if (need_dx) {
    if (L.M > FUSED_MAX_M) {
      const at::Tensor w = merge_impl(op, w0, tau_w, coef_w, std::nullopt).to(dy.scalar_type());
      dx = at::matmul(dy, w).to(x.scalar_type());
    } else {
      const bool dbl = acc_of({dy.scalar_type(), w0.scalar_type(), tau_w.scalar_type(), coef_w.scalar_type()}) ==
                       at::kDouble;
      dx = at::empty({L.M, L.IN}, x.options().memory_format(at::MemoryFormat::Contiguous));
      fused_mm(op, dy, w0, tau_w, coef_w, /*trans=*/false, at::Tensor(), dx, L.M, L.IN, L.OUT, dbl);
    }
  }
  if (need_dcoef_w) {
    const bool dbl = acc_of({dy.scalar_type(), x.scalar_type(), w0.scalar_type(), tau_w.scalar_type()}) == at::kDouble;
    const at::Tensor dyc = dy.contiguous();
    const at::Tensor xc = x.contiguous();
    const Stack t = as_stack(tau_w);
    const int64_t tiles = amf_dcoef_w_tiles(L.OUT, L.IN);
    const auto dopt = x.options().dtype(at::kDouble);
    at::Tensor part = at::empty({amf_reduce_rows(tiles) * L.K}, dopt);
    at::Tensor res = at::empty({L.K}, dopt);
    check_launch(amf_dcoef_w(dyc.const_data_ptr(), dt_code(dy.scalar_type()), xc.const_data_ptr(),
                             dt_code(x.scalar_type()), t.t.const_data_ptr(), dt_code(tau_w.scalar_type()), t.kstride,
                             static_cast<int>(L.K), L.M, L.OUT, L.IN, dbl ? 1 : 0, part.data_ptr<double>(),
                             res.data_ptr<double>(), cur_stream()),
                 op);
    dcw = res.to(acc);
  }
  if (need_dcoef_b) {
    TORCH_CHECK(tau_b.has_value() && tau_b->defined(), op, ": need_dcoef_b requires tau_b");
    dcb = dcoef_impl(op, dy.to(acc).sum(0), *tau_b).to(acc);
  }
  return std::make_tuple(dx, dcw, dcb);
}

// ------------------------------------------------------------------------------------------------ entropy
at::Tensor k_entropy_fwd_cuda(const at::Tensor& logits) {
  const char* op = "k_entropy_fwd";
  check_cuda_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be [N, C] with C >= 1, got ",
              shape_str(logits.sizes()));
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = acc_of({logits.scalar_type()});
  const at::Tensor lc = logits.contiguous();
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(acc));
  check_launch(amf_entropy_fwd(lc.const_data_ptr(), dt_code(logits.scalar_type()), logits.size(0), logits.size(1),
                               out.data_ptr(), acc == at::kDouble, cur_stream()),
               op);
  return out;
}

at::Tensor k_entropy_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "k_entropy_bwd";
  check_cuda_float(op, "logits", logits);
  check_defined_float(op, "grad", grad);
  check_device(op, "grad", grad, logits.device(), "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be [N, C] with C >= 1, got ",
              shape_str(logits.sizes()));
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), op, ": grad must be [N=", logits.size(0), "], got ",
              shape_str(grad.sizes()));
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = acc_of({logits.scalar_type()});
  const at::Tensor lc = logits.contiguous();
  const at::Tensor g = grad.to(acc).contiguous();
  at::Tensor out = at::empty(lc.sizes(), lc.options());
  check_launch(amf_entropy_bwd(g.const_data_ptr(), lc.const_data_ptr(), dt_code(logits.scalar_type()), logits.size(0),
                               logits.size(1), out.data_ptr(), acc == at::kDouble, cur_stream()),
               op);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace amf

TORCH_LIBRARY_IMPL(adamerge_fast, CUDA, m) {
  m.impl("k_merge", &amf::cuda::k_merge_cuda);
  m.impl("k_dcoef", &amf::cuda::k_dcoef_cuda);
  m.impl("k_merge_many", &amf::cuda::k_merge_many_cuda);
  m.impl("k_dcoef_many", &amf::cuda::k_dcoef_many_cuda);
  m.impl("k_merged_linear_fwd", &amf::cuda::k_merged_linear_fwd_cuda);
  m.impl("k_merged_linear_bwd", &amf::cuda::k_merged_linear_bwd_cuda);
  m.impl("k_entropy_fwd", &amf::cuda::k_entropy_fwd_cuda);
  m.impl("k_entropy_bwd", &amf::cuda::k_entropy_bwd_cuda);
}

#endif  // ADAMERGE_WITH_CUDA
