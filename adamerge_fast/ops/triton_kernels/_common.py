"""Helpers shared by the Triton kernel modules: interpreter flag, dtype maps, block-size helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time (``@triton.jit``) whether kernels are compiled or interpreted, so the
# value of TRITON_INTERPRET when this package is first imported is the one that counts.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, next_pow2(n)))


def dot_dtype(*dtypes: torch.dtype) -> tl.dtype:
    """The operand dtype fed to ``tl.dot`` for inputs of the given torch dtypes (accumulation is fp32).

    Same 16-bit dtype everywhere -> that dtype (its products are exact in fp32); anything else -> fp32.
    Under the interpreter bf16 operands are widened to fp32: Triton 3.x's interpreter computes ``tl.dot``
    of bf16 tiles wrongly (values off by ~1e10, checked with triton 3.9); fp32 gives the same exact products.
    """
    ds = set(dtypes)
    if len(ds) == 1:
        (d,) = ds
        if d == torch.float16 or (d == torch.bfloat16 and not INTERPRET):
            return TL_DTYPE[d]
    return tl.float32


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's own matmul setting.

    torch's default (``torch.get_float32_matmul_precision() == "highest"``) is a true fp32 product, so the
    kernels use ``"ieee"``; with "high"/"medium" torch itself allows TF32, and so do we.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def int64_table(rows, device: torch.device) -> torch.Tensor:
    """``rows`` (a list, or a list of equal-length lists) as an int64 tensor on ``device`` (one host-to-device copy)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t
