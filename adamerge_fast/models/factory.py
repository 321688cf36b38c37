"""The adapter for any module: a factory function builds the backbone, checkpoints hold its state dicts.

``adamerge-fast adamerge --model-factory MODULE:FUNCTION``: :func:`load_factory` finds the function (MODULE is
a dotted module name or a path to a ``.py`` file), :func:`build` calls it and loads the checkpoints.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ..io import existing, load_into, load_state_dict
from .spec import Source, TaskSpec, load_finetuned, load_heads


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The function named by ``"MODULE:FUNCTION"``; MODULE is importable by name or a ``.py`` file (run as a new
    module). Raises ``ValueError`` naming what is missing."""
    if ":" not in spec:
        raise ValueError(f"a model factory must be MODULE:FUNCTION, got {spec!r}")
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = existing(mod_name, "model factory file")
        sp = importlib.util.spec_from_file_location(f"_adamerge_factory_{path.stem}", path)
        mod = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"model factory: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model factory: {mod_name!r} has no function {fn_name!r}")
    return fn


def build(
    factory: str | Callable[[], nn.Module],
    pretrained: str | Path,
    finetuned: Sequence[Source],
    tasks: Sequence[str],
    *,
    heads: Sequence[str | Path | nn.Module] | None,
    head_normalize: bool | None = None,
    image_size: int = 224,
    trust_pickle: bool = False,
) -> TaskSpec:
    """A backbone from ``factory`` (a callable returning the module skeleton, or ``"MODULE:FUNCTION"``) with the
    ``pretrained`` checkpoint loaded into it; ``finetuned``: one checkpoint (path or state dict) per task with the
    module's key names; ``heads`` (required): one head file (or module) per task, ``head_normalize`` as
    :func:`adamerge_fast.models.heads.load_head` (``None``: as stored in the file, else no). Image-folder data
    goes through :class:`adamerge_fast.data.ImageTransform` of ``image_size``."""
    from ..data import ImageTransform

    name = factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))
    fn = load_factory(factory) if isinstance(factory, str) else factory
    backbone = fn()
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"model factory {name} returned {type(backbone).__name__}, not an nn.Module")
    pre = existing(pretrained, "pretrained checkpoint")
    load_into(backbone, load_state_dict(pre, trust_pickle=trust_pickle), str(pretrained))
    fts = load_finetuned(finetuned, backbone, trust_pickle=trust_pickle)
    head_map, head_files = load_heads(heads, tasks, normalize=head_normalize, trust_pickle=trust_pickle)
    return TaskSpec(backbone.eval(), fts, head_map, transform=ImageTransform(image_size), head_files=head_files,
                    metadata={"model": f"factory:{name}"})


__all__ = ["build", "load_factory"]
