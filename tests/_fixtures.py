"""Small model fixtures shared by several test files."""

import copy

import torch
from torch import nn


def perturbed_copies(model: nn.Module, n: int, scale: float) -> list[nn.Module]:
    """``n`` deep copies of ``model`` ("fine-tuned models"): copy ``s`` (1-based) has ``scale * randn`` added to every
    parameter, drawn from a generator seeded with ``s``."""
    out = []
    for s in range(1, n + 1):
        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        out.append(m)
    return out
