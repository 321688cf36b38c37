"""``linear_entropy``: a linear head (an LM head, optionally merged) fused with the softmax entropy of its logits.

Plain-torch semantics (``acc``: fp32, or fp64 when an input is fp64)::

    W = w0 + sum_k coef_w[k] * tau_w[k]          (w0 when tau_w is None)        [V, D]
    b = b0 + sum_k coef_b[k] * tau_b[k]          (b0 when tau_b is None)        [V] | None
    H = entropy(h @ W.T + b)                     h[N, D] -> H[N] in acc
    linear_entropy(..., reduction="none") = H;   "mean" = H.mean();   "sum" = H.sum()

Rows are taken ``chunk`` at a time, so no more than one ``[chunk, V]`` tile of logits exists, forward or backward
(for V = 128256 and N = 4096 the full fp32 logits alone would be 2 GiB). What each reduction costs:

- ``"none"``: the forward computes ``H`` tile by tile and saves only the inputs; the backward recomputes each tile's
  logits (one more head matmul) to form ``dH/dz * grad`` in place, then ``dh``, and ``dW = dz^T h`` accumulated in
  one ``[V, D]`` buffer when the head's weight or coefficients need it.
- ``"mean"`` / ``"sum"``: the output is a scalar, so its gradient with respect to everything is known up to the one
  upstream factor: the forward computes ``dh``, ``dW`` and the coefficient gradients tile by tile (the way fused
  linear-cross-entropy kernels do) and the backward only scales them — the same three head matmuls as the unfused
  forward + backward, no recomputation. This is what AdaMerging's loss (a per-task mean entropy) uses.

The coefficient gradients are ``dcoef_w[k] = <dW, tau_w[k]>``, ``dcoef_b[k] = <db, tau_b[k]>`` (the backend's
``dcoef``); the merged head is built by the backend's ``merge`` and exists only inside a call. The tile step
(``Backend.entropy_tile_``) is plain torch on the ``reference`` and ``cpu`` backends and a Triton kernel
(:mod:`.triton_kernels.linear_entropy`) on the ``triton`` backend; the matmuls are torch's. Gradients of the task
vectors themselves are not computed (a clear error if asked).

Like the other ops: ``torch.library`` custom ops with fake implementations and registered autograd (what
``torch.compile`` and ``opcheck`` see), and ``autograd.Function`` s over the same backend calls for plain eager
calls (:func:`._library.use_fast_path`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import acc_dtype
from ._library import NS, use_fast_path
from ._registry import get_backend

#: the default ``chunk`` keeps one fp32 logits tile within this many bytes
TILE_BYTES = 64 << 20
REDUCTIONS = ("none", "mean", "sum")


def default_chunk(V: int, tile_bytes: int = TILE_BYTES) -> int:
    """Rows per tile so that a ``[rows, V]`` fp32 tile fits in ``tile_bytes`` (at least 1)."""
    return max(1, tile_bytes // (4 * max(V, 1)))


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype) -> Tensor:
    return t if t is not None else _empty(like, dtype)  # custom-op outputs cannot be None (nor alias each other)


# ------------------------------------------------------------------------------ custom op: reduction="none"
@torch.library.custom_op(f"{NS}::linear_entropy", mutates_args=())
def linear_entropy_op(
    h: Tensor,
    w0: Tensor,
    b0: Optional[Tensor],
    tau_w: Optional[Tensor],
    coef_w: Optional[Tensor],
    tau_b: Optional[Tensor],
    coef_b: Optional[Tensor],
    chunk: int,
    backend: str,
) -> Tensor:
    be = get_backend(backend)
    return be.linear_entropy_grads(None, h, w0, b0, tau_w, coef_w, tau_b, coef_b, False, False, False, False, False,
                                   chunk)[0]


@linear_entropy_op.register_fake
def _(h, w0, b0, tau_w, coef_w, tau_b, coef_b, chunk, backend):
    return h.new_empty(h.shape[0], dtype=acc_dtype(h.dtype, w0.dtype))


def _grads(be_grads, g, h, w0, b0, tau_w, coef_w, tau_b, coef_b, needs, chunk) -> tuple[Tensor, ...]:
    """``(dh, dw, db, dcoef_w, dcoef_b)``, each an empty tensor when not needed."""
    acc = acc_dtype(h.dtype, w0.dtype)
    _, dh, dw, db, dcw, dcb = be_grads(g, h, w0, b0, tau_w, coef_w, tau_b, coef_b, *needs, chunk)
    return (_or_empty(dh, h, h.dtype), _or_empty(dw, h, acc), _or_empty(db, h, acc), _or_empty(dcw, h, acc),
            _or_empty(dcb, h, acc))


@torch.library.custom_op(f"{NS}::linear_entropy_backward", mutates_args=())
def linear_entropy_backward_op(
    grad: Tensor,
    h: Tensor,
    w0: Tensor,
    b0: Optional[Tensor],
    tau_w: Optional[Tensor],
    coef_w: Optional[Tensor],
    tau_b: Optional[Tensor],
    coef_b: Optional[Tensor],
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    need_dcoef_w: bool,
    need_dcoef_b: bool,
    chunk: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dh, need_dw, need_db, need_dcoef_w, need_dcoef_b)
    return _grads(get_backend(backend).linear_entropy_grads, grad, h, w0, b0, tau_w, coef_w, tau_b, coef_b, needs,
                  chunk)


def _fake_grads(h, w0, b0, tau_w, needs):
    acc = acc_dtype(h.dtype, w0.dtype)
    need_dh, need_dw, need_db, need_dcw, need_dcb = needs
    K = 0 if tau_w is None else tau_w.shape[0]
    return (h.new_empty(h.shape if need_dh else (0,)),
            h.new_empty(w0.shape if need_dw else (0,), dtype=acc),
            h.new_empty((w0.shape[0] if need_db else 0,), dtype=acc),
            h.new_empty((K if need_dcw else 0,), dtype=acc),
            h.new_empty((K if need_dcb else 0,), dtype=acc))  # fmt: skip


@linear_entropy_backward_op.register_fake
def _(grad, h, w0, b0, tau_w, coef_w, tau_b, coef_b, need_dh, need_dw, need_db, need_dcw, need_dcb, chunk, backend):
    return _fake_grads(h, w0, b0, tau_w, (need_dh, need_dw, need_db, need_dcw, need_dcb))


def _input_grads(ctx, dh, dw, db, dcw, dcb, scale=None):
    """The gradients of ``(h, w0, b0, tau_w, coef_w, tau_b, coef_b, ...)`` in the inputs' dtypes; ``scale`` (a 0-d
    tensor) multiplies them (the reduced op's upstream gradient)."""
    h_dtype, w_dtype, b_dtype, cw_dtype, cb_dtype = ctx.dtypes
    need_dh, need_dw, need_db, need_dcw, need_dcb = ctx.needs

    def out(t, need, dtype):
        if not need:
            return None
        return (t if scale is None else t * scale.to(t.dtype)).to(dtype)

    return (out(dh, need_dh, h_dtype), out(dw, need_dw, w_dtype), out(db, need_db, b_dtype), None,
            out(dcw, need_dcw, cw_dtype), None, out(dcb, need_dcb, cb_dtype))


def _needs_from(ctx_needs) -> tuple[bool, bool, bool, bool, bool]:
    """``(dh, dw, db, dcoef_w, dcoef_b)`` needed, from ``needs_input_grad`` of ``(h, w0, b0, tau_w, coef_w, tau_b,
    coef_b, ...)``."""
    n = ctx_needs
    if n[3] or n[5]:
        raise RuntimeError("linear_entropy: gradients of the task vectors tau_w / tau_b are not computed (detach "
                           "them)")
    return bool(n[0]), bool(n[1]), bool(n[2]), bool(n[4]), bool(n[6])


def _setup_common(ctx, inputs):
    h, w0, b0, tau_w, coef_w, tau_b, coef_b = inputs[:7]
    ctx.dtypes = (h.dtype, w0.dtype, None if b0 is None else b0.dtype, None if coef_w is None else coef_w.dtype,
                  None if coef_b is None else coef_b.dtype)


def _linear_entropy_setup(ctx, inputs, output):
    h, w0, b0, tau_w, coef_w, tau_b, coef_b, chunk, backend = inputs
    _setup_common(ctx, inputs)
    ctx.save_for_backward(h, w0, b0, tau_w, coef_w, tau_b, coef_b)
    ctx.chunk = chunk
    ctx.grads = lambda *a: linear_entropy_backward_op(*a, backend)


def _linear_entropy_backward(ctx, grad):
    h, w0, b0, tau_w, coef_w, tau_b, coef_b = ctx.saved_tensors
    ctx.needs = _needs_from(ctx.needs_input_grad)
    dh, dw, db, dcw, dcb = ctx.grads(grad, h, w0, b0, tau_w, coef_w, tau_b, coef_b, *ctx.needs, ctx.chunk)
    return (*_input_grads(ctx, dh, dw, db, dcw, dcb), None, None)


linear_entropy_op.register_autograd(_linear_entropy_backward, setup_context=_linear_entropy_setup)


class _LinearEntropyFn(torch.autograd.Function):
    """Eager fast path of ``linear_entropy_op``: same arguments, the last one a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):
        h, w0, b0, tau_w, coef_w, tau_b, coef_b, chunk, be = inputs
        return be.linear_entropy_grads(None, h, w0, b0, tau_w, coef_w, tau_b, coef_b, False, False, False, False,
                                       False, chunk)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w0, b0, tau_w, coef_w, tau_b, coef_b, chunk, be = inputs
        _setup_common(ctx, inputs)
        ctx.save_for_backward(h, w0, b0, tau_w, coef_w, tau_b, coef_b)
        ctx.chunk = chunk
        ctx.grads = lambda g, *a: _grads(be.linear_entropy_grads, g, *a[:7], a[7:12], a[12])

    @staticmethod
    def backward(ctx, grad):
        return _linear_entropy_backward(ctx, grad)


# ----------------------------------------------------------------------- custom op: reduction="mean" / "sum"
@torch.library.custom_op(f"{NS}::linear_entropy_reduced", mutates_args=())
def linear_entropy_reduced_op(
    h: Tensor,
    w0: Tensor,
    b0: Optional[Tensor],
    tau_w: Optional[Tensor],
    coef_w: Optional[Tensor],
    tau_b: Optional[Tensor],
    coef_b: Optional[Tensor],
    scale: float,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    need_dcoef_w: bool,
    need_dcoef_b: bool,
    chunk: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(scale * H.sum(), d/dh, d/dW, d/db, d/dcoef_w, d/dcoef_b)`` of that value: the gradients for an upstream
    gradient of 1, computed in the same pass (empty when not needed)."""
    return _reduced(get_backend(backend), h, w0, b0, tau_w, coef_w, tau_b, coef_b, scale,
                    (need_dh, need_dw, need_db, need_dcoef_w, need_dcoef_b), chunk)


def _reduced(be, h, w0, b0, tau_w, coef_w, tau_b, coef_b, scale, needs, chunk):
    acc = acc_dtype(h.dtype, w0.dtype)
    g = float(scale) if any(needs) else None
    H, dh, dw, db, dcw, dcb = be.linear_entropy_grads(g, h, w0, b0, tau_w, coef_w, tau_b, coef_b, *needs, chunk)
    value = (H.sum() * scale).to(acc)
    return (value, _or_empty(dh, h, h.dtype), _or_empty(dw, h, acc), _or_empty(db, h, acc),
            _or_empty(dcw, h, acc), _or_empty(dcb, h, acc))


@linear_entropy_reduced_op.register_fake
def _(h, w0, b0, tau_w, coef_w, tau_b, coef_b, scale, need_dh, need_dw, need_db, need_dcw, need_dcb, chunk, backend):
    value = h.new_empty((), dtype=acc_dtype(h.dtype, w0.dtype))
    return (value, *_fake_grads(h, w0, b0, tau_w, (need_dh, need_dw, need_db, need_dcw, need_dcb)))


def _reduced_setup(ctx, inputs, output):
    _setup_common(ctx, inputs)
    ctx.needs = tuple(inputs[8:13])
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _reduced_backward(ctx, grad, *_unused):
    dh, dw, db, dcw, dcb = ctx.saved_tensors
    return (*_input_grads(ctx, dh, dw, db, dcw, dcb, scale=grad), *([None] * 8))


linear_entropy_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup)


class _LinearEntropyReducedFn(torch.autograd.Function):
    """Eager fast path of ``linear_entropy_reduced_op`` (``apply(..., scale, *needs, chunk, backend object)``);
    returns only the value."""

    @staticmethod
    def forward(*inputs):
        h, w0, b0, tau_w, coef_w, tau_b, coef_b, scale, *needs, chunk, be = inputs
        return _reduced(be, h, w0, b0, tau_w, coef_w, tau_b, coef_b, scale, tuple(needs), chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _reduced_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad, *_unused):
        return _reduced_backward(ctx, grad)


# ------------------------------------------------------------------------------------------------ entry point
def linear_entropy(h, w0, b0, tau_w, coef_w, tau_b, coef_b, reduction: str, chunk: int, backend: str) -> Tensor:
    """The op on checked arguments (:func:`adamerge_fast.ops.linear_entropy` checks them): ``h[N, D]``, the
    resolved ``backend`` name; the fast path or the custom ops, like the other ops' entry points."""
    args = (h, w0, b0, tau_w, coef_w, tau_b, coef_b)
    if reduction == "none":
        if use_fast_path(*args):
            return _LinearEntropyFn.apply(*args, chunk, get_backend(backend))
        return linear_entropy_op(*args, chunk, backend)
    N = h.shape[0]
    if N == 0:
        raise ValueError(f"linear_entropy: reduction={reduction!r} over zero rows")
    scale = 1.0 / N if reduction == "mean" else 1.0
    on = torch.is_grad_enabled()
    if on and any(t is not None and t.requires_grad for t in (tau_w, tau_b)):
        raise RuntimeError("linear_entropy: gradients of the task vectors tau_w / tau_b are not computed (detach "
                           "them)")
    needs = tuple(on and t is not None and t.requires_grad for t in (h, w0, b0, coef_w, coef_b))
    if use_fast_path(*args):
        return _LinearEntropyReducedFn.apply(*args, scale, *needs, chunk, get_backend(backend))[0]
    return linear_entropy_reduced_op(*args, scale, *needs, chunk, backend)[0]
