"""Task-vector merge and its coefficient gradient, for one tensor and for a list of tensors in one launch.

Plain-torch semantics (fp32 accumulation)::

    merge(base[*S], deltas[K, *S], coef[K]) = base + sum_k coef[k] * deltas[k]          -> [*S], base dtype
    dcoef(grad[*S], deltas[K, *S])          = [(grad * deltas[k]).sum() for k]         -> [K],  fp32
    merge_many / dcoef_many                 = the same over a list (coefs [n, K] -> outputs, [n, K])

Task-vector stacks are read in place when each slice ``deltas[k]`` is contiguous, whatever the distance between
slices (``stride(0)``): a row slice ``tau[:, lo:hi]`` of a packed projection is never copied. Other layouts are
copied once with ``.contiguous()``.

``merge_many`` / ``dcoef_many`` are multi-tensor-apply kernels: the launcher writes a table of raw pointers
(``data_ptr()``), sizes, slice strides and coefficient rows, one row per tensor, plus a block -> tensor map, and a
single launch covers every tensor of one group: same dtypes, and either all 16-byte aligned (pointers, sizes and
slice strides multiples of 16 bytes / 16 elements: the ``ALIGNED`` variant, whose loads and stores compile to
16-byte vector accesses like the single-tensor kernels') or not. Each program reads its tensor's pointers from the
table and casts them with ``.to(tl.pointer_type(...))``.

CUDA-graph capture: while the current stream is being captured the table is not built (a copy from host memory that
a replay would read again, after the host buffer is gone). Each tensor is then launched on its own through the
*capture kernels* ``_merge_one_kernel`` / ``_dcoef_one_kernel`` / ``_segment_sum_fixed_kernel``, whose arguments are
kernel parameters (captured by value). Their signatures are fixed (addresses and sizes typed int64 and never
specialized, alignment only through ``ALIGNED``), so there is one compiled variant per dtype group and ``ALIGNED``,
and the eager path launches the first tensor of every group through them once per process and device: the warm-up
that precedes every capture (``torch.cuda.graph``'s own, or the eager steps before ``torch.compile``'s cudagraphs)
has then loaded every capture kernel, and nothing is compiled or loaded during capture (``cuModuleLoadData`` is not
allowed while a stream is capturing).

``dcoef`` is deterministic: every program writes its ``K`` partial sums to a ``[num_blocks, K]`` buffer (no
float atomics) and :func:`segment_sum` sums each tensor's rows in a fixed order, in two levels when a tensor has
more than :data:`CHUNK_ROWS` rows of partial sums (fixed chunks in parallel, then the chunk sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from ._common import INTERPRET, TL_DTYPE, capturing, clamp_pow2, int64_table

# Elements per program. Under the interpreter bigger blocks mean fewer (slow, Python-level) programs.
MERGE_BLOCK = 4096 if INTERPRET else 1024
DCOEF_BLOCK = 4096 if INTERPRET else 2048
NUM_WARPS = 4
# segment_sum: rows of partial sums one program adds up; longer segments are reduced in two levels
CHUNK_ROWS = 64 if INTERPRET else 2048
ALIGN = 16  # bytes (pointers), elements (sizes and slice strides) of the ALIGNED multi-tensor variant

# The *_many kernels read one int64 table row of ROW columns per tensor:
#   [base (or grad) pointer, deltas pointer, output pointer (0 for dcoef), numel, coefs row, first block,
#    elements between task-vector slices]
ROW = 7


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _merge_block(base_ptr, delta_ptr, coef_ptr, out_ptr, N, KSTRIDE, K, block, BLOCK: tl.constexpr):
    # one BLOCK-element slice of out[N] = base[N] + sum_k coef[k] * delta[k, N]   (fp32 in registers)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64: deltas may exceed 2^31 elements
    mask = offs < N
    acc = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    d_ptrs = delta_ptr + offs  # [BLOCK] pointers into deltas[0]; advanced by KSTRIDE per task vector (64-bit)
    for k in range(K):
        c = tl.load(coef_ptr + k).to(tl.float32)  # scalar
        acc += c * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] slice of deltas[k]
        d_ptrs += KSTRIDE
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dcoef_block(grad_ptr, delta_ptr, partial_ptr, N, KSTRIDE, K, block, BLOCK: tl.constexpr):
    # partial[k] = sum over one BLOCK-element slice of grad[N] * delta[k, N], for every k   (fp32)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < N
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK], read once for all K
    d_ptrs = delta_ptr + offs  # [BLOCK] pointers into deltas[0]
    for k in range(K):
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] slice of deltas[k]
        tl.store(partial_ptr + k, tl.sum(g * d, axis=0))
        d_ptrs += KSTRIDE


@triton.jit
def _merge_kernel(
    base_ptr,  # [N] contiguous
    delta_ptr,  # [K, N]: slice k (contiguous) at delta_ptr + k * stride_k
    coef_ptr,  # [K]
    out_ptr,  # [N], any float dtype (the merged tensor's dtype)
    N,
    K,
    stride_k,
    BLOCK: tl.constexpr,
):
    _merge_block(base_ptr, delta_ptr, coef_ptr, out_ptr, N, stride_k, K, tl.program_id(0), BLOCK)


@triton.jit
def _dcoef_partial_kernel(
    grad_ptr,  # [N] contiguous
    delta_ptr,  # [K, N]: slice k (contiguous) at delta_ptr + k * stride_k
    partial_ptr,  # [num_blocks, K] fp32
    N,
    K,
    stride_k,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _dcoef_block(grad_ptr, delta_ptr, partial_ptr + pid.to(tl.int64) * K, N, stride_k, K, pid, BLOCK)


@triton.jit
def _table_item(table_ptr, block_tensor_ptr, pid, A_TY: tl.constexpr, D_TY: tl.constexpr, ALIGNED: tl.constexpr):
    # The table row of program pid: (first operand, deltas, output address, numel, slice stride, coefs row, block
    # index inside the tensor). ALIGNED: the launcher grouped 16-byte aligned rows; the hints let the compiler
    # emit 16-byte vector accesses (pointers read from memory carry no alignment information otherwise).
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 7  # ROW columns
    a_addr = tl.load(row + 0)
    d_addr = tl.load(row + 1)
    o_addr = tl.load(row + 2)
    n = tl.load(row + 3)
    kstride = tl.load(row + 6)
    a = a_addr.to(tl.pointer_type(A_TY))
    d = d_addr.to(tl.pointer_type(D_TY))
    if ALIGNED:
        a = tl.multiple_of(a, 16)
        d = tl.multiple_of(d, 16)
        n = tl.multiple_of(n, 16)
        kstride = tl.multiple_of(kstride, 16)
    return a, d, o_addr, n, kstride, tl.load(row + 4), pid - tl.load(row + 5)


@triton.jit
def _merge_many_kernel(
    table_ptr,  # [n, ROW] int64 (see ROW)
    block_tensor_ptr,  # [num_blocks] int32: which table row each program works on
    coef_ptr,  # [n_all, K] contiguous coefficients (row picked by the table)
    K,
    BASE_TY: tl.constexpr,  # element types shared by every tensor of this launch
    DELTA_TY: tl.constexpr,
    OUT_TY: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row 16-byte aligned (see _table_item)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    base, delta, o_addr, n, kstride, coef_row, block = _table_item(
        table_ptr, block_tensor_ptr, pid, BASE_TY, DELTA_TY, ALIGNED
    )
    out = o_addr.to(tl.pointer_type(OUT_TY))
    if ALIGNED:
        out = tl.multiple_of(out, 16)
    _merge_block(base, delta, coef_ptr + coef_row * K, out, n, kstride, K, block, BLOCK)


@triton.jit
def _dcoef_many_partial_kernel(
    table_ptr,  # [n, ROW] int64 (output pointer and coefs row unused)
    block_tensor_ptr,  # [num_blocks] int32
    partial_ptr,  # [total_blocks, K] fp32; this launch writes rows [block_base, block_base + num_blocks)
    block_base,
    K,
    GRAD_TY: tl.constexpr,
    DELTA_TY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    grad, delta, _, n, kstride, _, block = _table_item(table_ptr, block_tensor_ptr, pid, GRAD_TY, DELTA_TY, ALIGNED)
    partial = partial_ptr + (block_base + pid).to(tl.int64) * K
    _dcoef_block(grad, delta, partial, n, kstride, K, block, BLOCK)


# -- capture kernels (see the module docstring): fixed signatures, no runtime specialization ----------------------
_FIXED_ARGS = dict(do_not_specialize=("base_addr", "delta_addr", "out_addr", "n_units", "K", "k_units",
                                      "partial_ptr", "coef_ptr"),
                   do_not_specialize_on_alignment=("coef_ptr", "partial_ptr"))  # fmt: skip


@triton.jit
def _fixed_item(a_addr, d_addr, n_units, k_units, A_TY: tl.constexpr, D_TY: tl.constexpr, ALIGNED: tl.constexpr):
    # (first operand, deltas, N, slice stride) of a capture kernel: the launcher passes N and the slice stride in
    # units of 16 elements when ALIGNED (a product by 16 carries its divisibility to the compiler)
    a = a_addr.to(tl.pointer_type(A_TY))
    d = d_addr.to(tl.pointer_type(D_TY))
    if ALIGNED:
        return tl.multiple_of(a, 16), tl.multiple_of(d, 16), n_units * 16, k_units * 16
    return a, d, n_units, k_units


@triton.jit(**_FIXED_ARGS)
def _merge_one_kernel(
    base_addr: tl.int64,  # addresses (data_ptr()) of base [N], deltas [K, N] (slice stride kstride), out [N]
    delta_addr: tl.int64,
    coef_ptr,  # [K]
    out_addr: tl.int64,
    n_units: tl.int64,  # N, or N / 16 when ALIGNED (see _fixed_item)
    K: tl.int32,
    k_units: tl.int64,  # elements between task-vector slices, or that / 16 when ALIGNED
    BASE_TY: tl.constexpr,
    DELTA_TY: tl.constexpr,
    OUT_TY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    base, delta, N, kstride = _fixed_item(base_addr, delta_addr, n_units, k_units, BASE_TY, DELTA_TY, ALIGNED)
    out = out_addr.to(tl.pointer_type(OUT_TY))
    if ALIGNED:
        out = tl.multiple_of(out, 16)
    _merge_block(base, delta, coef_ptr, out, N, kstride, K, tl.program_id(0), BLOCK)


@triton.jit(**_FIXED_ARGS)
def _dcoef_one_kernel(
    base_addr: tl.int64,  # the gradient [N]
    delta_addr: tl.int64,
    partial_ptr,  # [num_blocks, K] fp32
    n_units: tl.int64,  # as in _merge_one_kernel
    K: tl.int32,
    k_units: tl.int64,
    GRAD_TY: tl.constexpr,
    DELTA_TY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    grad, delta, N, kstride = _fixed_item(base_addr, delta_addr, n_units, k_units, GRAD_TY, DELTA_TY, ALIGNED)
    pid = tl.program_id(0)
    _dcoef_block(grad, delta, partial_ptr + pid.to(tl.int64) * K, N, kstride, K, pid, BLOCK)


@triton.jit
def _segment_sum_kernel(
    partial_ptr,  # [P, K] fp32
    seg_ptr,  # [n, 2] int64 row ranges [start, end) of partial, one per output row (HAS_SEG)
    out_ptr,  # [n, K] fp32
    P,  # rows of partial
    K,
    CHUNK,  # without HAS_SEG: output row i sums rows [i * CHUNK, min((i + 1) * CHUNK, P))
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
        start = i.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, P)
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mk = rk < K
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        m = (rp < end)[:, None] & mk[None, :]
        acc += tl.load(partial_ptr + rp[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0.0)
    tl.store(out_ptr + i.to(tl.int64) * K + rk, tl.sum(acc, axis=0), mask=mk)


# the segment sum of the capture path: _segment_sum_kernel without runtime specialization (one variant per K)
_segment_sum_fixed_kernel = triton.jit(
    _segment_sum_kernel.fn,
    do_not_specialize=("P", "K", "CHUNK"),
    do_not_specialize_on_alignment=("partial_ptr", "seg_ptr", "out_ptr"),
)


# ------------------------------------------------------------------------------------------------- launchers
def _launch_segment_sum(partial, seg, out, n, chunk, fixed=False):
    P, K = partial.shape
    BLOCK_K = clamp_pow2(K, 1, 1 << 20)
    BLOCK_P = max(1, min(128 if not INTERPRET else 1024, 4096 // BLOCK_K))
    kernel = _segment_sum_fixed_kernel if fixed else _segment_sum_kernel
    kernel[(n,)](
        partial, partial if seg is None else seg, out, P, K, max(int(chunk), 1),
        HAS_SEG=seg is not None, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )  # fmt: skip


def _chunks(bounds, chunk):
    """Split row ranges ``[(start, end)]`` into ranges of at most ``chunk`` rows: ``(chunk ranges, per input range
    the range of its chunks)``."""
    pieces, owner = [], []
    for a, b in bounds:
        first = len(pieces)
        pieces += [[s, min(s + chunk, b)] for s in range(a, b, chunk)]
        owner.append([first, len(pieces)])
    return pieces, owner


def segment_sum(partial: torch.Tensor, seg, n: int, out: torch.Tensor | None = None, _seg_t=None,
                fixed: bool = False) -> torch.Tensor:
    """``partial[P, K]`` fp32 -> ``[n, K]`` fp32: row i sums ``partial[seg[i][0]:seg[i][1]]`` (all P rows if
    ``seg`` is None, then ``n == 1``); ``seg``: a list of ``(start, end)`` pairs. Deterministic second pass of every
    coefficient gradient: ranges longer than :data:`CHUNK_ROWS` are first summed in fixed chunks, one program
    each, then the chunk sums (two levels, same order on every call). ``out``: a contiguous ``[n, K]`` fp32 tensor
    to write (default: a new one). ``_seg_t``: ``seg`` already on the device (internal). ``fixed``: through the
    capture kernel (``seg`` must be None)."""
    P, K = partial.shape
    if out is None:
        out = new_output((n, K), torch.float32, partial.device)
    bounds = [(0, P)] if seg is None else [(int(a), int(b)) for a, b in seg]
    if max((b - a for a, b in bounds), default=0) > CHUNK_ROWS:  # level 1: chunk sums in parallel
        if seg is None:
            n1 = triton.cdiv(P, CHUNK_ROWS)
            level1 = torch.empty((n1, K), dtype=torch.float32, device=partial.device)
            _launch_segment_sum(partial, None, level1, n1, CHUNK_ROWS, fixed)
            return segment_sum(level1, None, 1, out, fixed=fixed)
        pieces, owner = _chunks(bounds, CHUNK_ROWS)
        table = int64_table(pieces + owner, partial.device)  # one host-to-device copy for both levels
        level1 = torch.empty((len(pieces), K), dtype=torch.float32, device=partial.device)
        _launch_segment_sum(partial, table[: len(pieces)], level1, len(pieces), 0)
        return segment_sum(level1, owner, n, out, _seg_t=table[len(pieces) :])
    if seg is not None and _seg_t is None:
        _seg_t = int64_table([list(b) for b in bounds], partial.device)
    _launch_segment_sum(partial, _seg_t, out, n, P, fixed)
    return out


def slices(deltas: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(stack, kstride)``: ``deltas[K, *S]`` itself when every slice ``deltas[k]`` is contiguous (slice k starts
    ``k * kstride`` elements after the first), else a contiguous copy."""
    expected = 1
    for size, stride in zip(reversed(deltas.shape[1:]), reversed(deltas.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            d = deltas.contiguous()
            return d, d[0].numel()
        expected *= size
    return deltas, deltas.stride(0)


def _launch_merge(base, deltas, coef, out) -> None:
    """``out <- merge(base, deltas, coef)`` with ``base`` and ``out`` contiguous, ``coef`` contiguous."""
    N = base.numel()
    if N == 0:
        return
    d, kstride = slices(deltas)
    grid = (triton.cdiv(N, MERGE_BLOCK),)
    _merge_kernel[grid](base, d, coef, out, N, d.shape[0], kstride, BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS)


def merge(base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` with ``deltas[K, *S]``, ``coef[K]`` -> ``[*S]`` fresh, contiguous,
    in ``out_dtype`` (default ``base.dtype``); fp32 accumulation. Inputs fp32/bf16/fp16, any layout."""
    out = new_output(base.shape, out_dtype or base.dtype, base.device)
    _launch_merge(base.contiguous(), deltas, coef.contiguous(), out)
    return out


def _dcoef_partials(grad, deltas, partial) -> None:
    """``partial[num_blocks, K]`` <- per-block partial sums of ``dcoef(grad, deltas)``; ``grad`` contiguous."""
    d, kstride = slices(deltas)
    nblocks = partial.shape[0]
    if nblocks:
        _dcoef_partial_kernel[(nblocks,)](grad, d, partial, grad.numel(), d.shape[0], kstride, BLOCK=DCOEF_BLOCK,
                                          num_warps=NUM_WARPS)  # fmt: skip


def dcoef(grad: torch.Tensor, deltas: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[(grad * deltas[k]).sum() for k]`` with ``grad[*S]``, ``deltas[K, *S]`` -> ``[K]`` fp32, deterministic.
    ``out``: a contiguous ``[1, K]`` fp32 tensor to write (default: a new one)."""
    K = deltas.shape[0]
    grad = grad.contiguous()
    partial = torch.empty((triton.cdiv(grad.numel(), DCOEF_BLOCK), K), dtype=torch.float32, device=grad.device)
    _dcoef_partials(grad, deltas, partial)
    return segment_sum(partial, None, 1, out).reshape(K)


def _aligned(*ts_and_ints) -> bool:
    return all((x.data_ptr() if isinstance(x, torch.Tensor) else x) % ALIGN == 0 for x in ts_and_ints)


def _group_key(a, stack, out) -> tuple:
    """(first dtype, deltas dtype, aligned) of one tensor of a multi-tensor call; ``out`` None for dcoef."""
    d, kstride = stack
    return a.dtype, d.dtype, _aligned(a, d, a.numel(), kstride, *(() if out is None else (out,)))


def _groups(firsts, stacks, outs):
    """Indices of the non-empty tensors grouped by :func:`_group_key`: one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, (a, st) in enumerate(zip(firsts, stacks, strict=True)):
        if a.numel():
            groups.setdefault(_group_key(a, st, None if outs is None else outs[i]), []).append(i)
    return groups


def _table(rows_idx, firsts, stacks, outs, block, device):
    """The per-tensor pointer table and the block -> row map of one launch; also each tensor's block count."""
    rows, counts, first = [], [], 0
    for i in rows_idx:
        n = firsts[i].numel()
        nb = triton.cdiv(n, block)
        out_ptr = outs[i].data_ptr() if outs is not None else 0
        d, kstride = stacks[i]
        rows.append([firsts[i].data_ptr(), d.data_ptr(), out_ptr, n, i, first, kstride])
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
    # During CUDA-graph capture the table (copied from host memory) is not built either: see the module docstring.
    return (not INTERPRET or device.type == "cpu") and not capturing(device)


# (op, group key, coefs dtype or K, device) whose capture kernel variant the eager path has launched (see the
# module docstring)
_WARM: set[tuple] = set()


def _warm_first(op: str, groups: dict, extra, device) -> dict[tuple, int]:
    """For every group not warmed yet on ``device``: remove its first tensor from the group (it is launched through
    the capture kernel instead) and return ``{group key: that tensor's index}``."""
    firsts = {}
    for key, idx in groups.items():
        wk = (op, key, extra, str(device))
        if wk not in _WARM:
            _WARM.add(wk)
            firsts[key] = idx.pop(0)
    return firsts


def _merge_one(base, stack, coef_row, out) -> None:
    """``out <- merge(base, deltas, coef_row)`` through the capture kernel (``base``, ``out`` contiguous)."""
    N = base.numel()
    if N == 0:
        return
    d, kstride = stack
    _, _, aligned = _group_key(base, stack, out)
    unit = ALIGN if aligned else 1
    _merge_one_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
        base.data_ptr(), d.data_ptr(), coef_row, out.data_ptr(), N // unit, d.shape[0], kstride // unit,
        BASE_TY=TL_DTYPE[base.dtype], DELTA_TY=TL_DTYPE[d.dtype], OUT_TY=TL_DTYPE[out.dtype], ALIGNED=aligned,
        BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip


def _dcoef_one(grad, stack, out_row) -> None:
    """``out_row[1, K] <- dcoef(grad, deltas)`` through the capture kernels (``grad`` contiguous)."""
    d, kstride = stack
    K = d.shape[0]
    nblocks = triton.cdiv(grad.numel(), DCOEF_BLOCK)
    partial = torch.empty((max(nblocks, 1), K), dtype=torch.float32, device=grad.device)
    if nblocks:
        _, _, aligned = _group_key(grad, stack, None)
        unit = ALIGN if aligned else 1
        _dcoef_one_kernel[(nblocks,)](
            grad.data_ptr(), d.data_ptr(), partial, grad.numel() // unit, K, kstride // unit,
            GRAD_TY=TL_DTYPE[grad.dtype], DELTA_TY=TL_DTYPE[d.dtype], ALIGNED=aligned, BLOCK=DCOEF_BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    segment_sum(partial[:nblocks], None, 1, out_row, fixed=True)


def merge_many(bases, deltas, coefs: torch.Tensor) -> list[torch.Tensor]:
    """``[merge(bases[i], deltas[i], coefs[i]) for i]`` in one launch per group (base dtype, delta dtype, aligned).

    ``bases[i][*S_i]``, ``deltas[i][K, *S_i]``, ``coefs[n, K]``; outputs fresh, contiguous, in each base's dtype.
    """
    n = len(bases)
    device = bases[0].device
    outs = [new_output(b.shape, b.dtype, b.device) for b in bases]
    coefs = coefs.contiguous()
    bases = [b.contiguous() for b in bases]  # kept alive (referenced) until the launches are queued
    stacks = [slices(d) for d in deltas]
    if not _one_launch_ok(device):
        for i in range(n):
            if INTERPRET and device.type != "cpu":  # tensor arguments: the interpreter copies them to the host
                _launch_merge(bases[i], deltas[i], coefs[i], outs[i])
            else:
                _merge_one(bases[i], stacks[i], coefs[i], outs[i])
        return outs
    K = coefs.shape[1]
    groups = _groups(bases, stacks, outs)
    for i in _warm_first("merge", groups, coefs.dtype, device).values():
        _merge_one(bases[i], stacks[i], coefs[i], outs[i])
    for (bdt, ddt, aligned), idx in groups.items():
        if not idx:
            continue
        table, block_tensor, counts = _table(idx, bases, stacks, outs, MERGE_BLOCK, device)
        _merge_many_kernel[(sum(counts),)](
            table, block_tensor, coefs, K,
            BASE_TY=TL_DTYPE[bdt], DELTA_TY=TL_DTYPE[ddt], OUT_TY=TL_DTYPE[bdt], ALIGNED=aligned,
            BLOCK=MERGE_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return outs


def dcoef_many(grads, deltas) -> torch.Tensor:
    """``[n, K]`` fp32: row i is ``dcoef(grads[i], deltas[i])``; one partial-sum launch per group (dtypes,
    aligned) and one deterministic reduction (:func:`segment_sum`) for all rows."""
    n = len(grads)
    K = deltas[0].shape[0]
    device = grads[0].device
    grads = [g.contiguous() for g in grads]
    stacks = [slices(d) for d in deltas]
    out = new_output((n, K), torch.float32, device)
    if not _one_launch_ok(device):
        for i in range(n):
            if INTERPRET and device.type != "cpu":  # tensor arguments: the interpreter copies them to the host
                dcoef(grads[i], deltas[i], out=out[i : i + 1])
            else:
                _dcoef_one(grads[i], stacks[i], out[i : i + 1])
        return out
    groups = _groups(grads, stacks, None)
    warm = _warm_first("dcoef", groups, K, device)
    launches, seg, block_base = [], [(0, 0)] * n, 0
    for (gdt, ddt, aligned), idx in groups.items():
        if not idx:
            continue
        table, block_tensor, counts = _table(idx, grads, stacks, None, DCOEF_BLOCK, device)
        for i, c in zip(idx, counts, strict=True):
            seg[i] = (block_base, block_base + c)
            block_base += c
        launches.append((table, block_tensor, block_base - sum(counts), sum(counts), gdt, ddt, aligned))
    partial = torch.empty((block_base, K), dtype=torch.float32, device=device)  # [total_blocks, K]
    for table, block_tensor, base, nblocks, gdt, ddt, aligned in launches:
        _dcoef_many_partial_kernel[(nblocks,)](
            table, block_tensor, partial, base, K,
            GRAD_TY=TL_DTYPE[gdt], DELTA_TY=TL_DTYPE[ddt], ALIGNED=aligned, BLOCK=DCOEF_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    segment_sum(partial, seg, n, out)
    for i in warm.values():  # after the segment sum, which wrote 0 to these rows (empty segments)
        _dcoef_one(grads[i], stacks[i], out[i : i + 1])
    return out
