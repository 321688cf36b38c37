"""The kernel interface every backend implements (:class:`Backend`) and the plain-torch backend.

A backend implements two primitives, ``merge`` and ``dcoef``, and says where it runs
(``unavailable_reason``); :class:`Backend` composes every other kernel from those two, and fused backends
override what they do better. The registry and the ``auto`` order are in :mod:`._registry`.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import acc_dtype


class Backend:
    """The kernel interface. Shapes use K = number of task vectors.

    Subclasses implement at least ``merge``/``dcoef`` (and say where they run in ``unavailable_reason``);
    the defaults below build the other ops from those two primitives, materializing one tensor at a time.
    All returned tensors are fresh (never alias an input).
    """

    name = "abstract"

    # -- availability -------------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` when this backend runs on ``device``; otherwise a sentence saying why not."""
        raise NotImplementedError

    def available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) is None

    # -- primitives ---------------------------------------------------------------------------------
    def merge(self, base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``base[*S] + sum_k coef[k] * deltas[k]`` -> ``[*S]`` in ``base.dtype`` (accumulated in fp32+)."""
        raise NotImplementedError

    def dcoef(self, grad: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``[<grad, deltas[k]> for k]`` -> ``[K]`` in the accumulation dtype (fp32, or fp64 for fp64)."""
        raise NotImplementedError

    # -- composites (overridden by fused backends) ------------------------------------------------------
    def merge_many(self, bases, deltas, coefs):
        """``[merge(bases[i], deltas[i], coefs[i]) for i]``; ``coefs`` is ``[n, K]``."""
        return [self.merge(b, d, coefs[i]) for i, (b, d) in enumerate(zip(bases, deltas, strict=True))]

    def dcoef_many(self, grads, deltas):
        """``[n, K]``: row i is ``dcoef(grads[i], deltas[i])``."""
        return torch.stack([self.dcoef(g, d) for g, d in zip(grads, deltas, strict=True)])

    def merged_linear_fwd(self, x, w0, tau_w, coef_w, b0, tau_b, coef_b):
        """``x[M, in] @ merge(w0, tau_w, coef_w).T + merge(b0, tau_b, coef_b)`` -> ``[M, out]`` in x.dtype.

        ``b0[out]`` or None; ``tau_b[K, out]``/``coef_b[K]`` or None (then ``b0`` is used as it is).
        Just-in-time strategy: this one layer's merged weight exists only inside this call.
        """
        w = self.merge(w0, tau_w, coef_w).to(x.dtype)
        b = b0 if b0 is None or tau_b is None else self.merge(b0, tau_b, coef_b)
        return torch.nn.functional.linear(x, w, None if b is None else b.to(x.dtype))

    def merged_linear_bwd(self, dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        """Returns ``(dx[M, in] | empty, dcoef_w[K] | empty, dcoef_b[K] | empty)``.

        ``dx = dy @ W``; ``dcoef_w[k] = <dy^T x, tau_w[k]>``; ``dcoef_b[k] = <dy.sum(0), tau_b[k]>``.
        """
        acc = acc_dtype(w0.dtype, x.dtype)

        def empty():  # distinct tensors: custom-op outputs must not alias each other
            return dy.new_empty(0, dtype=acc)

        dx = empty()
        if need_dx:
            w = self.merge(w0, tau_w, coef_w).to(dy.dtype)
            dx = (dy @ w).to(x.dtype)
        dcw = empty()
        if need_dcoef_w:
            dw = dy.to(acc).t() @ x.to(acc)  # [out, in]: the weight gradient this composite does allocate
            dcw = self.dcoef(dw, tau_w)
        dcb = empty()
        if need_dcoef_b:
            dcb = self.dcoef(dy.to(acc).sum(0), tau_b)
        return dx, dcw, dcb

    def merged_lora_linear_fwd(self, x, w0, lora_a, lora_b, ranks, coef_w, scale, b0, tau_b, coef_b):
        """``(y[M, out], u[M, R])``: ``y = x @ w0.T + ((x @ lora_a.T) * cs) @ lora_b.T + merge(b0, tau_b, coef_b)``
        in x.dtype, ``u = x @ lora_a.T`` in the accumulation dtype (saved for backward); ``cs[r]`` is
        ``coef_w[k] * scale[k]`` of rank row r's task k (``ranks[k]`` consecutive rows per task). Shapes:
        ``lora_a[R, in]``, ``lora_b[out, R]``, ``ranks`` K ints, ``coef_w``/``scale`` ``[K]``, ``b0[out]`` or None,
        ``tau_b[Kb, out]``/``coef_b[Kb]`` or None. Plain torch (:func:`.reference.lora_linear_fwd`); no
        ``[out, in]`` tensor."""
        b = b0 if b0 is None or tau_b is None else self.merge(b0, tau_b, coef_b)
        return reference.lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, b)

    def merged_lora_linear_bwd(self, dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b,
                               need_dx, need_dcoef_w, need_dcoef_b):
        """``(dx[M, in] | empty, dcoef_w[K] | empty, dcoef_b[Kb] | empty)`` of :meth:`merged_lora_linear_fwd`:
        ``dx = dy @ w0 + ((dy @ lora_b) * cs) @ lora_a``;
        ``dcoef_w[k] = scale[k] * sum((dy @ lora_b_k) * u_k)``; ``dcoef_b[k] = <dy.sum(0), tau_b[k]>``."""
        acc = acc_dtype(w0.dtype, x.dtype, lora_a.dtype, lora_b.dtype)
        dx, dcw = reference.lora_linear_bwd(dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, need_dx,
                                            need_dcoef_w)
        dcb = self.dcoef(dy.to(acc).sum(0), tau_b) if need_dcoef_b else None
        # distinct empties for what was not asked: custom-op outputs must not alias each other
        return tuple(t if t is not None else dy.new_empty(0, dtype=acc) for t in (dx, dcw, dcb))

    def entropy_fwd(self, logits):
        """``logits[N, C]`` -> softmax entropy ``[N]`` (fp32; fp64 for fp64 logits): :func:`.reference.entropy_fwd`."""
        return reference.entropy_fwd(logits)

    def entropy_bwd(self, grad, logits):
        """``grad[N]``, ``logits[N, C]`` -> ``dlogits[N, C]`` in logits.dtype: :func:`.reference.entropy_bwd`."""
        return reference.entropy_bwd(grad, logits)

    # -- fused linear head + entropy (ops.linear_entropy), composed over merge / dcoef / entropy_tile_ ----------------
    def entropy_tile_(self, z, g, write_grad):
        """One ``[c, V]`` logits tile in place -> ``H[c]`` (and the gradient in ``z``):
        :func:`.reference.entropy_tile_`."""
        return reference.entropy_tile_(z, g, write_grad)

    def linear_entropy_grads(self, g, h, w0, b0, tau_w, coef_w, tau_b, coef_b, need_dh, need_dw, need_db,
                             need_dcoef_w, need_dcoef_b, chunk):
        """``(H[N], dh, dw, db, dcoef_w, dcoef_b)`` of ``sum_n g[n] H[n]`` (``g``: ``[N]``, a float, or ``None`` for
        ``H`` alone; a gradient not needed is ``None``) with ``H`` the softmax entropy of ``h @ W.T + b`` per row,
        ``W = merge(w0, tau_w, coef_w)`` (``w0`` when ``tau_w`` is None), ``b`` likewise.

        The merged head exists only inside this call; the logits never exist beyond one ``[chunk, V]`` tile
        (:func:`.reference.linear_entropy_chunks` with this backend's ``entropy_tile_``). ``dw``/``db`` (fp32 or
        fp64) are ``[V, D]``/``[V]`` accumulators, allocated when they or the coefficient gradients are needed.
        """
        w = w0 if tau_w is None else self.merge(w0, tau_w, coef_w)
        b = b0 if b0 is None or tau_b is None else self.merge(b0, tau_b, coef_b)
        H, dh, dw, db = reference.linear_entropy_chunks(
            h, w, b, g, need_dh, need_dw or need_dcoef_w, need_db or need_dcoef_b, chunk, self.entropy_tile_)
        dcw = self.dcoef(dw, tau_w) if need_dcoef_w else None
        dcb = self.dcoef(db, tau_b) if need_dcoef_b else None
        return H, dh, dw if need_dw else None, db if need_db else None, dcw, dcb


class ReferenceBackend(Backend):
    """Plain torch (:mod:`.reference`): the test oracle's twin and the fallback on every device."""

    name = "reference"

    def unavailable_reason(self, device):
        return None

    merge = staticmethod(reference.merge)
    dcoef = staticmethod(reference.dcoef)
