"""The paper's setting on open_clip: merge the CLIP *image encoder*, classify with fixed zero-shot heads.

- :func:`create_clip`: an open_clip model by name (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14`` or open_clip's own
  spelling ``ViT-B-32``), pretrained weights from a **local file only** (nothing is downloaded).
- :func:`image_encoder`: the visual tower (``model.visual``) — the module AdaMerging merges. Its output is
  the image embedding ``[B, embed_dim]``; the zero-shot head L2-normalizes it.
- :func:`zero_shot_head`: the task's head from class names and templates, built exactly as the paper
  (see :func:`adamerge_fast.models.heads.zero_shot_weights`), cached on disk by :func:`cached_zero_shot_head`.
- :func:`visual_state_dict`: a fine-tuned checkpoint's visual-tower tensors, whatever the key layout (a full
  CLIP state dict ``visual.*``, the task_vectors ``ImageEncoder`` layout ``model.visual.*``, or the visual
  tower's own keys).
- :func:`small_clip`: a tiny random-init CLIP (2-layer ViT on 32x32 images) for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .._compat import import_open_clip
from ..io import CheckpointError, load_state_dict
from .heads import ClassificationHead, Template, cached_head, file_identity, head_key, zero_shot_weights

#: the paper's names -> open_clip's
MODEL_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14"}

#: the default template set: a single "a photo of a {}." (pass the paper's per-dataset templates with a file)
DEFAULT_TEMPLATES = ("a photo of a {}.",)

SMALL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def canonical_name(name: str) -> str:
    """``ViT-B/32`` -> ``ViT-B-32``; open_clip names pass through; unknown names raise ValueError."""
    oc = import_open_clip()
    n = MODEL_NAMES.get(name, name)
    if n == "small":
        return n
    if n not in oc.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (e.g. {', '.join(MODEL_NAMES)}; or one of open_clip.list_models())")
    return n


class _PrefixView(Mapping[str, torch.Tensor]):
    """A lazy view of ``sd`` restricted to keys under ``prefix``, with the prefix removed."""

    def __init__(self, sd: Mapping[str, torch.Tensor], prefix: str):
        self.sd, self.prefix = sd, prefix
        self._keys = [k[len(prefix):] for k in sd.keys() if k.startswith(prefix)]

    def __getitem__(self, key):
        return self.sd[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def shape_dtype(sd: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``sd[key]`` without reading the tensor when ``sd`` is a lazy safetensors mapping."""
    prefix = ""
    while isinstance(sd, _PrefixView):
        prefix, sd = sd.prefix + prefix, sd.sd
    if hasattr(sd, "shape_dtype"):
        return sd.shape_dtype(prefix + key)
    t = sd[prefix + key]
    return tuple(t.shape), t.dtype


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> Mapping[str, torch.Tensor]:
    """The view under the first of ``prefixes`` that some key starts with, else ``sd`` itself."""
    keys = list(sd.keys())
    for pre in prefixes:
        if any(k.startswith(pre) for k in keys):
            return _PrefixView(sd, pre)
    return sd


def visual_state_dict(src, *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """The visual tower's tensors of a checkpoint (path or mapping): ``module.``/``model.``/``visual.``
    prefixes are removed as needed, so full CLIP checkpoints, task_vectors ``ImageEncoder`` checkpoints and
    visual-only state dicts all give the visual tower's own key names."""
    sd = load_state_dict(src, trust_pickle=trust_pickle) if isinstance(src, (str, Path)) else src
    sd = strip_prefix(sd, ["module."])
    return strip_prefix(sd, ["model.visual.", "visual."])


def check_fits(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, *, params_only: bool = True, check_dtype: bool = False) -> None:
    """Raise a one-line :class:`CheckpointError` when ``sd`` does not hold ``module``'s tensors with its shapes
    (and dtypes, with ``check_dtype``)."""
    ref = dict(module.named_parameters()) if params_only else module.state_dict()
    keys = set(sd.keys())
    missing = [k for k in ref if k not in keys]
    if missing:
        extra = sorted(keys - set(ref))
        hint = f"; it has other keys such as {extra[0]!r}" if extra else ""
        raise CheckpointError(
            f"{what}: does not fit the model: {len(missing)} of its {len(ref)} tensors are missing, e.g. {missing[0]!r}{hint} "
            "(a checkpoint of another architecture?)"
        )
    for k, v in ref.items():
        shape, dtype = shape_dtype(sd, k)
        if shape != tuple(v.shape):
            raise CheckpointError(
                f"{what}: key {k!r} has shape {list(shape)}, the model has {list(v.shape)} (a checkpoint of another architecture?)"
            )
        if check_dtype and dtype != v.dtype:
            raise CheckpointError(f"{what}: key {k!r} has dtype {dtype}, the pretrained model has {v.dtype} (convert it first)")


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Copy ``sd``'s tensors into ``module`` (cast to the module's dtypes), after :func:`check_fits`; extra keys
    are ignored."""
    check_fits(module, sd, what)
    own = module.state_dict()
    with torch.no_grad():
        for k, t in own.items():
            if k in sd:
                if tuple(sd[k].shape) != tuple(t.shape):
                    raise CheckpointError(f"{what}: key {k!r} has shape {list(sd[k].shape)}, the model has {list(t.shape)}")
                t.copy_(sd[k].to(t.dtype))
    return module


def create_clip(
    name: str,
    pretrained: str | Path | None = None,
    *,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> nn.Module:
    """An open_clip CLIP model; ``pretrained`` is a local checkpoint path (full CLIP state dict, safetensors or
    torch file) or ``None`` for random init (``seed``). ``name="small"`` gives :data:`SMALL_CONFIG`."""
    oc = import_open_clip()
    n = canonical_name(name)
    if seed is not None:
        torch.manual_seed(seed)
    if n == "small":
        model = oc.model.CLIP(**SMALL_CONFIG)
    else:
        import logging

        prev = logging.root.manager.disable
        if pretrained is not None:  # open_clip warns that it loaded no weights: we load them just below
            logging.disable(logging.WARNING)
        try:
            model = oc.create_model(n, pretrained=None, load_weights=False, device="cpu")
        finally:
            logging.disable(prev)
    model.eval()
    if pretrained is not None:
        sd = load_state_dict(pretrained, trust_pickle=trust_pickle)
        sd = strip_prefix(sd, ["module."])
        sd = strip_prefix(sd, ["model."]) if any(k.startswith("model.visual.") for k in sd.keys()) else sd
        sd = {k: sd[k] for k in sd.keys()}
        if "logit_scale" in sd and sd["logit_scale"].dim() != model.logit_scale.dim():
            sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
        load_into(model, sd, f"{pretrained}")
    return model.to(device)


def image_encoder(model: nn.Module) -> nn.Module:
    """The module AdaMerging merges: the CLIP visual tower (``[B, 3, H, W] -> [B, embed_dim]``)."""
    return model.visual


def tokenizer_for(name: str):
    oc = import_open_clip()
    n = canonical_name(name)
    if n == "small":
        return oc.get_tokenizer("ViT-B-32", context_length=SMALL_CONFIG["text_cfg"]["context_length"])
    return oc.get_tokenizer(n)


def preprocess_for(model: nn.Module):
    """open_clip's eval transform for ``model`` (resize, center crop, normalize), PIL image -> tensor."""
    oc = import_open_clip()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return oc.image_transform(size, is_train=False)


def zero_shot_head(
    model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[Template] = DEFAULT_TEMPLATES, *, progress: bool = False
) -> ClassificationHead:
    """The paper's zero-shot head: ``ClassificationHead(normalize=True, weights=zero-shot weights * logit_scale.exp())``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    try:
        w = zero_shot_weights(encode, classnames, templates, model.logit_scale.detach().float(), progress=progress)
    finally:
        model.train(was_training)
    return ClassificationHead(w.cpu(), None, normalize=True)


def cached_zero_shot_head(
    name: str,
    model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    *,
    weights_id: str | None = None,
    cache_dir=None,
    progress: bool = False,
) -> ClassificationHead:
    """:func:`zero_shot_head`, cached as ``<cache>/heads/<hash>.safetensors``; the hash covers the model name,
    ``weights_id`` (e.g. :func:`file_identity` of the pretrained file), the class names and the templates."""
    key = head_key("open_clip", canonical_name(name), weights_id, list(classnames), list(templates))
    return cached_head(key, lambda: zero_shot_head(model, tokenizer, classnames, templates, progress=progress), cache_dir)


def small_clip(seed: int = 0) -> nn.Module:
    """A tiny random-init open_clip CLIP (ViT: 2 layers, width 64, 32x32 images; text: 2 layers, width 32)."""
    return create_clip("small", None, seed=seed)


__all__ = [
    "MODEL_NAMES",
    "DEFAULT_TEMPLATES",
    "SMALL_CONFIG",
    "canonical_name",
    "create_clip",
    "image_encoder",
    "tokenizer_for",
    "preprocess_for",
    "zero_shot_head",
    "cached_zero_shot_head",
    "visual_state_dict",
    "strip_prefix",
    "check_fits",
    "load_into",
    "small_clip",
    "file_identity",
]
