"""Softmax entropy per row and its gradient, chunked over the class dimension.

Plain-torch semantics (fp32 accumulation)::

    fwd: H[N]         = -(softmax(z) * log_softmax(z)).sum(-1)     for logits z[N, C]     (fp32)
    bwd: dz[N, C]     = -p * (log p + H[:, None]) * grad[:, None]  with p = softmax(z)   (z dtype)

``-inf`` logits of a row with a finite entry contribute 0 (``p log p -> 0``) and get a zero gradient; a row with
a NaN or a ``+inf``, or of only ``-inf``, has H = NaN and a NaN gradient in every entry, as the plain formula.

One program per row walks the row in ``BLOCK_C`` chunks with an online update, so a 128k vocabulary never
materializes probabilities: with a running max ``m``, ``S = sum exp(z - m)`` and
``T = sum exp(z - m) * (z - m)``, moving to a new max ``m'`` rescales ``S' = a S``, ``T' = a (T + (m - m') S)``
with ``a = exp(m - m')``; at the end ``H = log S - T / S``. The backward recomputes ``(m, log S, H)`` in a
first pass and writes ``dz`` in a second.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from ._common import INTERPRET, clamp_pow2

# Largest chunk of a row held in registers at once.
MAX_BLOCK_C = 16384 if INTERPRET else 4096


@triton.jit
def _row_stats(z_row, C, stride_c, BLOCK_C: tl.constexpr):
    # one row z[C] -> (m, log S, H): running max, log-sum-exp relative to m, entropy (all fp32 scalars)
    rc = tl.arange(0, BLOCK_C).to(tl.int64)  # [BLOCK_C]; int64: cols * stride_c of a transposed view passes 2^31
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    t = tl.full([], 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + rc
        z = tl.load(z_row + cols * stride_c, mask=cols < C, other=-float("inf")).to(tl.float32)  # [BLOCK_C]
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # finite reference point (all -inf so far: 0)
        a = tl.exp(m - m_ref)  # rescale of the old sums; 0 when m = -inf
        shift = tl.where(s > 0, m - m_ref, 0.0)  # (m - m') S with S = 0 (m = -inf) must stay 0, not NaN
        e = tl.exp(z - m_ref)  # [BLOCK_C], 0 for -inf entries
        zr = tl.where(z == -float("inf"), 0.0, z - m_ref)  # avoids 0 * -inf
        t = a * (t + shift * s) + tl.sum(e * zr, axis=0)
        s = a * s + tl.sum(e, axis=0)
        m = m_new
    # s > 0 fails for a row of only -inf (s = 0) and for a row with a NaN or a +inf (z - m' is NaN there, so s is
    # NaN): H = NaN, and the backward's -p * (log p + H) is NaN in every entry of the row
    ok = s > 0
    m = tl.where(ok, m, 0.0)
    s = tl.where(ok, s, 1.0)
    log_s = tl.log(s)
    h = tl.where(ok, log_s - t / s, float("nan"))
    return m, log_s, h


@triton.jit
def _entropy_fwd_kernel(
    z_ptr,  # [N, C] logits, any float dtype, strides (stride_n, stride_c)
    h_ptr,  # [N] fp32
    C,
    stride_n,
    stride_c,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _, _, h = _row_stats(z_ptr + row * stride_n, C, stride_c, BLOCK_C)
    tl.store(h_ptr + row, h)


@triton.jit
def _entropy_bwd_kernel(
    g_ptr,  # [N] upstream gradient of H, stride stride_g
    z_ptr,  # [N, C] logits
    dz_ptr,  # [N, C] contiguous, logits dtype
    C,
    stride_g,
    stride_n,
    stride_c,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_n
    m, log_s, h = _row_stats(z_row, C, stride_c, BLOCK_C)
    g = tl.load(g_ptr + row * stride_g).to(tl.float32)
    _row_grad(z_row, stride_c, dz_ptr + row * C, C, m, log_s, h, g, BLOCK_C)


@triton.jit
def _row_grad(z_row, stride_c, dz_row, C, m, log_s, h, g, BLOCK_C: tl.constexpr):
    # dz_row[c] = -p * (log p + H) * g for one row z[C] with its stats (m, log S, H); dz_row contiguous (may be z_row)
    rc = tl.arange(0, BLOCK_C).to(tl.int64)  # cols * stride_c can pass 2^31
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + rc
        mask = cols < C
        z = tl.load(z_row + cols * stride_c, mask=mask, other=-float("inf")).to(tl.float32)
        logp = z - m - log_s  # [BLOCK_C]; -inf for -inf entries
        p = tl.exp(logp)
        logp = tl.where(p > 0, logp, 0.0)  # -inf entries (p = 0) give exactly 0, never 0 * -inf = NaN
        d = -p * (logp + h) * g
        tl.store(dz_row + cols, d.to(dz_row.dtype.element_ty), mask=mask)


def _block_c(C: int, block_c: int | None) -> int:
    return clamp_pow2(block_c or C, 16, MAX_BLOCK_C)


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else (8 if block_c <= 4096 else 16)


def entropy_fwd(logits: torch.Tensor, block_c: int | None = None) -> torch.Tensor:
    """``logits[N, C]`` -> entropy ``[N]`` fp32. ``block_c``: chunk width (rounded to a power of two)."""
    N, C = logits.shape
    h = new_output((N,), torch.float32, logits.device)
    if N == 0:
        return h
    BLOCK_C = _block_c(C, block_c)
    _entropy_fwd_kernel[(N,)](logits, h, C, logits.stride(0), logits.stride(1), BLOCK_C=BLOCK_C,
                              num_warps=_num_warps(BLOCK_C))  # fmt: skip
    return h


def entropy_bwd(grad: torch.Tensor, logits: torch.Tensor, block_c: int | None = None) -> torch.Tensor:
    """``grad[N]``, ``logits[N, C]`` -> ``dlogits[N, C]`` (contiguous, logits dtype)."""
    N, C = logits.shape
    dz = new_output((N, C), logits.dtype, logits.device)
    if N == 0:
        return dz
    BLOCK_C = _block_c(C, block_c)
    _entropy_bwd_kernel[(N,)](grad, logits, dz, C, grad.stride(0), logits.stride(0), logits.stride(1),
                              BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C))  # fmt: skip
    return dz
