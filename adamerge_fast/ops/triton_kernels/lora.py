"""LoRA adapters as task vectors: a linear layer through ``w0`` plus K low-rank terms, forward and backward.

Plain-torch semantics (``lora_a[R, in]`` and ``lora_b[out, R]``: the K adapters concatenated along the rank,
``rows[r]``: the task of rank row r, ``cs[r] = coef_w[rows[r]] * scale[rows[r]]``; fp32 accumulation)::

    fwd:      u[M, R]   = x[M, in] @ lora_a.T                                 (fp32, saved for backward)
              y[M, out] = x @ w0.T + (u * cs) @ lora_b.T + bias               (x dtype)
    bwd:      g[M, R]   = dy[M, out] @ lora_b                                 (fp32)
              dx[M, in] = dy @ w0 + (g * cs) @ lora_a                         (x dtype)
              dcoef_w[k] = scale[k] * sum over rows r of task k of (g * u)[:, r].sum()

Two kernels, punica/vLLM style, and every task in one launch whatever its rank:

* ``_lora_shrink_kernel``: ``C[M, R] = A[M, D] @ W[D, R]``, all tasks at once (their adapters are one matrix);
  ``u`` (``A = x``, ``W = lora_a.T``) and ``g`` (``A = dy``, ``W = lora_b``). For ``g`` it also reduces
  ``(g * u)`` over its rows tile (``DCOEF``): per rank row, times that row's task scale, into a
  ``[R, row tiles]`` buffer that :func:`~.merge.segment_sum` sums per task in a fixed order (deterministic).
  Few row tiles x rank tiles cannot fill a GPU, so the reduction dimension ``D`` is then split over
  ``SPLIT_D`` programs whose partial products are summed by ``torch.sum`` (``dcoef`` then from ``g``).
* ``_lora_expand_kernel``: ``C[M, N] = A[M, D] @ W0'[D, N] + (U[M, R] * cs) @ E[R, N] + bias`` — the low-rank
  expand added to the base tile in registers. Forward: ``A = x``, ``W0' = w0.T``, ``U = u``, ``E = lora_b.T``;
  ``dx``: ``A = dy``, ``W0' = w0``, ``U = g``, ``E = lora_a``. The low-rank product runs in fp32.

Nothing ``[out, in]`` is allocated. ``fwd`` and ``dx`` have two strategies (chosen like ``merged_linear``'s,
:func:`~.merged_linear.choose_strategy`: measured on a GPU, else by ``M``): ``"fused"`` runs the base matmul
inside the expand kernel; ``"jit"`` (large M) runs it with the vendor matmul into the output, and the expand
kernel adds the low-rank term in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from ._common import INTERPRET, clamp_pow2, dot_dtype, fp32_dot_precision
from .merge import dcoef, merge, segment_sum
from .merged_linear import choose_strategy

# Force the shrink's split of the reduction dimension for every call (an int >= 1); None chooses from the problem
# size (_shrink_config). Tests set this to cover the split path under the interpreter.
SPLIT_D: int | None = None

_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (ranks, device) -> (rows [R] int32, seg [K, 2])


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _lora_shrink_kernel(
    a_ptr,  # [M, D] activations: x (u) or dy (g)
    w_ptr,  # W[D, R] through (stride_wd, stride_wr): lora_a.T (u) or lora_b (g)
    c_ptr,  # [SPLIT_D, M, R] fp32, contiguous: the product, or SPLIT_D partial products
    u_ptr,  # [M, R] fp32: the forward's shrink (DCOEF)
    rows_ptr,  # [R] int32: task of each rank row (DCOEF)
    scale_ptr,  # [K] task scales (DCOEF)
    partial_ptr,  # [R, n_mt] fp32 (DCOEF): scale * sum over this row tile of c * u, per rank row
    M,
    D,
    R,
    n_mt,
    stride_am,
    stride_ad,
    stride_wd,
    stride_wr,
    stride_um,
    stride_ur,
    DCOEF: tl.constexpr,
    DOT_TY: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program (pid_m, pid_r, pid_s): C[pid_s, rows pid_m, ranks pid_r] = A[rows, D chunk pid_s] @ W[D chunk, ranks]
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    rd = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mm = rm < M
    mr = rr < R
    chunk = tl.cdiv(tl.cdiv(D, SPLIT), BLOCK_D) * BLOCK_D  # D per split, a multiple of BLOCK_D
    d_lo = pid_s * chunk
    d_hi = tl.minimum(D, d_lo + chunk)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (d_lo + rd)[None, :] * stride_ad  # [BLOCK_M, BLOCK_D]
    w_ptrs = w_ptr + (d_lo + rd)[:, None] * stride_wd + rr[None, :] * stride_wr  # [BLOCK_D, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        md = (d0 + rd) < d_hi
        a = tl.load(a_ptrs, mask=mm[:, None] & md[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=md[:, None] & mr[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PREC)
        a_ptrs += BLOCK_D * stride_ad
        w_ptrs += BLOCK_D * stride_wd
    c_ptrs = c_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * R + rr[None, :]
    tl.store(c_ptrs, acc, mask=mm[:, None] & mr[None, :])
    if DCOEF:  # only with SPLIT == 1: acc is the whole g tile
        u = tl.load(u_ptr + rm[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur,
                    mask=mm[:, None] & mr[None, :], other=0.0)  # fmt: skip
        t = tl.load(rows_ptr + rr, mask=mr, other=0)
        s = tl.load(scale_ptr + t, mask=mr, other=0.0).to(tl.float32)  # [BLOCK_R]
        tl.store(partial_ptr + rr.to(tl.int64) * n_mt + pid_m, tl.sum(acc * u, axis=0) * s, mask=mr)


@triton.jit
def _lora_expand_kernel(
    a_ptr,  # [M, D] activations (HAS_BASE): x (fwd) or dy (dx)
    w0_ptr,  # W0'[D, N] through (stride_wd, stride_wn) (HAS_BASE): w0.T (fwd) or w0 (dx)
    base_ptr,  # [M, N] contiguous, any float dtype (BASE_IN): the base product, computed outside
    u_ptr,  # [M, R] fp32: u (fwd) or g (dx)
    e_ptr,  # E[R, N] through (stride_er, stride_en): lora_b.T (fwd) or lora_a (dx)
    rows_ptr,  # [R] int32: task of each rank row
    coef_ptr,  # [K]
    scale_ptr,  # [K]
    bias_ptr,  # [N] (HAS_BIAS), any float dtype
    c_ptr,  # [M, N] contiguous output (may be base_ptr itself: each program reads its tile before writing it)
    M,
    N,
    D,
    R,
    stride_am,
    stride_ad,
    stride_wd,
    stride_wn,
    stride_um,
    stride_ur,
    stride_er,
    stride_en,
    stride_bias,
    HAS_BASE: tl.constexpr,
    BASE_IN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_TY: tl.constexpr,  # operand dtype of the base tl.dot (fp32 accumulation)
    PREC: tl.constexpr,  # input precision of the base tl.dot
    LR_PREC: tl.constexpr,  # input precision of the fp32 low-rank tl.dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # program (pid_m, pid_n): C[rows, cols] = A @ W0' + (U * cs) @ E + bias, all in fp32 registers
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mm = rm < M
    mn = rn < N
    rm64 = rm[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        rd = tl.arange(0, BLOCK_D)
        a_ptrs = a_ptr + rm64 * stride_am + rd[None, :] * stride_ad  # [BLOCK_M, BLOCK_D]
        w_ptrs = w0_ptr + rd[:, None] * stride_wd + rn[None, :] * stride_wn  # [BLOCK_D, BLOCK_N]
        for d0 in range(0, D, BLOCK_D):
            md = (d0 + rd) < D
            a = tl.load(a_ptrs, mask=mm[:, None] & md[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=md[:, None] & mn[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PREC)
            a_ptrs += BLOCK_D * stride_ad
            w_ptrs += BLOCK_D * stride_wd
    if BASE_IN:
        acc += tl.load(base_ptr + rm64 * N + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    u_ptrs = u_ptr + rm64 * stride_um + rr[None, :] * stride_ur  # [BLOCK_M, BLOCK_R]
    e_ptrs = e_ptr + rr[:, None] * stride_er + rn[None, :] * stride_en  # [BLOCK_R, BLOCK_N]
    for r0 in range(0, R, BLOCK_R):
        mr = (r0 + rr) < R
        t = tl.load(rows_ptr + r0 + rr, mask=mr, other=0)
        cs = tl.load(coef_ptr + t, mask=mr, other=0.0).to(tl.float32)
        cs *= tl.load(scale_ptr + t, mask=mr, other=0.0).to(tl.float32)
        u = tl.load(u_ptrs, mask=mm[:, None] & mr[None, :], other=0.0) * cs[None, :]
        e = tl.load(e_ptrs, mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(u, e, acc, input_precision=LR_PREC)
        u_ptrs += BLOCK_R * stride_ur
        e_ptrs += BLOCK_R * stride_er
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm64 * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


# ------------------------------------------------------------------------------------------------- configs
def _prec(dot_ty) -> str:
    return fp32_dot_precision() if dot_ty == tl.float32 else "tf32"


def _shrink_config(M: int, D: int, R: int, dot_ty) -> dict:
    """Tiles of ``[M, R]`` (R: all tasks' ranks, typically 16-512), chosen from the problem size (not timed). With
    few ``(row, rank)`` tiles the reduction over ``D`` is split so that about 256 programs run (two waves on a
    132-SM GPU), each over at least two ``BLOCK_D`` chunks. One config under the interpreter."""
    if INTERPRET:
        cfg = dict(BLOCK_M=clamp_pow2(M, 16, 64), BLOCK_R=clamp_pow2(R, 16, 64), BLOCK_D=clamp_pow2(D, 16, 64),
                   SPLIT=1, num_warps=4, num_stages=1)  # fmt: skip
    else:
        block_d = 64 if dot_ty != tl.float32 else 32
        cfg = dict(BLOCK_M=clamp_pow2(M, 16, 64), BLOCK_R=clamp_pow2(R, 16, 64), BLOCK_D=block_d, SPLIT=1,
                   num_warps=4, num_stages=3)  # fmt: skip
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(R, cfg["BLOCK_R"])
        most = max(1, D // (2 * block_d))
        want = triton.cdiv(256, tiles)
        split = 1
        while split * 2 <= min(want, most, 64):
            split *= 2
        cfg["SPLIT"] = split
    if SPLIT_D is not None:
        cfg["SPLIT"] = int(SPLIT_D)
    return cfg


def _expand_config(M: int, N: int, D: int, R: int, dot_ty) -> dict:
    """Tiles of the ``[M, N]`` output, as ``merged_linear``'s fused kernel picks them for the small-M regime (one
    row tile when possible, so that ``w0`` is read once), plus the rank block of the low-rank loop. Chosen from
    the sizes, not timed; spills checked by tools/triton_aot_check.py. One config under the interpreter."""
    if INTERPRET:
        return dict(BLOCK_M=clamp_pow2(M, 16, 64), BLOCK_N=clamp_pow2(N, 16, 64), BLOCK_D=clamp_pow2(D, 16, 64),
                    BLOCK_R=clamp_pow2(R, 16, 64), num_warps=4, num_stages=1)  # fmt: skip
    block_m = clamp_pow2(M, 16, 64 if dot_ty == tl.float32 else 128)
    block_n = 64 if triton.cdiv(N, 64) >= 64 else 32
    # the fp32 low-rank tiles sit beside the accumulator: 16 ranks per step at 128 rows (32 spilled ~1 KB on sm_90,
    # tools/triton_aot_check.py), 32 below
    block_r = clamp_pow2(R, 16, 16 if block_m >= 128 else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=32, BLOCK_R=block_r,
                num_warps=8 if block_m * block_n >= 64 * 64 else 4, num_stages=3)  # fmt: skip


def _tables(ranks, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [R] int32: each rank row's task, seg [K, 2] int64: each task's rank-row range)`` on ``device``,
    built once per ``(ranks, device)`` (no host-to-device copy on later calls, e.g. under CUDA-graph capture)."""
    key = (tuple(ranks), str(device))
    hit = _TABLES.get(key)
    if hit is None:
        rows, seg, o = [], [], 0
        for k, r in enumerate(ranks):
            rows += [k] * r
            seg.append([o, o + r])
            o += r
        if len(_TABLES) > 1024:  # many distinct rank layouts: keep the cache bounded
            _TABLES.clear()
        hit = _TABLES[key] = (torch.tensor(rows, dtype=torch.int32).to(device),
                              torch.tensor(seg, dtype=torch.int64).to(device))  # fmt: skip
    return hit


def _seg_pairs(ranks) -> list[tuple[int, int]]:
    """Each task's rank-row range ``[(o_k, o_k + r_k)]`` on the host (``seg`` of :func:`_tables`)."""
    o = [0]
    for r in ranks:
        o.append(o[-1] + int(r))
    return list(zip(o[:-1], o[1:], strict=True))


# ------------------------------------------------------------------------------------------------- launchers
def _shrink(a, w, stride_wd: int, stride_wr: int, R: int, dcoef=None):
    """``(a[M, D] @ W[D, R]`` fp32, ``dc[K]`` fp32 or None``) with ``W`` seen in ``w``'s storage through
    ``(stride_wd, stride_wr)``. ``dcoef = (u[M, R], rows[R], scale[K], seg[K, 2], pairs)`` asks for
    ``dc[k] = scale[k] * sum((a @ W) * u)`` over task k's rank rows ``seg[k]`` (deterministic); ``pairs``: ``seg``
    as a host list (the reduction plans its passes from it without reading the device)."""
    M, D = a.shape
    out = new_output((M, R), torch.float32, a.device)
    if M == 0 or R == 0:
        return out, (None if dcoef is None else torch.zeros(dcoef[3].shape[0], dtype=torch.float32, device=a.device))
    dot_ty = dot_dtype(a.dtype, w.dtype)
    cfg = _shrink_config(M, D, R, dot_ty)
    split = cfg["SPLIT"]
    fuse = dcoef is not None and split == 1  # the dcoef epilogue needs the whole g tile
    n_mt = triton.cdiv(M, cfg["BLOCK_M"])
    c = out if split == 1 else torch.empty((split, M, R), dtype=torch.float32, device=a.device)
    partial = torch.empty((R, n_mt), dtype=torch.float32, device=a.device) if fuse else out
    u, rows, scale = dcoef[:3] if fuse else (out, out, out)
    grid = (n_mt, triton.cdiv(R, cfg["BLOCK_R"]), split)
    _lora_shrink_kernel[grid](
        a, w, c, u, rows, scale, partial, M, D, R, n_mt,
        a.stride(0), a.stride(1), stride_wd, stride_wr, u.stride(0), u.stride(1),
        DCOEF=fuse, DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
    )  # fmt: skip
    if split > 1:
        torch.sum(c, 0, out=out)
    if dcoef is None:
        return out, None
    u, rows, scale, seg, pairs = dcoef
    K = seg.shape[0]
    if fuse:  # partial[r, tile]: task k owns rows [o_k * n_mt, (o_k + r_k) * n_mt) of partial.reshape(-1, 1)
        pairs_t = [(a * n_mt, b * n_mt) for a, b in pairs]
        return out, segment_sum(partial.reshape(-1, 1), pairs_t, K, _seg_t=seg * n_mt).reshape(K)
    per_row = (out * u).sum(0) * scale.float()[rows.long()]  # [R]; torch reductions are deterministic
    return out, segment_sum(per_row.reshape(-1, 1), pairs, K, _seg_t=seg).reshape(K)


def _expand(a, w0_strides, w0, base, u, e, e_strides, rows, coef, scale, bias, out):
    """Write ``out[M, N] = a[M, D] @ W0'[D, N] + (u * cs) @ E[R, N] + bias`` (``W0'``, ``E`` seen in ``w0``'s and
    ``e``'s storage through their ``(row, column)`` strides; ``cs[r] = coef[rows[r]] * scale[rows[r]]``). With
    ``base[M, N]`` (contiguous, possibly ``out`` itself) the base product is read from it instead of computed."""
    M, N = out.shape
    R = u.shape[1]
    if M == 0 or N == 0:
        return out
    has_base = base is None
    D = a.shape[1] if has_base else 0
    dot_ty = dot_dtype(a.dtype) if out.dtype == a.dtype else dot_dtype(a.dtype, out.dtype)
    cfg = _expand_config(M, N, D, R, dot_ty)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _lora_expand_kernel[grid](
        a if has_base else u, w0 if has_base else u, u if has_base else base, u, e, rows, coef, scale,
        u if bias is None else bias, out, M, N, D, R,
        a.stride(0) if has_base else 0, a.stride(1) if has_base else 0,
        w0_strides[0] if has_base else 0, w0_strides[1] if has_base else 0,
        u.stride(0), u.stride(1), e_strides[0], e_strides[1], 0 if bias is None else bias.stride(0),
        HAS_BASE=has_base, BASE_IN=not has_base, HAS_BIAS=bias is not None, DOT_TY=dot_ty, PREC=_prec(dot_ty),
        LR_PREC=fp32_dot_precision(), **cfg,
    )  # fmt: skip
    return out


def _base_product(a, w, out):
    """``a @ w`` by the vendor matmul into ``out`` when the dtypes allow, else into a fresh tensor in ``w``'s dtype
    (``a`` is cast, never ``w``: no ``[out, in]`` copy). Returns the tensor holding the product."""
    if a.dtype == w.dtype == out.dtype:
        return torch.mm(a, w, out=out)
    return torch.mm(a if a.dtype == w.dtype else a.to(w.dtype), w)


def merged_lora_linear_fwd(x, w0, lora_a, lora_b, ranks, coef_w, scale, b0=None, tau_b=None, coef_b=None,
                           strategy: str | None = None):
    """``(y[M, out] in x.dtype, u[M, R] fp32)``: ``u = x @ lora_a.T``, ``y = x @ w0.T + (u * cs) @ lora_b.T +``
    the merged bias. ``x[M, in]``, ``w0[out, in]``, ``lora_a[R, in]``, ``lora_b[out, R]``, ``ranks`` (K ints),
    ``coef_w[K]``, ``scale[K]``, ``b0[out]`` or None, ``tau_b[Kb, out]``/``coef_b[Kb]`` or None. ``strategy``:
    "fused", "jit" or None (chosen, see the module docstring)."""
    M = x.shape[0]
    OUT = w0.shape[0]
    R = lora_a.shape[0]
    coef_w, scale = coef_w.contiguous(), scale.contiguous()
    rows, _ = _tables(ranks, x.device)
    u, _ = _shrink(x, lora_a, lora_a.stride(1), lora_a.stride(0), R)
    bias = b0 if b0 is None or tau_b is None else merge(b0, tau_b, coef_b.contiguous(), out_dtype=torch.float32)
    key = ("lora_fwd", OUT, w0.shape[1], R, x.dtype, w0.dtype, lora_b.dtype, b0 is not None, x.device)
    s = choose_strategy(M, strategy, key, lambda s: _fwd(x, w0, u, lora_b, rows, coef_w, scale, bias, s))
    return _fwd(x, w0, u, lora_b, rows, coef_w, scale, bias, s), u


def _fwd(x, w0, u, lora_b, rows, coef_w, scale, bias, strategy: str):
    y = new_output((x.shape[0], w0.shape[0]), x.dtype, x.device)
    base = _base_product(x, w0.t(), y) if strategy == "jit" and y.numel() else None
    e_strides = (lora_b.stride(1), lora_b.stride(0))  # E[r, o] = lora_b[o, r]
    return _expand(x, (w0.stride(1), w0.stride(0)), w0, base, u, lora_b, e_strides, rows, coef_w, scale, bias, y)


def _dx(dy, w0, g, lora_a, rows, coef_w, scale, out_dtype, strategy: str):
    dx = new_output((dy.shape[0], w0.shape[1]), out_dtype, dy.device)
    base = _base_product(dy, w0, dx) if strategy == "jit" and dx.numel() else None
    e_strides = (lora_a.stride(0), lora_a.stride(1))  # E[r, i] = lora_a[r, i]
    return _expand(dy, (w0.stride(0), w0.stride(1)), w0, base, g, lora_a, e_strides, rows, coef_w, scale, None, dx)


def merged_lora_linear_bwd(dy, x, w0, lora_a, lora_b, ranks, coef_w, scale, u, tau_b, need_dx: bool,
                           need_dcoef_w: bool, need_dcoef_b: bool, strategy: str | None = None):
    """``(dx[M, in] | empty, dcoef_w[K] | empty, dcoef_b[Kb] | empty)`` (fp32 coefficient gradients) of
    :func:`merged_lora_linear_fwd` given ``dy[M, out]`` and the forward's ``u[M, R]``."""
    dx, dcw, dcb = (dy.new_empty(0, dtype=torch.float32) for _ in range(3))  # distinct: custom-op outputs
    if need_dx or need_dcoef_w:
        R = lora_a.shape[0]
        coef_w, scale = coef_w.contiguous(), scale.contiguous()
        rows, seg = _tables(ranks, dy.device)
        g, dc = _shrink(dy, lora_b, lora_b.stride(0), lora_b.stride(1), R,
                        (u, rows, scale, seg, _seg_pairs(ranks)) if need_dcoef_w else None)  # fmt: skip
        if need_dcoef_w:
            dcw = dc
        if need_dx:
            key = ("lora_dx", *w0.shape, R, dy.dtype, w0.dtype, lora_a.dtype, x.dtype, dy.device)
            s = choose_strategy(dy.shape[0], strategy, key,
                                lambda s: _dx(dy, w0, g, lora_a, rows, coef_w, scale, x.dtype, s))  # fmt: skip
            dx = _dx(dy, w0, g, lora_a, rows, coef_w, scale, x.dtype, s)
    if need_dcoef_b:
        dcb = dcoef(dy.sum(0, dtype=torch.float32), tau_b)
    return dx, dcw, dcb
