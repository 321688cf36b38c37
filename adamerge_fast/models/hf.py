"""Hugging Face adapters (loaded from local directories only: ``local_files_only=True``, nothing downloaded).

Vision (the paper's setting on HF CLIP):

- :class:`CLIPImageEncoder`: ``CLIPVisionModel`` + ``visual_projection`` as one module returning the image
  embedding ``[B, projection_dim]``; its parameter names are the HF ones (``vision_model.*``,
  ``visual_projection.weight``), so fine-tuned ``CLIPModel`` / ``CLIPVisionModelWithProjection`` checkpoints
  load directly.
- :func:`clip_zero_shot_head`: the zero-shot head from the text tower (``CLIPModel.get_text_features``) and
  ``logit_scale``, with the paper's recipe (:func:`adamerge_fast.models.heads.zero_shot_weights`).

Adapters: :func:`build_clip` and :func:`build_causal_lm` return the
:class:`~adamerge_fast.models.spec.TaskSpec` of a local HF CLIP or causal LM directory.

Language models (entropy of the next-token distribution as the objective):

- :class:`CausalLMForEntropy` wraps a causal LM (GPT-2, Llama, ...). ``positions="last"`` (default) returns the
  logits ``[B, V]`` of the next token after each sequence's *last real token* (found from the attention mask,
  left or right padding); this has one row per example and so works with ``task_batching="concat"``.
  ``positions="all"`` returns ``[N, V]``, the logits at every non-padding position of the batch flattened
  (``N`` = number of real tokens), so padding never counts; its row count is not the batch size, and
  :meth:`CausalLMForEntropy.rows_per_example` tells ``task_batching="concat"`` how to split a concatenated batch
  (each task's loss is its token-mean entropy over real tokens, as in sequential batching). Pair either with
  :class:`IdentityHead` (the logits are the prediction). ``fused_entropy=True`` hands over the hidden states and
  the LM head instead of the logits (:mod:`adamerge_fast.models.lm_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from .._compat import import_transformers
from ..io import CheckpointError, add_prefix, existing, load_state_dict
from .heads import ClassificationHead, Template, cached_head, file_identity, head_key, zero_shot_weights
from .lm_head import LinearHeadInputs
from .spec import ExportSpec, Source, TaskSpec, load_finetuned, load_heads, per_task, text_list


def _from_pretrained(cls, path, what: str, **kw):
    p = existing(path, what)
    try:
        return cls.from_pretrained(str(p), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: cannot load as a Hugging Face {what}: {first}") from e


# ------------------------------------------------------------------------------------------------ vision
class CLIPImageEncoder(nn.Module):
    """``pixel_values [B, 3, H, W] -> visual_projection(vision_model(pixel_values).pooler_output)``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    @classmethod
    def from_model(cls, model: nn.Module) -> "CLIPImageEncoder":
        """From a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (shares its modules)."""
        return cls(model.vision_model, model.visual_projection)

    @classmethod
    def from_config(cls, config, seed: int | None = 0) -> "CLIPImageEncoder":
        tf = import_transformers()
        if seed is not None:
            torch.manual_seed(seed)
        return cls.from_model(tf.CLIPVisionModelWithProjection(config).eval())

    @classmethod
    def from_pretrained(cls, path) -> "CLIPImageEncoder":
        """From a local HF directory of a ``CLIPModel`` or ``CLIPVisionModelWithProjection``."""
        tf = import_transformers()
        return cls.from_model(_from_pretrained(tf.CLIPVisionModelWithProjection, path, "CLIP vision model").eval())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        return self.visual_projection(out.pooler_output)


def tiny_clip_config(**overrides):
    """A tiny ``CLIPConfig`` (vision: 2 layers, width 32, 32x32 images, patch 8; text: 2 layers, width 32)."""
    tf = import_transformers()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)


def tiny_clip_vision_config(**overrides):
    """The vision part of :func:`tiny_clip_config` as a ``CLIPVisionConfig``."""
    return tiny_clip_config(vision=overrides).vision_config


@torch.no_grad()
def clip_zero_shot_head(
    clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[Template], *,
    progress: bool = False,
) -> ClassificationHead:
    """The paper's zero-shot head from an HF ``CLIPModel``: text features of the filled templates (the text
    tower + ``text_projection``), normalized, averaged, renormalized, times ``logit_scale.exp()``.
    ``tokenizer``: an HF tokenizer (or any callable ``list[str] -> {"input_ids", "attention_mask"}``)."""
    device = next(clip_model.parameters()).device

    def encode(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = clip_model.get_text_features(**enc)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    w = zero_shot_weights(encode, classnames, templates, clip_model.logit_scale.detach().float(), progress=progress)
    return ClassificationHead(w.cpu(), None, normalize=True)


# -------------------------------------------------------------------------------------------------- LMs
class CausalLMForEntropy(nn.Module):
    """A causal LM returning next-token logits for the entropy objective (see the module docstring).

    ``forward(input_ids [B, T], attention_mask [B, T] | None)``:
    ``positions="last"`` -> ``[B, V]`` at each row's last real token; ``positions="all"`` -> ``[N, V]`` at the
    ``N`` real tokens (row-major), padding excluded; :meth:`rows_per_example` says how many rows each example gives
    (so ``task_batching="concat"`` can split a concatenated batch by task).

    ``fused_entropy=True``: instead of the logits, a :class:`~adamerge_fast.models.lm_head.LinearHeadInputs` — the
    hidden states at the same positions (``[B, D]`` / ``[N, D]``) and the LM head (merged, inside
    ``AdaMergedModel``) — whose entropy :func:`adamerge_fast.ops.linear_entropy` computes without the ``[N, V]``
    logits (``chunk``: rows per logits tile). Needs a linear LM head without logit scaling or soft-capping.
    """

    def __init__(self, lm: nn.Module, positions: Literal["last", "all"] = "last", *, fused_entropy: bool = False,
                 chunk: int | None = None):
        super().__init__()
        if positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
        self.lm, self.positions, self.fused_entropy, self.chunk = lm, positions, bool(fused_entropy), chunk
        if self.fused_entropy:
            cfg = getattr(lm, "config", None)
            for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
                v = getattr(cfg, attr, None)
                if v not in (None, 1, 1.0):
                    raise ValueError(f"fused_entropy: the model's logits are transformed after its head (config "
                                     f"{attr}={v}); use fused_entropy=False")
            if not isinstance(lm.get_output_embeddings(), nn.Linear):
                raise ValueError(f"fused_entropy: the LM head is a {type(lm.get_output_embeddings()).__name__}, not "
                                 "a linear layer; use fused_entropy=False")

    def rows_per_example(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]``: output rows per example — 1 for ``positions="last"``, its real tokens for ``"all"``."""
        if self.positions == "last" or attention_mask is None:
            n = 1 if self.positions == "last" else input_ids.shape[1]
            return torch.full((input_ids.shape[0],), n, dtype=torch.long, device=input_ids.device)
        return attention_mask.bool().sum(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        kw = {}
        if attention_mask is not None and not bool(attention_mask.all()):  # positions count real tokens only
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (left padding)
            kw["position_ids"] = pos
        if self.fused_entropy:  # the decoder's hidden states; the LM head goes to linear_entropy
            body = getattr(self.lm, self.lm.base_model_prefix)
            out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state
        else:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits  # [B, T, V]
        if attention_mask is None:  # every token is real (no data-dependent indexing: shapes-only runs work)
            out = out.reshape(-1, out.shape[-1]) if self.positions == "all" else out[:, -1]
        elif self.positions == "all":
            out = out[attention_mask.bool()]
        else:
            mask = attention_mask.bool()
            T = mask.shape[1]
            idx = torch.arange(T, device=mask.device).expand_as(mask)
            last = torch.where(mask, idx, torch.full_like(idx, -1)).amax(dim=1).clamp(min=0)  # [B]
            out = out[torch.arange(out.shape[0], device=out.device), last]
        if self.fused_entropy:
            return LinearHeadInputs.from_head(out, self.lm.get_output_embeddings(), chunk=self.chunk)
        return out


class IdentityHead(nn.Module):
    """The LM's logits are the prediction: the head passes them through."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def load_clip(path) -> nn.Module:
    """A local HF ``CLIPModel`` directory, eval mode."""
    tf = import_transformers()
    return _from_pretrained(tf.CLIPModel, path, "CLIP model").eval()


def load_causal_lm(path) -> nn.Module:
    """A local HF causal LM directory (GPT-2, Llama, ...), eval mode."""
    tf = import_transformers()
    return _from_pretrained(tf.AutoModelForCausalLM, path, "causal language model").eval()


def load_tokenizer(path):
    tf = import_transformers()
    return _from_pretrained(tf.AutoTokenizer, path, "tokenizer")


# -------------------------------------------------------------------------------------------- adapters
def build_clip(
    pretrained: str | Path,
    finetuned: Sequence[Source],
    tasks: Sequence[str],
    *,
    classnames: Sequence[str | Path | Sequence[str]] | None = None,
    templates: str | Path | Sequence[Template] | None = None,
    heads: Sequence[str | Path | nn.Module] | None = None,
    head_normalize: bool | None = None,
    tokenizer: str | Path | None = None,
    image_size: int = 224,
    cache_dir=None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> TaskSpec:
    """The paper's setting on a local HF CLIP directory: merge :class:`CLIPImageEncoder`.

    Args:
        pretrained: a ``CLIPModel`` directory (a ``CLIPVisionModelWithProjection`` one suffices with ``heads``).
        finetuned: one checkpoint (file, directory or state dict) per task with the encoder's HF key names.
        tasks: the task names.
        heads: one head file (or module) per task; ``head_normalize`` (``None``: ``True``) L2-normalizes the
            features first. Without ``heads``, zero-shot heads from ``classnames`` (per task a class-names file
            or a list of names) and ``templates`` (a file or a list; default ``"a photo of a {}."``) through the
            text tower and ``tokenizer`` (a directory; default ``pretrained``), cached under ``cache_dir``.
        image_size: the image-folder transform's size when the vision config does not give one.
    """
    from ..data import CLIP_MEAN, CLIP_STD, ImageTransform

    head_files: dict[str, str] = {}
    if heads is not None:
        backbone = CLIPImageEncoder.from_pretrained(pretrained)
        head_map, head_files = load_heads(heads, tasks, normalize=True if head_normalize is None else head_normalize,
                                          trust_pickle=trust_pickle)
    else:
        classes = per_task(classnames, tasks, "classnames (or heads)")
        clip = load_clip(pretrained)
        backbone = CLIPImageEncoder.from_model(clip)
        tok = load_tokenizer(tokenizer or pretrained)
        temps = text_list(templates, "templates file") if templates is not None else ["a photo of a {}."]
        wid = file_identity(pretrained)
        head_map = {}
        for t, c in zip(tasks, classes, strict=True):
            names = text_list(c, "class-names file")
            head_map[t] = cached_head(head_key("hf-clip", wid, names, temps),
                                      lambda n=names: clip_zero_shot_head(clip, tok, n, temps, progress=progress),
                                      cache_dir)
        del clip
    config = getattr(backbone.vision_model, "config", None)
    transform = ImageTransform(config.image_size if config is not None else image_size, CLIP_MEAN, CLIP_STD)
    fts = load_finetuned(finetuned, backbone, trust_pickle=trust_pickle)
    return TaskSpec(backbone, fts, head_map, transform=transform, head_files=head_files,
                    metadata={"model": "hf-clip", "component": "vision_model+visual_projection"},
                    export=_hf_export(pretrained, ""))


def _hf_export(pretrained, prefix: str) -> ExportSpec:
    """The merged backbone written as the pretrained Hugging Face directory's model (its keys, config, tokenizer);
    backbone parameter names lose ``prefix``."""
    return ExportSpec(source=lambda: load_state_dict(pretrained), key=lambda n: n[len(prefix):] if n.startswith(prefix)
                      else n, files_from=Path(pretrained), name="merged")


def build_causal_lm(
    pretrained: str | Path,
    finetuned: Sequence[Source],
    tasks: Sequence[str],
    *,
    tokenizer: str | Path | None = None,
    positions: Literal["last", "all"] = "last",
    fused_entropy: bool = False,
    trust_pickle: bool = False,
) -> TaskSpec:
    """A local HF causal LM directory as :class:`CausalLMForEntropy` (``positions``, ``fused_entropy``), an
    :class:`IdentityHead` per task, the tokenizer of ``tokenizer`` (default ``pretrained``; its EOS token pads when
    it has no pad token). ``finetuned``: one LM checkpoint (directory, file or state dict) per task, with the LM's
    own key names. ``positions="all"`` gives one row per token: the spec's ``rows_per_example`` is then ``False``
    (concatenated batches are split by :meth:`CausalLMForEntropy.rows_per_example`)."""
    backbone = CausalLMForEntropy(load_causal_lm(pretrained), positions=positions, fused_entropy=fused_entropy)
    tok = load_tokenizer(tokenizer or pretrained)
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    fts = load_finetuned(finetuned, backbone, transform_keys=lambda sd: add_prefix(sd, "lm."),
                         trust_pickle=trust_pickle)
    return TaskSpec(backbone, fts, {t: IdentityHead() for t in tasks}, tokenizer=tok,
                    rows_per_example=positions == "last", metadata={"model": "hf-causal-lm", "component": "lm"},
                    export=_hf_export(pretrained, "lm."))


def tiny_gpt2_config(**overrides):
    tf = import_transformers()
    kw = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return tf.GPT2Config(**kw)


def tiny_llama_config(**overrides):
    tf = import_transformers()
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    return tf.LlamaConfig(**kw)


def tiny_causal_lm(kind: Literal["gpt2", "llama"] = "gpt2", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-init GPT-2 or Llama (2 layers, width 32, vocabulary 64)."""
    tf = import_transformers()
    torch.manual_seed(seed)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()
    if kind == "llama":
        return tf.LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    raise ValueError(f"kind must be 'gpt2' or 'llama', got {kind!r}")


__all__ = [
    "build_clip",
    "build_causal_lm",
    "CLIPImageEncoder",
    "clip_zero_shot_head",
    "tiny_clip_config",
    "tiny_clip_vision_config",
    "CausalLMForEntropy",
    "IdentityHead",
    "load_clip",
    "load_causal_lm",
    "load_tokenizer",
    "tiny_causal_lm",
    "tiny_gpt2_config",
    "tiny_llama_config",
]
