"""Hugging Face adapters (loaded from local directories only: ``local_files_only=True``, nothing downloaded).

Vision (the paper's setting on HF CLIP):

- :class:`CLIPImageEncoder`: ``CLIPVisionModel`` + ``visual_projection`` as one module returning the image
  embedding ``[B, projection_dim]``; its parameter names are the HF ones (``vision_model.*``,
  ``visual_projection.weight``), so fine-tuned ``CLIPModel`` / ``CLIPVisionModelWithProjection`` checkpoints
  load directly.
- :func:`clip_zero_shot_head`: the zero-shot head from the text tower (``CLIPModel.get_text_features``) and
  ``logit_scale``, with the paper's recipe (:func:`adamerge_fast.models.heads.zero_shot_weights`).

Language models (entropy of the next-token distribution as the objective):

- :class:`CausalLMForEntropy` wraps a causal LM (GPT-2, Llama, ...). ``positions="last"`` (default) returns the
  logits ``[B, V]`` of the next token after each sequence's *last real token* (found from the attention mask,
  left or right padding); this has one row per example and so works with ``task_batching="concat"``.
  ``positions="all"`` returns ``[N, V]``, the logits at every non-padding position of the batch flattened
  (``N`` = number of real tokens), so padding never counts; its row count is not the batch size, so use it with
  ``task_batching="sequential"``. Pair either with :class:`IdentityHead` (the logits are the prediction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from .._compat import import_transformers
from ..io import CheckpointError
from .heads import ClassificationHead, Template, zero_shot_weights


def _from_pretrained(cls, path, what: str, **kw):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")
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
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
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
    clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[Template], *, progress: bool = False
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
    ``N`` real tokens (row-major), padding excluded.
    """

    def __init__(self, lm: nn.Module, positions: Literal["last", "all"] = "last"):
        super().__init__()
        if positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
        self.lm, self.positions = lm, positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kw = {}
        if not bool(attention_mask.all()):  # positions count real tokens only (left padding)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kw["position_ids"] = pos
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits  # [B, T, V]
        mask = attention_mask.bool()
        if self.positions == "all":
            return logits[mask]
        T = mask.shape[1]
        idx = torch.arange(T, device=mask.device).expand_as(mask)
        last = torch.where(mask, idx, torch.full_like(idx, -1)).amax(dim=1).clamp(min=0)  # [B]
        return logits[torch.arange(logits.shape[0], device=logits.device), last]


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
