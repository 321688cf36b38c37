"""adamerge_fast: adaptive model merging (AdaMerging / AdaMerging++) with fused merged-linear kernels.

Quick start::

    from adamerge_fast import AdaMergedModel, adamerge
    merged = AdaMergedModel(pretrained, [ft_a, ft_b], granularity="layer")
    history = adamerge(merged, heads={"a": head_a, "b": head_b}, data={"a": loader_a, "b": loader_b})
    merged.to_module()  # the final merged model, materialized once
"""

from __future__ import annotations

from . import ops
from .io import CheckpointError, load_state_dict, save_safetensors
from .merging import (
    AdaMergedModel,
    dare,
    merge_checkpoints,
    task_arithmetic,
    task_vectors,
    ties_merge,
    ties_split,
    weight_average,
)
from .ops import entropy, merge, merge_many, merged_linear
from .optim import History, adamerge

__version__ = "0.1.0"

__all__ = [
    "ops",
    "merge",
    "merge_many",
    "merged_linear",
    "entropy",
    "AdaMergedModel",
    "adamerge",
    "History",
    "task_vectors",
    "weight_average",
    "merge_checkpoints",
    "task_arithmetic",
    "ties_merge",
    "ties_split",
    "dare",
    "load_state_dict",
    "save_safetensors",
    "CheckpointError",
    "__version__",
]
