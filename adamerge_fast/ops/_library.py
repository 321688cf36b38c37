"""``torch.library`` custom ops: one schema per op direction, the resolved backend name as a ``str`` arg.

Each forward op has a fake (meta) implementation and a registered autograd formula whose backward is
itself a custom op, so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` see opaque,
well-described kernels. What autograd saves: the inputs it already holds (``x``, ``w0``, task vectors,
coefficients: references, never copies); the merged weight is recomputed in backward, never saved.

Eager fast path: a custom op costs tens of microseconds more host time per call than a plain
``torch.autograd.Function`` (dispatcher, schema and alias checks; ``benchmarks/results/host_overhead.md``),
which adds up over the ~100 calls of a ViT forward + backward and can leave a GPU idle. So the entry points
:func:`merge`, :func:`merge_many`, :func:`merged_linear` and :func:`entropy` take an ``autograd.Function``
(``_MergeFn``, ...) over the *same* backend methods and the *same* backward formulas in plain eager calls, and
the custom ops whenever something needs to see the op (``torch.compile``, fake/meta tensors, dispatch or
function modes, tensor subclasses). The two differ only in the backward kernel that setup stores on ``ctx``
(``ctx.dcoef`` etc.): the backend's method on the fast path, the backward custom op otherwise.
``torch.func.grad`` works through the fast path (not through the custom ops: register_autograd does not support
it in this torch). ``EAGER_FAST_PATH = False`` (or ``ADAMERGE_EAGER_CUSTOM_OPS=1``) makes every call a custom op.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import acc_dtype
from ._registry import get_backend

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


def _with_backend(op, backend: str):
    """``op`` with its trailing ``backend`` argument bound: the backward kernel the custom-op path stores on ``ctx``
    (positional: a keyword argument costs the custom-op call more host time)."""
    return lambda *args: op(*args, backend)


def _scaled(coef: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
    # d deltas[k] = coef[k] * grad  (only when a caller differentiates the task vectors themselves)
    return (coef.to(grad.dtype).reshape(-1, *([1] * grad.dim())) * grad.unsqueeze(0)).to(dtype)


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


# _FORWARD_SIGNATURE: the eager fast-path Functions below take their inputs as one ``*inputs`` parameter because
# ``autograd.Function.apply`` binds the arguments to ``inspect.signature(forward)`` on every call when
# ``setup_context`` is defined, and binding costs host time per named parameter (timeit of that binding on
# AMD EPYC, 2 cores: about 16 us for merged_linear's 8 named parameters, 6 us for ``*inputs``).


def _merge_backward(ctx, grad):
    """Gradients of ``(base, deltas, coef, backend)``; ``ctx.dcoef(grad, deltas)`` was chosen at setup."""
    deltas, coef = ctx.saved_tensors
    need_base, need_deltas, need_coef = ctx.needs_input_grad[:3]
    dbase = grad if need_base else None
    ddeltas = _scaled(coef, grad, deltas.dtype) if need_deltas else None
    dcoef = ctx.dcoef(grad, deltas).to(coef.dtype) if need_coef else None
    return dbase, ddeltas, dcoef, None


def _merge_setup(ctx, inputs, output):
    _, deltas, coef, backend = inputs
    ctx.save_for_backward(deltas, coef)
    ctx.dcoef = _with_backend(merge_dcoef_op, backend)


merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


class _MergeFn(torch.autograd.Function):
    """Eager fast path of ``merge_op``: ``apply(base, deltas, coef, backend)`` with a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _FORWARD_SIGNATURE
        base, deltas, coef, backend = inputs
        return backend.merge(base, deltas, coef)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, deltas, coef, backend = inputs
        ctx.save_for_backward(deltas, coef)
        ctx.dcoef = backend.dcoef

    @staticmethod
    def backward(ctx, grad):
        return _merge_backward(ctx, grad)


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


def _merge_many_save(ctx, bases, deltas, coefs):
    ctx.save_for_backward(coefs, *deltas)
    ctx.shapes = [(b.shape, b.dtype) for b in bases]


def _merge_many_grads(ctx, grads, need_bases: bool, need_deltas: bool, need_coefs: bool):
    """``(dbases, ddeltas, dcoefs)``, each None when not needed; ``ctx.dcoef_many`` was chosen at setup."""
    coefs, *deltas = ctx.saved_tensors
    grads = [
        g if g is not None else torch.zeros(s, dtype=dt, device=coefs.device)
        for g, (s, dt) in zip(grads, ctx.shapes, strict=True)
    ]
    dbases = list(grads) if need_bases else None
    ddeltas = None
    if need_deltas:
        ddeltas = [_scaled(coefs[i], g, d.dtype) for i, (g, d) in enumerate(zip(grads, deltas, strict=True))]
    dcoefs = ctx.dcoef_many(grads, deltas).to(coefs.dtype) if need_coefs else None
    return dbases, ddeltas, dcoefs


def _merge_many_setup(ctx, inputs, output):
    bases, deltas, coefs, backend = inputs
    _merge_many_save(ctx, bases, deltas, coefs)
    ctx.dcoef_many = _with_backend(merge_many_dcoef_op, backend)


def _merge_many_backward(ctx, grads):
    need_bases, need_deltas, need_coefs = ctx.needs_input_grad[:3]
    return (*_merge_many_grads(ctx, grads, need_bases, need_deltas, need_coefs), None)


merge_many_op.register_autograd(_merge_many_backward, setup_context=_merge_many_setup)


class _MergeManyFn(torch.autograd.Function):
    """Eager fast path of ``merge_many_op``. autograd.Function tracks only top-level tensor arguments, so the
    lists travel flattened: ``apply(backend, n, coefs, *bases, *deltas)`` -> n outputs."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _FORWARD_SIGNATURE
        backend, n, coefs, *tensors = inputs
        return tuple(backend.merge_many(tensors[:n], tensors[n:], coefs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, n, coefs, *tensors = inputs
        _merge_many_save(ctx, tensors[:n], tensors[n:], coefs)
        ctx.dcoef_many = backend.dcoef_many
        ctx.n = n

    @staticmethod
    def backward(ctx, *grads):
        n, need = ctx.n, ctx.needs_input_grad
        need_coefs, need_bases, need_deltas = need[2], any(need[3 : 3 + n]), any(need[3 + n :])
        dbases, ddeltas, dcoefs = _merge_many_grads(ctx, grads, need_bases, need_deltas, need_coefs)
        return (None, None, dcoefs, *(dbases or [None] * n), *(ddeltas or [None] * n))


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


def _merged_linear_backward(ctx, dy):
    """Gradients of ``(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend)``; ``ctx.merged_linear_bwd`` (dx and the
    coefficient gradients) was chosen at setup."""
    x, w0, tau_w, coef_w, tau_b, coef_b = ctx.saved_tensors
    need_x, need_w0, need_tau_w, need_coef_w, need_b0, need_tau_b, need_coef_b = ctx.needs_input_grad[:7]
    need_coef_b = need_coef_b and tau_b is not None
    dx, dcw, dcb = ctx.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, need_x, need_coef_w, need_coef_b)
    dw0 = dtau_w = None
    if need_w0 or need_tau_w:  # gradients of the weights themselves: plain autograd formula (not the fast path)
        dw = dy.to(w0.dtype).t() @ x.to(w0.dtype)
        dw0 = dw if need_w0 else None
        dtau_w = _scaled(coef_w, dw, tau_w.dtype) if need_tau_w else None
    db0, dtau_b = _bias_grads(dy, coef_b, tau_b, need_b0, need_tau_b)
    return (
        dx if need_x else None,
        dw0,
        dtau_w,
        dcw.to(coef_w.dtype) if need_coef_w else None,
        db0,
        dtau_b,
        dcb.to(coef_b.dtype) if need_coef_b else None,
        None,
    )


def _bias_grads(dy, coef_b, tau_b, need_b0: bool, need_tau_b: bool):
    """``(d b0, d tau_b)`` of a merged bias ``b0 + sum_k coef_b[k] tau_b[k]`` given the output gradient ``dy``."""
    if not (need_b0 or need_tau_b):
        return None, None
    gb = dy.sum(0)
    return (gb if need_b0 else None), (_scaled(coef_b, gb, tau_b.dtype) if need_tau_b else None)


def _merged_linear_setup(ctx, inputs, output):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend = inputs
    ctx.save_for_backward(x, w0, tau_w, coef_w, tau_b, coef_b)
    ctx.merged_linear_bwd = _with_backend(merged_linear_backward_op, backend)


merged_linear_op.register_autograd(_merged_linear_backward, setup_context=_merged_linear_setup)


class _MergedLinearFn(torch.autograd.Function):
    """Eager fast path of ``merged_linear_op``: same arguments, the last one a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _FORWARD_SIGNATURE
        *tensors, backend = inputs  # x, w0, tau_w, coef_w, b0, tau_b, coef_b
        return backend.merged_linear_fwd(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend = inputs
        ctx.save_for_backward(x, w0, tau_w, coef_w, tau_b, coef_b)
        ctx.merged_linear_bwd = backend.merged_linear_bwd

    @staticmethod
    def backward(ctx, dy):
        return _merged_linear_backward(ctx, dy)


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


def _entropy_backward(ctx, grad):
    """Gradients of ``(logits, backend)``; ``ctx.entropy_bwd`` was chosen at setup."""
    (logits,) = ctx.saved_tensors
    return ctx.entropy_bwd(grad, logits), None


def _entropy_setup(ctx, inputs, output):
    logits, backend = inputs
    ctx.save_for_backward(logits)
    ctx.entropy_bwd = _with_backend(entropy_backward_op, backend)


entropy_op.register_autograd(_entropy_backward, setup_context=_entropy_setup)


class _EntropyFn(torch.autograd.Function):
    """Eager fast path of ``entropy_op``: ``apply(logits, backend)`` with a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _FORWARD_SIGNATURE
        logits, backend = inputs
        return backend.entropy_fwd(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, backend = inputs
        ctx.save_for_backward(logits)
        ctx.entropy_bwd = backend.entropy_bwd

    @staticmethod
    def backward(ctx, grad):
        return _entropy_backward(ctx, grad)


# ------------------------------------------------------------------------------------------ entry points
def merge(base: Tensor, deltas: Tensor, coef: Tensor, backend: str) -> Tensor:
    if use_fast_path(base, deltas, coef):
        return _MergeFn.apply(base, deltas, coef, get_backend(backend))
    return merge_op(base, deltas, coef, backend)


def merge_many(bases: list[Tensor], deltas: list[Tensor], coefs: Tensor, backend: str) -> list[Tensor]:
    if use_fast_path(coefs, *bases, *deltas):
        return list(_MergeManyFn.apply(get_backend(backend), len(bases), coefs, *bases, *deltas))
    return merge_many_op(bases, deltas, coefs, backend)


def merged_linear(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend: str) -> Tensor:
    if use_fast_path(x, w0, tau_w, coef_w, b0, tau_b, coef_b):
        return _MergedLinearFn.apply(x, w0, tau_w, coef_w, b0, tau_b, coef_b, get_backend(backend))
    return merged_linear_op(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend)


def entropy(logits: Tensor, backend: str) -> Tensor:
    if use_fast_path(logits):
        return _EntropyFn.apply(logits, get_backend(backend))
    return entropy_op(logits, backend)
