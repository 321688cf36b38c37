"""``torch.library`` custom ops: one schema per op direction, the resolved backend name as a ``str`` arg.

Each forward op has a fake (meta) implementation and a registered autograd formula whose backward is
itself a custom op, so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` see opaque,
well-described kernels. What autograd saves: the inputs it already holds (``x``, ``w0``, task vectors,
coefficients: references, never copies); the merged weight is recomputed in backward, never saved.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._backend import acc_dtype, get_backend

NS = "adamerge_fast"


def _empty_acc(like: Tensor, *dtypes: torch.dtype) -> Tensor:
    return like.new_empty(0, dtype=acc_dtype(*dtypes))


# ----------------------------------------------------------------------------------------------- merge
@torch.library.custom_op(f"{NS}::merge", mutates_args=())
def merge_op(base: Tensor, deltas: Tensor, coef: Tensor, backend: str) -> Tensor:
    return get_backend(backend).merge(base, deltas, coef)


@merge_op.register_fake
def _(base, deltas, coef, backend):
    return base.new_empty(base.shape)


@torch.library.custom_op(f"{NS}::merge_dcoef", mutates_args=())
def merge_dcoef_op(grad: Tensor, deltas: Tensor, backend: str) -> Tensor:
    return get_backend(backend).dcoef(grad, deltas)


@merge_dcoef_op.register_fake
def _(grad, deltas, backend):
    return grad.new_empty(deltas.shape[0], dtype=acc_dtype(grad.dtype, deltas.dtype))


def _merge_setup(ctx, inputs, output):
    _, deltas, coef, backend = inputs
    ctx.save_for_backward(deltas, coef)
    ctx.backend = backend


def _scaled(coef: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
    # d deltas[k] = coef[k] * grad  (only when a caller differentiates the task vectors themselves)
    return (coef.to(grad.dtype).reshape(-1, *([1] * grad.dim())) * grad.unsqueeze(0)).to(dtype)


def _merge_backward(ctx, grad):
    deltas, coef = ctx.saved_tensors
    nb, nd, nc = ctx.needs_input_grad[:3]
    dbase = grad if nb else None
    ddeltas = _scaled(coef, grad, deltas.dtype) if nd else None
    dcoef = merge_dcoef_op(grad, deltas, ctx.backend).to(coef.dtype) if nc else None
    return dbase, ddeltas, dcoef, None


merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


# ------------------------------------------------------------------------------------------ merge_many
@torch.library.custom_op(f"{NS}::merge_many", mutates_args=())
def merge_many_op(bases: Sequence[Tensor], deltas: Sequence[Tensor], coefs: Tensor, backend: str) -> list[Tensor]:
    return list(get_backend(backend).merge_many(list(bases), list(deltas), coefs))


@merge_many_op.register_fake
def _(bases, deltas, coefs, backend):
    return [b.new_empty(b.shape) for b in bases]


@torch.library.custom_op(f"{NS}::merge_many_dcoef", mutates_args=())
def merge_many_dcoef_op(grads: Sequence[Tensor], deltas: Sequence[Tensor], backend: str) -> Tensor:
    return get_backend(backend).dcoef_many(list(grads), list(deltas))


@merge_many_dcoef_op.register_fake
def _(grads, deltas, backend):
    acc = acc_dtype(*[g.dtype for g in grads], *[d.dtype for d in deltas])
    return grads[0].new_empty(len(grads), deltas[0].shape[0], dtype=acc)


def _merge_many_setup(ctx, inputs, output):
    bases, deltas, coefs, backend = inputs
    ctx.save_for_backward(coefs, *deltas)
    ctx.shapes = [(b.shape, b.dtype) for b in bases]
    ctx.backend = backend


def _merge_many_backward(ctx, grads):
    coefs, *deltas = ctx.saved_tensors
    nb, nd, nc = ctx.needs_input_grad[:3]
    grads = [g if g is not None else torch.zeros(s, dtype=dt, device=coefs.device) for g, (s, dt) in zip(grads, ctx.shapes)]
    dbases = list(grads) if nb else None
    ddeltas = [_scaled(coefs[i], g, d.dtype) for i, (g, d) in enumerate(zip(grads, deltas))] if nd else None
    dcoefs = merge_many_dcoef_op(grads, deltas, ctx.backend).to(coefs.dtype) if nc else None
    return dbases, ddeltas, dcoefs, None


merge_many_op.register_autograd(_merge_many_backward, setup_context=_merge_many_setup)


# --------------------------------------------------------------------------------------- merged_linear
@torch.library.custom_op(f"{NS}::merged_linear", mutates_args=())
def merged_linear_op(
    x: Tensor,
    w0: Tensor,
    tau_w: Tensor,
    coef_w: Tensor,
    b0: Optional[Tensor],
    tau_b: Optional[Tensor],
    coef_b: Optional[Tensor],
    backend: str,
) -> Tensor:
    return get_backend(backend).merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b)


@merged_linear_op.register_fake
def _(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend):
    return x.new_empty(x.shape[0], w0.shape[0])


@torch.library.custom_op(f"{NS}::merged_linear_backward", mutates_args=())
def merged_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    w0: Tensor,
    tau_w: Tensor,
    coef_w: Tensor,
    tau_b: Optional[Tensor],
    need_dx: bool,
    need_dcoef_w: bool,
    need_dcoef_b: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return get_backend(backend).merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b)


@merged_linear_backward_op.register_fake
def _(dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b, backend):
    acc = acc_dtype(w0.dtype, x.dtype)
    K = tau_w.shape[0]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0, dtype=acc)
    dcw = x.new_empty(K if need_dcoef_w else 0, dtype=acc)
    dcb = x.new_empty(K if need_dcoef_b else 0, dtype=acc)
    return dx, dcw, dcb


def _ml_setup(ctx, inputs, output):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend = inputs
    ctx.save_for_backward(x, w0, tau_w, coef_w, tau_b, coef_b)
    ctx.backend = backend


def _ml_backward(ctx, dy):
    x, w0, tau_w, coef_w, tau_b, coef_b = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_dcb = bool(n[6]) and tau_b is not None
    dx, dcw, dcb = merged_linear_backward_op(dy, x, w0, tau_w, coef_w, tau_b, n[0], n[3], need_dcb, ctx.backend)
    dw0 = dtau_w = db0 = dtau_b = None
    if n[1] or n[2]:  # gradients of the weights themselves: plain autograd formula (not the fast path)
        dw = dy.to(w0.dtype).t() @ x.to(w0.dtype)
        dw0 = dw if n[1] else None
        dtau_w = _scaled(coef_w, dw, tau_w.dtype) if n[2] else None
    if n[4] or n[5]:
        gb = dy.sum(0)
        db0 = gb if n[4] else None
        dtau_b = _scaled(coef_b, gb, tau_b.dtype) if n[5] else None
    return (
        dx if n[0] else None,
        dw0,
        dtau_w,
        dcw.to(coef_w.dtype) if n[3] else None,
        db0,
        dtau_b,
        dcb.to(coef_b.dtype) if need_dcb else None,
        None,
    )


merged_linear_op.register_autograd(_ml_backward, setup_context=_ml_setup)


# --------------------------------------------------------------------------------------------- entropy
@torch.library.custom_op(f"{NS}::entropy", mutates_args=())
def entropy_op(logits: Tensor, backend: str) -> Tensor:
    return get_backend(backend).entropy_fwd(logits)


@entropy_op.register_fake
def _(logits, backend):
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits.dtype))


@torch.library.custom_op(f"{NS}::entropy_backward", mutates_args=())
def entropy_backward_op(grad: Tensor, logits: Tensor, backend: str) -> Tensor:
    return get_backend(backend).entropy_bwd(grad, logits)


@entropy_backward_op.register_fake
def _(grad, logits, backend):
    return logits.new_empty(logits.shape)


def _ent_setup(ctx, inputs, output):
    logits, backend = inputs
    ctx.save_for_backward(logits)
    ctx.backend = backend


def _ent_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return entropy_backward_op(grad, logits, ctx.backend), None


entropy_op.register_autograd(_ent_backward, setup_context=_ent_setup)
