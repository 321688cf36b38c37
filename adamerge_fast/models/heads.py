"""Classification heads: the fixed per-task heads AdaMerging puts on top of the merged backbone.

:class:`ClassificationHead` is the official task_vectors / AdaMerging head: optionally L2-normalize the
features, then a linear layer. :func:`zero_shot_weights` builds the CLIP zero-shot weights exactly as the
paper's code does (fill every template with the class name, encode, L2-normalize each text embedding, average
over templates, renormalize; stack; multiply by ``logit_scale.exp()``), from any text encoder.
Heads are cached on disk as safetensors (:func:`cached_head`), keyed by a hash of what determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io import CheckpointError, load_state_dict, save_safetensors

Template = str | Callable[[str], str]


class ClassificationHead(nn.Module):
    """``logits = (normalize(features) if normalize else features) @ weight.T + bias``.

    ``weight``: ``[C, D]`` (for zero-shot heads already multiplied by ``logit_scale.exp()``). The weights are
    buffers, not parameters: a head is fixed during merging.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"head weight must be [classes, features], got shape {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"head bias must be [{weight.shape[0]}], got shape {list(bias.shape)}")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.normalize = bool(normalize)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(
            features, self.weight.to(features.dtype), None if self.bias is None else self.bias.to(features.dtype)
        )

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[1]}, classes={self.weight.shape[0]}, normalize={self.normalize}"

    def save(self, path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write as safetensors (``weight``, optional ``bias``; ``normalize`` in the metadata), atomically."""
        t = {"weight": self.weight}
        if self.bias is not None:
            t["bias"] = self.bias
        return save_safetensors(
            t, path, {"format": "adamerge_fast.head/1", "normalize": str(int(self.normalize)), **(metadata or {})}
        )


def load_head(path, *, normalize: bool | None = None, trust_pickle: bool = False) -> ClassificationHead:
    """Read a head checkpoint: a state dict with ``weight`` ``[C, D]`` and optional ``bias`` ``[C]`` (safetensors
    or torch file; an official pickled ``src.modeling.ClassificationHead``, read without running its code; any other
    whole pickled head module only with ``trust_pickle``).

    ``normalize``: L2-normalize features first; ``None`` reads it from the file (safetensors metadata written by
    :meth:`ClassificationHead.save`, or a pickled module's ``normalize`` attribute), else ``False``.
    """
    p = Path(path)
    sd = load_state_dict(p, trust_pickle=trust_pickle)
    keys = list(sd.keys())
    wkey = "weight" if "weight" in sd else next((k for k in keys if k.endswith(".weight") and sd[k].dim() == 2), None)
    if wkey is None or sd[wkey].dim() != 2:
        raise CheckpointError(
            f"{p}: not a classification head (expected a 'weight' tensor [classes, features]; keys: {keys[:6]})"
        )
    bkey = wkey[: -len("weight")] + "bias"
    bias = sd[bkey] if bkey in sd else None
    if normalize is None:
        normalize = False
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                normalize = (f.metadata() or {}).get("normalize", "0") == "1"
        else:
            from ..safe_pickle import RefusedPickle, load_official

            try:
                normalize = bool(load_official(p).attributes.get("normalize", False))
            except RefusedPickle:  # a plain state dict, or another pickle (read above only with trust_pickle)
                if trust_pickle:
                    obj = torch.load(p, map_location="cpu", weights_only=False)
                    normalize = bool(getattr(obj, "normalize", False))
    w = sd[wkey].float()
    try:
        return ClassificationHead(w, None if bias is None else bias.float(), normalize=normalize)
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from None


def _fill(template: Template, classname: str) -> str:
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.format(classname)
    raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")


@torch.no_grad()
def zero_shot_weights(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    logit_scale: float | torch.Tensor = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """``[C, D]`` zero-shot classifier weights, the paper's recipe (task_vectors ``build_classification_head``).

    For each class: fill every template, ``encode_text`` the prompts (``list[str] -> [T, D]``), L2-normalize
    each embedding, average over the templates, renormalize. Stack the classes and multiply by
    ``logit_scale.exp()`` — pass the *log* scale as CLIP stores it. ``progress``: a progress bar over classes.
    """
    if not classnames:
        raise ValueError("zero-shot head: no class names")
    if not templates:
        raise ValueError("zero-shot head: no templates")
    from tqdm.auto import tqdm

    rows = []
    for c in tqdm(classnames, desc="zero-shot head", disable=not progress, leave=False, dynamic_ncols=True):
        emb = encode_text([_fill(t, c) for t in templates]).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(dim=0)
        rows.append(emb / emb.norm())
    w = torch.stack(rows)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).exp().reshape(())
    return (w * scale).float()


def head_key(*parts) -> str:
    """A short stable hash of everything that determines a head (model, weights identity, classes, templates)."""
    norm = [[p.__name__ if callable(p) else p for p in x] if isinstance(x, (list, tuple)) else x for x in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$ADAMERGE_CACHE`` or ``~/.cache/adamerge_fast``."""
    env = os.environ.get("ADAMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adamerge_fast"


def cached_head(key: str, build: Callable[[], ClassificationHead], cache_dir=None) -> ClassificationHead:
    """The head stored under ``<cache_dir>/heads/<key>.safetensors``, built (and written atomically) if absent.
    ``cache_dir=False`` disables the cache."""
    if cache_dir is False:
        return build()
    path = Path(cache_dir or default_cache_dir()) / "heads" / f"{key}.safetensors"
    if path.exists():
        try:
            return load_head(path)
        except CheckpointError:
            pass  # a stale or foreign file: rebuild it
    head = build()
    head.save(path, {"key": key})
    return head


def file_identity(path) -> str:
    """A cheap identity for a weights file or directory (resolved path, size, mtime), for cache keys."""
    if path is None:
        return "random-init"
    p = Path(path).resolve()
    st = p.stat()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return f"{p}|" + ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def read_lines(path, what: str = "file") -> list[str]:
    """Non-empty, stripped lines of a text file (class names, templates); a clear error when there are none."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{p}: {what} is empty")
    return lines


__all__ = [
    "ClassificationHead",
    "load_head",
    "zero_shot_weights",
    "head_key",
    "cached_head",
    "default_cache_dir",
    "file_identity",
    "read_lines",
]
