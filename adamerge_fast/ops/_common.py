"""Helpers shared by every module of :mod:`adamerge_fast.ops`; imports nothing from the package.

``acc_dtype`` picks the accumulation dtype; ``new_output`` allocates a kernel output, NaN-filled while
:data:`POISON_OUTPUTS` is true (tests set it; so does ``ADAMERGE_POISON=1``) so that an element a kernel
fails to write shows up in the comparison against the oracle.
"""

from __future__ import annotations

import os

import torch

# Read at every new_output call: set ``adamerge_fast.ops._common.POISON_OUTPUTS`` (tests/conftest.py does).
POISON_OUTPUTS = os.environ.get("ADAMERGE_POISON", "") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output of ``shape``: uninitialized normally, NaN-filled while ``POISON_OUTPUTS``."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
