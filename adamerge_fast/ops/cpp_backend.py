"""The ``cpu`` and ``cuda`` backends: the compiled extension ``adamerge_fast._C`` (``torch.ops.adamerge_fast.k_*``).

``cpu`` runs the OpenMP kernels on CPU tensors: merge and the coefficient gradients in one pass over memory;
``merged_linear`` is the composite of :class:`~adamerge_fast.ops._backend.Backend` (merge the layer's weight,
then ``F.linear``; backward forms ``dy^T x``, then one pass over the task vectors gives both the merged weight
for ``dx`` and the coefficient gradient). ``cuda`` runs the CUDA kernels, including the fused small-batch
``merged_linear`` and the softmax entropy; it exists only when the extension was built with CUDA.

When the extension is not built, constructing either backend raises ``ImportError`` (the registry then reports
the backend unavailable with that reason; ``auto`` moves on quietly, an explicit request raises
``BackendUnavailableError`` carrying the message and how to build the extension).
"""

from __future__ import annotations

import torch

from . import _common
from ._backend import Backend

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; set ADAMERGE_REQUIRE_EXT=1 "
    "to see why the build failed)"
)


def _load_extension():
    """The extension module; loading it registers ``torch.ops.adamerge_fast.k_*``. ``ImportError`` when absent."""
    try:
        import adamerge_fast._C as ext
    except ImportError as e:
        msg = f"the C++ extension adamerge_fast._C is not built or failed to load ({e}); {_BUILD_HINT}"
        raise ImportError(msg) from e
    return ext


def _poisoned(shape, like: torch.Tensor):
    """While ``_common.POISON_OUTPUTS``: a NaN-filled output for the kernel to write, else None (C++ allocates)."""
    if _common.POISON_OUTPUTS:
        return _common.new_output(shape, like.dtype, like.device)
    return None


class CppBackend(Backend):
    """Merge primitives on ``torch.ops.adamerge_fast.k_*``; everything else from :class:`Backend`."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self):
        _load_extension()  # ImportError when the extension is not built
        self._ops = torch.ops.adamerge_fast

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name!r} backend runs on {self.device_type} tensors only (got {device})"
        return None

    def merge(self, base, deltas, coef):
        return self._ops.k_merge(base, deltas, coef, _poisoned(base.shape, base))

    def dcoef(self, grad, deltas):
        return self._ops.k_dcoef(grad, deltas)

    def merge_many(self, bases, deltas, coefs):
        bases, deltas = list(bases), list(deltas)
        outs = [_poisoned(b.shape, b) for b in bases] if _common.POISON_OUTPUTS else None
        return list(self._ops.k_merge_many(bases, deltas, coefs, outs))

    def dcoef_many(self, grads, deltas):
        return self._ops.k_dcoef_many(list(grads), list(deltas))

    def merged_linear_bwd(self, dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        """The composite backward of :class:`Backend`, except that when both ``dx`` and ``dcoef_w`` are needed the
        merged weight (for ``dx``) and ``dcoef_w`` (from ``dW = dy^T x``) come from one pass over the task
        vectors (``k_merge_dcoef``) instead of two."""
        acc = _common.acc_dtype(w0.dtype, x.dtype)
        if not (need_dx and need_dcoef_w) or acc != torch.float32:
            return super().merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b)
        dw = dy.to(acc).t() @ x.to(acc)  # [out, in]: the weight gradient this composite does allocate
        w, dcw = self._ops.k_merge_dcoef(w0, tau_w, coef_w, dw)
        dx = (dy @ w.to(dy.dtype)).to(x.dtype)
        dcb = self.dcoef(dy.to(acc).sum(0), tau_b) if need_dcoef_b else dy.new_empty(0, dtype=acc)
        return dx, dcw, dcb


class CudaBackend(CppBackend):
    """The CUDA kernels: merge primitives plus fused merged_linear and softmax entropy."""

    name = "cuda"
    device_type = "cuda"

    def unavailable_reason(self, device):
        if not bool(self._ops.k_has_cuda()):
            return (
                "adamerge_fast._C was built without CUDA (needs a CUDA build of torch and nvcc at build time, "
                "and ADAMERGE_SKIP_CUDA_BUILD unset)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return super().unavailable_reason(device)

    def merged_linear_fwd(self, x, w0, tau_w, coef_w, b0, tau_b, coef_b):
        return self._ops.k_merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b)

    def merged_linear_bwd(self, dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        dx, dcw, dcb = self._ops.k_merged_linear_bwd(
            dy, x, w0, tau_w, coef_w, tau_b, bool(need_dx), bool(need_dcoef_w), bool(need_dcoef_b)
        )
        return dx, dcw, dcb

    def entropy_fwd(self, logits):
        return self._ops.k_entropy_fwd(logits)

    def entropy_bwd(self, grad, logits):
        return self._ops.k_entropy_bwd(grad, logits)


def extension_info() -> dict:
    """What the loaded extension was built with (for diagnostics and benchmark reports)."""
    ext = _load_extension()
    return {
        "with_cuda": bool(getattr(ext, "WITH_CUDA", 0)),
        "with_openmp": bool(getattr(ext, "WITH_OPENMP", 0)),
        "file": getattr(ext, "__file__", None),
    }
