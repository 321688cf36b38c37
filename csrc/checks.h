// Argument checks shared by the CPU and CUDA bindings of the k_* kernel ops.
//
// Every failed check is a TORCH_CHECK (a RuntimeError in Python) whose message names the op, the tensor and
// what was expected. Policy for layout: inputs that are not contiguous are accepted and copied with
// .contiguous() (task-vector stacks whose slices deltas[k] are each contiguous are used in place, through
// one pointer per slice); an `out` tensor must already be contiguous, of the right shape, dtype and device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace amf {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The accumulation dtype: double if any input is double, else float.
inline at::ScalarType acc_of(std::initializer_list<at::ScalarType> ts) {
  for (auto t : ts)
    if (t == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline void check_defined_float(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float16/bfloat16/float32/float64), got ", t.scalar_type());
}

inline void check_device(const char* op, const std::string& name, const at::Tensor& t, const at::Device& dev,
                         const char* ref_name) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ", dev,
              " (all tensors must be on one device)");
}

inline void check_device_type(const char* op, const std::string& name, const at::Tensor& t,
                              at::DeviceType want) {
  TORCH_CHECK(t.device().type() == want, op, ": ", name, " must be a ", at::DeviceTypeName(want, true),
              " tensor, got one on ", t.device());
}

// deltas[K, *S] against base[*S] (or grad[*S]); returns K.
inline int64_t check_stack(const char* op, const std::string& dname, const at::Tensor& deltas,
                           const std::string& bname, const at::Tensor& base) {
  bool ok = deltas.dim() == base.dim() + 1;
  for (int64_t d = 0; ok && d < base.dim(); ++d) ok = deltas.size(d + 1) == base.size(d);
  TORCH_CHECK(ok, op, ": ", dname, " must have shape [K, *", bname, ".shape] = [K", base.dim() ? ", " : "",
              shape_str(base.sizes()).substr(1), ", got ", shape_str(deltas.sizes()));
  TORCH_CHECK(deltas.size(0) >= 1, op, ": ", dname, " must hold at least one task vector (K >= 1), got K=0");
  return deltas.size(0);
}

inline void check_coef(const char* op, const std::string& name, const at::Tensor& coef, int64_t K) {
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == K, op, ": ", name, " must have shape [K]=[", K, "], got ",
              shape_str(coef.sizes()));
}

inline void check_out(const char* op, const std::string& name, const at::Tensor& out, const at::Tensor& like) {
  TORCH_CHECK(out.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(out.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == like.sizes(), op, ": ", name, " must have shape ", shape_str(like.sizes()), ", got ",
              shape_str(out.sizes()));
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous (the kernel writes it densely)");
}

// The output of a single-tensor op: the caller's ``out`` (checked against ``like``) when given and defined, else a
// fresh contiguous tensor like ``like``; ``fresh`` tells which (a fresh output's pages are not yet touched).
inline at::Tensor out_or_new(const char* op, const std::optional<at::Tensor>& out, const at::Tensor& like,
                             bool& fresh) {
  fresh = !(out.has_value() && out->defined());
  if (!fresh) {
    check_out(op, "out", *out, like);
    return *out;
  }
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

inline std::string idx(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// The list-level arguments of merge_many: n bases, n task-vector stacks, coefs [n, K], outs (if given) n tensors.
// Returns K. (Per-device dtype/device checks of coefs stay with the caller.)
inline int64_t check_merge_many_args(const char* op, at::TensorList bases, at::TensorList deltas, const at::Tensor& coefs,
                                     const std::optional<at::TensorList>& outs) {
  const size_t n = bases.size();
  TORCH_CHECK(deltas.size() == n, op, ": got ", n, " bases but ", deltas.size(), " deltas");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == static_cast<int64_t>(n), op, ": coefs must have shape [n=", n,
              ", K], got ", shape_str(coefs.sizes()));
  if (outs.has_value())
    TORCH_CHECK(outs->size() == n, op, ": outs must hold one tensor per base (", n, "), got ", outs->size());
  return coefs.size(1);
}

// Item i of a merge_many list: deltas[i] stacked against bases[i] with K task vectors, and its output (the
// caller's outs[i], checked, or a fresh contiguous tensor). Device and dtype checks stay with the caller.
inline at::Tensor merge_many_item_out(const char* op, size_t i, const at::Tensor& base, const at::Tensor& deltas,
                                      int64_t K, const std::optional<at::TensorList>& outs) {
  const std::string dn = idx("deltas", i);
  check_stack(op, dn, deltas, idx("bases", i), base);
  TORCH_CHECK(deltas.size(0) == K, op, ": ", dn, " holds K=", deltas.size(0), " task vectors but coefs has K=", K,
              " columns");
  if (outs.has_value()) {
    check_out(op, idx("outs", i), (*outs)[i], base);
    return (*outs)[i];
  }
  return at::empty(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
}

// Item i of a dcoef_many list: deltas[i] stacked against grads[i], holding the same K as item 0; returns the
// item's accumulation dtype (fp64 if either is fp64, else fp32).
inline at::ScalarType dcoef_many_item_check(const char* op, size_t i, const at::Tensor& grad, const at::Tensor& deltas,
                                            int64_t K) {
  const std::string dn = idx("deltas", i);
  check_stack(op, dn, deltas, idx("grads", i), grad);
  TORCH_CHECK(deltas.size(0) == K, op, ": ", dn, " holds K=", deltas.size(0), " task vectors but deltas[0] holds K=",
              K, " (all must hold the same K)");
  return acc_of({grad.scalar_type(), deltas.scalar_type()});
}

// True when every slice t[k] is contiguous (the strides of dims 1.. are those of a dense tensor), so that
// slice k starts at data_ptr + k * stride(0) elements.
inline bool slices_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// A task-vector stack in a form the kernels read: slices contiguous, slice k at ptr + k * kstride elements.
struct Stack {
  at::Tensor t;        // keeps the storage alive (maybe a contiguous copy)
  int64_t kstride = 0;  // elements between slices
};

inline Stack as_stack(const at::Tensor& deltas) {
  Stack s;
  s.t = slices_contiguous(deltas) ? deltas : deltas.contiguous();
  s.kstride = s.t.stride(0);
  return s;
}

}  // namespace amf
