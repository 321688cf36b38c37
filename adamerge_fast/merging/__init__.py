"""Task vectors, static merges (averaging, task arithmetic, TIES, DARE) and the learnable AdaMergedModel."""

from .adamerged import AdaMergedModel, MergedLinear, MergedMultiheadAttention
from .lora import MergedLoRALinear
from .static import dare, task_arithmetic, ties_merge, ties_split, weight_average
from .stream import merge_checkpoints
from .task_vectors import check_task_vectors, task_vectors, unstack

__all__ = [
    "AdaMergedModel",
    "MergedLinear",
    "MergedMultiheadAttention",
    "MergedLoRALinear",
    "task_vectors",
    "check_task_vectors",
    "unstack",
    "weight_average",
    "task_arithmetic",
    "ties_merge",
    "ties_split",
    "dare",
    "merge_checkpoints",
]
