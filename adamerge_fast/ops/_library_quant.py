"""``torch.library`` custom ops (and their eager fast-path ``autograd.Function``s) over quantized task vectors.

The same contract as :mod:`._library`, with the task vectors of one tensor given as the parts of a
:class:`~.quant.QuantizedTensor`: ``qdata``, ``scales``, ``zeros`` (None, or an empty list in the list ops, for
int8) plus two ints, ``bits`` (8 / 4) and ``group_size`` (0 for int8), and the resolved backend name. The logical
shape comes from the base tensor (``base``, ``grad`` or ``w0``). Each forward op has a fake implementation and a
registered autograd formula whose backward is itself a custom op; plain eager calls go through the Functions
(:func:`._library.use_fast_path`), exactly as the dense ops do.

Gradients: ``base``/``w0``/``b0``/``x``/``tau_b`` and the coefficients, the latter against the *dequantized* task
vectors (``d coef[k] = <grad, dequantize(qt)[k]>``: the values the forward merged). The quantized parts are
constants (no gradient).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import acc_dtype
from ._library import NS, _scaled, _with_backend, use_fast_path
from ._registry import get_backend
from .quant import QuantizedTensor


def as_quantized(qdata: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
                 task_shape) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of the parts an op received (``task_shape``: the base tensor's shape)."""
    return QuantizedTensor(qdata, scales, zeros, bits, group_size, torch.Size((qdata.shape[0], *task_shape)))


def _zs(zeros: Sequence[Tensor], n: int) -> list[Optional[Tensor]]:
    """The per-item zero points of a list op: ``zeros`` itself (int4) or n Nones (int8: an empty list)."""
    return list(zeros) if len(zeros) else [None] * n


# --------------------------------------------------------------------------------------------- merge_q
@torch.library.custom_op(f"{NS}::merge_q", mutates_args=())
def merge_q_op(base: Tensor, qdata: Tensor, scales: Tensor, zeros: Optional[Tensor], coef: Tensor, bits: int,
               group_size: int, backend: str) -> Tensor:
    return get_backend(backend).merge_q(base, as_quantized(qdata, scales, zeros, bits, group_size, base.shape), coef)


@merge_q_op.register_fake
def _(base, qdata, scales, zeros, coef, bits, group_size, backend):
    return base.new_empty(base.shape)


@torch.library.custom_op(f"{NS}::merge_q_dcoef", mutates_args=())
def merge_q_dcoef_op(grad: Tensor, qdata: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                     group_size: int, backend: str) -> Tensor:
    return get_backend(backend).dcoef_q(grad, as_quantized(qdata, scales, zeros, bits, group_size, grad.shape))


@merge_q_dcoef_op.register_fake
def _(grad, qdata, scales, zeros, bits, group_size, backend):
    return grad.new_empty(qdata.shape[0], dtype=acc_dtype(grad.dtype))


def _merge_q_backward(ctx, grad):
    """Gradients of ``(base, qdata, scales, zeros, coef, bits, group_size, backend)``."""
    qdata, scales, zeros, coef = ctx.saved_tensors
    need_base, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    dcoef = ctx.dcoef(grad, qdata, scales, zeros, ctx.bits, ctx.group_size).to(coef.dtype) if need_coef else None
    return grad if need_base else None, None, None, None, dcoef, None, None, None


def _merge_q_save(ctx, inputs):
    _, qdata, scales, zeros, coef, bits, group_size, _ = inputs
    ctx.save_for_backward(qdata, scales, zeros, coef)
    ctx.bits, ctx.group_size = bits, group_size


def _merge_q_setup(ctx, inputs, output):
    _merge_q_save(ctx, inputs)
    ctx.dcoef = _with_backend(merge_q_dcoef_op, inputs[-1])


merge_q_op.register_autograd(_merge_q_backward, setup_context=_merge_q_setup)


class _MergeQFn(torch.autograd.Function):
    """Eager fast path of ``merge_q_op``: the same arguments, the last one a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _library._FORWARD_SIGNATURE
        base, qdata, scales, zeros, coef, bits, group_size, backend = inputs
        return backend.merge_q(base, as_quantized(qdata, scales, zeros, bits, group_size, base.shape), coef)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _merge_q_save(ctx, inputs)
        be = inputs[-1]
        ctx.dcoef = lambda g, q, s, z, b, gs: be.dcoef_q(g, as_quantized(q, s, z, b, gs, g.shape))

    @staticmethod
    def backward(ctx, grad):
        return _merge_q_backward(ctx, grad)


# ---------------------------------------------------------------------------------------- merge_many_q
@torch.library.custom_op(f"{NS}::merge_many_q", mutates_args=())
def merge_many_q_op(bases: Sequence[Tensor], qdatas: Sequence[Tensor], scales: Sequence[Tensor],
                    zeros: Sequence[Tensor], coefs: Tensor, bits: int, group_size: int, backend: str) -> list[Tensor]:
    qts = [as_quantized(q, s, z, bits, group_size, b.shape)
           for b, q, s, z in zip(bases, qdatas, scales, _zs(zeros, len(bases)), strict=True)]
    return list(get_backend(backend).merge_many_q(list(bases), qts, coefs))


@merge_many_q_op.register_fake
def _(bases, qdatas, scales, zeros, coefs, bits, group_size, backend):
    return [b.new_empty(b.shape) for b in bases]


@torch.library.custom_op(f"{NS}::merge_many_q_dcoef", mutates_args=())
def merge_many_q_dcoef_op(grads: Sequence[Tensor], qdatas: Sequence[Tensor], scales: Sequence[Tensor],
                          zeros: Sequence[Tensor], bits: int, group_size: int, backend: str) -> Tensor:
    qts = [as_quantized(q, s, z, bits, group_size, g.shape)
           for g, q, s, z in zip(grads, qdatas, scales, _zs(zeros, len(grads)), strict=True)]
    return get_backend(backend).dcoef_many_q(list(grads), qts)


@merge_many_q_dcoef_op.register_fake
def _(grads, qdatas, scales, zeros, bits, group_size, backend):
    return grads[0].new_empty(len(grads), qdatas[0].shape[0], dtype=acc_dtype(*[g.dtype for g in grads]))


def _merge_many_q_grads(ctx, grads, need_bases: bool, need_coefs: bool):
    """``(dbases | None, dcoefs | None)``; ``ctx.dcoef_many(grads, qdatas, scales, zeros)`` was chosen at setup."""
    coefs, *parts = ctx.saved_tensors
    n = len(ctx.shapes)
    grads = [g if g is not None else torch.zeros(s, dtype=dt, device=coefs.device)
             for g, (s, dt) in zip(grads, ctx.shapes, strict=True)]
    dcoefs = None
    if need_coefs:
        dcoefs = ctx.dcoef_many(grads, parts[:n], parts[n:2 * n], parts[2 * n:]).to(coefs.dtype)
    return (list(grads) if need_bases else None), dcoefs


def _merge_many_q_save(ctx, bases, qdatas, scales, zeros, coefs, bits, group_size):
    ctx.save_for_backward(coefs, *qdatas, *scales, *zeros)
    ctx.shapes = [(b.shape, b.dtype) for b in bases]
    ctx.bits, ctx.group_size, ctx.n_zeros = bits, group_size, len(zeros)


def _merge_many_q_setup(ctx, inputs, output):
    bases, qdatas, scales, zeros, coefs, bits, group_size, backend = inputs
    _merge_many_q_save(ctx, bases, qdatas, scales, zeros, coefs, bits, group_size)
    op = _with_backend(merge_many_q_dcoef_op, backend)
    ctx.dcoef_many = lambda g, q, s, z: op(g, q, s, z, ctx.bits, ctx.group_size)


def _merge_many_q_backward(ctx, grads):
    need = ctx.needs_input_grad
    dbases, dcoefs = _merge_many_q_grads(ctx, grads, need[0], need[4])
    n, nz = len(ctx.shapes), ctx.n_zeros
    none = [None] * n  # list inputs take lists (of Nones: the quantized parts are constants)
    return dbases or list(none), list(none), list(none), [None] * nz, dcoefs, None, None, None


merge_many_q_op.register_autograd(_merge_many_q_backward, setup_context=_merge_many_q_setup)


class _MergeManyQFn(torch.autograd.Function):
    """Eager fast path of ``merge_many_q_op``; lists flattened (autograd.Function tracks top-level tensors only):
    ``apply(backend, n, bits, group_size, coefs, *bases, *qdatas, *scales, *zeros)`` -> n outputs (zeros: n
    tensors for int4, none for int8)."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _library._FORWARD_SIGNATURE
        backend, n, bits, gs, coefs, *t = inputs
        bases, qdatas, scales, zeros = t[:n], t[n:2 * n], t[2 * n:3 * n], _zs(t[3 * n:], n)
        qts = [as_quantized(q, s, z, bits, gs, b.shape) for b, q, s, z in zip(bases, qdatas, scales, zeros,
                                                                               strict=True)]
        return tuple(backend.merge_many_q(list(bases), qts, coefs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, n, bits, gs, coefs, *t = inputs
        _merge_many_q_save(ctx, t[:n], t[n:2 * n], t[2 * n:3 * n], t[3 * n:], coefs, bits, gs)
        ctx.n = n

        def dcoef_many(grads, qdatas, scales, zeros):
            qts = [as_quantized(q, s, z, bits, gs, g.shape)
                   for g, q, s, z in zip(grads, qdatas, scales, _zs(zeros, len(grads)), strict=True)]
            return backend.dcoef_many_q(list(grads), qts)

        ctx.dcoef_many = dcoef_many

    @staticmethod
    def backward(ctx, *grads):
        n, need = ctx.n, ctx.needs_input_grad
        dbases, dcoefs = _merge_many_q_grads(ctx, grads, any(need[5:5 + n]), need[4])
        rest = len(need) - 5 - n
        return (None, None, None, None, dcoefs, *(dbases or [None] * n), *([None] * rest))


# ------------------------------------------------------------------------------------- merged_linear_q
@torch.library.custom_op(f"{NS}::merged_linear_q", mutates_args=())
def merged_linear_q_op(x: Tensor, w0: Tensor, qdata: Tensor, scales: Tensor, zeros: Optional[Tensor], coef_w: Tensor,
                       b0: Optional[Tensor], tau_b: Optional[Tensor], coef_b: Optional[Tensor], bits: int,
                       group_size: int, backend: str) -> Tensor:
    qt = as_quantized(qdata, scales, zeros, bits, group_size, w0.shape)
    return get_backend(backend).merged_linear_q_fwd(x, w0, qt, coef_w, b0, tau_b, coef_b)


@merged_linear_q_op.register_fake
def _(x, w0, qdata, scales, zeros, coef_w, b0, tau_b, coef_b, bits, group_size, backend):
    return x.new_empty(x.shape[0], w0.shape[0])


@torch.library.custom_op(f"{NS}::merged_linear_q_backward", mutates_args=())
def merged_linear_q_backward_op(dy: Tensor, x: Tensor, w0: Tensor, qdata: Tensor, scales: Tensor,
                                zeros: Optional[Tensor], coef_w: Tensor, tau_b: Optional[Tensor], need_dx: bool,
                                need_dcoef_w: bool, need_dcoef_b: bool, bits: int, group_size: int,
                                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    qt = as_quantized(qdata, scales, zeros, bits, group_size, w0.shape)
    return get_backend(backend).merged_linear_q_bwd(dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcoef_w,
                                                    need_dcoef_b)


@merged_linear_q_backward_op.register_fake
def _(dy, x, w0, qdata, scales, zeros, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b, bits, group_size, backend):
    acc = acc_dtype(w0.dtype, x.dtype)
    K = qdata.shape[0]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0, dtype=acc)
    return dx, x.new_empty(K if need_dcoef_w else 0, dtype=acc), x.new_empty(K if need_dcoef_b else 0, dtype=acc)


def _merged_linear_q_backward(ctx, dy):
    """Gradients of ``(x, w0, qdata, scales, zeros, coef_w, b0, tau_b, coef_b, bits, group_size, backend)``."""
    x, w0, qdata, scales, zeros, coef_w, tau_b, coef_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_w0, need_coef_w, need_b0, need_tau_b = need[0], need[1], need[5], need[6], need[7]
    need_coef_b = need[8] and tau_b is not None
    dx, dcw, dcb = ctx.bwd(dy, x, w0, qdata, scales, zeros, coef_w, tau_b, need_x, need_coef_w, need_coef_b,
                           ctx.bits, ctx.group_size)
    dw0 = dy.to(w0.dtype).t() @ x.to(w0.dtype) if need_w0 else None  # plain autograd formula (not the fast path)
    gb = dy.sum(0) if need_b0 or need_tau_b else None
    return (
        dx if need_x else None,
        dw0,
        None,
        None,
        None,
        dcw.to(coef_w.dtype) if need_coef_w else None,
        gb if need_b0 else None,
        _scaled(coef_b, gb, tau_b.dtype) if need_tau_b else None,
        dcb.to(coef_b.dtype) if need_coef_b else None,
        None,
        None,
        None,
    )


def _merged_linear_q_save(ctx, inputs):
    x, w0, qdata, scales, zeros, coef_w, b0, tau_b, coef_b, bits, group_size, _ = inputs
    ctx.save_for_backward(x, w0, qdata, scales, zeros, coef_w, tau_b, coef_b)
    ctx.bits, ctx.group_size = bits, group_size


def _merged_linear_q_setup(ctx, inputs, output):
    _merged_linear_q_save(ctx, inputs)
    ctx.bwd = _with_backend(merged_linear_q_backward_op, inputs[-1])


merged_linear_q_op.register_autograd(_merged_linear_q_backward, setup_context=_merged_linear_q_setup)


class _MergedLinearQFn(torch.autograd.Function):
    """Eager fast path of ``merged_linear_q_op``: the same arguments, the last one a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _library._FORWARD_SIGNATURE
        x, w0, qdata, scales, zeros, coef_w, b0, tau_b, coef_b, bits, group_size, backend = inputs
        qt = as_quantized(qdata, scales, zeros, bits, group_size, w0.shape)
        return backend.merged_linear_q_fwd(x, w0, qt, coef_w, b0, tau_b, coef_b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _merged_linear_q_save(ctx, inputs)
        be = inputs[-1]

        def bwd(dy, x, w0, q, s, z, coef_w, tau_b, need_dx, need_dcw, need_dcb, bits, gs):
            qt = as_quantized(q, s, z, bits, gs, w0.shape)
            return be.merged_linear_q_bwd(dy, x, w0, qt, coef_w, tau_b, need_dx, need_dcw, need_dcb)

        ctx.bwd = bwd

    @staticmethod
    def backward(ctx, dy):
        return _merged_linear_q_backward(ctx, dy)


# ------------------------------------------------------------------------------------------ entry points
def merge_q(base: Tensor, qt: QuantizedTensor, coef: Tensor, backend: str) -> Tensor:
    q, s, z = qt.components()
    if use_fast_path(base, q, s, z, coef):
        return _MergeQFn.apply(base, q, s, z, coef, qt.bits, qt.group_size, get_backend(backend))
    return merge_q_op(base, q, s, z, coef, qt.bits, qt.group_size, backend)


def merge_many_q(bases: list[Tensor], qts: list[QuantizedTensor], coefs: Tensor, backend: str) -> list[Tensor]:
    """All ``qts`` share one format (``bits``, ``group_size``)."""
    bits, gs = qts[0].bits, qts[0].group_size
    qdatas, scales = [q.qdata for q in qts], [q.scales for q in qts]
    zeros = [q.zeros for q in qts] if bits == 4 else []
    if use_fast_path(coefs, *bases, *qdatas, *scales, *zeros):
        return list(_MergeManyQFn.apply(get_backend(backend), len(bases), bits, gs, coefs, *bases, *qdatas, *scales,
                                        *zeros))
    return merge_many_q_op(bases, qdatas, scales, zeros, coefs, bits, gs, backend)


def merged_linear_q(x, w0, qt: QuantizedTensor, coef_w, b0, tau_b, coef_b, backend: str) -> Tensor:
    q, s, z = qt.components()
    if use_fast_path(x, w0, q, s, z, coef_w, b0, tau_b, coef_b):
        return _MergedLinearQFn.apply(x, w0, q, s, z, coef_w, b0, tau_b, coef_b, qt.bits, qt.group_size,
                                      get_backend(backend))
    return merged_linear_q_op(x, w0, q, s, z, coef_w, b0, tau_b, coef_b, qt.bits, qt.group_size, backend)
