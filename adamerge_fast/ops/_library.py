"""``torch.library`` custom ops: one schema per op direction, the resolved backend name as a ``str`` arg.

Each forward op has a fake (meta) implementation and a registered autograd formula whose backward is
itself a custom op, so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` see opaque,
well-described kernels. What autograd saves: the inputs it already holds (``x``, ``w0``, task vectors,
coefficients: references, never copies); the merged weight is recomputed in backward, never saved.

Eager fast path: a custom op costs tens of microseconds more host time per call than a plain
``torch.autograd.Function`` (dispatcher, schema and alias checks), which adds up over the ~100 calls of a
ViT forward + backward and can leave a GPU idle. So the entry points :func:`merge`, :func:`merge_many`,
:func:`merged_linear` and :func:`entropy` take an ``autograd.Function`` over the *same* backend methods and
the *same* backward formulas in plain eager calls, and the custom ops whenever something needs to see the op
(``torch.compile``, fake/meta tensors, dispatch or function modes, tensor subclasses). ``torch.func.grad``
works through the fast path (not through the custom ops: register_autograd does not support it here).
``EAGER_FAST_PATH = False`` (or ``ADAMERGE_EAGER_CUSTOM_OPS=1``) makes every call a custom op.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._backend import acc_dtype, get_backend

NS = "adamerge_fast"

EAGER_FAST_PATH = os.environ.get("ADAMERGE_EAGER_CUSTOM_OPS", "") != "1"


def use_fast_path(*tensors: Optional[Tensor]) -> bool:
    """True for a plain eager call: no compile, no transform/mode, only plain (non-subclass) tensors."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return False
    # (functorch transforms are fine: these autograd.Functions define setup_context, so torch.func.grad works
    # through them, which it does not through register_autograd custom ops in this torch)
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return False
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not torch.nn.Parameter) or t.is_meta):
            return False
    return True


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
    dcoef = None
    if nc:
        if getattr(ctx, "fast", False):
            dcoef = get_backend(ctx.backend).dcoef(grad, deltas)
        else:
            dcoef = merge_dcoef_op(grad, deltas, ctx.backend)
        dcoef = dcoef.to(coef.dtype)
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


def _merge_many_grads(ctx, grads, nb: bool, nd: bool, nc: bool):
    """(dbases, ddeltas, dcoefs), each None when not needed: shared by the custom op and the fast path."""
    coefs, *deltas = ctx.saved_tensors
    grads = [
        g if g is not None else torch.zeros(s, dtype=dt, device=coefs.device) for g, (s, dt) in zip(grads, ctx.shapes)
    ]
    dbases = list(grads) if nb else None
    ddeltas = [_scaled(coefs[i], g, d.dtype) for i, (g, d) in enumerate(zip(grads, deltas))] if nd else None
    dcoefs = None
    if nc:
        if getattr(ctx, "fast", False):
            dcoefs = get_backend(ctx.backend).dcoef_many(grads, deltas)
        else:
            dcoefs = merge_many_dcoef_op(grads, deltas, ctx.backend)
        dcoefs = dcoefs.to(coefs.dtype)
    return dbases, ddeltas, dcoefs


def _merge_many_backward(ctx, grads):
    return (*_merge_many_grads(ctx, grads, *ctx.needs_input_grad[:3]), None)


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
    if getattr(ctx, "fast", False):
        bwd = get_backend(ctx.backend).merged_linear_bwd
        dx, dcw, dcb = bwd(dy, x, w0, tau_w, coef_w, tau_b, n[0], n[3], need_dcb)
    else:
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
    if getattr(ctx, "fast", False):
        return get_backend(ctx.backend).entropy_bwd(grad, logits), None
    return entropy_backward_op(grad, logits, ctx.backend), None


entropy_op.register_autograd(_ent_backward, setup_context=_ent_setup)


# ------------------------------------------------------------------------------------- eager fast path
# The same backend methods, setup and backward formulas as the custom ops above, as autograd.Functions
# (ctx.fast selects direct backend calls in the shared backward code).
def _fast_function(name: str, method: str, setup, backward):
    """An autograd.Function whose forward is ``get_backend(backend).<method>(*tensors)`` (the backend name is
    the last argument, as in the custom op) with the custom op's setup and backward code."""

    def forward(*args):
        return getattr(get_backend(args[-1]), method)(*args[:-1])

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.fast = True

    ns = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    return type(name, (torch.autograd.Function,), ns)


_MergeFn = _fast_function("_MergeFn", "merge", _merge_setup, _merge_backward)
_MergedLinearFn = _fast_function("_MergedLinearFn", "merged_linear_fwd", _ml_setup, _ml_backward)
_EntropyFn = _fast_function("_EntropyFn", "entropy_fwd", _ent_setup, _ent_backward)


class _MergeManyFn(torch.autograd.Function):
    # autograd.Function tracks only top-level tensor arguments: the lists travel flattened,
    # apply(backend, n, coefs, *bases, *deltas) -> n outputs
    @staticmethod
    def forward(backend, n, coefs, *tensors):
        return tuple(get_backend(backend).merge_many(list(tensors[:n]), list(tensors[n:]), coefs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, n, coefs, *tensors = inputs
        _merge_many_setup(ctx, (tensors[:n], tensors[n:], coefs, backend), output)
        ctx.n = n
        ctx.fast = True

    @staticmethod
    def backward(ctx, *grads):
        n, need = ctx.n, ctx.needs_input_grad
        dbases, ddeltas, dcoefs = _merge_many_grads(ctx, grads, any(need[3 : 3 + n]), any(need[3 + n :]), need[2])
        return (None, None, dcoefs, *(dbases or [None] * n), *(ddeltas or [None] * n))


def merge(base: Tensor, deltas: Tensor, coef: Tensor, backend: str) -> Tensor:
    if use_fast_path(base, deltas, coef):
        return _MergeFn.apply(base, deltas, coef, backend)
    return merge_op(base, deltas, coef, backend)


def merge_many(bases: list[Tensor], deltas: list[Tensor], coefs: Tensor, backend: str) -> list[Tensor]:
    if use_fast_path(coefs, *bases, *deltas):
        return list(_MergeManyFn.apply(backend, len(bases), coefs, *bases, *deltas))
    return merge_many_op(bases, deltas, coefs, backend)


def merged_linear(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend: str) -> Tensor:
    if use_fast_path(x, w0, tau_w, coef_w, b0, tau_b, coef_b):
        return _MergedLinearFn.apply(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend)
    return merged_linear_op(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend)


def entropy(logits: Tensor, backend: str) -> Tensor:
    if use_fast_path(logits):
        return _EntropyFn.apply(logits, backend)
    return entropy_op(logits, backend)
