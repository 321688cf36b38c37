"""Task-vector merge and its coefficient gradient, for one tensor and for a list of tensors in one launch.

Plain-torch semantics (fp32 accumulation)::

    merge(base[*S], deltas[K, *S], coef[K]) = base + sum_k coef[k] * deltas[k]          -> [*S], base dtype
    dcoef(grad[*S], deltas[K, *S])          = [(grad * deltas[k]).sum() for k]         -> [K],  fp32
    merge_many / dcoef_many                 = the same over a list (coefs [n, K] -> outputs, [n, K])

``merge_many`` / ``dcoef_many`` are multi-tensor-apply kernels: the launcher writes a table of raw pointers
(``data_ptr()``), sizes and coefficient rows, one row per tensor, plus a block -> tensor map, and a single
launch covers every tensor whose dtypes match (one launch per dtype combination). Each program reads its
tensor's pointers from the table and casts them with ``.to(tl.pointer_type(...))``.

``dcoef`` is deterministic: every program writes its ``K`` partial sums to a ``[num_blocks, K]`` buffer (no
float atomics) and a second kernel sums each tensor's rows in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from ._common import INTERPRET, TL_DTYPE, clamp_pow2, int64_table

# Elements per program. Under the interpreter bigger blocks mean fewer (slow, Python-level) programs.
MERGE_BLOCK = 4096 if INTERPRET else 1024
DCOEF_BLOCK = 4096 if INTERPRET else 2048
NUM_WARPS = 4

# The *_many kernels read one int64 table row per tensor:
#   [base (or grad) pointer, deltas pointer, output pointer (0 for dcoef), numel, coefs row, first block]


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _merge_block(base_ptr, delta_ptr, coef_ptr, out_ptr, N, K, block, BLOCK: tl.constexpr):
    # one BLOCK-element slice of out[N] = base[N] + sum_k coef[k] * delta[k, N]   (fp32 in registers)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64: deltas may exceed 2^31 elements
    mask = offs < N
    acc = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    d_ptrs = delta_ptr + offs  # [BLOCK] pointers into deltas[0]; advanced by N per task vector (64-bit pointers)
    for k in range(K):
        c = tl.load(coef_ptr + k).to(tl.float32)  # scalar
        acc += c * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] slice of deltas[k]
        d_ptrs += N
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dcoef_block(grad_ptr, delta_ptr, partial_ptr, N, K, block, BLOCK: tl.constexpr):
    # partial[k] = sum over one BLOCK-element slice of grad[N] * delta[k, N], for every k   (fp32)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < N
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK], read once for all K
    d_ptrs = delta_ptr + offs  # [BLOCK] pointers into deltas[0]
    for k in range(K):
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] slice of deltas[k]
        tl.store(partial_ptr + k, tl.sum(g * d, axis=0))
        d_ptrs += N


@triton.jit
def _merge_kernel(
    base_ptr,  # [N] contiguous
    delta_ptr,  # [K, N] contiguous
    coef_ptr,  # [K]
    out_ptr,  # [N], any float dtype (the merged tensor's dtype)
    N,
    K,
    BLOCK: tl.constexpr,
):
    _merge_block(base_ptr, delta_ptr, coef_ptr, out_ptr, N, K, tl.program_id(0), BLOCK)


@triton.jit
def _dcoef_partial_kernel(
    grad_ptr,  # [N] contiguous
    delta_ptr,  # [K, N] contiguous
    partial_ptr,  # [num_blocks, K] fp32
    N,
    K,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _dcoef_block(grad_ptr, delta_ptr, partial_ptr + pid.to(tl.int64) * K, N, K, pid, BLOCK)


@triton.jit
def _merge_many_kernel(
    table_ptr,  # [n, 6] int64: base ptr, delta ptr, out ptr, numel, coef row, first block
    block_tensor_ptr,  # [num_blocks] int32: which table row each program works on
    coef_ptr,  # [n_all, K] contiguous coefficients (row picked by the table)
    K,
    BASE_TY: tl.constexpr,  # element types shared by every tensor of this launch
    DELTA_TY: tl.constexpr,
    OUT_TY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 6
    base = tl.load(row + 0).to(tl.pointer_type(BASE_TY))
    delta = tl.load(row + 1).to(tl.pointer_type(DELTA_TY))
    out = tl.load(row + 2).to(tl.pointer_type(OUT_TY))
    n = tl.load(row + 3)
    coef = coef_ptr + tl.load(row + 4) * K
    _merge_block(base, delta, coef, out, n, K, pid - tl.load(row + 5), BLOCK)


@triton.jit
def _dcoef_many_partial_kernel(
    table_ptr,  # [n, 6] int64: grad ptr, delta ptr, (unused), numel, (unused), first block
    block_tensor_ptr,  # [num_blocks] int32
    partial_ptr,  # [total_blocks, K] fp32; this launch writes rows [block_base, block_base + num_blocks)
    block_base,
    K,
    GRAD_TY: tl.constexpr,
    DELTA_TY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 6
    grad = tl.load(row + 0).to(tl.pointer_type(GRAD_TY))
    delta = tl.load(row + 1).to(tl.pointer_type(DELTA_TY))
    n = tl.load(row + 3)
    partial = partial_ptr + (block_base + pid).to(tl.int64) * K
    _dcoef_block(grad, delta, partial, n, K, pid - tl.load(row + 5), BLOCK)


@triton.jit
def _segment_sum_kernel(
    partial_ptr,  # [P, K] fp32
    seg_ptr,  # [n, 2] int64 row ranges [start, end) of partial, one per output row (HAS_SEG)
    out_ptr,  # [n, K] fp32
    P,  # rows of partial; the single segment when not HAS_SEG
    K,
    HAS_SEG: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[i, :] = partial[start_i:end_i, :].sum(0), always in the same order (deterministic)
    i = tl.program_id(0)
    if HAS_SEG:
        start = tl.load(seg_ptr + 2 * i)
        end = tl.load(seg_ptr + 2 * i + 1)
    else:
        start = 0
        end = P
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mk = rk < K
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        m = (rp < end)[:, None] & mk[None, :]
        acc += tl.load(partial_ptr + rp[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0.0)
    tl.store(out_ptr + i * K + rk, tl.sum(acc, axis=0), mask=mk)


# ------------------------------------------------------------------------------------------------- launchers
def segment_sum(partial: torch.Tensor, seg: torch.Tensor | None, n: int) -> torch.Tensor:
    """``partial[P, K]`` fp32 -> ``[n, K]`` fp32: row i sums ``partial[seg[i,0]:seg[i,1]]`` (all P rows if
    ``seg`` is None, then ``n == 1``). Deterministic second pass of every coefficient gradient."""
    P, K = partial.shape
    out = new_output((n, K), torch.float32, partial.device)
    BLOCK_K = clamp_pow2(K, 1, 1 << 20)
    BLOCK_P = max(1, min(128 if not INTERPRET else 1024, 4096 // BLOCK_K))
    _segment_sum_kernel[(n,)](
        partial, partial if seg is None else seg, out, P, K,
        HAS_SEG=seg is not None, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def merge(base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` with ``deltas[K, *S]``, ``coef[K]`` -> ``[*S]`` fresh, contiguous,
    in ``out_dtype`` (default ``base.dtype``); fp32 accumulation. Inputs fp32/bf16/fp16, any layout."""
    out = new_output(base.shape, out_dtype or base.dtype, base.device)
    N = base.numel()
    if N == 0:
        return out
    K = deltas.shape[0]
    base, deltas, coef = base.contiguous(), deltas.contiguous(), coef.contiguous()
    grid = (triton.cdiv(N, MERGE_BLOCK),)
    _merge_kernel[grid](base, deltas, coef, out, N, K, BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS)
    return out


def dcoef(grad: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``[(grad * deltas[k]).sum() for k]`` with ``grad[*S]``, ``deltas[K, *S]`` -> ``[K]`` fp32, deterministic."""
    K = deltas.shape[0]
    N = grad.numel()
    grad, deltas = grad.contiguous(), deltas.contiguous()
    nblocks = triton.cdiv(N, DCOEF_BLOCK)
    partial = torch.empty((nblocks, K), dtype=torch.float32, device=grad.device)  # [num_blocks, K]
    if nblocks:
        _dcoef_partial_kernel[(nblocks,)](grad, deltas, partial, N, K, BLOCK=DCOEF_BLOCK, num_warps=NUM_WARPS)
    return segment_sum(partial, None, 1).reshape(K)


def _groups(firsts, seconds):
    """Indices of the non-empty tensors, grouped by (first dtype, second dtype): one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
        if a.numel():
            groups.setdefault((a.dtype, b.dtype), []).append(i)
    return groups


def _table(rows_idx, firsts, deltas, outs, block, device):
    """The per-tensor pointer table and the block -> row map of one launch; also each tensor's block count."""
    rows, counts, first = [], [], 0
    for i in rows_idx:
        n = firsts[i].numel()
        nb = triton.cdiv(n, block)
        out_ptr = outs[i].data_ptr() if outs is not None else 0
        rows.append([firsts[i].data_ptr(), deltas[i].data_ptr(), out_ptr, n, i, first])
        counts.append(nb)
        first += nb
    table = int64_table(rows, device)
    # block -> row map, built on the device from the (tiny) per-tensor block counts; output_size avoids a sync
    rows_ids = torch.arange(len(rows_idx), dtype=torch.int32, device=device)
    block_tensor = torch.repeat_interleave(rows_ids, int64_table(counts, device), output_size=first)
    return table, block_tensor, counts


def _one_launch_ok(device: torch.device) -> bool:
    # The interpreter copies non-CPU tensor arguments to the host, so raw device pointers read from a table
    # cannot be dereferenced there: interpreting with CUDA tensors falls back to one launch per tensor.
    # (On CPU tensors the interpreter dereferences table pointers fine; on CUDA compiled kernels always do.)
    return not INTERPRET or device.type == "cpu"


def merge_many(bases, deltas, coefs: torch.Tensor) -> list[torch.Tensor]:
    """``[merge(bases[i], deltas[i], coefs[i]) for i]`` in one launch per (base dtype, delta dtype) pair.

    ``bases[i][*S_i]``, ``deltas[i][K, *S_i]``, ``coefs[n, K]``; outputs fresh, contiguous, in each base's dtype.
    """
    n = len(bases)
    device = bases[0].device
    outs = [new_output(b.shape, b.dtype, b.device) for b in bases]
    if not _one_launch_ok(device):
        for i in range(n):
            if bases[i].numel():
                outs[i].copy_(merge(bases[i], deltas[i], coefs[i]))
        return outs
    K = coefs.shape[1]
    coefs = coefs.contiguous()
    bases = [b.contiguous() for b in bases]  # kept alive (referenced) until the launches are queued
    deltas = [d.contiguous() for d in deltas]
    for (bdt, ddt), idx in _groups(bases, deltas).items():
        table, block_tensor, counts = _table(idx, bases, deltas, outs, MERGE_BLOCK, device)
        _merge_many_kernel[(sum(counts),)](
            table, block_tensor, coefs, K,
            BASE_TY=TL_DTYPE[bdt], DELTA_TY=TL_DTYPE[ddt], OUT_TY=TL_DTYPE[bdt],
            BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return outs


def dcoef_many(grads, deltas) -> torch.Tensor:
    """``[n, K]`` fp32: row i is ``dcoef(grads[i], deltas[i])``; one partial-sum launch per dtype pair and one
    deterministic reduction launch for all rows."""
    n = len(grads)
    K = deltas[0].shape[0]
    device = grads[0].device
    if not _one_launch_ok(device):
        out = new_output((n, K), torch.float32, device)
        for i in range(n):
            out[i] = dcoef(grads[i], deltas[i])
        return out
    grads = [g.contiguous() for g in grads]
    deltas = [d.contiguous() for d in deltas]
    groups = _groups(grads, deltas)
    launches, seg, block_base = [], [[0, 0] for _ in range(n)], 0
    for (gdt, ddt), idx in groups.items():
        table, block_tensor, counts = _table(idx, grads, deltas, None, DCOEF_BLOCK, device)
        for i, c in zip(idx, counts, strict=True):
            seg[i] = [block_base, block_base + c]
            block_base += c
        launches.append((table, block_tensor, block_base - sum(counts), sum(counts), gdt, ddt))
    partial = torch.empty((block_base, K), dtype=torch.float32, device=device)  # [total_blocks, K]
    for table, block_tensor, base, nblocks, gdt, ddt in launches:
        _dcoef_many_partial_kernel[(nblocks,)](
            table, block_tensor, partial, base, K,
            GRAD_TY=TL_DTYPE[gdt], DELTA_TY=TL_DTYPE[ddt], BLOCK=DCOEF_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return segment_sum(partial, int64_table(seg, device), n)
