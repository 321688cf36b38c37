"""The paper's setting on open_clip: merge the CLIP *image encoder*, classify with fixed zero-shot heads.

- :func:`create_clip`: an open_clip model by name (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14`` or open_clip's own
  spelling ``ViT-B-32``), pretrained weights from a **local file only** (nothing is downloaded).
- :func:`image_encoder`: the visual tower (``model.visual``) — the module AdaMerging merges. Its output is
  the image embedding ``[B, embed_dim]``; the zero-shot head L2-normalizes it.
- :func:`zero_shot_head`: the task's head from class names and templates, built exactly as the paper
  (see :func:`adamerge_fast.models.heads.zero_shot_weights`), cached on disk by :func:`cached_zero_shot_head`.
- :func:`visual_state_dict`: a fine-tuned checkpoint's visual-tower tensors, whatever the key layout (a full
  CLIP state dict ``visual.*``, the task_vectors ``ImageEncoder`` layout ``model.visual.*``, or the visual
  tower's own keys). Official ``ImageEncoder`` / ``ClassificationHead`` pickles are read without running their
  code (:mod:`adamerge_fast.safe_pickle`).
- :func:`build`: the :class:`~adamerge_fast.models.spec.TaskSpec` of the paper's setting (image encoder,
  fine-tuned checkpoints, zero-shot heads or head files, open_clip's preprocessing).
- :func:`small_clip`: a tiny random-init CLIP (2-layer ViT on 32x32 images) for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .._compat import import_open_clip
from ..io import existing, load_into, load_state_dict, strip_prefix
from .heads import ClassificationHead, Template, cached_head, file_identity, head_key, zero_shot_weights
from .spec import ExportSpec, Source, TaskSpec, load_finetuned, load_heads, per_task, text_list

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
        raise ValueError(f"unknown open_clip model {name!r} (e.g. {', '.join(MODEL_NAMES)}; or one of "
                         "open_clip.list_models())")
    return n


def visual_state_dict(src, *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """The visual tower's tensors of a checkpoint (path or mapping): ``module.``/``model.``/``visual.``
    prefixes are removed as needed, so full CLIP checkpoints, task_vectors ``ImageEncoder`` checkpoints and
    visual-only state dicts all give the visual tower's own key names."""
    sd = load_state_dict(src, trust_pickle=trust_pickle) if isinstance(src, (str, Path)) else src
    sd = strip_prefix(sd, ["module."])
    return strip_prefix(sd, ["model.visual.", "visual."])


def create_clip(
    name: str,
    pretrained: str | Path | Mapping[str, torch.Tensor] | None = None,
    *,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> nn.Module:
    """An open_clip CLIP model; ``pretrained`` is a local checkpoint path (full CLIP state dict, safetensors or
    torch file, or an official ``src.modeling.ImageEncoder`` pickle, read without running its code) or ``None`` for
    random init (``seed``), or such a checkpoint's state dict. ``name="small"`` gives :data:`SMALL_CONFIG`.

    A checkpoint without the text transformer (the official ``ImageEncoder`` deletes it) gives a model whose
    ``transformer`` is ``None``: the image tower works, zero-shot heads need head files instead."""
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
        what = "pretrained state dict" if isinstance(pretrained, Mapping) else str(pretrained)
        sd = pretrained if isinstance(pretrained, Mapping) else load_state_dict(pretrained, trust_pickle=trust_pickle)
        sd = strip_prefix(sd, ["module."])
        sd = strip_prefix(sd, ["model."]) if any(k.startswith("model.visual.") for k in sd.keys()) else sd
        sd = {k: sd[k] for k in sd.keys()}
        if "logit_scale" in sd and sd["logit_scale"].dim() != model.logit_scale.dim():
            sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
        if getattr(model, "transformer", None) is not None and not any(k.startswith("transformer.") for k in sd):
            model.transformer = None  # an image-encoder checkpoint: no text tower to load
        load_into(model, sd, what)
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
    model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[Template] = DEFAULT_TEMPLATES, *,
    progress: bool = False,
) -> ClassificationHead:
    """The paper's zero-shot head: ``ClassificationHead(zero-shot weights * logit_scale.exp(), normalize=True)``."""
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
    return cached_head(key, lambda: zero_shot_head(model, tokenizer, classnames, templates, progress=progress),
                       cache_dir)


def build(
    name: str,
    pretrained: str | Path,
    finetuned: Sequence[Source],
    tasks: Sequence[str],
    *,
    classnames: Sequence[str | Path | Sequence[str]] | None = None,
    templates: str | Path | Sequence[Template] | None = None,
    heads: Sequence[str | Path | nn.Module] | None = None,
    head_normalize: bool | None = None,
    cache_dir=None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> TaskSpec:
    """The paper's setting: the image encoder of the open_clip model ``name`` with one head per task.

    Args:
        name: an open_clip model name (:func:`canonical_name`).
        pretrained: a local CLIP checkpoint (:func:`create_clip`).
        finetuned: one image-encoder checkpoint (path or state dict) per task, in any layout
            :func:`visual_state_dict` reads.
        tasks: the task names.
        heads: one head file (or module) per task; ``head_normalize`` (``None``: ``True``) L2-normalizes the
            features first. Without ``heads``, zero-shot heads from ``classnames`` (per task a class-names file
            or a list of names) and ``templates`` (a file or a list; default :data:`DEFAULT_TEMPLATES`), cached
            under ``cache_dir`` (:func:`cached_zero_shot_head`).
    """
    model = create_clip(name, existing(pretrained, "pretrained checkpoint"), trust_pickle=trust_pickle)
    full_keys = list(model.state_dict())
    backbone = image_encoder(model)
    try:
        transform = preprocess_for(model)
    except Exception:  # open_clip's transform needs a working torchvision; the plain PIL transform does not
        from ..data import ImageTransform

        size = backbone.image_size
        transform = ImageTransform(size[0] if isinstance(size, (tuple, list)) else size)
    fts = load_finetuned(finetuned, backbone, transform_keys=visual_state_dict, trust_pickle=trust_pickle)
    head_files: dict[str, str] = {}
    if heads is not None:
        head_map, head_files = load_heads(heads, tasks, normalize=True if head_normalize is None else head_normalize,
                                          trust_pickle=trust_pickle)
    else:
        if getattr(model, "transformer", None) is None:
            raise ValueError(f"{pretrained}: an image-encoder checkpoint without the text tower: zero-shot heads "
                             "cannot be built from class names; give one head file per task (--heads, e.g. the "
                             "official head_<task>.pt)")
        classes = per_task(classnames, tasks, "classnames (or heads)")
        temps = text_list(templates, "templates file") if templates is not None else list(DEFAULT_TEMPLATES)
        tok = tokenizer_for(name)
        wid = file_identity(pretrained)
        head_map = {
            t: cached_zero_shot_head(name, model, tok, text_list(c, "class-names file"), temps, weights_id=wid,
                                     cache_dir=cache_dir, progress=progress)
            for t, c in zip(tasks, classes, strict=True)
        }
    model.transformer = None  # the text tower is not needed after the zero-shot heads
    export = ExportSpec(source=lambda: full_state_dict(pretrained, full_keys, trust_pickle=trust_pickle),
                        key=lambda n: f"visual.{n}", name="merged_clip.safetensors")
    return TaskSpec(backbone, fts, head_map, transform=transform, head_files=head_files,
                    metadata={"model": f"open_clip:{canonical_name(name)}", "component": "visual"}, export=export)


def full_state_dict(pretrained, keys: Sequence[str], *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """The full CLIP state dict of a pretrained checkpoint with the model's own key names (``module.``/``model.``
    prefixes removed as :func:`create_clip` does), restricted to ``keys`` in that order: what open_clip's own
    loader (``create_model(name, pretrained=file)``) reads back."""
    sd = load_state_dict(pretrained, trust_pickle=trust_pickle)
    sd = strip_prefix(sd, ["module."])
    sd = strip_prefix(sd, ["model."]) if any(k.startswith("model.visual.") for k in sd.keys()) else sd
    return {k: sd[k] for k in keys if k in sd}


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
    "full_state_dict",
    "build",
    "small_clip",
    "file_identity",
]
