"""A plain-torch CLIP image tower with the architecture, parameter names, shapes and order of open_clip's
``VisionTransformer`` (class-token pooling, no attention pooling, no patch dropout), for machines without open_clip
(the GPU machine): conv patch embedding, class token, positional embedding, ``ln_pre``, residual blocks of
``nn.MultiheadAttention`` (batch first) and a GELU MLP, ``ln_post`` on the class token's row, projection.

``tests/test_bench.py`` loads open_clip's ViT-B/32 tower's state dict into :func:`build` (strict) and checks
that both give the same output. :data:`CONFIGS` holds the open_clip model configs the step benchmark uses.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# open_clip's model configs (vision_cfg, embed_dim) of the towers the step benchmark builds
CONFIGS = {
    "ViT-B-32": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32)),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16)),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14)),
}


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose output is cast back to the input's dtype (as open_clip's ``LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` on ``[N, L, width]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )
        self.ls_2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


class VisionTransformer(nn.Module):
    """``images[N, 3, S, S]`` -> ``features[N, output_dim]``; the parameters are registered in open_clip's order
    (``class_embedding``, ``positional_embedding``, ``proj``, then ``conv1``, ``ln_pre``, ``transformer``,
    ``ln_post``), so ``named_parameters()`` and the AdaMerging coefficient rows match open_clip's."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int):  # fmt: skip
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [N, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid^2, width]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


def build(embed_dim: int, vision_cfg: dict) -> VisionTransformer:
    """The tower of an open_clip model config (``embed_dim``, ``vision_cfg`` with image_size, layers, width,
    patch_size and optionally head_width (64) and mlp_ratio (4.0)), like ``open_clip.model._build_vision_tower``."""
    width = vision_cfg["width"]
    return VisionTransformer(
        image_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"], width=width,
        layers=vision_cfg["layers"], heads=width // vision_cfg.get("head_width", 64),
        mlp_ratio=vision_cfg.get("mlp_ratio", 4.0), output_dim=embed_dim,
    )  # fmt: skip
