"""Plain-torch implementations of the kernel primitives: the ``reference`` backend's kernels, the default
``entropy`` of every backend, and the fp64 path of the Triton backend.

Accumulation is fp32 (fp64 when any input is fp64); task vectors may be stored in bf16/fp16 below an fp32 base.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype, new_output


def _flat(t: torch.Tensor, k: int | None = None) -> torch.Tensor:
    return t.reshape(-1) if k is None else t.reshape(k, -1)


def merge(base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` with ``deltas[K, *S]``, ``coef[K]`` -> ``[*S]`` in base.dtype."""
    K = deltas.shape[0]
    acc = acc_dtype(base.dtype, deltas.dtype, coef.dtype)
    c = coef.to(acc)
    if deltas.dtype == acc:
        # one matrix-vector product over all K task vectors: [N, K] @ [K]
        out = torch.addmv(_flat(base).to(acc), _flat(deltas, K).t(), c)
    else:  # low-precision task vectors: upcast one at a time (never K full-size fp32 copies)
        out = _flat(base).to(acc, copy=True)
        for k in range(K):
            out.add_(_flat(deltas[k]).to(acc) * c[k])
    return out.reshape(base.shape).to(base.dtype)


def dcoef(grad: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``[(grad * deltas[k]).sum() for k]`` with ``grad[*S]``, ``deltas[K, *S]`` -> ``[K]`` in the acc dtype."""
    K = deltas.shape[0]
    acc = acc_dtype(grad.dtype, deltas.dtype)
    g = _flat(grad).to(acc)
    if deltas.dtype == acc:
        return torch.mv(_flat(deltas, K), g)
    return torch.stack([torch.dot(_flat(deltas[k]).to(acc), g) for k in range(K)])


def entropy_fwd(logits: torch.Tensor) -> torch.Tensor:
    """``-(softmax(z) * log_softmax(z)).sum(-1)``: ``logits[N, C]`` -> ``H[N]`` in fp32 (fp64 for fp64 input).

    ``-inf`` entries of a row with a finite entry contribute 0 (``p log p -> 0``); a row with a NaN or a ``+inf``,
    or of only ``-inf``, gives NaN, as the plain formula does (its ``log_softmax`` is NaN in every entry, and
    ``p != 0`` keeps those NaN in the sum)."""
    acc = acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    p = logp.exp()
    plogp = torch.where(p != 0, p * logp, torch.zeros((), dtype=acc, device=logits.device))
    return -plogp.sum(-1)


def entropy_bwd(grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``dH/dz = -p * (log p + H)`` scaled per row by ``grad[N]``: -> ``[N, C]`` in logits.dtype; 0 at the ``-inf``
    entries of a row with a finite entry, NaN in every entry of a row whose ``H`` is NaN."""
    acc = acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    p = logp.exp()
    h = -torch.where(p != 0, p * logp, torch.zeros((), dtype=acc, device=logits.device)).sum(-1, keepdim=True)
    d = torch.where(p != 0, -p * (logp + h), h * 0)  # h * 0: 0 for a finite row, NaN for a NaN row
    return (d * grad.to(acc).unsqueeze(-1)).to(logits.dtype)


def entropy_tile_(z: torch.Tensor, g: torch.Tensor | None, write_grad: bool) -> torch.Tensor:
    """One tile of :func:`linear_entropy_chunks`, in place: ``z[c, V]`` logits (fp32 or fp64, contiguous) ->
    softmax entropy ``H[c]`` per row; with ``write_grad`` ``z`` is overwritten by ``dH/dz * g[:, None]`` =
    ``-p * (log p + H) * g`` (``g[c]``; ``None``: 1), else its contents are undefined afterwards. ``-inf``
    logits contribute 0, as in :func:`entropy_fwd`. One more tile (``p``) is allocated, no other."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m.masked_fill_(~torch.isfinite(m), 0.0))
    p = z.exp()
    s = p.sum(dim=1, keepdim=True)
    s.masked_fill_(s == 0, 1.0)  # a row of -inf: p = 0, H = 0
    p.div_(s)
    z.sub_(s.log_()).clamp_(min=torch.finfo(z.dtype).min)  # z := log p, finite: p * log p = 0 where p = 0
    h = -torch.einsum("ij,ij->i", p, z)  # row dot products, no [c, V] temporary
    if write_grad:
        z.add_(h.unsqueeze(1)).mul_(p).neg_()
        if g is not None:
            z.mul_(g.to(z.dtype).unsqueeze(1))
    return h


def linear_entropy_chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    g: torch.Tensor | float | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk: int,
    tile=entropy_tile_,
):
    """Softmax entropy of ``h[N, D] @ w[V, D].T + b[V]`` per row, ``chunk`` rows at a time, never holding more
    than one ``[chunk, V]`` tile of logits; with gradients of ``sum_n g[n] * H[n]`` when asked.

    Returns ``(H[N], dh[N, D] | None, dw[V, D] | None, db[V] | None)``: ``H`` in the accumulation dtype (fp32;
    fp64 when an input is fp64); ``dh`` in ``h.dtype``; ``dw``, ``db`` in the accumulation dtype (``dw`` is
    accumulated by fp32/fp64 matmuls). ``g``: ``[N]``,
    a float (every row), or ``None`` (no gradient). The matmuls run in the dtype of ``h`` and ``w`` when both are
    one 16-bit dtype (outputs rounded to it, as ``nn.Linear`` does), else in the accumulation dtype; ``tile`` is
    the in-place entropy step (:func:`entropy_tile_`, or a backend's kernel with its signature).
    """
    N, D = h.shape
    acc = acc_dtype(h.dtype, w.dtype, *(() if b is None else (b.dtype,)))
    mm = h.dtype if h.dtype == w.dtype and h.dtype in (torch.float16, torch.bfloat16) else acc
    wm = w if w.dtype == mm else w.to(mm)
    bias = None if b is None else b.to(acc)
    want_grad = g is not None and (need_dh or need_dw or need_db)
    H = new_output((N,), acc, h.device)
    dh = new_output((N, D), h.dtype, h.device) if want_grad and need_dh else None
    dw = torch.zeros(w.shape, dtype=acc, device=h.device) if want_grad and need_dw else None
    db = torch.zeros(w.shape[0], dtype=acc, device=h.device) if want_grad and need_db else None
    for r0 in range(0, N, chunk):
        hc = h[r0:r0 + chunk].to(mm)
        z = (hc @ wm.t()).to(acc)  # [c, V]: the one logits tile alive
        if bias is not None:
            z.add_(bias)
        gc = g[r0:r0 + chunk] if isinstance(g, torch.Tensor) else None
        H[r0:r0 + chunk] = tile(z, gc, want_grad)
        if not want_grad:
            continue
        if isinstance(g, float) and g != 1.0:
            z.mul_(g)
        if dh is not None:
            dh[r0:r0 + chunk] = z.to(mm) @ wm
        if dw is not None:
            dw.addmm_(z.t(), hc.to(acc))  # in the accumulation dtype whatever mm is
        if db is not None:
            db.add_(z.sum(0))
        del z
    return H, dh, dw, db


# --------------------------------------------------------------------------------------------------- LoRA
def lora_row_tasks(ranks, device: torch.device) -> torch.Tensor:
    """``[R]`` int64: the task of each rank row of the concatenated adapters (``ranks[k]`` rows of task k)."""
    counts = torch.tensor(list(ranks), dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)


def lora_row_scales(coef: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[R]``: ``coef[k] * scale[k]`` of each rank row's task ``rows[r]``, in ``dtype``."""
    return (coef.to(dtype) * scale.to(dtype))[rows]


def lora_task_sums(per_row: torch.Tensor, rows: torch.Tensor, K: int) -> torch.Tensor:
    """``[K]``: ``per_row[R]`` summed over the rank rows of each task (deterministic on every device: a one-hot
    ``[K, R]`` matrix-vector product, not scattered atomics)."""
    onehot = rows[None, :] == torch.arange(K, device=rows.device)[:, None]
    return onehot.to(per_row.dtype) @ per_row


def _base_matmul(a: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ w`` in ``w``'s dtype: ``a`` is cast, not ``w``, so no copy of an ``[out, in]`` weight is made (but
    in fp64 when ``acc`` is: the fp64 path is an oracle, not a memory-lean one)."""
    if acc == torch.float64:
        return a.to(acc) @ w.to(acc)
    return (a if a.dtype == w.dtype else a.to(w.dtype)) @ w


def lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, bias):
    """``(y, u)``: ``y[M, out] = x @ w0.T + ((x @ lora_a.T) * cs) @ lora_b.T + bias`` in ``x.dtype`` and the shrink
    ``u[M, R] = x @ lora_a.T`` (accumulation dtype, saved for backward), with ``cs[r] = coef_w[k] * scale[k]`` of
    row r's task. ``x[M, in]``, ``w0[out, in]``, ``lora_a[R, in]``, ``lora_b[out, R]``, ``ranks``: K ints summing
    to R, ``coef_w[K]``, ``scale[K]``, ``bias[out]`` (already merged) or None. The base product runs in ``w0``'s
    dtype, the low-rank terms in fp32 (fp64 for fp64 inputs). Nothing ``[out, in]`` is allocated."""
    acc = acc_dtype(x.dtype, w0.dtype, lora_a.dtype, lora_b.dtype)
    rows = lora_row_tasks(ranks, x.device)
    u = x.to(acc) @ lora_a.to(acc).t()  # [M, R]
    y = _base_matmul(x, w0.t(), acc).to(acc)  # [M, out], fresh: the low-rank term is added in place
    y.addmm_(u * lora_row_scales(coef_w, scale, rows, acc), lora_b.to(acc).t())
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype), u


def lora_linear_bwd(dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, need_dx: bool, need_dcoef_w: bool):
    """``(dx[M, in] | None, dcoef_w[K] | None)`` of :func:`lora_linear_fwd` given ``dy[M, out]`` and its saved
    ``u[M, R]``: ``dx = dy @ w0 + ((dy @ lora_b) * cs) @ lora_a`` (``x.dtype``);
    ``dcoef_w[k] = scale[k] * sum over task k's rank rows of ((dy @ lora_b) * u).sum(0)`` (accumulation dtype)."""
    acc = acc_dtype(dy.dtype, w0.dtype, lora_a.dtype, lora_b.dtype)
    rows = lora_row_tasks(ranks, dy.device)
    g = dy.to(acc) @ lora_b.to(acc)  # [M, R]
    dx = dcw = None
    if need_dx:
        dx = _base_matmul(dy, w0, acc).to(acc)  # fresh: the low-rank term is added in place
        dx = dx.addmm_(g * lora_row_scales(coef_w, scale, rows, acc), lora_a.to(acc)).to(x.dtype)
    if need_dcoef_w:
        dcw = lora_task_sums((g * u.to(acc)).sum(0), rows, len(ranks)) * scale.to(acc)
    return dx, dcw
