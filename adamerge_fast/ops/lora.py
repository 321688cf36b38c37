"""``merged_lora_linear``: a linear layer whose task vectors are LoRA adapters, never densified.

Plain-torch semantics (``K`` tasks; task k's adapter ``A_k = lora_a[o_k : o_k + r_k]`` ``[r_k, in]``,
``B_k = lora_b[:, o_k : o_k + r_k]`` ``[out, r_k]``, scale ``s_k = scale[k]``, ``o_k = r_0 + ... + r_{k-1}``)::

    W = w0 + sum_k coef_w[k] * scale[k] * B_k @ A_k                              (never formed)
    y = x @ W.T + (b0 + sum_j coef_b[j] * tau_b[j])
      = x @ w0.T + ((x @ lora_a.T) * cs) @ lora_b.T + b,   cs[r] = coef_w[k] * scale[k] for the rows r of task k

Backward, with ``u = x @ lora_a.T`` (``[M, R]``, saved by the forward) and ``g = dy @ lora_b`` (``[M, R]``)::

    dx          = dy @ w0 + (g * cs) @ lora_a
    dcoef_w[k]  = scale[k] * sum over task k's rows of (g * u).sum(0)        (= <dy^T x, s_k B_k A_k>)
    dcoef_b[j]  = <dy.sum(0), tau_b[j]>

Tasks of different ranks share one call (``ranks``; a rank may be 0). Nothing of size ``[out, in]`` beyond
``w0`` is allocated, forward or backward. Gradients of ``w0``, ``lora_a``, ``lora_b``, ``scale``, ``b0`` and
``tau_b`` themselves are supported too (plain torch formulas; ``w0``'s is ``[out, in]`` by nature).

Registered like the ops of :mod:`._library`: a ``torch.library`` custom op per direction
(``adamerge_fast::merged_lora_linear`` returning ``(y, u)``, ``adamerge_fast::merged_lora_linear_backward``)
with fake implementations and registered autograd, and an eager fast-path ``autograd.Function`` over the same
backend methods (:meth:`~adamerge_fast.ops.Backend.merged_lora_linear_fwd` / ``_bwd``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from ._common import acc_dtype
from ._library import NS, _bias_grads, _with_backend, use_fast_path
from ._registry import get_backend, resolve

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op(f"{NS}::merged_lora_linear", mutates_args=())
def merged_lora_linear_op(
    x: Tensor,
    w0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: list[int],
    coef_w: Tensor,
    scale: Tensor,
    b0: Optional[Tensor],
    tau_b: Optional[Tensor],
    coef_b: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    y, u = get_backend(backend).merged_lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b)
    return y, u


@merged_lora_linear_op.register_fake
def _(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, backend):
    acc = acc_dtype(x.dtype, w0.dtype, lora_a.dtype, lora_b.dtype)
    return x.new_empty(x.shape[0], w0.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0], dtype=acc)


@torch.library.custom_op(f"{NS}::merged_lora_linear_backward", mutates_args=())
def merged_lora_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    w0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: list[int],
    coef_w: Tensor,
    scale: Tensor,
    u: Tensor,
    tau_b: Optional[Tensor],
    need_dx: bool,
    need_dcoef_w: bool,
    need_dcoef_b: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dcw, dcb = get_backend(backend).merged_lora_linear_bwd(
        dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_dx, need_dcoef_w, need_dcoef_b
    )
    return dx, dcw, dcb


@merged_lora_linear_backward_op.register_fake
def _(dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_dx, need_dcoef_w, need_dcoef_b, backend):
    acc = acc_dtype(w0.dtype, x.dtype, lora_a.dtype, lora_b.dtype)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0, dtype=acc)
    dcw = x.new_empty(len(ranks) if need_dcoef_w else 0, dtype=acc)
    dcb = x.new_empty(tau_b.shape[0] if need_dcoef_b else 0, dtype=acc)
    return dx, dcw, dcb


# ------------------------------------------------------------------------------------------------ autograd
def _lora_backward(ctx, dy, du):
    """Gradients of ``(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, backend)``; ``du`` (of the
    saved shrink ``u``, not a result of the public op) is ignored. ``ctx.lora_bwd`` was chosen at setup."""
    x, w0, lora_a, lora_b, coef_w, scale, u, tau_b, coef_b = ctx.saved_tensors
    ranks = ctx.ranks
    need = ctx.needs_input_grad
    need_x, need_w0, need_a, need_b = need[0], need[1], need[2], need[3]
    need_coef_w, need_scale, need_b0, need_tau_b = need[5], need[6], need[7], need[8]
    need_coef_b = need[9] and tau_b is not None
    if dy is None:  # only u was used downstream: nothing flows back
        return (None,) * 11
    dx, dcw, dcb = ctx.lora_bwd(dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_x, need_coef_w,
                                need_coef_b)  # fmt: skip
    dw0 = da = db = dscale = None
    if need_w0:  # the base weight's own gradient: [out, in] by nature (not the fast path)
        dw0 = dy.to(w0.dtype).t() @ x.to(w0.dtype)
    if need_a or need_b or need_scale:  # the adapters' own gradients: plain torch, no [out, in] tensor
        acc = acc_dtype(dy.dtype, w0.dtype, lora_a.dtype, lora_b.dtype)
        rows = reference.lora_row_tasks(ranks, dy.device)
        cs = reference.lora_row_scales(coef_w, scale, rows, acc)
        g = dy.to(acc) @ lora_b.to(acc)  # [M, R]
        if need_a:
            da = ((g * cs).t() @ x.to(acc)).to(lora_a.dtype)
        if need_b:
            db = (dy.to(acc).t() @ (u.to(acc) * cs)).to(lora_b.dtype)
        if need_scale:
            dscale = (reference.lora_task_sums((g * u.to(acc)).sum(0), rows, len(ranks)) * coef_w.to(acc))
            dscale = dscale.to(scale.dtype)
    db0, dtau_b = _bias_grads(dy, coef_b, tau_b, need_b0, need_tau_b)
    return (
        dx if need_x else None,
        dw0,
        da,
        db,
        None,
        dcw.to(coef_w.dtype) if need_coef_w else None,
        dscale,
        db0,
        dtau_b,
        dcb.to(coef_b.dtype) if need_coef_b else None,
        None,
    )


def _save(ctx, inputs, output):
    x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, _ = inputs
    ctx.save_for_backward(x, w0, lora_a, lora_b, coef_w, scale, output[1], tau_b, coef_b)
    ctx.ranks = list(ranks)


def _setup(ctx, inputs, output):
    _save(ctx, inputs, output)
    ctx.lora_bwd = _with_backend(merged_lora_linear_backward_op, inputs[-1])


merged_lora_linear_op.register_autograd(_lora_backward, setup_context=_setup)


class _MergedLoRALinearFn(torch.autograd.Function):
    """Eager fast path of ``merged_lora_linear_op``: same arguments, the last one a :class:`Backend` object."""

    @staticmethod
    def forward(*inputs):  # one *args parameter: see _library._FORWARD_SIGNATURE
        *args, backend = inputs
        return tuple(backend.merged_lora_linear_fwd(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # u's gradient is never used: no zero tensor for it
        ctx.lora_bwd = inputs[-1].merged_lora_linear_bwd

    @staticmethod
    def backward(ctx, dy, du):
        return _lora_backward(ctx, dy, du)


def _apply(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, backend: str) -> Tensor:
    if use_fast_path(x, w0, lora_a, lora_b, coef_w, scale, b0, tau_b, coef_b):
        return _MergedLoRALinearFn.apply(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b,
                                         get_backend(backend))[0]  # fmt: skip
    return merged_lora_linear_op(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, backend)[0]


# ------------------------------------------------------------------------------------------------ public
def _check(name: str, t, dtypes=_FLOAT) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"merged_lora_linear: {name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"merged_lora_linear: {name}: expected a floating dtype (fp16/bf16/fp32/fp64), got {t.dtype}")


def _shape(name: str, t: Tensor, want: tuple, text: str) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"merged_lora_linear: {name} must be {text}, got {list(t.shape)}")


def merged_lora_linear(
    x: Tensor,
    w0: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: Sequence[int],
    coef_w: Tensor,
    scale: Tensor | Sequence[float],
    b0: Optional[Tensor] = None,
    tau_b: Optional[Tensor] = None,
    coef_b: Optional[Tensor] = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``x[*, in] @ (w0 + sum_k coef_w[k] scale[k] B_k A_k).T + (b0 + sum_j coef_b[j] tau_b[j])`` -> ``[*, out]``.

    ``w0[out, in]`` (any strides: a ``[in, out]`` weight's ``.t()`` works); ``lora_a[R, in]`` and
    ``lora_b[out, R]``: the K adapters concatenated along the rank (task k owns ``ranks[k]`` consecutive rows of
    ``lora_a`` / columns of ``lora_b``; ``R = sum(ranks)``, a rank may be 0); ``coef_w[K]``; ``scale[K]`` (a
    tensor or floats: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)``); ``b0[out]`` or None; ``tau_b[Kb, out]``
    and ``coef_b[Kb]`` both given (a dense bias task vector per task that has one; ``Kb`` need not be K) or both
    None. Output in ``x.dtype``; under autocast ``x`` is first cast to the autocast dtype, like ``nn.Linear``.
    See the module docstring for the backward.
    """
    _check("x", x)
    _check("w0", w0)
    _check("lora_a", lora_a)
    _check("lora_b", lora_b)
    _check("coef_w", coef_w)
    if w0.dim() != 2:
        raise ValueError(f"merged_lora_linear: w0 must be [out, in], got {list(w0.shape)}")
    out_f, in_f = w0.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"merged_lora_linear: x must be [*, in={in_f}], got {list(x.shape)}")
    try:
        ranks = [int(r) for r in ranks]
    except (TypeError, ValueError):
        raise TypeError(f"merged_lora_linear: ranks must be a sequence of ints, got {ranks!r}") from None
    K, R = len(ranks), sum(ranks)
    if K < 1 or min(ranks) < 0:
        raise ValueError(f"merged_lora_linear: ranks must be K >= 1 non-negative ints, got {ranks}")
    _shape("lora_a", lora_a, (R, in_f), f"[R=sum(ranks)={R}, in={in_f}]")
    _shape("lora_b", lora_b, (out_f, R), f"[out={out_f}, R=sum(ranks)={R}]")
    _shape("coef_w", coef_w, (K,), f"[K={K}] (one per entry of ranks)")
    if not isinstance(scale, Tensor):
        scale = torch.tensor([float(s) for s in scale], dtype=torch.float32, device=x.device)
    _check("scale", scale)
    _shape("scale", scale, (K,), f"[K={K}] (one per entry of ranks)")
    if (tau_b is None) != (coef_b is None):
        raise ValueError("merged_lora_linear: tau_b and coef_b must be given together")
    if b0 is not None:
        _check("b0", b0)
        _shape("b0", b0, (out_f,), f"[out={out_f}]")
    if tau_b is not None:
        if b0 is None:
            raise ValueError("merged_lora_linear: tau_b given without b0")
        _check("tau_b", tau_b)
        _check("coef_b", coef_b)
        if tau_b.dim() != 2 or tau_b.shape[1] != out_f or tau_b.shape[0] < 1:
            raise ValueError(f"merged_lora_linear: tau_b must be [Kb >= 1, out={out_f}], got {list(tau_b.shape)}")
        _shape("coef_b", coef_b, (tau_b.shape[0],), f"[Kb={tau_b.shape[0]}] (one per row of tau_b)")
    for name, t in (("w0", w0), ("lora_a", lora_a), ("lora_b", lora_b), ("coef_w", coef_w), ("scale", scale),
                    ("b0", b0), ("tau_b", tau_b), ("coef_b", coef_b)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"merged_lora_linear: {name} is on {t.device} but x is on {x.device}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    be = resolve(backend, "merged_lora_linear", x.device)
    lead = x.shape[:-1]
    y = _apply(x.reshape(-1, in_f), w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b, be)
    return y.reshape(*lead, out_f)
