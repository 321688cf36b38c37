"""adamerge_fast: adaptive model merging (AdaMerging / AdaMerging++) with fused merged-linear kernels."""

from __future__ import annotations

from . import ops
from .ops import entropy, merge, merge_many, merged_linear

__version__ = "0.1.0"

__all__ = ["ops", "merge", "merge_many", "merged_linear", "entropy", "__version__"]
