"""Helpers shared by the Triton kernel modules: interpreter flag, dtype maps, block-size helpers, the matmul
precision torch is set to, the device guard and CUDA-graph capture detection."""

from __future__ import annotations

import contextlib
import functools
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
    """``tl.dot`` input precision for fp32 operands, following torch's own CUDA matmul setting.

    Read without raising: ``torch.backends.cuda.matmul.fp32_precision`` (the API torch recommends since 2.9:
    ``"ieee"``, ``"tf32"``, or ``"none"`` = not set) first; when it is not set or does not exist, the legacy
    ``torch.get_float32_matmul_precision()`` (``"highest"`` -> ``"ieee"``; ``"high"``/``"medium"`` -> ``"tf32"``),
    which raises once the legacy and the new API have both been used: that counts as not set, i.e. ``"ieee"``
    (torch's default, a true fp32 product). Setting either API is honoured: the legacy setter also updates the new
    attribute.
    """
    try:
        p = torch.backends.cuda.matmul.fp32_precision  # "ieee" | "tf32" | "none"; AttributeError before torch 2.9
    except (AttributeError, RuntimeError):
        p = "none"
    if p in ("ieee", "tf32"):
        return p
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy/new settings
        return "ieee"
    return "ieee" if legacy == "highest" else "tf32"


def device_guard(device: torch.device):
    """A context that makes ``device`` the current CUDA device while Triton launches on it (Triton launches on
    the current device and stream); a no-op for CPU tensors and when it already is current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (never for CPU tensors)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (132 for an H100/H200 SXM)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def int64_table(rows, device: torch.device) -> torch.Tensor:
    """``rows`` (a list, or a list of equal-length lists) as an int64 tensor on ``device`` (one host-to-device copy)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t
