"""The ``"triton"`` backend: Triton kernels on CUDA, or on CPU tensors through the Triton interpreter.

Kernels live in :mod:`adamerge_fast.ops.triton_kernels` (one module per op). What is fused here:

* ``merge`` / ``dcoef``: one pass over the task vectors; ``merge_many`` / ``dcoef_many``: one launch for the
  whole list (a pointer table, multi-tensor-apply style), one per dtype combination.
* ``merged_linear_fwd`` / the ``dx`` of ``merged_linear_bwd``: for small M the merged weight never exists (each
  program merges its weight tiles in registers); for large M it exists for this one layer only, inside the call.
* ``dcoef_w``: tiles of ``dy^T x`` in registers, contracted with the task vectors; no ``[out, in]`` gradient.
* ``entropy``: chunked online softmax entropy, one program per row.
* ``merged_lora_linear``: the LoRA shrink ``x @ A^T`` of all tasks in one launch, then the base matmul and the
  scaled expand ``(u * c_k s_k) @ B^T`` in one kernel; backward likewise, the coefficient gradient reduced in the
  shrink of ``dy @ B`` (:mod:`.triton_kernels.lora`).
* ``linear_entropy``: its tile step (entropy of a ``[chunk, V]`` logits tile and its gradient, in place); the head's
  matmuls are torch's.

fp64 is not a Triton path: calls with any fp64 input go to the reference backend's functions (same contract).

Triton launches on the *current* CUDA device and stream: every kernel method below runs under
:func:`~.triton_kernels._common.device_guard` of its first tensor argument, so tensors on ``cuda:1`` work while
``cuda:0`` is current (the strategy timing's CUDA events go to that device too).
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference as _ref
from ._backend import Backend, ReferenceBackend
from ._common import acc_dtype

_F64 = torch.float64


def _any_f64(*ts) -> bool:
    return any(t is not None and t.dtype == _F64 for t in ts)


def _first_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return None


def _guarded(method):
    """Run ``method`` with the device of its first tensor argument current (see the module docstring)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        device = _first_device(args)
        if device is None or device.type != "cuda":
            return method(self, *args, **kwargs)
        with self._device_guard(device):
            return method(self, *args, **kwargs)

    run.device_guarded = True
    return run


# The kernel methods every backend has (Backend's interface): each is wrapped by _guarded in TritonBackend.
KERNEL_METHODS = ("merge", "dcoef", "merge_many", "dcoef_many", "merged_linear_fwd", "merged_linear_bwd",
                  "merged_lora_linear_fwd", "merged_lora_linear_bwd", "entropy_fwd", "entropy_bwd",
                  "entropy_tile_")  # fmt: skip


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        # triton is an optional dependency: imported here, when the registry first constructs this backend
        try:
            import triton  # noqa: F401
        except ImportError as e:  # the registry remembers this and reports it
            raise ImportError(f"the triton backend needs the 'triton' package ({e})") from e
        from .triton_kernels import INTERPRET, entropy, linear_entropy, lora, merge, merged_linear
        from .triton_kernels._common import device_guard

        self._interpret = INTERPRET
        self._device_guard = device_guard
        self._merge = merge
        self._linear = merged_linear
        self._entropy = entropy
        self._lora = lora
        self._linear_entropy = linear_entropy

    # -- availability -------------------------------------------------------------------------------
    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            if self._interpret:
                return (
                    "the Triton kernels were imported with TRITON_INTERPRET=1: they would run through the interpreter, "
                    "not on the GPU; unset TRITON_INTERPRET before importing adamerge_fast's Triton backend."
                )
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton kernels run on CPU tensors only through the interpreter (set TRITON_INTERPRET=1)."
            if not self._interpret:
                return (
                    "the Triton kernels were compiled for the GPU when first imported (TRITON_INTERPRET was not 1 "
                    "then); set TRITON_INTERPRET=1 before importing adamerge_fast's Triton backend."
                )
            return None
        return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), not on {device.type}."

    # -- merge ----------------------------------------------------------------------------------------
    def merge(self, base, deltas, coef):
        if _any_f64(base, deltas, coef):
            return _ref.merge(base, deltas, coef)
        return self._merge.merge(base, deltas, coef)

    def dcoef(self, grad, deltas):
        if _any_f64(grad, deltas):
            return _ref.dcoef(grad, deltas)
        return self._merge.dcoef(grad, deltas)

    def merge_many(self, bases, deltas, coefs):
        if _any_f64(coefs, *bases, *deltas):
            return [_ref.merge(b, d, coefs[i]) for i, (b, d) in enumerate(zip(bases, deltas, strict=True))]
        return self._merge.merge_many(list(bases), list(deltas), coefs)

    def dcoef_many(self, grads, deltas):
        if _any_f64(*grads, *deltas):
            return torch.stack([_ref.dcoef(g, d).to(_F64) for g, d in zip(grads, deltas, strict=True)])
        return self._merge.dcoef_many(list(grads), list(deltas))

    # -- merged_linear -----------------------------------------------------------------------------------
    def merged_linear_fwd(self, x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=None):
        if _any_f64(x, w0, tau_w, coef_w, b0, tau_b, coef_b):
            return _REFERENCE.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b)
        return self._linear.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)

    def merged_linear_bwd(self, dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b, strategy=None):
        if _any_f64(dy, x, w0, tau_w, coef_w, tau_b):
            return _REFERENCE.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b)
        acc = acc_dtype(w0.dtype, x.dtype)
        # three distinct empties: outputs of a custom op must not alias one another
        dx, dcw, dcb = (dy.new_empty(0, dtype=acc) for _ in range(3))
        if need_dx:
            dx = self._linear.merged_linear_dx(dy, w0, tau_w, coef_w, out_dtype=x.dtype, strategy=strategy)
        if need_dcoef_w:
            dcw = self._linear.merged_linear_dcoef_w(dy, x, tau_w)
        if need_dcoef_b:
            gb = dy.sum(0, dtype=torch.float32)  # [out], tiny; torch's reduction is deterministic
            dcb = self._merge.dcoef(gb, tau_b)
        return dx, dcw, dcb

    # -- merged_lora_linear ------------------------------------------------------------------------------
    def merged_lora_linear_fwd(self, x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, strategy=None):
        if _any_f64(x, w0, lora_a, lora_b, coef_w, scale, b0, tau_b, coef_b):
            return _REFERENCE.merged_lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b)
        return self._lora.merged_lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b,
                                                 strategy=strategy)  # fmt: skip

    def merged_lora_linear_bwd(self, dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_dx,
                               need_dcoef_w, need_dcoef_b, strategy=None):  # fmt: skip
        args = (dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_dx, need_dcoef_w, need_dcoef_b)
        if _any_f64(dy, x, w0, lora_a, lora_b, coef_w, scale, u, tau_b):
            return _REFERENCE.merged_lora_linear_bwd(*args)
        return self._lora.merged_lora_linear_bwd(*args, strategy=strategy)

    # -- entropy ---------------------------------------------------------------------------------------
    def entropy_fwd(self, logits):
        if logits.dtype == _F64:
            return _ref.entropy_fwd(logits)
        return self._entropy.entropy_fwd(logits)

    def entropy_bwd(self, grad, logits):
        if logits.dtype == _F64 or grad.dtype == _F64:
            return _ref.entropy_bwd(grad, logits)
        return self._entropy.entropy_bwd(grad, logits)

    def entropy_tile_(self, z, g, write_grad):
        if z.dtype == _F64:
            return _ref.entropy_tile_(z, g, write_grad)
        return self._linear_entropy.entropy_tile_(z, g, write_grad)


for _name in KERNEL_METHODS:
    setattr(TritonBackend, _name, _guarded(getattr(TritonBackend, _name)))
del _name

_REFERENCE = ReferenceBackend()  # fp64 merged_linear: the composite over the plain-torch merge
