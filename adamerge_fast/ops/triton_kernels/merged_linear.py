"""Linear layer through a merged weight, forward and backward, without the ``[out, in]`` weight gradient.

Plain-torch semantics (``W = w0 + sum_k coef_w[k] * tau_w[k]``, fp32 accumulation)::

    fwd:       y[M, out]  = x[M, in] @ W.T + (b0 + sum_k coef_b[k] * tau_b[k])       (x dtype)
    dx:        dx[M, in]  = dy[M, out] @ W                                           (x dtype)
    dcoef_w:   dc[K]      = [((dy.T @ x) * tau_w[k]).sum() for k]                    (fp32)

with ``w0[out, in]``, ``tau_w[K, out, in]``, ``coef_w[K]``, ``b0[out]``, ``tau_b[K, out]``, ``coef_b[K]``.

``fwd`` and ``dx`` have two strategies, chosen per layer shape and number of rows ``M`` (measured on the GPU,
see :func:`choose_strategy`; :data:`FUSED_MAX_M` where nothing can be measured):

* ``"fused"`` (small M, memory-bound on the K+1 weight reads): one kernel, ``C[M, N] = A[M, R] @ W'[R, N]``
  where every program loads its ``w0`` tile and the K task-vector tiles, combines them with the coefficients
  in fp32 registers and feeds the combined tile to ``tl.dot``. The merged weight never exists in memory.
  ``fwd`` is ``A = x``, ``W' = W.T``; ``dx`` is ``A = dy``, ``W' = W``: the same kernel, other strides.
* ``"jit"`` (large M, compute-bound): the merge kernel writes this layer's merged weight into a scratch
  buffer (already in the matmul dtype), cuBLAS does the matmul, the scratch is dropped at once.

``dcoef_w`` never allocates ``dy.T @ x``: each program computes one ``[BLOCK_O, BLOCK_I]`` tile of it in
registers (reducing over M with ``tl.dot``), contracts the tile with the K task-vector tiles and writes only
K partial sums to a ``[num_tiles, K]`` buffer, which a second kernel sums in a fixed order (deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._common import new_output
from ._common import INTERPRET, clamp_pow2, dot_dtype, fp32_dot_precision
from .merge import merge, segment_sum

# How fwd/dx pick a strategy (choose_strategy):
# 1. a forced one: the ``strategy`` argument, else the module override STRATEGY (tests, benchmarks);
# 2. on a GPU, *measured* (for M in TUNE_M_RANGE): the first call for a key (direction, M rounded up to a
#    power of two, the layer's N and R, K, the dtypes, the device) times both strategies on that call's own
#    inputs (CUDA events, best of three after a warm-up) and caches the faster one for the process
#    (``tuned_strategies()`` lists the choices). One threshold cannot be right for every layer width, K, dtype
#    and GPU, so the crossover comes from measurement on the device that runs it, as Triton's autotuner does
#    for block sizes;
# 3. FUSED_MAX_M otherwise: under the interpreter, during CUDA-graph capture, or with ADAMERGE_TRITON_TUNE=0.
#    Its value (256) is an estimate from the cost model, not a measurement: the fused kernel re-reads the K+1
#    weight tiles and redoes the K-term combine once per row tile (one to a few 64-row tiles up to 256 rows),
#    the jit path pays one extra write and read of the merged weight. benchmarks/bench_triton_ops.py measures
#    the crossover on a GPU.
FUSED_MAX_M = 256

# Force a strategy for every call ("fused" or "jit"); None chooses (see above). Tests set this.
STRATEGY: str | None = None

# Measure the crossover on the GPU (step 2 above); ADAMERGE_TRITON_TUNE=0 turns it off.
TUNE = os.environ.get("ADAMERGE_TRITON_TUNE", "1") != "0"

_STRATEGIES = ("fused", "jit")
_TUNED: dict[tuple, str] = {}


# Only rows in (lo, hi] are measured: at <= 16 rows the fused kernel reads each weight once and the matmul is
# tiny (fused wins by construction); far above the expected crossover the fused kernel redoes the combine for
# hundreds of row tiles (jit wins), and timing it would only cost time.
TUNE_M_RANGE = (16, 8192)


def _bench_ms(fn) -> float:
    """Best of three timed calls of ``fn`` on the current CUDA stream after one warm-up call (which also
    compiles the kernel), in ms. Tests replace this."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def _can_measure(device: torch.device) -> bool:
    if not TUNE or INTERPRET or device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def tuned_strategies() -> dict[tuple, str]:
    """The measured choices so far: ``{(direction, M bucket, N, R, K, dtypes..., device): strategy}``."""
    return dict(_TUNED)


def choose_strategy(M: int, strategy: str | None = None, key: tuple | None = None, run=None) -> str:
    """The strategy for ``M`` rows: forced (``strategy``, then :data:`STRATEGY`), measured on the GPU when
    ``key`` and ``run`` are given (``run(s)`` runs the op with strategy ``s``), else by :data:`FUSED_MAX_M`."""
    s = strategy or STRATEGY
    if s is not None:
        if s not in _STRATEGIES:
            raise ValueError(f"merged_linear strategy must be one of {_STRATEGIES} or None, got {s!r}")
        return s
    if key is not None and run is not None and TUNE_M_RANGE[0] < M <= TUNE_M_RANGE[1]:
        device = key[-1]
        if _can_measure(device):
            k = (key[0], 1 << max(4, (M - 1).bit_length()), *key[1:])
            hit = _TUNED.get(k)
            if hit is None:
                times = {c: _bench_ms(lambda c=c: run(c)) for c in _STRATEGIES}
                hit = _TUNED[k] = min(times, key=times.get)
            return hit
    return "fused" if M <= FUSED_MAX_M else "jit"


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _merged_matmul_kernel(
    a_ptr,  # [M, R] activations: x (fwd) or dy (dx)
    w0_ptr,  # the base weight seen as W'[R, N] through (stride_wr, stride_wn)
    tau_ptr,  # the task vectors seen as [K, R, N] through (stride_tk, stride_tr, stride_tn)
    coef_ptr,  # [K]
    b0_ptr,  # [N] bias (HAS_BIAS), any float dtype
    taub_ptr,  # [K, N] bias task vectors (MERGE_BIAS), row stride stride_bk
    coefb_ptr,  # [K] (MERGE_BIAS)
    c_ptr,  # [M, N] contiguous output
    M,
    N,
    R,
    K,
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
    DOT_TY: tl.constexpr,  # operand dtype of tl.dot (fp32 accumulation)
    PREC: tl.constexpr,  # tl.dot input_precision ("ieee" / "tf32"; only matters for fp32 operands)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # program (pid_m, pid_n): C[pid_m*BLOCK_M:, pid_n*BLOCK_N:] = A @ (w0' + sum_k coef[k] tau'[k]) (+ bias)
    # pid_m varies fastest, so the programs sharing a weight tile run side by side (L2 reuse).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mm = rm < M
    mn = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar  # [BLOCK_M, BLOCK_R]
    w_ptrs = w0_ptr + rr[:, None] * stride_wr + rn[None, :] * stride_wn  # [BLOCK_R, BLOCK_N]
    t_ptrs = tau_ptr + rr[:, None] * stride_tr + rn[None, :] * stride_tn  # [BLOCK_R, BLOCK_N] of tau[0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mr = (r0 + rr) < R
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
    if HAS_BIAS:
        b = tl.load(b0_ptr + rn * stride_bn, mask=mn, other=0.0).to(tl.float32)  # [BLOCK_N]
        if MERGE_BIAS:
            tb = taub_ptr + rn * stride_tbn
            for k in range(K):
                b += tl.load(coefb_ptr + k).to(tl.float32) * tl.load(tb, mask=mn, other=0.0).to(tl.float32)
                tb += stride_bk
        acc += b[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _dcoef_w_tiles_kernel(
    dy_ptr,  # [M, OUT]
    x_ptr,  # [M, IN]
    tau_ptr,  # [K, OUT, IN]
    partial_ptr,  # [num_tiles, K] fp32
    M,
    OUT,
    IN,
    K,
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
    # partial[tile, k] = sum over one [BLOCK_O, BLOCK_I] tile of (dy.T @ x) * tau[k]; the tile lives only in
    # registers: the [OUT, IN] weight gradient is never written.
    pid = tl.program_id(0)
    n_o = tl.cdiv(OUT, BLOCK_O)
    n_i = tl.cdiv(IN, BLOCK_I)
    group = pid // (GROUP_O * n_i)
    first_o = group * GROUP_O
    size_o = tl.minimum(n_o - first_o, GROUP_O)
    pid_o = first_o + (pid % (GROUP_O * n_i)) % size_o
    pid_i = (pid % (GROUP_O * n_i)) // size_o
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O]
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    rm = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mo = ro < OUT
    mi = ri < IN
    dyt_ptrs = dy_ptr + ro[:, None] * stride_dyo + rm[None, :] * stride_dym  # [BLOCK_O, BLOCK_M] of dy.T
    x_ptrs = x_ptr + rm[:, None] * stride_xm + ri[None, :] * stride_xi  # [BLOCK_M, BLOCK_I]
    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # tile of dy.T @ x
    for m0 in range(0, M, BLOCK_M):
        mk = (m0 + rm) < M
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


def _dcoef_config(M: int, OUT: int, IN: int, dot_ty) -> dict:
    """Tiles of dy^T x: 64x64 by default, 128x64 when M is long and there are enough tiles (chosen from the tile
    sizes, not timed; spill-free on sm_90 per tools/triton_aot_check.py); one config under the interpreter."""
    if INTERPRET:
        return dict(BLOCK_O=clamp_pow2(OUT, 16, 64), BLOCK_I=clamp_pow2(IN, 16, 64), BLOCK_M=clamp_pow2(M, 16, 64),
                    GROUP_O=8, num_warps=4, num_stages=1)  # fmt: skip
    if M >= 2048 and triton.cdiv(OUT, 128) * triton.cdiv(IN, 64) >= 264:  # GEMM-like: bigger tiles
        return dict(BLOCK_O=128, BLOCK_I=64, BLOCK_M=32, GROUP_O=8, num_warps=8, num_stages=3)
    return dict(BLOCK_O=64, BLOCK_I=64, BLOCK_M=32, GROUP_O=8, num_warps=4, num_stages=3)


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
    dot_ty = dot_dtype(a.dtype) if out_dtype == a.dtype else dot_dtype(a.dtype, out_dtype)
    cfg = _matmul_config(M, N, R, dot_ty)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _merged_matmul_kernel[grid](
        a, w0, tau, coef,
        b0 if has_bias else w0, tau_b if merge_bias else w0, coef_b if merge_bias else coef,
        c, M, N, R, K,
        a.stride(0), a.stride(1), sw_r, sw_n, st_k, st_r, st_n,
        b0.stride(0) if has_bias else 0,
        tau_b.stride(0) if merge_bias else 0, tau_b.stride(1) if merge_bias else 0,
        HAS_BIAS=has_bias, MERGE_BIAS=merge_bias, DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
    )  # fmt: skip
    return c


def merged_linear_fwd(x, w0, tau_w, coef_w, b0=None, tau_b=None, coef_b=None, strategy: str | None = None):
    """``x[M, in] @ (w0 + sum_k coef_w[k] tau_w[k]).T + merged bias`` -> ``[M, out]`` in ``x.dtype``.

    ``w0[out, in]``, ``tau_w[K, out, in]``, ``coef_w[K]``, ``b0[out]`` or None, ``tau_b[K, out]`` and
    ``coef_b[K]`` or None. ``strategy``: "fused", "jit", or None (by M, see :func:`choose_strategy`).
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
    partial = torch.empty((n_tiles, K), dtype=torch.float32, device=dy.device)  # [num_tiles, K]
    if n_tiles:
        _dcoef_w_tiles_kernel[(n_tiles,)](
            dy, x, tau_w, partial, M, OUT, IN, K,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *tau_w.stride(),
            DOT_TY=dot_ty, PREC=_prec(dot_ty), **cfg,
        )  # fmt: skip
    return segment_sum(partial, None, 1).reshape(K)
