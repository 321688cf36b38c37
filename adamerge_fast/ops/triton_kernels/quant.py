"""Merge, coefficient gradients and the merged linear layer over quantized task vectors (``ops/quant.py``).

Plain-torch semantics (``deq(qt)`` the dequantized ``[K, *S]`` stack, fp32 accumulation)::

    merge_q(base[*S], qt, coef[K])   = base + sum_k coef[k] * deq(qt)[k]                        -> [*S], base dtype
    dcoef_q(grad[*S], qt)            = [(grad * deq(qt)[k]).sum() for k]                        -> [K],  fp32
    merged_linear_q_fwd / _dx / _dcoef_w: ``merged_linear`` (triton_kernels.merged_linear) with tau_w = deq(qt)

Every kernel reads the packed values and dequantizes them in registers (:func:`_deq`): int8 ``s[k, r] * q``,
int4 ``s[k, r, g] * (nibble - z[k, r, g])`` with ``g = c // GS``; the dense task vectors never exist. ``merge_q`` /
``dcoef_q`` run over the flattened ``[R, C]`` view in blocks (row and column of each element from its flat index);
the fused ``merged_linear`` kernel dequantizes each task-vector tile in its prologue, next to the ``w0`` tile, before
``tl.dot``; ``dcoef_w`` contracts each register tile of ``dy^T x`` with the dequantized tiles. The fwd/dx strategy
("fused" or "jit": merge this one layer into a scratch buffer, then cuBLAS) is chosen as for dense task vectors
(:func:`.merged_linear.choose_strategy`). ``merge_many_q`` is one launch per tensor (the models' quantized tensors
that are not linear weights are few: patch embedding, position embedding, projections); ``dcoef_many_q`` writes all
partial sums into one buffer and reduces them in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from ..quant import rows_cols
from ._common import INTERPRET, dot_dtype
from .merge import DCOEF_BLOCK, MERGE_BLOCK, NUM_WARPS, merge, segment_sum
from .merged_linear import _dcoef_config, _matmul_config, _prec, choose_strategy


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _deq(q_ptr, s_ptr, z_ptr, r, c, mask, q_sr, s_sr, z_sr, BITS: tl.constexpr, GS: tl.constexpr):
    # one task's dequantized values at rows r, columns c (int64 index tensors of one broadcast shape), fp32;
    # q_ptr / s_ptr / z_ptr point at that task's slice (the callers advance them by the task strides: 64-bit)
    if BITS == 8:
        q = tl.load(q_ptr + r * q_sr + c, mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + r * s_sr + c * 0, mask=mask, other=0.0)
        v = q * s
    else:
        byte = tl.load(q_ptr + r * q_sr + c // 2, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((c % 2) * 4).to(tl.int32)) & 15
        g = c // GS
        s = tl.load(s_ptr + r * s_sr + g, mask=mask, other=0.0)
        z = tl.load(z_ptr + r * z_sr + g, mask=mask, other=0).to(tl.float32)
        v = (nib.to(tl.float32) - z) * s
    return v


@triton.jit
def _deq_tile(q_ptr, s_ptr, z_ptr, r, c, rmask, cmask, g0, q_sr, s_sr, z_sr, BITS: tl.constexpr, GS: tl.constexpr,
              ONE_GROUP: tl.constexpr, R_AXIS: tl.constexpr):
    # one task's dequantized tile at rows r (1-D int64) and columns c (1-D), fp32: [len(r), len(c)] when R_AXIS == 0,
    # [len(c), len(r)] when R_AXIS == 1. Scales (and int4 zero points) load once per row as 1-D vectors (int8; int4
    # when the tile's columns lie in one group, ONE_GROUP, group g0), else per element.
    if R_AXIS == 0:
        r2 = r[:, None]
        c2 = c[None, :]
        m = rmask[:, None] & cmask[None, :]
    else:
        r2 = r[None, :]
        c2 = c[:, None]
        m = rmask[None, :] & cmask[:, None]
    if BITS == 8:
        q = tl.load(q_ptr + r2 * q_sr + c2, mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + r * s_sr, mask=rmask, other=0.0)
        if R_AXIS == 0:
            v = q * s[:, None]
        else:
            v = q * s[None, :]
    else:
        byte = tl.load(q_ptr + r2 * q_sr + c2 // 2, mask=m, other=0).to(tl.int32)
        nib = ((byte >> ((c2 % 2) * 4).to(tl.int32)) & 15).to(tl.float32)
        if ONE_GROUP:
            s = tl.load(s_ptr + r * s_sr + g0, mask=rmask, other=0.0)
            z = tl.load(z_ptr + r * z_sr + g0, mask=rmask, other=0).to(tl.float32)
            if R_AXIS == 0:
                v = (nib - z[:, None]) * s[:, None]
            else:
                v = (nib - z[None, :]) * s[None, :]
        else:
            g2 = c2 // GS
            s2 = tl.load(s_ptr + r2 * s_sr + g2, mask=m, other=0.0)
            z2 = tl.load(z_ptr + r2 * z_sr + g2, mask=m, other=0).to(tl.float32)
            v = (nib - z2) * s2
    return v


@triton.jit
def _qmerge_kernel(
    base_ptr,  # [N] contiguous (the [R, C] view of S)
    q_ptr,  # packed values: row r of task k at q_ptr + k * q_sk + r * q_sr
    s_ptr,  # fp32 scales: [K, R] (int8) / [K, R, G] (int4), unit stride along G
    z_ptr,  # uint8 zero points [K, R, G] (int4; unused for int8)
    coef_ptr,  # [K]
    out_ptr,  # [N]
    N,
    C,
    K,
    q_sk,
    q_sr,
    s_sk,
    s_sr,
    z_sk,
    z_sr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[offs] = base[offs] + sum_k coef[k] * deq_k[offs] for one BLOCK of the flattened [R, C] view
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = offs < N
    r = offs // C
    c = offs - r * C
    acc = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(K):
        cf = tl.load(coef_ptr + k).to(tl.float32)
        acc += cf * _deq(q_ptr, s_ptr, z_ptr, r, c, mask, q_sr, s_sr, z_sr, BITS, GS)
        q_ptr += q_sk
        s_ptr += s_sk
        z_ptr += z_sk
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qdcoef_partial_kernel(
    grad_ptr,  # [N] contiguous
    q_ptr,
    s_ptr,
    z_ptr,
    partial_ptr,  # [rows, K] fp32; this launch writes rows [row0, row0 + num_blocks)
    row0,
    N,
    C,
    K,
    q_sk,
    q_sr,
    s_sk,
    s_sr,
    z_sk,
    z_sr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # partial[row0 + pid, k] = sum over one BLOCK of grad * deq_k, for every k
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = offs // C
    c = offs - r * C
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # read once for all K
    out = partial_ptr + (row0 + pid).to(tl.int64) * K
    for k in range(K):
        d = _deq(q_ptr, s_ptr, z_ptr, r, c, mask, q_sr, s_sr, z_sr, BITS, GS)
        tl.store(out + k, tl.sum(g * d, axis=0))
        q_ptr += q_sk
        s_ptr += s_sk
        z_ptr += z_sk


@triton.jit
def _merged_matmul_q_kernel(
    a_ptr,  # [M, RR] activations: x (fwd, RR = in) or dy (dx, RR = out)
    w0_ptr,  # [OUT, IN] base weight (strides stride_wo, stride_wi)
    q_ptr,  # packed task vectors of the weight: [K, OUT, IN] as rows o, columns i
    s_ptr,
    z_ptr,
    coef_ptr,  # [K]
    b0_ptr,  # [N] bias (HAS_BIAS)
    taub_ptr,  # [K, N] bias task vectors (MERGE_BIAS, dense)
    coefb_ptr,  # [K] (MERGE_BIAS)
    c_ptr,  # [M, N] contiguous output
    M,
    N,
    RR,
    K,
    stride_am,
    stride_ar,
    stride_wo,
    stride_wi,
    q_sk,
    q_sr,
    s_sk,
    s_sr,
    z_sk,
    z_sr,
    stride_bn,
    stride_bk,
    stride_tbn,
    TRANS_W: tl.constexpr,  # fwd: W'[r, n] = W[n, r] (r over IN); dx: W'[r, n] = W[r, n] (r over OUT)
    HAS_BIAS: tl.constexpr,
    MERGE_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    ONE_GROUP: tl.constexpr,  # int4: every W' tile's input columns lie in one group (GS a multiple of the tile)
    DOT_TY: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # C[tile] = A @ (w0' + sum_k coef[k] deq(q)'[k]) (+ bias): the weight tile is dequantized and merged in fp32
    # registers before tl.dot; nothing [OUT, IN]-sized is written.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, RR, BLOCK_R):
        kr = (r0 + rr).to(tl.int64)  # [BLOCK_R]
        mr = kr < RR
        a = tl.load(a_ptr + rm[:, None] * stride_am + kr[None, :] * stride_ar, mask=mm[:, None] & mr[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_R]
        wmask = mr[:, None] & mn[None, :]
        qp, sp, zp = q_ptr, s_ptr, z_ptr
        if TRANS_W:  # W' tile [BLOCK_R (in), BLOCK_N (out)]: weight rows rn, columns kr
            w = tl.load(w0_ptr + rn[None, :] * stride_wo + kr[:, None] * stride_wi, mask=wmask, other=0.0)
            w = w.to(tl.float32)
            for k in range(K):
                cf = tl.load(coef_ptr + k).to(tl.float32)
                w += cf * _deq_tile(qp, sp, zp, rn, kr, mn, mr, r0 // GS, q_sr, s_sr, z_sr, BITS, GS, ONE_GROUP, 1)
                qp += q_sk
                sp += s_sk
                zp += z_sk
        else:  # W' tile [BLOCK_R (out), BLOCK_N (in)]: weight rows kr, columns rn
            w = tl.load(w0_ptr + kr[:, None] * stride_wo + rn[None, :] * stride_wi, mask=wmask, other=0.0)
            w = w.to(tl.float32)
            g0 = (pid_n * BLOCK_N) // GS
            for k in range(K):
                cf = tl.load(coef_ptr + k).to(tl.float32)
                w += cf * _deq_tile(qp, sp, zp, kr, rn, mr, mn, g0, q_sr, s_sr, z_sr, BITS, GS, ONE_GROUP, 0)
                qp += q_sk
                sp += s_sk
                zp += z_sk
        acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PREC)
    if HAS_BIAS:
        b = tl.load(b0_ptr + rn * stride_bn, mask=mn, other=0.0).to(tl.float32)  # [BLOCK_N]
        if MERGE_BIAS:
            tb = taub_ptr + rn * stride_tbn
            for k in range(K):
                b += tl.load(coefb_ptr + k).to(tl.float32) * tl.load(tb, mask=mn, other=0.0).to(tl.float32)
                tb += stride_bk
        acc += b[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _dcoef_w_q_tiles_kernel(
    dy_ptr,  # [M, OUT]
    x_ptr,  # [M, IN]
    q_ptr,  # packed task vectors [K, OUT, IN]
    s_ptr,
    z_ptr,
    partial_ptr,  # [num_tiles, K] fp32
    M,
    OUT,
    IN,
    K,
    stride_dym,
    stride_dyo,
    stride_xm,
    stride_xi,
    q_sk,
    q_sr,
    s_sk,
    s_sr,
    z_sk,
    z_sr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    ONE_GROUP: tl.constexpr,  # int4: every tile's columns lie in one group
    DOT_TY: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    # partial[tile, k] = sum over one [BLOCK_O, BLOCK_I] tile of (dy.T @ x) * deq_k: the tile of dy.T @ x lives in
    # registers, the task-vector tiles are dequantized in registers; no [OUT, IN] tensor is written.
    pid = tl.program_id(0)
    n_o = tl.cdiv(OUT, BLOCK_O)
    n_i = tl.cdiv(IN, BLOCK_I)
    group = pid // (GROUP_O * n_i)
    first_o = group * GROUP_O
    size_o = tl.minimum(n_o - first_o, GROUP_O)
    pid_o = first_o + (pid % (GROUP_O * n_i)) % size_o
    pid_i = (pid % (GROUP_O * n_i)) // size_o
    ro = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)  # [BLOCK_O]
    ri = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)  # [BLOCK_I]
    rm = tl.arange(0, BLOCK_M)
    mo = ro < OUT
    mi = ri < IN
    dyt_ptrs = dy_ptr + ro[:, None] * stride_dyo + rm[None, :] * stride_dym  # [BLOCK_O, BLOCK_M] of dy.T
    x_ptrs = x_ptr + rm[:, None] * stride_xm + ri[None, :] * stride_xi  # [BLOCK_M, BLOCK_I]
    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mk = (m0 + rm) < M
        a = tl.load(dyt_ptrs, mask=mo[:, None] & mk[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=mk[:, None] & mi[None, :], other=0.0)
        g = tl.dot(a.to(DOT_TY), b.to(DOT_TY), g, input_precision=PREC)
        dyt_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    out = partial_ptr + pid.to(tl.int64) * K
    g0 = (pid_i * BLOCK_I) // GS
    for k in range(K):
        t = _deq_tile(q_ptr, s_ptr, z_ptr, ro, ri, mo, mi, g0, q_sr, s_sr, z_sr, BITS, GS, ONE_GROUP, 0)
        tl.store(out + k, tl.sum(tl.sum(g * t, axis=1), axis=0))
        q_ptr += q_sk
        s_ptr += s_sk
        z_ptr += z_sk


# ------------------------------------------------------------------------------------------------- launchers
def _parts(qt):
    """``(q, s, z, strides)`` of a quantized stack as the kernels read it: unit stride along the packed columns and
    the groups (copies only when a caller's view lacks it); ``z`` is ``q`` (never read) for int8."""
    q = qt.qdata if qt.qdata.stride(-1) == 1 else qt.qdata.contiguous()
    s = qt.scales if qt.bits == 8 or qt.scales.stride(-1) == 1 else qt.scales.contiguous()
    if qt.bits == 4:
        z = qt.zeros if qt.zeros.stride(-1) == 1 else qt.zeros.contiguous()
        zs = (z.stride(0), z.stride(1))
    else:
        z, zs = q, (0, 0)
    # int8 scales [K, R]: the row stride is stride(1); int4 [K, R, G]: stride(1) too (G unit stride)
    return q, s, z, (q.stride(0), q.stride(1), s.stride(0), s.stride(1), *zs)


def _fmt(qt) -> dict:
    return dict(BITS=qt.bits, GS=max(qt.group_size, 1))


def _one_group(qt, cols: int) -> bool:
    """Whether tiles of ``cols`` input columns (starting at multiples of ``cols``) each lie in one int4 group."""
    return qt.bits == 4 and qt.group_size % cols == 0


def merge_q(base: torch.Tensor, qt, coef: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deq(qt)[k]`` -> ``[*S]`` fresh, contiguous, in ``out_dtype`` (default
    ``base.dtype``); fp32 accumulation."""
    out = new_output(base.shape, out_dtype or base.dtype, base.device)
    N = base.numel()
    if N == 0:
        return out
    _, C = rows_cols(base.shape)
    q, s, z, strides = _parts(qt)
    base, coef = base.contiguous(), coef.contiguous()
    _qmerge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
        base, q, s, z, coef, out, N, C, qt.num_tasks, *strides, **_fmt(qt), BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _dcoef_partials(grad, qt, partial, row0) -> None:
    N = grad.numel()
    _, C = rows_cols(grad.shape)
    q, s, z, strides = _parts(qt)
    _qdcoef_partial_kernel[(triton.cdiv(N, DCOEF_BLOCK),)](
        grad.contiguous(), q, s, z, partial, row0, N, C, qt.num_tasks, *strides, **_fmt(qt), BLOCK=DCOEF_BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip


def dcoef_q(grad: torch.Tensor, qt) -> torch.Tensor:
    """``[(grad * deq(qt)[k]).sum() for k]`` -> ``[K]`` fp32, deterministic (partial sums, then a fixed-order sum)."""
    K = qt.num_tasks
    nblocks = triton.cdiv(grad.numel(), DCOEF_BLOCK)
    partial = torch.zeros((max(nblocks, 1), K), dtype=torch.float32, device=grad.device)
    if nblocks:
        _dcoef_partials(grad, qt, partial, 0)
    return segment_sum(partial, None, 1).reshape(K)


def merge_many_q(bases, qts, coefs: torch.Tensor) -> list[torch.Tensor]:
    """``[merge_q(bases[i], qts[i], coefs[i]) for i]`` (one launch per tensor)."""
    return [merge_q(b, q, coefs[i]) for i, (b, q) in enumerate(zip(bases, qts, strict=True))]


def dcoef_many_q(grads, qts) -> torch.Tensor:
    """``[n, K]`` fp32: row i is ``dcoef_q(grads[i], qts[i])``, deterministic. Per tensor: its partial sums, then
    their fixed-order sum through the capture kernel of :func:`~.merge.segment_sum` (fixed signature) into row i.
    No host table is built, and the same launches (same specializations) run eagerly and while a CUDA stream is
    capturing, so the eager warm-up that precedes a capture has compiled and loaded all of them."""
    n, K = len(grads), qts[0].num_tasks
    out = new_output((n, K), torch.float32, grads[0].device)
    for i, (g, q) in enumerate(zip(grads, qts, strict=True)):
        nblocks = triton.cdiv(g.numel(), DCOEF_BLOCK)
        partial = torch.zeros((max(nblocks, 1), K), dtype=torch.float32, device=g.device)
        if nblocks:
            _dcoef_partials(g, q, partial, 0)
        segment_sum(partial, None, 1, out[i : i + 1], fixed=True)
    return out


def _fused_q(a, w0, qt, coef, bias, out_dtype, transpose_w: bool):
    """``C[M, N] = a[M, RR] @ W'`` with ``W' = W.T`` (forward) or ``W`` (dx), W merged and dequantized per tile."""
    M, RR = a.shape
    OUT, IN = w0.shape
    N = OUT if transpose_w else IN
    c = new_output((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return c
    if RR == 0:  # nothing to reduce: C = bias (or 0)
        c.zero_()
        if bias is not None:
            b0, tau_b, coef_b = bias
            c += b0.float() if tau_b is None else merge(b0, tau_b, coef_b, out_dtype=torch.float32)
        return c
    q, s, z, strides = _parts(qt)
    has_bias = bias is not None
    b0, tau_b, coef_b = bias if has_bias else (None, None, None)
    merge_bias = tau_b is not None
    dot_ty = dot_dtype(a.dtype) if out_dtype == a.dtype else dot_dtype(a.dtype, out_dtype)
    cfg = _matmul_config(M, N, RR, dot_ty)
    cols_tile = cfg["BLOCK_R"] if transpose_w else cfg["BLOCK_N"]  # input columns per W' tile
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _merged_matmul_q_kernel[grid](
        a, w0, q, s, z, coef,
        b0 if has_bias else w0, tau_b if merge_bias else w0, coef_b if merge_bias else coef,
        c, M, N, RR, qt.num_tasks,
        a.stride(0), a.stride(1), w0.stride(0), w0.stride(1), *strides,
        b0.stride(0) if has_bias else 0,
        tau_b.stride(0) if merge_bias else 0, tau_b.stride(1) if merge_bias else 0,
        TRANS_W=transpose_w, HAS_BIAS=has_bias, MERGE_BIAS=merge_bias, **_fmt(qt), ONE_GROUP=_one_group(qt, cols_tile),
        DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
    )  # fmt: skip
    return c


def _key(direction: str, w0, qt, *dtypes) -> tuple:
    return (direction, *w0.shape, qt.num_tasks, *dtypes, w0.dtype, f"int{qt.bits}/{qt.group_size}", w0.device)


def merged_linear_q_fwd(x, w0, qt, coef_w, b0=None, tau_b=None, coef_b=None, strategy: str | None = None):
    """``x[M, in] @ (w0 + sum_k coef_w[k] deq(qt)[k]).T + merged bias`` -> ``[M, out]`` in ``x.dtype``."""
    coef_w = coef_w.contiguous()
    coef_b = None if coef_b is None else coef_b.contiguous()

    def run(s):
        if s == "fused":
            return _fused_q(x, w0, qt, coef_w, None if b0 is None else (b0, tau_b, coef_b), x.dtype, True)
        w = merge_q(w0, qt, coef_w, out_dtype=x.dtype)  # [out, in] scratch, this layer only
        y = new_output((x.shape[0], w0.shape[0]), x.dtype, x.device)
        if b0 is None:
            torch.mm(x, w.t(), out=y)
        else:
            b = merge(b0, tau_b, coef_b, out_dtype=x.dtype) if tau_b is not None else b0.to(x.dtype)
            torch.addmm(b, x, w.t(), out=y)
        return y

    key = _key("fwd", w0, qt, x.dtype, b0 is not None)
    return run(choose_strategy(x.shape[0], strategy, key, run))


def merged_linear_q_dx(dy, w0, qt, coef_w, out_dtype: torch.dtype, strategy: str | None = None):
    """``dy[M, out] @ (w0 + sum_k coef_w[k] deq(qt)[k])`` -> ``[M, in]`` in ``out_dtype``."""
    coef_w = coef_w.contiguous()

    def run(s):
        if s == "fused":
            return _fused_q(dy, w0, qt, coef_w, None, out_dtype, False)
        w = merge_q(w0, qt, coef_w, out_dtype=dy.dtype)  # [out, in] scratch
        dx = new_output((dy.shape[0], w0.shape[1]), out_dtype, dy.device)
        if dy.dtype == out_dtype:
            torch.mm(dy, w, out=dx)
        else:
            dx.copy_(dy @ w)
        return dx

    key = _key("dx", w0, qt, dy.dtype, out_dtype)
    return run(choose_strategy(dy.shape[0], strategy, key, run))


def merged_linear_q_dcoef_w(dy, x, qt):
    """``[((dy.T @ x) * deq(qt)[k]).sum() for k]`` -> ``[K]`` fp32; no ``[out, in]`` tensor; deterministic."""
    M, OUT = dy.shape
    IN = x.shape[1]
    K = qt.num_tasks
    dot_ty = dot_dtype(dy.dtype, x.dtype)
    cfg = _dcoef_config(M, OUT, IN, dot_ty)
    if qt.bits == 4 and not INTERPRET:
        # int4 tiles unpack nibbles from a 2-D byte gather: at 32 tile elements per thread (64x64 with 4 warps, 128x64
        # with 8) that spilled 350-800 B on sm_80/sm_90 (tools/triton_aot_check.py); 64x64 with 8 warps does not
        cfg.update(BLOCK_O=64, num_warps=8)
    n_tiles = triton.cdiv(OUT, cfg["BLOCK_O"]) * triton.cdiv(IN, cfg["BLOCK_I"])
    partial = torch.empty((n_tiles, K), dtype=torch.float32, device=dy.device)
    if n_tiles:
        q, s, z, strides = _parts(qt)
        _dcoef_w_q_tiles_kernel[(n_tiles,)](
            dy, x, q, s, z, partial, M, OUT, IN, K,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *strides,
            **_fmt(qt), ONE_GROUP=_one_group(qt, cfg["BLOCK_I"]), DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
        )  # fmt: skip
    return segment_sum(partial, None, 1).reshape(K)
