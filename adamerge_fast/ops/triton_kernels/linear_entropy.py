"""The tile step of ``linear_entropy`` (:mod:`adamerge_fast.ops._linear_entropy`): softmax entropy of a logits tile
and its gradient, in place.

Plain-torch semantics (:func:`adamerge_fast.ops.reference.entropy_tile_`)::

    H[c]    = -(softmax(z) * log_softmax(z)).sum(-1)                for a tile z[c, V] (fp32, contiguous)
    z[c, V] := -p * (log p + H[:, None]) * g[:, None]   (write_grad; g[c], or 1 without g)

One program per row: :func:`.entropy._row_stats` walks the row in ``BLOCK_C`` chunks with the online update
(running max, sum of exponentials and of exponentials times logits), so a 128k vocabulary is never held in
registers at once; with ``WRITE_GRAD`` a second walk (:func:`.entropy._row_grad`) overwrites the row with its
gradient — the tile the head's backward matmuls read next. The matmuls that make and consume the tile are torch's
(cuBLAS on a GPU), as in fused linear-cross-entropy kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import new_output
from .entropy import _block_c, _num_warps, _row_grad, _row_stats


@triton.jit
def _entropy_tile_kernel(
    z_ptr,  # [c, V] fp32 logits, row stride stride_n, unit column stride; overwritten by the gradient
    g_ptr,  # [c] upstream gradient (HAS_G), stride stride_g
    h_ptr,  # [c] fp32 entropy
    C,
    stride_n,
    stride_g,
    HAS_G: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_n
    m, log_s, h = _row_stats(z_row, C, 1, BLOCK_C)
    tl.store(h_ptr + row, h)
    if WRITE_GRAD:
        g = 1.0
        if HAS_G:
            g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        _row_grad(z_row, 1, z_row, C, m, log_s, h, g, BLOCK_C)


def entropy_tile_(z: torch.Tensor, g: torch.Tensor | None, write_grad: bool,
                  block_c: int | None = None) -> torch.Tensor:
    """``z[c, V]`` fp32 with unit column stride -> ``H[c]`` fp32; with ``write_grad`` ``z`` becomes
    ``-p (log p + H) g``. ``g``: ``[c]`` or ``None`` (1). ``block_c``: chunk width (rounded to a power of two)."""
    if z.dtype != torch.float32 or z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"entropy_tile_: z must be a [c, V] float32 tile with unit column stride, got {z.dtype} "
                         f"{list(z.shape)} strides {z.stride()}")
    n, C = z.shape
    h = new_output((n,), torch.float32, z.device)
    if n == 0:
        return h
    BLOCK_C = _block_c(C, block_c)
    gp = g if g is not None else h  # never read without HAS_G
    _entropy_tile_kernel[(n,)](z, gp, h, C, z.stride(0), gp.stride(0), HAS_G=g is not None, WRITE_GRAD=write_grad,
                               BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C))  # fmt: skip
    return h
