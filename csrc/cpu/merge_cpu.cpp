// CPU kernels of the k_merge / k_dcoef / k_merge_many / k_dcoef_many ops.
//
// The loops themselves are in merge_kernels.inc (see there), compiled twice: the baseline copy here and an
// AVX2 copy in merge_cpu_avx2.cpp, picked at run time. This file holds the drivers and the torch bindings.
//
// Threads: work is cut into fixed chunks (CHUNK elements for merge, DCHUNK for dcoef) that OpenMP threads
// share, with at least BYTES_PER_THREAD of memory traffic per thread. dcoef writes one fixed slot of partial
// sums per (chunk, k) and combines the slots in fp64 in chunk order, so its result is bitwise the same
// whatever the number of threads or their scheduling; merge is elementwise and deterministic anyway.
// Outputs come from at::empty (torch's allocator; THP_MEM_ALLOC_ENABLE=1 makes it use huge pages).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "merge_cpu.h"

#define AMF_ISA base
#include "merge_kernels.inc"
#include "qmerge_kernels.inc"
#undef AMF_ISA

namespace amf {
namespace cpu {
namespace {

constexpr int64_t CHUNK = 1 << 16;   // merge: elements per work item
constexpr int64_t DCHUNK = 1 << 15;  // dcoef: elements per work item (one set of partial sums each)

// ------------------------------------------------------------------------------------ instruction set
enum class Isa { base, avx2 };

Isa detect_isa() {
  const char* env = std::getenv("ADAMERGE_CPU_ISA");  // "base" forces the baseline copy (tests, comparisons)
  if (env != nullptr && std::string(env) == "base") return Isa::base;
#if AMF_CPU_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

std::string isa_name() { return isa() == Isa::avx2 ? "avx2" : "base"; }

MergeFn pick_merge(at::ScalarType b, at::ScalarType d, bool dbl, int64_t K) {
#if AMF_CPU_AVX2
  if (isa() == Isa::avx2) return avx2::pick_merge(b, d, dbl, K);
#endif
  return base::pick_merge(b, d, dbl, K);
}

DotFn pick_dot(at::ScalarType g, at::ScalarType d, bool dbl, int64_t K) {
#if AMF_CPU_AVX2
  if (isa() == Isa::avx2) return avx2::pick_dot(g, d, dbl, K);
#endif
  return base::pick_dot(g, d, dbl, K);
}

MergeDotFn pick_merge_dot(at::ScalarType b, at::ScalarType d, int64_t K) {
#if AMF_CPU_AVX2
  if (isa() == Isa::avx2) return avx2::pick_merge_dot(b, d, K);
#endif
  return base::pick_merge_dot(b, d, K);
}

// ------------------------------------------------------------------------------------------- drivers
struct Work {
  int64_t item;
  int64_t b, e;
};

inline void merge_chunk(const MergeItem& it, int64_t b, int64_t e) {
  if (it.prefault) touch_pages(static_cast<char*>(it.out) + b * it.out_esize, (e - b) * it.out_esize);
  it.fn(it, b, e);
}

void run_merge(const std::vector<MergeItem>& items) {
  std::vector<Work> work;
  int64_t bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    bytes += items[i].numel * items[i].bytes_per_elem;
    for (int64_t b = 0; b < items[i].numel; b += CHUNK)
      work.push_back({static_cast<int64_t>(i), b, std::min(b + CHUNK, items[i].numel)});
  }
  const int64_t nw = static_cast<int64_t>(work.size());
  const int nt = threads_for(bytes);
  if (items.size() == 1) {  // one tensor: one contiguous range per thread (streams stay sequential)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t w = 0; w < nw; ++w) merge_chunk(items[work[w].item], work[w].b, work[w].e);
  } else {  // many tensors of mixed sizes: balance dynamically (the result does not depend on the order)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t w = 0; w < nw; ++w) merge_chunk(items[work[w].item], work[w].b, work[w].e);
  }
}

// out[i*K + k] = <grad_i, deltas_i[k]>, summed in fp64 over fixed chunks in chunk order (deterministic).
void run_dot(std::vector<DotItem>& items, int K, double* out) {
  std::vector<Work> work;
  int64_t bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].part0 = static_cast<int64_t>(work.size());
    bytes += items[i].numel * items[i].bytes_per_elem;
    for (int64_t b = 0; b < items[i].numel; b += DCHUNK)
      work.push_back({static_cast<int64_t>(i), b, std::min(b + DCHUNK, items[i].numel)});
  }
  const int64_t nw = static_cast<int64_t>(work.size());
  std::vector<double> part(static_cast<size_t>(nw) * K);
  const int nt = threads_for(bytes);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t w = 0; w < nw; ++w) {
    const DotItem& it = items[work[w].item];
    it.fn(it, work[w].b, work[w].e, part.data() + w * K);
  }
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t p0 = items[i].part0;
    const int64_t p1 = i + 1 < items.size() ? items[i + 1].part0 : nw;
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t p = p0; p < p1; ++p) s += part[p * K + k];
      out[i * K + k] = s;
    }
  }
}

// merge of `it` and out[k] = <g, deltas[k]> in one pass: fixed chunks of DCHUNK elements (as run_dot, so the
// dot products are deterministic), one contiguous range of chunks per thread.
void run_merge_dot(const MergeItem& it, const float* g, MergeDotFn fn, double* out) {
  const int K = it.K;
  const int64_t nw = (it.numel + DCHUNK - 1) / DCHUNK;
  std::vector<double> part(static_cast<size_t>(nw) * K);
  const int nt = threads_for(it.numel * (it.bytes_per_elem + 4));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t b = w * DCHUNK, e = std::min(b + DCHUNK, it.numel);
    if (it.prefault) touch_pages(static_cast<char*>(it.out) + b * it.out_esize, (e - b) * it.out_esize);
    fn(it, g, b, e, part.data() + w * K);
  }
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t w = 0; w < nw; ++w) s += part[w * K + k];
    out[k] = s;
  }
}

// --------------------------------------------------------------------------------------------- checks
void check_cpu_float(const char* op, const std::string& name, const at::Tensor& t) {
  check_defined_float(op, name, t);
  check_device_type(op, name, t, at::kCPU);
}


// memory traffic per element: base read + out write + K task-vector reads (merge); grad + K reads (dcoef)
int merge_bpe(const at::Tensor& b, const at::Tensor& d) {
  return static_cast<int>(2 * b.element_size() + d.size(0) * d.element_size());
}
int dot_bpe(const at::Tensor& g, const at::Tensor& d) {
  return static_cast<int>(g.element_size() + d.size(0) * d.element_size());
}

// The work item that merges the stack d (K task vectors) into the contiguous o from the contiguous b; fresh: o was
// just allocated (its pages are touched chunk by chunk before the stream); cd may be null (fp32 accumulation).
MergeItem merge_item(const at::Tensor& o, const at::Tensor& b, const Stack& d, int64_t K, bool fresh, const float* cf,
                     const double* cd, MergeFn fn) {
  return {o.data_ptr(), b.const_data_ptr(), static_cast<const char*>(d.t.const_data_ptr()),
          d.kstride * static_cast<int64_t>(d.t.element_size()), b.numel(), static_cast<int>(K), merge_bpe(b, d.t),
          static_cast<int>(o.element_size()), fresh, cf, cd, fn};
}

// The work item of <g, d[k]> for every k, g and the stack d as they will be read (g contiguous).
DotItem dot_item(const at::Tensor& g, const Stack& d, int64_t K, DotFn fn) {
  return {g.const_data_ptr(), static_cast<const char*>(d.t.const_data_ptr()),
          d.kstride * static_cast<int64_t>(d.t.element_size()), g.numel(), static_cast<int>(K), dot_bpe(g, d.t), 0, fn};
}

// ------------------------------------------------------------------------------------------- bindings
at::Tensor k_merge_cpu(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coef,
                       const std::optional<at::Tensor>& out) {
  const char* op = "k_merge";
  check_cpu_float(op, "base", base);
  check_cpu_float(op, "deltas", deltas);
  check_cpu_float(op, "coef", coef);
  const int64_t K = check_stack(op, "deltas", deltas, "base", base);
  check_coef(op, "coef", coef, K);
  bool fresh = false;
  const at::Tensor o = out_or_new(op, out, base, fresh);
  if (base.numel() == 0) return o;
  const at::Tensor b = base.contiguous();
  const Stack d = as_stack(deltas);
  const bool dbl = acc_of({base.scalar_type(), deltas.scalar_type(), coef.scalar_type()}) == at::kDouble;
  const at::Tensor cd = coef.to(at::kDouble).contiguous();
  const at::Tensor cf = coef.to(at::kFloat).contiguous();
  run_merge({merge_item(o, b, d, K, fresh, cf.const_data_ptr<float>(), cd.const_data_ptr<double>(),
                        pick_merge(base.scalar_type(), deltas.scalar_type(), dbl, K))});
  return o;
}

at::Tensor k_dcoef_cpu(const at::Tensor& grad, const at::Tensor& deltas) {
  const char* op = "k_dcoef";
  check_cpu_float(op, "grad", grad);
  check_cpu_float(op, "deltas", deltas);
  const int64_t K = check_stack(op, "deltas", deltas, "grad", grad);
  const at::ScalarType acc = acc_of({grad.scalar_type(), deltas.scalar_type()});
  at::Tensor res = at::empty({K}, grad.options().dtype(at::kDouble));
  const at::Tensor g = grad.contiguous();
  const Stack d = as_stack(deltas);
  std::vector<DotItem> items{
      dot_item(g, d, K, pick_dot(grad.scalar_type(), deltas.scalar_type(), acc == at::kDouble, K))};
  run_dot(items, static_cast<int>(K), res.data_ptr<double>());
  return acc == at::kDouble ? res : res.to(acc);
}

// (k_merge(base, deltas, coef), k_dcoef(grad, deltas)) reading the task vectors once (K <= 8, no fp64, fp32
// grad); otherwise the two ops one after the other.
std::tuple<at::Tensor, at::Tensor> k_merge_dcoef_cpu(const at::Tensor& base, const at::Tensor& deltas,
                                                     const at::Tensor& coef, const at::Tensor& grad) {
  const char* op = "k_merge_dcoef";
  check_cpu_float(op, "base", base);
  check_cpu_float(op, "deltas", deltas);
  check_cpu_float(op, "coef", coef);
  check_cpu_float(op, "grad", grad);
  const int64_t K = check_stack(op, "deltas", deltas, "base", base);
  check_coef(op, "coef", coef, K);
  TORCH_CHECK(grad.sizes() == base.sizes(), op, ": grad must have the shape of base ", shape_str(base.sizes()),
              ", got ", shape_str(grad.sizes()));
  const bool dbl = acc_of({base.scalar_type(), deltas.scalar_type(), coef.scalar_type(), grad.scalar_type()}) ==
                   at::kDouble;
  const MergeDotFn fn =
      dbl || grad.scalar_type() != at::kFloat ? nullptr : pick_merge_dot(base.scalar_type(), deltas.scalar_type(), K);
  if (fn == nullptr) return {k_merge_cpu(base, deltas, coef, std::nullopt), k_dcoef_cpu(grad, deltas)};
  at::Tensor o = at::empty(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor res = at::empty({K}, base.options().dtype(at::kDouble));
  if (base.numel() == 0) return {o, res.zero_().to(at::kFloat)};
  const at::Tensor b = base.contiguous();
  const at::Tensor g = grad.contiguous();
  const Stack d = as_stack(deltas);
  const at::Tensor cf = coef.to(at::kFloat).contiguous();
  const MergeItem it = merge_item(o, b, d, K, true, cf.const_data_ptr<float>(), nullptr, nullptr);
  run_merge_dot(it, g.const_data_ptr<float>(), fn, res.data_ptr<double>());
  return {o, res.to(at::kFloat)};
}

std::vector<at::Tensor> k_merge_many_cpu(at::TensorList bases, at::TensorList deltas, const at::Tensor& coefs,
                                         std::optional<at::TensorList> outs) {
  const char* op = "k_merge_many";
  const size_t n = bases.size();
  check_cpu_float(op, "coefs", coefs);
  const int64_t K = check_merge_many_args(op, bases, deltas, coefs, outs);
  const bool has_outs = outs.has_value();
  std::vector<at::Tensor> res;
  res.reserve(n);
  std::vector<at::Tensor> keep;  // contiguous copies, alive until the kernels ran
  keep.reserve(2 * n);
  std::vector<MergeItem> items;
  items.reserve(n);
  const at::Tensor cd = coefs.to(at::kDouble).contiguous();
  const at::Tensor cf = coefs.to(at::kFloat).contiguous();
  for (size_t i = 0; i < n; ++i) {
    const std::string bn = idx("bases", i), dn = idx("deltas", i);
    check_cpu_float(op, bn, bases[i]);
    check_cpu_float(op, dn, deltas[i]);
    const at::Tensor o = merge_many_item_out(op, i, bases[i], deltas[i], K, outs);
    res.push_back(o);
    if (bases[i].numel() == 0) continue;
    keep.push_back(bases[i].contiguous());
    const at::Tensor& b = keep.back();
    const Stack d = as_stack(deltas[i]);
    keep.push_back(d.t);
    const bool dbl =
        acc_of({bases[i].scalar_type(), deltas[i].scalar_type(), coefs.scalar_type()}) == at::kDouble;
    items.push_back(merge_item(o, b, d, K, !has_outs, cf.const_data_ptr<float>() + i * K,
                               cd.const_data_ptr<double>() + i * K,
                               pick_merge(bases[i].scalar_type(), deltas[i].scalar_type(), dbl, K)));
  }
  if (!items.empty()) run_merge(items);
  return res;
}

at::Tensor k_dcoef_many_cpu(at::TensorList grads, at::TensorList deltas) {
  const char* op = "k_dcoef_many";
  const size_t n = grads.size();
  TORCH_CHECK(deltas.size() == n, op, ": got ", n, " grads but ", deltas.size(), " deltas");
  if (n == 0) return at::empty({0, 0}, at::TensorOptions().dtype(at::kFloat));
  for (size_t i = 0; i < n; ++i) {
    check_cpu_float(op, idx("grads", i), grads[i]);
    check_cpu_float(op, idx("deltas", i), deltas[i]);
  }
  const int64_t K = check_stack(op, "deltas[0]", deltas[0], "grads[0]", grads[0]);
  at::ScalarType acc = at::kFloat;
  std::vector<at::Tensor> keep;
  keep.reserve(2 * n);
  std::vector<DotItem> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::ScalarType a = dcoef_many_item_check(op, i, grads[i], deltas[i], K);
    if (a == at::kDouble) acc = at::kDouble;
    keep.push_back(grads[i].contiguous());
    const at::Tensor& g = keep.back();
    const Stack d = as_stack(deltas[i]);
    keep.push_back(d.t);
    items.push_back(dot_item(g, d, K, pick_dot(grads[i].scalar_type(), deltas[i].scalar_type(), a == at::kDouble, K)));
  }
  at::Tensor res = at::empty({static_cast<int64_t>(n), K}, grads[0].options().dtype(at::kDouble));
  run_dot(items, static_cast<int>(K), res.data_ptr<double>());
  return acc == at::kDouble ? res : res.to(acc);
}

}  // namespace

bool use_avx2() { return isa() == Isa::avx2; }

}  // namespace cpu
}  // namespace amf

TORCH_LIBRARY_IMPL(adamerge_fast, CPU, m) {
  m.impl("k_merge", &amf::cpu::k_merge_cpu);
  m.impl("k_dcoef", &amf::cpu::k_dcoef_cpu);
  m.impl("k_merge_many", &amf::cpu::k_merge_many_cpu);
  m.impl("k_dcoef_many", &amf::cpu::k_dcoef_many_cpu);
  m.impl("k_merge_dcoef", &amf::cpu::k_merge_dcoef_cpu);
}

// Which copy of the CPU loops runs here: "avx2" or "base" (ADAMERGE_CPU_ISA=base forces the baseline).
TORCH_LIBRARY_FRAGMENT(adamerge_fast, m) { m.def("k_cpu_isa() -> str", &amf::cpu::isa_name); }
