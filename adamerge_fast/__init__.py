"""adamerge_fast: adaptive model merging (AdaMerging / AdaMerging++) with fused merged-linear kernels.

Quick start::

    from adamerge_fast import AdaMergedModel, adamerge
    merged = AdaMergedModel(pretrained, [ft_a, ft_b], granularity="layer")
    history = adamerge(merged, heads={"a": head_a, "b": head_b}, data={"a": loader_a, "b": loader_b})
    merged.to_module()  # the final merged model, materialized once

The names below are imported from their submodules on first use (PEP 562), so that importing the command line
(``adamerge_fast.cli``, the ``adamerge-fast`` entry point) loads no torch before it can turn a Ctrl-C into a one-line
message. ``import adamerge_fast.ops`` (or the first use of any op) registers the ``torch.ops.adamerge_fast`` ops.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it (None: the name is the submodule itself)
_EXPORTS: dict[str, str | None] = {
    "ops": None,
    "merge": "ops",
    "merge_many": "ops",
    "merged_linear": "ops",
    "merged_lora_linear": "ops",
    "entropy": "ops",
    "linear_entropy": "ops",
    "AdaMergedModel": "merging",
    "adamerge": "optim",
    "History": "optim",
    "task_vectors": "merging",
    "weight_average": "merging",
    "task_arithmetic": "merging",
    "ties_merge": "merging",
    "ties_split": "merging",
    "dare": "merging",
    "merge_checkpoints": "merging",
    "load_state_dict": "io",
    "save_safetensors": "io",
    "CheckpointError": "io",
}

__all__ = [
    "ops",
    "merge",
    "merge_many",
    "merged_linear",
    "merged_lora_linear",
    "entropy",
    "linear_entropy",
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


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name, "")
    if where == "":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{where or name}", __name__)
    value = module if where is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names for type checkers and readers
    from . import ops
    from .io import CheckpointError, load_state_dict, save_safetensors
    from .merging import (
        AdaMergedModel,
        dare,
        task_arithmetic,
        task_vectors,
        ties_merge,
        ties_split,
        weight_average,
    )
    from .ops import entropy, merge, merge_many, merged_linear, merged_lora_linear
    from .optim import History, adamerge
