// adamerge_fast._C: the low-level kernel ops of the "cpu" and "cuda" backends.
//
// Schemas live here; the CPU kernels are registered in cpu/merge_cpu.cpp (quantized task vectors: cpu/qmerge_cpu.cpp)
// and the CUDA kernels (only when the extension is built with CUDA, macro ADAMERGE_WITH_CUDA) in
// cuda/bindings_cuda.cpp. The ops carry a k_
// prefix: the namespace adamerge_fast also holds the Python-level custom ops (merge, merge_dcoef, ...), which
// wrap these kernels behind the backend registry (adamerge_fast/ops/cpp_backend.py).
//
// Semantics are those of adamerge_fast.ops._backend.Backend:
//   k_merge(base[*S], deltas[K,*S], coef[K])  = base + sum_k coef[k] * deltas[k]  in base.dtype
//   k_dcoef(grad[*S], deltas[K,*S])           = [<grad, deltas[k]> for k]          in the accumulation dtype
//   k_merge_many / k_dcoef_many               = the same over lists, in one call
//   k_merge_dcoef(base, deltas, coef, grad)   = (k_merge(base, deltas, coef), k_dcoef(grad, deltas)), CPU only,
//                                               reading each task vector once (the cpu merged_linear backward)
// Accumulation is float32, or float64 when an input (or coef) is float64. `out`/`outs`, when given, must be
// contiguous tensors of the result's shape and dtype; they are written and returned (hence the (a!) alias
// annotation on the result, as for torch's out= ops); without them the results are fresh tensors.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(adamerge_fast, m) {
  m.def("k_merge(Tensor base, Tensor deltas, Tensor coef, Tensor(a!)? out=None) -> Tensor(a!)");
  m.def("k_dcoef(Tensor grad, Tensor deltas) -> Tensor");
  m.def("k_merge_many(Tensor[] bases, Tensor[] deltas, Tensor coefs, Tensor(a!)[]? outs=None) -> Tensor(a!)[]");
  m.def("k_dcoef_many(Tensor[] grads, Tensor[] deltas) -> Tensor");
  // CPU only: (k_merge(base, deltas, coef), k_dcoef(grad, deltas)) reading each task vector once.
  m.def("k_merge_dcoef(Tensor base, Tensor deltas, Tensor coef, Tensor grad) -> (Tensor, Tensor)");
  // Quantized task vectors (adamerge_fast/ops/quant.py; CPU only): deq_k = scales[k, r] * qdata[k, r, c] (bits 8)
  // or scales[k, r, g] * (q[k, r, c] - zeros[k, r, g]), g = c // group_size (bits 4, two values per byte). zeros:
  // None / an empty list for int8. k_merge_dcoef_q: (k_merge_q(...), k_dcoef_q(grad, ...)) in one pass.
  m.def(
      "k_merge_q(Tensor base, Tensor qdata, Tensor scales, Tensor? zeros, Tensor coef, int bits, int group_size, "
      "Tensor(a!)? out=None) -> Tensor(a!)");
  m.def("k_dcoef_q(Tensor grad, Tensor qdata, Tensor scales, Tensor? zeros, int bits, int group_size) -> Tensor");
  m.def(
      "k_merge_many_q(Tensor[] bases, Tensor[] qdata, Tensor[] scales, Tensor?[] zeros, Tensor coefs, int bits, "
      "int group_size, Tensor(a!)[]? outs=None) -> Tensor(a!)[]");
  m.def(
      "k_dcoef_many_q(Tensor[] grads, Tensor[] qdata, Tensor[] scales, Tensor?[] zeros, int bits, int group_size) "
      "-> Tensor");
  m.def(
      "k_merge_dcoef_q(Tensor base, Tensor qdata, Tensor scales, Tensor? zeros, Tensor coef, Tensor grad, int bits, "
      "int group_size) -> (Tensor, Tensor)");
  // CUDA only (no CPU kernel is registered: the cpu backend uses the composite in Backend).
  m.def(
      "k_merged_linear_fwd(Tensor x, Tensor w0, Tensor tau_w, Tensor coef_w, Tensor? b0, Tensor? tau_b, "
      "Tensor? coef_b) -> Tensor");
  m.def(
      "k_merged_linear_bwd(Tensor dy, Tensor x, Tensor w0, Tensor tau_w, Tensor coef_w, Tensor? tau_b, "
      "bool need_dx, bool need_dcoef_w, bool need_dcoef_b) -> (Tensor, Tensor, Tensor)");
  m.def("k_entropy_fwd(Tensor logits) -> Tensor");
  m.def("k_entropy_bwd(Tensor grad, Tensor logits) -> Tensor");
  // Whether this build has the CUDA kernels (a catch-all kernel: the op has no tensor argument).
  m.def("k_has_cuda() -> bool", []() -> bool {
#ifdef ADAMERGE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// A plain Python module, so that `import adamerge_fast._C` loads the library (and registers the ops above).
static PyModuleDef amf_module = {PyModuleDef_HEAD_INIT, "_C", "adamerge_fast kernel ops (torch.ops.adamerge_fast.k_*)",
                                 -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&amf_module);
  if (mod == nullptr) return nullptr;
#ifdef ADAMERGE_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "WITH_OPENMP", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_OPENMP", 0);
#endif
  return mod;
}
