"""Linear layer through a merged weight, forward and backward, without the ``[out, in]`` weight gradient.

Plain-torch semantics (``W = w0 + sum_k coef_w[k] * tau_w[k]``, fp32 accumulation)::

    fwd:       y[M, out]  = x[M, in] @ W.T + (b0 + sum_k coef_b[k] * tau_b[k])       (x dtype)
    dx:        dx[M, in]  = dy[M, out] @ W                                           (x dtype)
    dcoef_w:   dc[K]      = [((dy.T @ x) * tau_w[k]).sum() for k]                    (fp32)

with ``w0[out, in]``, ``tau_w[K, out, in]``, ``coef_w[K]``, ``b0[out]``, ``tau_b[K, out]``, ``coef_b[K]``.
Every input may be a strided view (index arithmetic is 64-bit: a view whose offsets pass 2^31 elements is fine).

``fwd`` and ``dx`` have two strategies, chosen per layer shape and number of rows ``M`` (see
:func:`choose_strategy`):

* ``"fused"`` (small M, memory-bound on the K+1 weight reads): one kernel, ``C[M, N] = A[M, R] @ W'[R, N]``
  where every program loads its ``w0`` tile and the K task-vector tiles, combines them with the coefficients
  in fp32 registers and feeds the combined tile to ``tl.dot``. The merged weight never exists in memory.
  ``fwd`` is ``A = x``, ``W' = W.T``; ``dx`` is ``A = dy``, ``W' = W``: the same kernel, other strides. When the
  ``[M, N]`` tile grid has fewer programs than the GPU has multiprocessors (a 768-wide layer at M <= 16: 24 tiles
  on 132 SMs), the reduction dimension R is split over more programs (split-K), which write fp32 partial products
  that a second kernel sums in split order, adds the bias to and casts (deterministic for a given GPU model).
* ``"jit"`` (large M, compute-bound): the merge kernel writes this layer's merged weight into a scratch
  buffer (already in the matmul dtype), cuBLAS does the matmul, the scratch is dropped at once.

``dcoef_w`` never allocates ``dy.T @ x``: each program computes one ``[BLOCK_O, BLOCK_I]`` tile of it in
registers (reducing over M with ``tl.dot``), contracts the tile with the K task-vector tiles and writes only
K partial sums to a ``[num_tiles * splits, K]`` buffer, which :func:`.merge.segment_sum` sums in a fixed order
(deterministic). With few tiles and a long M, M is split over several programs per tile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from ...io import write_text_atomic
from .._common import new_output
from ._common import INTERPRET, capturing, clamp_pow2, dot_dtype, fp32_dot_precision, sm_count
from .merge import merge, segment_sum

# How fwd/dx pick a strategy (choose_strategy):
# 1. a forced one: the ``strategy`` argument, else the module override STRATEGY (tests, benchmarks);
# 2. the tuned table, when it holds the key (direction, M rounded up to a power of two (at least 16), the layer's
#    N and R, K, the dtypes, the bias flag or output dtype, the GPU's name): measured earlier in this process, or
#    loaded with load_tuned() / ADAMERGE_TRITON_TUNE_TABLE;
# 3. on a GPU, *measured* for M in TUNE_M_RANGE (ADAMERGE_TRITON_TUNE=0 or a fixed table turn this off, and it never
#    happens during CUDA-graph capture): the first call for a key times both strategies on that call's own inputs
#    (_bench_ms: L2 flushed before every repetition, median of TUNE_REPS) and records the faster one; within
#    TIE_MARGIN the rule of step 4 decides (a near tie does not flip between processes). Later calls, the capture
#    of a CUDA graph included, reuse the recorded choice, so a graph runs what the warm-up ran;
# 4. FUSED_MAX_M otherwise (under the interpreter; with ADAMERGE_TRITON_TUNE=0; keys a fixed table lacks).
#    Its value (256) is an estimate from the cost model, not a measurement: the fused kernel re-reads the K+1
#    weight tiles and redoes the K-term combine once per row tile (one to a few 64-row tiles up to 256 rows),
#    the jit path pays one extra write and read of the merged weight. benchmarks/bench_gpu_ops.py measures
#    the crossover on a GPU.
# The two strategies round differently, so bitwise-reproducible runs across processes (exact resume of an
# AdaMerging run from a checkpoint included) need the same choices: ADAMERGE_TRITON_TUNE=0, or a fixed table
# (save_tuned() once, then load_tuned() / ADAMERGE_TRITON_TUNE_TABLE=path in every process).
FUSED_MAX_M = 256

# Force a strategy for every call ("fused" or "jit"); None chooses (see above). Tests set this.
STRATEGY: str | None = None

# Measure the crossover on the GPU (step 3 above); ADAMERGE_TRITON_TUNE=0 turns it off.
TUNE = os.environ.get("ADAMERGE_TRITON_TUNE", "1") != "0"
TUNE_TABLE_ENV = "ADAMERGE_TRITON_TUNE_TABLE"

_STRATEGIES = ("fused", "jit")
_TUNED: dict[tuple, str] = {}
_FIXED = False  # a fixed table was loaded: nothing is measured any more
_TABLE_LOADED_FROM_ENV = False

# Rows in (lo, hi] are measured: far above the expected crossover the fused kernel redoes the combine for hundreds
# of row tiles (jit wins), and timing it would only cost time.
TUNE_M_RANGE = (0, 8192)
TUNE_REPS = 5
TIE_MARGIN = 0.03

# Forced splits (tests; None: chosen from the grid size and the GPU's multiprocessors).
SPLIT_R: int | None = None
SPLIT_M: int | None = None
SPLIT_WORKSPACE_MAX = 64 << 20  # bytes of fp32 partial products the split-K forward may allocate


def _l2_bytes(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "L2_cache_size", 0) or (64 << 20))


def _bench_ms(fn) -> float:
    """Median of :data:`TUNE_REPS` timed calls of ``fn`` on the current CUDA device and stream, in ms, after one
    warm-up call (which also compiles the kernel). Before each timed call a buffer of twice the L2 size is zeroed:
    the inputs come from device memory as in a real step, and the GPU is busy while the host queues ``fn`` (the
    host's launch time stays out of the event interval). Tests replace this."""
    fn()
    flush = torch.empty(2 * _l2_bytes(torch.cuda.current_device()) // 4, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(TUNE_REPS)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _can_measure(device: torch.device) -> bool:
    if not TUNE or _FIXED or INTERPRET or device.type != "cuda":
        return False
    return not capturing(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _table_key(key: tuple, M: int) -> tuple:
    """The tuned-table key of a launcher key ``(direction, N, R, K, dtypes..., flag, device)``: M bucketed, dtypes as
    names, the device as its model name (a table is valid on every GPU of that model)."""
    direction, *rest, device = key
    rest = [str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for v in rest]
    return (direction, 1 << max(4, (M - 1).bit_length()), *rest, _device_name(device))


def tuned_strategies() -> dict[tuple, str]:
    """The tuned table: ``{(direction, M bucket, N, R, K, dtypes..., flag, GPU name): strategy}``."""
    _load_env_table()
    return dict(_TUNED)


def save_tuned(path) -> Path:
    """Write the tuned table (:func:`tuned_strategies`) to ``path`` as JSON (atomically)."""
    rows = [{"key": list(k), "strategy": s} for k, s in sorted(_TUNED.items(), key=lambda kv: repr(kv[0]))]
    return write_text_atomic(path, json.dumps({"format": "adamerge_fast.triton_tuned/1", "entries": rows}, indent=1))


def load_tuned(path, fixed: bool = True) -> int:
    """Load a table written by :func:`save_tuned`, replacing the current one; returns its number of entries.

    ``fixed=True``: nothing is measured any more in this process; keys the table lacks use the ``FUSED_MAX_M``
    rule. Every process that loads the same table makes the same choices (bitwise-reproducible runs).
    ``fixed=False``: the entries are reused and missing keys are still measured."""
    global _FIXED
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["entries"]
        table = {}
        for e in entries:
            key, s = tuple(e["key"]), e["strategy"]
            if s not in _STRATEGIES or not key or key[0] not in ("fwd", "dx"):
                raise ValueError(f"bad entry {e!r}")
            table[key] = s
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tuned-strategy table written by save_tuned() ({e})") from e
    _TUNED.clear()
    _TUNED.update(table)
    _FIXED = bool(fixed)
    return len(table)


def reset_tuned() -> None:
    """Forget every tuned choice and the fixed flag (measuring resumes where allowed)."""
    global _FIXED
    _TUNED.clear()
    _FIXED = False


def _load_env_table() -> None:
    global _TABLE_LOADED_FROM_ENV
    if not _TABLE_LOADED_FROM_ENV:
        _TABLE_LOADED_FROM_ENV = True
        path = os.environ.get(TUNE_TABLE_ENV)
        if path:
            load_tuned(path, fixed=True)


def choose_strategy(M: int, strategy: str | None = None, key: tuple | None = None, run=None) -> str:
    """The strategy for ``M`` rows: forced (``strategy``, then :data:`STRATEGY`), the tuned table, measured on the
    GPU when ``key`` (whose last element is the device) and ``run`` are given (``run(s)`` runs the op with strategy
    ``s``), else by :data:`FUSED_MAX_M` (see the comment above :data:`FUSED_MAX_M`)."""
    s = strategy or STRATEGY
    if s is not None:
        if s not in _STRATEGIES:
            raise ValueError(f"merged_linear strategy must be one of {_STRATEGIES} or None, got {s!r}")
        return s
    default = "fused" if M <= FUSED_MAX_M else "jit"
    if key is None:
        return default
    _load_env_table()
    k = _table_key(key, M)
    hit = _TUNED.get(k)
    if hit is not None:
        return hit
    if run is not None and not _FIXED and TUNE_M_RANGE[0] < M <= TUNE_M_RANGE[1] and _can_measure(key[-1]):
        times = {c: _bench_ms(lambda c=c: run(c)) for c in _STRATEGIES}
        best = min(times, key=times.get)
        if best != default and times[best] > (1.0 - TIE_MARGIN) * times[default]:
            best = default  # a near tie: the fixed rule decides, the same in every process
        _TUNED[k] = best
        return best
    return default


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _merged_bias(b0_ptr, taub_ptr, coefb_ptr, rn, mask, K, stride_bn, stride_bk, stride_tbn, MERGE_BIAS: tl.constexpr):
    # b0[rn] (+ sum_k coef_b[k] * tau_b[k, rn]) in fp32, for the int64 column indices rn
    b = tl.load(b0_ptr + rn * stride_bn, mask=mask, other=0.0).to(tl.float32)
    if MERGE_BIAS:
        tb = taub_ptr + rn * stride_tbn
        for k in range(K):
            b += tl.load(coefb_ptr + k).to(tl.float32) * tl.load(tb, mask=mask, other=0.0).to(tl.float32)
            tb += stride_bk
    return b


@triton.jit
def _merged_matmul_kernel(
    a_ptr,  # [M, R] activations: x (fwd) or dy (dx)
    w0_ptr,  # the base weight seen as W'[R, N] through (stride_wr, stride_wn)
    tau_ptr,  # the task vectors seen as [K, R, N] through (stride_tk, stride_tr, stride_tn)
    coef_ptr,  # [K]
    b0_ptr,  # [N] bias (HAS_BIAS), any float dtype
    taub_ptr,  # [K, N] bias task vectors (MERGE_BIAS), row stride stride_bk
    coefb_ptr,  # [K] (MERGE_BIAS)
    c_ptr,  # [M, N] contiguous output; with SPLIT the fp32 partial products [splits, M, N]
    M,
    N,
    R,
    K,
    R_PER_SPLIT,  # rows of R each program along axis 2 reduces (a multiple of BLOCK_R; >= R without a split)
    stride_am,
    stride_ar,
    stride_wr,
    stride_wn,
    stride_tk,
    stride_tr,
    stride_tn,
    stride_bn,
    stride_bk,
    stride_tbn,
    HAS_BIAS: tl.constexpr,
    MERGE_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # write fp32 partial products (no bias) for _split_sum_kernel
    DOT_TY: tl.constexpr,  # operand dtype of tl.dot (fp32 accumulation)
    PREC: tl.constexpr,  # tl.dot input_precision ("ieee" / "tf32"; only matters for fp32 operands)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # program (pid_m, pid_n, pid_k): C[pid_m*BLOCK_M:, pid_n*BLOCK_N:] = A[:, R slice pid_k] @
    # (w0' + sum_k coef[k] tau'[k])[R slice pid_k] (+ bias). pid_m varies fastest, so the programs sharing a
    # weight tile run side by side (L2 reuse). Index products are int64 (strided views past 2^31 elements).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    r_lo = pid_k.to(tl.int64) * R_PER_SPLIT
    r_hi = tl.minimum(r_lo + R_PER_SPLIT, R)
    rr = r_lo + tl.arange(0, BLOCK_R)  # [BLOCK_R] int64
    mm = rm < M
    mn = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar  # [BLOCK_M, BLOCK_R]
    w_ptrs = w0_ptr + rr[:, None] * stride_wr + rn[None, :] * stride_wn  # [BLOCK_R, BLOCK_N]
    t_ptrs = tau_ptr + rr[:, None] * stride_tr + rn[None, :] * stride_tn  # [BLOCK_R, BLOCK_N] of tau[0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        mr = (r0 - r_lo + rr) < r_hi
        a = tl.load(a_ptrs, mask=mm[:, None] & mr[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        wmask = mr[:, None] & mn[None, :]
        w = tl.load(w_ptrs, mask=wmask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N] merged in fp32
        tp = t_ptrs
        for k in range(K):
            c = tl.load(coef_ptr + k).to(tl.float32)
            w += c * tl.load(tp, mask=wmask, other=0.0).to(tl.float32)
            tp += stride_tk
        acc = tl.dot(a.to(DOT_TY), w.to(DOT_TY), acc, input_precision=PREC)
        a_ptrs += BLOCK_R * stride_ar
        w_ptrs += BLOCK_R * stride_wr
        t_ptrs += BLOCK_R * stride_tr
    cmask = mm[:, None] & mn[None, :]
    if SPLIT:
        ws_ptrs = c_ptr + (pid_k.to(tl.int64) * M + rm[:, None]) * N + rn[None, :]
        tl.store(ws_ptrs, acc, mask=cmask)
    else:
        if HAS_BIAS:
            acc += _merged_bias(b0_ptr, taub_ptr, coefb_ptr, rn, mn, K, stride_bn, stride_bk, stride_tbn,
                                MERGE_BIAS)[None, :]  # fmt: skip
        c_ptrs = c_ptr + rm[:, None] * N + rn[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _split_sum_kernel(
    ws_ptr,  # [splits, M, N] fp32 partial products
    b0_ptr,
    taub_ptr,
    coefb_ptr,
    c_ptr,  # [M, N] contiguous output
    M,
    N,
    K,
    SPLITS,
    stride_bn,
    stride_bk,
    stride_tbn,
    HAS_BIAS: tl.constexpr,
    MERGE_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # c = sum over the splits in order (deterministic) + merged bias, cast to c's dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat indices of c
    total = M * N
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += _merged_bias(b0_ptr, taub_ptr, coefb_ptr, offs % N, mask, K, stride_bn, stride_bk, stride_tbn,
                            MERGE_BIAS)  # fmt: skip
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dcoef_w_tiles_kernel(
    dy_ptr,  # [M, OUT]
    x_ptr,  # [M, IN]
    tau_ptr,  # [K, OUT, IN]
    partial_ptr,  # [num_tiles * splits, K] fp32
    M,
    OUT,
    IN,
    K,
    M_PER_SPLIT,  # rows of M one program reduces (a multiple of BLOCK_M; >= M without a split)
    stride_dym,
    stride_dyo,
    stride_xm,
    stride_xi,
    stride_tk,
    stride_to,
    stride_ti,
    DOT_TY: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_O: tl.constexpr,  # tiles grouped along OUT so that neighbouring programs share dy / x slices
):
    # partial[pid, k] = sum over one [BLOCK_O, BLOCK_I] tile of (dy[M slice].T @ x[M slice]) * tau[k]; the tile lives
    # only in registers: the [OUT, IN] weight gradient is never written. Program pid works on tile pid % num_tiles
    # and M slice pid // num_tiles.
    pid = tl.program_id(0)
    n_o = tl.cdiv(OUT, BLOCK_O)
    n_i = tl.cdiv(IN, BLOCK_I)
    n_tiles = n_o * n_i
    split = pid // n_tiles
    tile = pid % n_tiles
    group = tile // (GROUP_O * n_i)
    first_o = group * GROUP_O
    size_o = tl.minimum(n_o - first_o, GROUP_O)
    pid_o = first_o + (tile % (GROUP_O * n_i)) % size_o
    pid_i = (tile % (GROUP_O * n_i)) // size_o
    ro = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O]
    ri = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    m_lo = split.to(tl.int64) * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
    rm = m_lo + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    mo = ro < OUT
    mi = ri < IN
    dyt_ptrs = dy_ptr + ro[:, None] * stride_dyo + rm[None, :] * stride_dym  # [BLOCK_O, BLOCK_M] of dy.T
    x_ptrs = x_ptr + rm[:, None] * stride_xm + ri[None, :] * stride_xi  # [BLOCK_M, BLOCK_I]
    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # tile of dy.T @ x
    for m0 in range(m_lo, m_hi, BLOCK_M):
        mk = (m0 - m_lo + rm) < m_hi
        a = tl.load(dyt_ptrs, mask=mo[:, None] & mk[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=mk[:, None] & mi[None, :], other=0.0)
        g = tl.dot(a.to(DOT_TY), b.to(DOT_TY), g, input_precision=PREC)
        dyt_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    t_ptrs = tau_ptr + ro[:, None] * stride_to + ri[None, :] * stride_ti  # [BLOCK_O, BLOCK_I] of tau[0]
    tmask = mo[:, None] & mi[None, :]
    out = partial_ptr + pid.to(tl.int64) * K
    for k in range(K):
        t = tl.load(t_ptrs, mask=tmask, other=0.0).to(tl.float32)
        tl.store(out + k, tl.sum(tl.sum(g * t, axis=1), axis=0))
        t_ptrs += stride_tk


# ------------------------------------------------------------------------------------------------- configs
def _prec(dot_ty) -> str:
    return fp32_dot_precision() if dot_ty == tl.float32 else "tf32"


def _matmul_config(M: int, N: int, R: int, dot_ty) -> dict:
    """Block sizes of the fused kernel for the memory-bound small-M regime, chosen from the tile sizes (not
    timed). The GPU configs were cross-compiled for sm_90 and checked with ptxas resource usage
    (tools/triton_aot_check.py): no spills beyond a few bytes of stack. Exactly one config under the interpreter.
    tl.dot needs every tile dim >= 16."""
    if INTERPRET:
        return dict(BLOCK_M=clamp_pow2(M, 16, 64), BLOCK_N=clamp_pow2(N, 16, 64), BLOCK_R=clamp_pow2(R, 16, 64),
                    num_warps=4, num_stages=1)  # fmt: skip
    block_m = clamp_pow2(M, 16, 64 if dot_ty == tl.float32 else 128)  # one M tile: weights read once
    block_n = 64 if triton.cdiv(N, 64) >= 64 else 32  # narrow layers: more programs in flight
    # 8 warps from 64x64 tiles up: with 4 warps, the fp32 "ieee" dot over 16-bit task vectors needs 255 registers
    # and spills ~700 B (tools/triton_aot_check.py found it on sm_80 and sm_90)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=32, num_warps=8 if block_m * block_n >= 64 * 64 else 4,
                num_stages=3)  # fmt: skip


def _sms(device: torch.device) -> int:
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_k_count(tiles: int, steps: int, sms: int, out_bytes: int) -> int:
    """Programs along the reduction dimension of the fused kernel: 1 when its ``tiles`` output tiles fill the ``sms``
    multiprocessors, else enough for two programs per multiprocessor, at most one per ``BLOCK_R`` step (``steps``)
    and 16, and within :data:`SPLIT_WORKSPACE_MAX` of partial products (``out_bytes`` = 4 * M * N each)."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), steps, 16, SPLIT_WORKSPACE_MAX // max(1, out_bytes)))


def _split_r(M: int, N: int, R: int, cfg: dict, device: torch.device) -> int:
    steps = triton.cdiv(R, cfg["BLOCK_R"])
    if SPLIT_R is not None:
        return max(1, min(SPLIT_R, steps))
    if INTERPRET or device.type != "cuda":
        return 1
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    return split_k_count(tiles, steps, _sms(device), 4 * M * N)


def _dcoef_config(M: int, OUT: int, IN: int, dot_ty) -> dict:
    """Tiles of dy^T x: 64x64 by default, 128x64 when M is long and there are enough tiles (chosen from the tile
    sizes, not timed; spill-free on sm_90 per tools/triton_aot_check.py); one config under the interpreter."""
    if INTERPRET:
        return dict(BLOCK_O=clamp_pow2(OUT, 16, 64), BLOCK_I=clamp_pow2(IN, 16, 64), BLOCK_M=clamp_pow2(M, 16, 64),
                    GROUP_O=8, num_warps=4, num_stages=1)  # fmt: skip
    if M >= 2048 and triton.cdiv(OUT, 128) * triton.cdiv(IN, 64) >= 264:  # GEMM-like: bigger tiles
        return dict(BLOCK_O=128, BLOCK_I=64, BLOCK_M=32, GROUP_O=8, num_warps=8, num_stages=3)
    return dict(BLOCK_O=64, BLOCK_I=64, BLOCK_M=32, GROUP_O=8, num_warps=4, num_stages=3)


def split_m_count(tiles: int, steps: int, sms: int) -> int:
    """Programs per dcoef_w tile along M: 1 when the ``tiles`` give two per multiprocessor, else up to four programs
    per multiprocessor, at most 8, each keeping at least 16 ``BLOCK_M`` steps of the ``steps`` (every split reads
    the tile's K task-vector tiles again)."""
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, max(tiles, 1)), steps // 16, 8))


def _split_m(M: int, n_tiles: int, cfg: dict, device: torch.device) -> int:
    steps = triton.cdiv(M, cfg["BLOCK_M"])
    if SPLIT_M is not None:
        return max(1, min(SPLIT_M, steps))
    if INTERPRET or device.type != "cuda":
        return 1
    return split_m_count(n_tiles, steps, _sms(device))


# ------------------------------------------------------------------------------------------------- launchers
def _fused(a, w0, tau, coef, bias, out_dtype, transpose_w: bool):
    """``C[M, N] = a[M, R] @ W'`` with ``W' = W.T`` (``transpose_w``, forward) or ``W`` (dx), W merged per tile."""
    M, R = a.shape
    N = w0.shape[0] if transpose_w else w0.shape[1]
    K = tau.shape[0]
    c = new_output((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return c
    if R == 0:  # nothing to reduce: C = bias (or 0)
        c.zero_()
        if bias is not None:
            b0, tau_b, coef_b = bias
            c += b0.float() if tau_b is None else merge(b0, tau_b, coef_b, out_dtype=torch.float32)
        return c
    sw_o, sw_i = w0.stride()
    st_k, st_o, st_i = tau.stride()
    # forward: W'[r=i, n=o] = W[o, i]; dx: W'[r=o, n=i] = W[o, i]
    sw_r, sw_n = (sw_i, sw_o) if transpose_w else (sw_o, sw_i)
    st_r, st_n = (st_i, st_o) if transpose_w else (st_o, st_i)
    has_bias = bias is not None
    b0, tau_b, coef_b = bias if has_bias else (None, None, None)
    merge_bias = tau_b is not None
    bias_args = (b0 if has_bias else w0, tau_b if merge_bias else w0, coef_b if merge_bias else coef)
    bias_strides = (b0.stride(0) if has_bias else 0, tau_b.stride(0) if merge_bias else 0,
                    tau_b.stride(1) if merge_bias else 0)  # fmt: skip
    dot_ty = dot_dtype(a.dtype) if out_dtype == a.dtype else dot_dtype(a.dtype, out_dtype)
    cfg = _matmul_config(M, N, R, dot_ty)
    splits, per = _split_r(M, N, R, cfg, a.device), R
    if splits > 1:  # whole BLOCK_R steps per split; the last may be shorter
        per = triton.cdiv(triton.cdiv(R, cfg["BLOCK_R"]), splits) * cfg["BLOCK_R"]
        splits = triton.cdiv(R, per)
    target = c if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), splits)
    _merged_matmul_kernel[grid](
        a, w0, tau, coef, *bias_args, target, M, N, R, K, per,
        a.stride(0), a.stride(1), sw_r, sw_n, st_k, st_r, st_n, *bias_strides,
        HAS_BIAS=has_bias, MERGE_BIAS=merge_bias, SPLIT=splits > 1, DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
    )  # fmt: skip
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(M * N, block),)](
            target, *bias_args, c, M, N, K, splits, *bias_strides,
            HAS_BIAS=has_bias, MERGE_BIAS=merge_bias, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return c


def merged_linear_fwd(x, w0, tau_w, coef_w, b0=None, tau_b=None, coef_b=None, strategy: str | None = None):
    """``x[M, in] @ (w0 + sum_k coef_w[k] tau_w[k]).T + merged bias`` -> ``[M, out]`` in ``x.dtype``.

    ``w0[out, in]``, ``tau_w[K, out, in]``, ``coef_w[K]``, ``b0[out]`` or None, ``tau_b[K, out]`` and
    ``coef_b[K]`` or None. ``strategy``: "fused", "jit", or None (see :func:`choose_strategy`).
    """
    M = x.shape[0]
    coef_w = coef_w.contiguous()
    coef_b = None if coef_b is None else coef_b.contiguous()
    key = ("fwd", *w0.shape, tau_w.shape[0], x.dtype, w0.dtype, tau_w.dtype, b0 is not None, x.device)
    s = choose_strategy(M, strategy, key, lambda s: _fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, s))
    return _fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, s)


def _fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy: str):
    M = x.shape[0]
    if strategy == "fused":
        bias = None if b0 is None else (b0, tau_b, coef_b)
        return _fused(x, w0, tau_w, coef_w, bias, x.dtype, transpose_w=True)
    w = merge(w0, tau_w, coef_w, out_dtype=x.dtype)  # [out, in] scratch, this layer only
    y = new_output((M, w0.shape[0]), x.dtype, x.device)
    if b0 is None:
        torch.mm(x, w.t(), out=y)
    else:
        b = merge(b0, tau_b, coef_b, out_dtype=x.dtype) if tau_b is not None else b0.to(x.dtype)
        torch.addmm(b, x, w.t(), out=y)
    del w
    return y


def merged_linear_dx(dy, w0, tau_w, coef_w, out_dtype: torch.dtype, strategy: str | None = None):
    """``dy[M, out] @ (w0 + sum_k coef_w[k] tau_w[k])`` -> ``[M, in]`` in ``out_dtype``."""
    coef_w = coef_w.contiguous()
    key = ("dx", *w0.shape, tau_w.shape[0], dy.dtype, w0.dtype, tau_w.dtype, out_dtype, dy.device)
    s = choose_strategy(dy.shape[0], strategy, key, lambda s: _dx(dy, w0, tau_w, coef_w, out_dtype, s))
    return _dx(dy, w0, tau_w, coef_w, out_dtype, s)


def _dx(dy, w0, tau_w, coef_w, out_dtype: torch.dtype, strategy: str):
    M = dy.shape[0]
    if strategy == "fused":
        return _fused(dy, w0, tau_w, coef_w, None, out_dtype, transpose_w=False)
    w = merge(w0, tau_w, coef_w, out_dtype=dy.dtype)  # [out, in] scratch
    dx = new_output((M, w0.shape[1]), out_dtype, dy.device)
    if dy.dtype == out_dtype:
        torch.mm(dy, w, out=dx)
    else:
        dx.copy_(dy @ w)
    del w
    return dx


def merged_linear_dcoef_w(dy, x, tau_w):
    """``[((dy.T @ x) * tau_w[k]).sum() for k]`` -> ``[K]`` fp32, with ``dy[M, out]``, ``x[M, in]``,
    ``tau_w[K, out, in]``; the ``[out, in]`` product is never allocated; deterministic."""
    M, OUT = dy.shape
    IN = x.shape[1]
    K = tau_w.shape[0]
    dot_ty = dot_dtype(dy.dtype, x.dtype)
    cfg = _dcoef_config(M, OUT, IN, dot_ty)
    n_tiles = triton.cdiv(OUT, cfg["BLOCK_O"]) * triton.cdiv(IN, cfg["BLOCK_I"])
    splits, per = _split_m(M, n_tiles, cfg, dy.device), max(M, 1)
    if splits > 1:  # whole BLOCK_M steps per split; the last may be shorter
        per = triton.cdiv(triton.cdiv(M, cfg["BLOCK_M"]), splits) * cfg["BLOCK_M"]
        splits = triton.cdiv(M, per)
    partial = torch.empty((n_tiles * splits, K), dtype=torch.float32, device=dy.device)  # [num_tiles * splits, K]
    if n_tiles:
        _dcoef_w_tiles_kernel[(n_tiles * splits,)](
            dy, x, tau_w, partial, M, OUT, IN, K, per,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *tau_w.stride(),
            DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
        )  # fmt: skip
    return segment_sum(partial, None, 1).reshape(K)
