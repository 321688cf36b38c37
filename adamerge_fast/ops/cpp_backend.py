"""The ``cpu`` and ``cuda`` backends: the compiled extension ``adamerge_fast._C`` (``torch.ops.adamerge_fast.k_*``).

``cpu`` runs the OpenMP kernels on CPU tensors: merge and the coefficient gradients in one pass over memory (dense
task vectors, or quantized ones dequantized inside the loops: ``k_*_q``);
``merged_linear`` is the composite of :class:`~adamerge_fast.ops._backend.Backend` (merge the layer's weight,
then ``F.linear``; backward forms ``dy^T x``, then one pass over the task vectors gives both the merged weight
for ``dx`` and the coefficient gradient). ``cuda`` runs the CUDA kernels, including the fused small-batch
``merged_linear`` and the softmax entropy; it exists only when the extension was built with CUDA.

When the extension is not built, constructing either backend raises ``ImportError`` (the registry then reports
the backend unavailable with that reason; ``auto`` moves on quietly, an explicit request raises
``BackendUnavailableError`` carrying the message and how to build the extension).
"""

from __future__ import annotations

import logging

import torch

from . import _common
from ._backend import Backend

log = logging.getLogger("adamerge_fast")
_QUANT_FALLBACK_LOGGED: list[bool] = []  # the cuda backend's quantized fallback is logged once per process

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


    # -- quantized task vectors (ops/quant.py): the k_*_q kernels dequantize inside their loops --------------------
    # fp64 bases/gradients have no C++ loop: they run on the reference functions (Backend's defaults).
    def merge_q(self, base, qt, coef):
        if base.dtype == torch.float64:
            return super().merge_q(base, qt, coef)
        q, s, z = qt.components()
        return self._ops.k_merge_q(base, q, s, z, coef, qt.bits, qt.group_size, _poisoned(base.shape, base))

    def dcoef_q(self, grad, qt):
        if grad.dtype == torch.float64:
            return super().dcoef_q(grad, qt)
        q, s, z = qt.components()
        return self._ops.k_dcoef_q(grad, q, s, z, qt.bits, qt.group_size)

    def merge_many_q(self, bases, qts, coefs):
        if any(b.dtype == torch.float64 for b in bases):
            return super().merge_many_q(bases, qts, coefs)
        outs = [_poisoned(b.shape, b) for b in bases] if _common.POISON_OUTPUTS else None
        return list(self._ops.k_merge_many_q(*_q_lists(bases, qts), coefs, qts[0].bits, qts[0].group_size, outs))

    def dcoef_many_q(self, grads, qts):
        if any(g.dtype == torch.float64 for g in grads):
            return super().dcoef_many_q(grads, qts)
        return self._ops.k_dcoef_many_q(*_q_lists(grads, qts), qts[0].bits, qts[0].group_size)

    def merged_linear_q_bwd(self, dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        """As :meth:`merged_linear_bwd`: with both ``dx`` and ``dcoef_w`` needed, one pass over the packed task
        vectors (``k_merge_dcoef_q``) gives the merged weight and ``dcoef_w``."""
        acc = _common.acc_dtype(w0.dtype, x.dtype)
        if not (need_dx and need_dcoef_w) or acc != torch.float32:
            return super().merged_linear_q_bwd(dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b)
        dw = dy.to(acc).t() @ x.to(acc)  # [out, in]: the weight gradient this composite does allocate
        q, s, z = qt.components()
        w, dcw = self._ops.k_merge_dcoef_q(w0, q, s, z, coef_w, dw, qt.bits, qt.group_size)
        dx = (dy @ w.to(dy.dtype)).to(x.dtype)
        dcb = self.dcoef(dy.to(acc).sum(0), tau_b) if need_dcoef_b else dy.new_empty(0, dtype=acc)
        return dx, dcw, dcb


def _q_lists(bases, qts):
    """``(bases, qdatas, scales, zeros)`` as the list kernels take them (zeros: empty for int8)."""
    zeros = [q.zeros for q in qts] if qts[0].bits == 4 else []
    return list(bases), [q.qdata for q in qts], [q.scales for q in qts], zeros


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

    # Quantized task vectors: no CUDA kernels read them; the Backend defaults run instead (dequantize one task at a
    # time on the device with torch, then this backend's own merge/dcoef/matmul), logged once per process.
    def _quant_fallback(self):
        if not _QUANT_FALLBACK_LOGGED:
            _QUANT_FALLBACK_LOGGED.append(True)
            log.debug("cuda backend: no CUDA kernel reads quantized task vectors; dequantizing them with torch one "
                      "task at a time (backend='triton' has fused kernels for them)")

    def merge_q(self, base, qt, coef):
        self._quant_fallback()
        return Backend.merge_q(self, base, qt, coef)

    def dcoef_q(self, grad, qt):
        self._quant_fallback()
        return Backend.dcoef_q(self, grad, qt)

    def merge_many_q(self, bases, qts, coefs):
        return Backend.merge_many_q(self, bases, qts, coefs)

    def dcoef_many_q(self, grads, qts):
        return Backend.dcoef_many_q(self, grads, qts)

    def merged_linear_q_bwd(self, dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        return Backend.merged_linear_q_bwd(self, dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b)

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
