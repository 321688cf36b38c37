"""Model adapters: the paper's open_clip setting, Hugging Face CLIP vision and causal LMs, classification heads.

The open_clip and transformers adapters import their libraries on first use (``adamerge_fast.models.open_clip``,
``adamerge_fast.models.hf``), after the torchvision import workaround of :mod:`adamerge_fast._compat`.
"""

from .heads import ClassificationHead, cached_head, load_head, zero_shot_weights

__all__ = ["ClassificationHead", "load_head", "zero_shot_weights", "cached_head"]
