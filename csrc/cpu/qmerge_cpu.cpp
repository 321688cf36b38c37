// CPU kernels of the ops over quantized task vectors (adamerge_fast/ops/quant.py):
//   k_merge_q(base, qdata, scales, zeros?, coef, bits, group_size, out?)   = base + sum_k coef[k] * deq_k
//   k_dcoef_q(grad, qdata, scales, zeros?, bits, group_size)              = [<grad, deq_k> for k]
//   k_merge_many_q / k_dcoef_many_q                                        = the same over lists, in one call
//   k_merge_dcoef_q(base, qdata, scales, zeros?, coef, grad, bits, gs)     = both in one pass (fp32 grad)
// deq_k is the dequantized task vector (int8: scale per row; int4: scale and zero point per group of group_size
// columns), computed inside the loops of qmerge_kernels.inc; nothing dense is written but the outputs.
//
// Work is cut into fixed units of at most QSEG elements (whole rows, or pieces of one long row) that OpenMP threads
// share; dcoef writes one slot of partial sums per (unit, task) and combines them in fp64 in unit order, so its
// result does not depend on the number of threads. Accumulation is fp32 (bases fp32/bf16/fp16): fp64 inputs are
// not handled here (the Python backend runs them on the reference functions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "merge_cpu.h"

namespace amf {
namespace cpu {
namespace {

constexpr int64_t QSEG = 1 << 15;  // elements per work unit (even: int4 pieces start on a byte)
constexpr int QMAXK = 8;           // partial-sum slots per work unit: the most tasks of one dot kernel call


QMergeFn pick_qmerge_isa(at::ScalarType b, int bits, int64_t K) {
#if AMF_CPU_AVX2
  if (use_avx2()) return avx2::pick_qmerge(b, bits, K);
#endif
  return base::pick_qmerge(b, bits, K);
}

QDotFn pick_qdot_isa(at::ScalarType g, int bits, int64_t K) {
#if AMF_CPU_AVX2
  if (use_avx2()) return avx2::pick_qdot(g, bits, K);
#endif
  return base::pick_qdot(g, bits, K);
}

QDotFn pick_qmerge_dot_isa(at::ScalarType b, int bits, int64_t K) {
#if AMF_CPU_AVX2
  if (use_avx2()) return avx2::pick_qmerge_dot(b, bits, K);
#endif
  return base::pick_qmerge_dot(b, bits, K);
}

// Tasks per dot kernel call (larger K: groups of this many): 8 where the loops of this ISA take eight tasks for
// these dtypes, else 4 (the generic int4 loop; qmerge_kernels.inc).
int dot_tasks(at::ScalarType g, int bits) { return pick_qdot_isa(g, bits, QMAXK) != nullptr ? QMAXK : 4; }

// ----------------------------------------------------------------------------------------------- work
struct QWork {
  int64_t item, r0, r1, c0, c1;
};

// The fixed work units of an [R, C] item (they depend on the shape only).
void add_units(std::vector<QWork>& w, int64_t item, int64_t R, int64_t C) {
  if (R == 0 || C == 0) return;
  if (C >= QSEG) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; c += QSEG) w.push_back({item, r, r + 1, c, std::min(c + QSEG, C)});
  } else {
    const int64_t rows = std::max<int64_t>(1, QSEG / C);
    for (int64_t r = 0; r < R; r += rows) w.push_back({item, r, std::min(r + rows, R), 0, C});
  }
}

void prefault(const QItem& it, const QWork& u) {
  if (!it.prefault) return;
  const int64_t b = u.r0 * it.C + u.c0, e = (u.r1 - 1) * it.C + u.c1;  // a contiguous range of the output
  touch_pages(static_cast<char*>(it.out) + b * it.out_esize, (e - b) * it.out_esize);
}

void run_qmerge(const std::vector<QItem>& items) {
  std::vector<QWork> work;
  int64_t bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    add_units(work, static_cast<int64_t>(i), items[i].R, items[i].C);
    bytes += items[i].R * items[i].C * items[i].bytes_per_elem;
  }
  const int64_t nw = static_cast<int64_t>(work.size());
  const int nt = threads_for(bytes);
  auto unit = [&](int64_t w) {
    const QWork& u = work[w];
    const QItem& it = items[u.item];
    prefault(it, u);
    it.merge(it, u.r0, u.r1, u.c0, u.c1);
  };
  if (items.size() == 1) {  // one tensor: one contiguous range per thread (streams stay sequential)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t w = 0; w < nw; ++w) unit(w);
  } else {  // many tensors of mixed sizes: balance dynamically (the result does not depend on the order)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t w = 0; w < nw; ++w) unit(w);
  }
}

// out[dest[i].first * K + dest[i].second + k] = dot of item i's task k (items hold at most QMAXK tasks each),
// summed over the work units in order (deterministic). Items with `out` set also write their merge (merge_dot).
void run_qdot(const std::vector<QItem>& items, const std::vector<std::pair<int64_t, int>>& dest, int64_t K,
              double* out) {
  std::vector<QWork> work;
  std::vector<int64_t> first(items.size() + 1, 0);
  int64_t bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    first[i] = static_cast<int64_t>(work.size());
    add_units(work, static_cast<int64_t>(i), items[i].R, items[i].C);
    bytes += items[i].R * items[i].C * items[i].bytes_per_elem;
  }
  first[items.size()] = static_cast<int64_t>(work.size());
  const int64_t nw = static_cast<int64_t>(work.size());
  std::vector<double> part(static_cast<size_t>(nw) * QMAXK, 0.0);
  const int nt = threads_for(bytes);
  // static: one contiguous range of units per thread (each unit's partial sums have a fixed slot: deterministic)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t w = 0; w < nw; ++w) {
    const QWork& u = work[w];
    const QItem& it = items[u.item];
    if (it.out != nullptr) prefault(it, u);
    it.dot(it, u.r0, u.r1, u.c0, u.c1, part.data() + w * QMAXK);
  }
  for (size_t i = 0; i < items.size(); ++i)
    for (int k = 0; k < items[i].K; ++k) {
      double s = 0.0;
      for (int64_t w = first[i]; w < first[i + 1]; ++w) s += part[w * QMAXK + k];
      out[dest[i].first * K + dest[i].second + k] = s;
    }
}

// ---------------------------------------------------------------------------------------------- checks
// One quantized stack as the kernels read it (contiguous copies where a slice was not contiguous, kept alive here).
struct QStack {
  at::Tensor q, s, z;
  int64_t K = 0, R = 0, C = 0, G = 1, gs = 0;
  int bits = 8;
};

std::string shape_of(int64_t a, int64_t b, int64_t c = -1) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + (c >= 0 ? ", " + std::to_string(c) : "") + "]";
}

at::Tensor slices_dense(const at::Tensor& t) { return slices_contiguous(t) ? t : t.contiguous(); }

// qdata/scales/zeros of a stack over `like` (base or grad, shape S): formats, dtypes, shapes, CPU.
QStack check_qstack(const char* op, const std::string& pre, const at::Tensor& like, const at::Tensor& qdata,
                    const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t bits, int64_t gs) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  QStack st;
  st.bits = static_cast<int>(bits);
  st.R = like.dim() <= 1 ? 1 : like.size(0);  // the [R, C] view of S (ops/quant.py: rows_cols)
  st.C = like.dim() == 0 ? 1 : like.dim() == 1 ? like.size(0) : 1;
  for (int64_t d = 1; d < like.dim(); ++d) st.C *= like.size(d);
  for (const auto& [name, t] : {std::pair<std::string, const at::Tensor*>{"qdata", &qdata}, {"scales", &scales}}) {
    TORCH_CHECK(t->defined(), op, ": ", pre, name, " is an undefined tensor");
    check_device_type(op, pre + name, *t, at::kCPU);
  }
  TORCH_CHECK(qdata.dim() == 3 && qdata.size(0) >= 1, op, ": ", pre, "qdata must be [K, R, *] with K >= 1, got ",
              shape_str(qdata.sizes()));
  st.K = qdata.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": ", pre, "scales must be float32, got ", scales.scalar_type());
  if (bits == 8) {
    TORCH_CHECK(gs == 0, op, ": int8 task vectors have one scale per row (group_size 0), got group_size=", gs);
    TORCH_CHECK(qdata.scalar_type() == at::kChar, op, ": ", pre, "qdata must be int8 for bits=8, got ",
                qdata.scalar_type());
    TORCH_CHECK(qdata.sizes() == at::IntArrayRef({st.K, st.R, st.C}), op, ": ", pre, "qdata must have shape ",
                shape_of(st.K, st.R, st.C), " for a base of shape ", shape_str(like.sizes()), ", got ",
                shape_str(qdata.sizes()));
    TORCH_CHECK(scales.sizes() == at::IntArrayRef({st.K, st.R}), op, ": ", pre, "scales must have shape ",
                shape_of(st.K, st.R), ", got ", shape_str(scales.sizes()));
    TORCH_CHECK(!(zeros.has_value() && zeros->defined()), op, ": ", pre, "int8 task vectors have no zero points");
  } else {
    TORCH_CHECK(gs >= 2 && gs % 2 == 0, op, ": int4 group_size must be even and >= 2, got ", gs);
    TORCH_CHECK(qdata.scalar_type() == at::kByte, op, ": ", pre, "qdata must be uint8 for bits=4, got ",
                qdata.scalar_type());
    st.gs = gs;
    st.G = (st.C + gs - 1) / gs;
    TORCH_CHECK(qdata.sizes() == at::IntArrayRef({st.K, st.R, (st.C + 1) / 2}), op, ": ", pre,
                "qdata must have shape ", shape_of(st.K, st.R, (st.C + 1) / 2), " for a base of shape ",
                shape_str(like.sizes()), ", got ", shape_str(qdata.sizes()));
    TORCH_CHECK(scales.sizes() == at::IntArrayRef({st.K, st.R, st.G}), op, ": ", pre, "scales must have shape ",
                shape_of(st.K, st.R, st.G), ", got ", shape_str(scales.sizes()));
    TORCH_CHECK(zeros.has_value() && zeros->defined(), op, ": ", pre, "int4 task vectors need zero points");
    check_device_type(op, pre + "zeros", *zeros, at::kCPU);
    TORCH_CHECK(zeros->scalar_type() == at::kByte, op, ": ", pre, "zeros must be uint8, got ", zeros->scalar_type());
    TORCH_CHECK(zeros->sizes() == scales.sizes(), op, ": ", pre, "zeros must have shape ", shape_of(st.K, st.R, st.G),
                ", got ", shape_str(zeros->sizes()));
    st.z = slices_dense(*zeros);
  }
  st.q = slices_dense(qdata);
  st.s = slices_dense(scales);
  return st;
}

void check_base(const char* op, const std::string& name, const at::Tensor& t) {
  check_defined_float(op, name, t);
  check_device_type(op, name, t, at::kCPU);
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": ", name,
              " must be float32/bfloat16/float16 (float64 runs on the reference backend)");
}

// The item of `st` over the contiguous `base_or_grad` (and out, cf, fns set by the caller).
QItem qitem(const QStack& st, const at::Tensor& b) {
  QItem it{};
  it.base = b.const_data_ptr();
  it.q0 = static_cast<const char*>(st.q.const_data_ptr());
  it.qk = st.q.stride(0) * st.q.element_size();
  it.qrow = st.q.size(2) * st.q.element_size();
  it.s0 = st.s.const_data_ptr<float>();
  it.sk = st.s.stride(0);
  it.z0 = st.bits == 4 ? st.z.const_data_ptr<uint8_t>() : nullptr;
  it.zk = st.bits == 4 ? st.z.stride(0) : 0;
  it.R = st.R;
  it.C = st.C;
  it.G = st.G;
  it.gs = st.gs;
  it.K = static_cast<int>(st.K);
  const int64_t qbytes = st.bits == 8 ? 2 : 1;  // per element of the K task vectors: 1 byte (int8), 1/2 (int4)
  it.bytes_per_elem = static_cast<int>(2 * b.element_size() + (st.K * qbytes + 1) / 2);
  return it;
}

// The task group [k0, k0 + n) of `it` (n <= QMAXK): its parts advanced to task k0.
QItem task_group(QItem it, int k0, int n) {
  it.q0 += k0 * it.qk;
  it.s0 += k0 * it.sk;
  if (it.z0 != nullptr) it.z0 += k0 * it.zk;
  it.cf = it.cf == nullptr ? nullptr : it.cf + k0;
  it.K = n;
  return it;
}

// ---------------------------------------------------------------------------------------------- bindings
at::Tensor k_merge_q_cpu(const at::Tensor& base, const at::Tensor& qdata, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, const at::Tensor& coef, int64_t bits,
                         int64_t group_size, const std::optional<at::Tensor>& out) {
  const char* op = "k_merge_q";
  check_base(op, "base", base);
  check_defined_float(op, "coef", coef);
  check_device_type(op, "coef", coef, at::kCPU);
  const QStack st = check_qstack(op, "", base, qdata, scales, zeros, bits, group_size);
  check_coef(op, "coef", coef, st.K);
  bool fresh = false;
  const at::Tensor o = out_or_new(op, out, base, fresh);
  if (base.numel() == 0) return o;
  const at::Tensor b = base.contiguous();
  const at::Tensor cf = coef.to(at::kFloat).contiguous();
  QItem it = qitem(st, b);
  it.out = o.data_ptr();
  it.out_esize = static_cast<int>(o.element_size());
  it.prefault = fresh;
  it.cf = cf.const_data_ptr<float>();
  it.merge = pick_qmerge_isa(base.scalar_type(), st.bits, st.K);
  run_qmerge({it});
  return o;
}

// Items of <g, deq_k> for every task k of `st`, in groups of QMAXK tasks, with their destinations.
void dot_items(const QStack& st, const at::Tensor& g, int64_t row, std::vector<QItem>& items,
               std::vector<std::pair<int64_t, int>>& dest) {
  QItem it = qitem(st, g);
  it.bytes_per_elem = static_cast<int>(g.element_size() + (st.K * (st.bits == 8 ? 2 : 1) + 1) / 2);
  const int step = dot_tasks(g.scalar_type(), st.bits);
  for (int k0 = 0; k0 < st.K; k0 += step) {
    const int n = static_cast<int>(std::min<int64_t>(step, st.K - k0));
    QItem t = task_group(it, k0, n);
    t.dot = pick_qdot_isa(g.scalar_type(), st.bits, n);
    items.push_back(t);
    dest.emplace_back(row, k0);
  }
}

at::Tensor k_dcoef_q_cpu(const at::Tensor& grad, const at::Tensor& qdata, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  const char* op = "k_dcoef_q";
  check_base(op, "grad", grad);
  const QStack st = check_qstack(op, "", grad, qdata, scales, zeros, bits, group_size);
  at::Tensor res = at::zeros({st.K}, grad.options().dtype(at::kDouble));
  if (grad.numel() == 0) return res.to(at::kFloat);
  const at::Tensor g = grad.contiguous();
  std::vector<QItem> items;
  std::vector<std::pair<int64_t, int>> dest;
  dot_items(st, g, 0, items, dest);
  run_qdot(items, dest, st.K, res.data_ptr<double>());
  return res.to(at::kFloat);
}

// (k_merge_q(...), k_dcoef_q(grad, ...)) reading the task vectors once (fp32 grad; K <= 8 for int8, <= 4 for
// int4); otherwise the two ops.
std::tuple<at::Tensor, at::Tensor> k_merge_dcoef_q_cpu(const at::Tensor& base, const at::Tensor& qdata,
                                                       const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                                       const at::Tensor& coef, const at::Tensor& grad, int64_t bits,
                                                       int64_t group_size) {
  const char* op = "k_merge_dcoef_q";
  check_base(op, "base", base);
  check_base(op, "grad", grad);
  check_defined_float(op, "coef", coef);
  check_device_type(op, "coef", coef, at::kCPU);
  TORCH_CHECK(grad.sizes() == base.sizes(), op, ": grad must have the shape of base ", shape_str(base.sizes()),
              ", got ", shape_str(grad.sizes()));
  const QStack st = check_qstack(op, "", base, qdata, scales, zeros, bits, group_size);
  check_coef(op, "coef", coef, st.K);
  const QDotFn fn = grad.scalar_type() == at::kFloat ? pick_qmerge_dot_isa(base.scalar_type(), st.bits, st.K) : nullptr;
  if (fn == nullptr || base.numel() == 0)
    return {k_merge_q_cpu(base, qdata, scales, zeros, coef, bits, group_size, std::nullopt),
            k_dcoef_q_cpu(grad, qdata, scales, zeros, bits, group_size)};
  at::Tensor o = at::empty(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor res = at::zeros({st.K}, base.options().dtype(at::kDouble));
  const at::Tensor b = base.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor cf = coef.to(at::kFloat).contiguous();
  QItem it = qitem(st, b);
  it.g = g.const_data_ptr<float>();
  it.out = o.data_ptr();
  it.out_esize = static_cast<int>(o.element_size());
  it.prefault = true;
  it.cf = cf.const_data_ptr<float>();
  it.bytes_per_elem += 4;
  it.dot = fn;
  const std::vector<std::pair<int64_t, int>> dest{{0, 0}};
  run_qdot(std::vector<QItem>{it}, dest, st.K, res.data_ptr<double>());
  return {o, res.to(at::kFloat)};
}

std::optional<at::Tensor> zeros_at(const c10::List<std::optional<at::Tensor>>& zeros, size_t i) {
  if (zeros.size() == 0) return std::nullopt;
  return zeros.get(i);
}

std::vector<at::Tensor> k_merge_many_q_cpu(at::TensorList bases, at::TensorList qdatas, at::TensorList scales,
                                           const c10::List<std::optional<at::Tensor>>& zeros, const at::Tensor& coefs,
                                           int64_t bits, int64_t group_size, std::optional<at::TensorList> outs) {
  const char* op = "k_merge_many_q";
  const size_t n = bases.size();
  TORCH_CHECK(qdatas.size() == n && scales.size() == n, op, ": got ", n, " bases but ", qdatas.size(), " qdata and ",
              scales.size(), " scales");
  TORCH_CHECK(zeros.size() == 0 || zeros.size() == n, op,
              ": zeros must be empty (int8) or hold one tensor per base, got ", zeros.size());
  check_defined_float(op, "coefs", coefs);
  check_device_type(op, "coefs", coefs, at::kCPU);
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == static_cast<int64_t>(n), op, ": coefs must have shape [n=", n,
              ", K], got ", shape_str(coefs.sizes()));
  if (outs.has_value())
    TORCH_CHECK(outs->size() == n, op, ": outs must hold one tensor per base (", n, "), got ", outs->size());
  const int64_t K = coefs.size(1);
  const at::Tensor cf = coefs.to(at::kFloat).contiguous();
  std::vector<at::Tensor> res, keep;
  std::vector<QStack> stacks;
  stacks.reserve(n);
  keep.reserve(n);
  std::vector<QItem> items;
  for (size_t i = 0; i < n; ++i) {
    const std::string bn = idx("bases", i), pre = idx("", i) + ": ";
    check_base(op, bn, bases[i]);
    stacks.push_back(check_qstack(op, "item " + pre, bases[i], qdatas[i], scales[i], zeros_at(zeros, i), bits,
                                  group_size));
    const QStack& st = stacks.back();
    TORCH_CHECK(st.K == K, op, ": item ", i, " holds K=", st.K, " task vectors but coefs has K=", K, " columns");
    at::Tensor o;
    if (outs.has_value()) {
      check_out(op, idx("outs", i), (*outs)[i], bases[i]);
      o = (*outs)[i];
    } else {
      o = at::empty(bases[i].sizes(), bases[i].options().memory_format(at::MemoryFormat::Contiguous));
    }
    res.push_back(o);
    if (bases[i].numel() == 0) continue;
    keep.push_back(bases[i].contiguous());
    QItem it = qitem(st, keep.back());
    it.out = o.data_ptr();
    it.out_esize = static_cast<int>(o.element_size());
    it.prefault = !outs.has_value();
    it.cf = cf.const_data_ptr<float>() + i * K;
    it.merge = pick_qmerge_isa(bases[i].scalar_type(), st.bits, K);
    items.push_back(it);
  }
  if (!items.empty()) run_qmerge(items);
  return res;
}

at::Tensor k_dcoef_many_q_cpu(at::TensorList grads, at::TensorList qdatas, at::TensorList scales,
                              const c10::List<std::optional<at::Tensor>>& zeros, int64_t bits, int64_t group_size) {
  const char* op = "k_dcoef_many_q";
  const size_t n = grads.size();
  TORCH_CHECK(qdatas.size() == n && scales.size() == n, op, ": got ", n, " grads but ", qdatas.size(), " qdata and ",
              scales.size(), " scales");
  TORCH_CHECK(zeros.size() == 0 || zeros.size() == n, op,
              ": zeros must be empty (int8) or hold one tensor per grad, got ", zeros.size());
  if (n == 0) return at::empty({0, 0}, at::TensorOptions().dtype(at::kFloat));
  std::vector<QStack> stacks;
  stacks.reserve(n);
  std::vector<at::Tensor> keep;
  keep.reserve(n);
  std::vector<QItem> items;
  std::vector<std::pair<int64_t, int>> dest;
  int64_t K = -1;
  for (size_t i = 0; i < n; ++i) {
    check_base(op, idx("grads", i), grads[i]);
    stacks.push_back(check_qstack(op, "item " + idx("", i) + ": ", grads[i], qdatas[i], scales[i], zeros_at(zeros, i),
                                  bits, group_size));
    const QStack& st = stacks.back();
    if (K < 0) K = st.K;
    TORCH_CHECK(st.K == K, op, ": item ", i, " holds K=", st.K, " task vectors but item 0 holds K=", K);
    keep.push_back(grads[i].contiguous());
    if (grads[i].numel() > 0) dot_items(st, keep.back(), static_cast<int64_t>(i), items, dest);
  }
  at::Tensor res = at::zeros({static_cast<int64_t>(n), K}, grads[0].options().dtype(at::kDouble));
  run_qdot(items, dest, K, res.data_ptr<double>());
  return res.to(at::kFloat);
}

}  // namespace
}  // namespace cpu
}  // namespace amf

TORCH_LIBRARY_IMPL(adamerge_fast, CPU, m) {
  m.impl("k_merge_q", &amf::cpu::k_merge_q_cpu);
  m.impl("k_dcoef_q", &amf::cpu::k_dcoef_q_cpu);
  m.impl("k_merge_many_q", &amf::cpu::k_merge_many_q_cpu);
  m.impl("k_dcoef_many_q", &amf::cpu::k_dcoef_many_q_cpu);
  m.impl("k_merge_dcoef_q", &amf::cpu::k_merge_dcoef_q_cpu);
}
