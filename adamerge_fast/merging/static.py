"""Static (data-free) merges on stacked task vectors ``{name: [K, *S]}``.

- :func:`weight_average`: ``theta_0 + mean_k tau_k`` (the mean of the fine-tuned models).
- :func:`task_arithmetic`: ``theta_0 + scale * sum_k tau_k`` (Ilharco et al.).
- :func:`ties_split` / :func:`ties_merge`: TIES (Yadav et al.): trim each task vector to its top-``k``
  fraction by magnitude (exactly as the official code: keep magnitudes >= the ``(d - int(d*k))``-th smallest,
  i.e. ``int(d*k) + 1`` entries of ``d`` barring ties), elect a sign per entry by the sign of the sum over
  tasks (zeros take the majority sign), keep only entries agreeing with it (the per-task "split" form
  AdaMerging++ feeds to AdaMerging), and take their disjoint mean (or sum). ``scope="global"`` trims over
  each task's whole flattened vector as the official AdaMerging++ code does; ``scope="tensor"`` trims each
  tensor separately.
- :func:`dare`: drop each entry with probability ``p`` (seeded), rescale survivors by ``1/(1-p)``.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch

from .. import ops

TV = Mapping[str, torch.Tensor]


def _combine(base: Mapping[str, torch.Tensor], tv: TV, coef_row: torch.Tensor, backend=None) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for k, d in tv.items():
            b = base[k].detach()
            out[k] = ops.merge(b, d.to(b.device), coef_row.to(b.device), backend=backend)
    return out


def _K(tv: TV) -> int:
    if not tv:
        raise ValueError("empty task vectors")
    return next(iter(tv.values())).shape[0]


def weight_average(base: Mapping[str, torch.Tensor], tv: TV, *, backend=None) -> dict[str, torch.Tensor]:
    """``theta_0 + mean_k tau_k`` for every key of ``tv``."""
    K = _K(tv)
    return _combine(base, tv, torch.full((K,), 1.0 / K), backend)


def check_scale(scale: float, what: str = "scale") -> float:
    """``float(scale)``, or ``ValueError`` naming ``what`` unless it is a finite number that float32 (the dtype of
    the merge coefficients) holds."""
    try:
        v = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(scale).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v}")
    if abs(v) > torch.finfo(torch.float32).max:
        raise ValueError(f"{what} must be a finite number that float32 holds (|scale| <= 3.4e38), got {v}")
    return v


def check_ties_k(k: float, what: str = "TIES: k") -> float:
    """``float(k)``, or ``ValueError`` naming ``what`` unless ``0 < k <= 1`` (the fraction of entries kept)."""
    try:
        v = float(k)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(k).__name__}") from None
    if not 0.0 < v <= 1.0:  # NaN fails too
        raise ValueError(f"{what} is the fraction of entries kept, expected 0 < k <= 1 (in (0, 1]), got {v}")
    return v


def task_arithmetic(
    base: Mapping[str, torch.Tensor], tv: TV, scale: float = 0.3, *, backend=None
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * sum_k tau_k`` (0.3: the AdaMerging paper's task-arithmetic setting)."""
    scale = check_scale(scale, "task_arithmetic: scale")
    return _combine(base, tv, torch.full((_K(tv),), scale), backend)


def _keep_count(n: int, k: float) -> int:
    check_ties_k(k)
    return n - int(n * k)  # official: k-th smallest magnitude with k = d - int(d * K)


def _trim(tv: TV, k: float, scope: str) -> dict[str, torch.Tensor]:
    """Zero all but the top-``k`` fraction (by magnitude) of each task's vector."""
    k = check_ties_k(k)
    K = _K(tv)
    if k >= 1.0:
        return {n: t.clone() for n, t in tv.items()}
    out = {}
    if scope == "global":
        thresh = []
        for i in range(K):
            flat = torch.cat([t[i].reshape(-1).abs().float() for t in tv.values()])
            kk = _keep_count(flat.numel(), k)
            thresh.append(flat.kthvalue(kk).values if kk > 0 else flat.new_tensor(0.0))
            del flat
        for n, t in tv.items():
            th = torch.stack(thresh).to(t.device).reshape(K, *([1] * (t.dim() - 1)))
            out[n] = t * (t.abs().float() >= th)
    elif scope == "tensor":
        for n, t in tv.items():
            flat = t.reshape(K, -1).abs().float()
            kk = _keep_count(flat.shape[1], k)
            th = flat.kthvalue(kk, dim=1, keepdim=True).values if kk > 0 else flat.new_zeros(K, 1)
            out[n] = t * (flat >= th).reshape(t.shape)
    else:
        raise ValueError(f"TIES: scope must be 'global' or 'tensor', got {scope!r}")
    return out


def _elect(trimmed: TV, scope: str) -> dict[str, torch.Tensor]:
    """Per-entry sign of the sum over tasks; zero entries take the majority sign (of the whole vector, or tensor)."""
    signs = {n: torch.sign(t.float().sum(0)) for n, t in trimmed.items()}
    if scope == "global":
        majority = torch.sign(sum(s.sum() for s in signs.values()))
        for s in signs.values():
            s[s == 0] = majority
    else:
        for s in signs.values():
            s[s == 0] = torch.sign(s.sum())
    return signs


def ties_split(tv: TV, k: float = 0.2, scope: Literal["global", "tensor"] = "global") -> dict[str, torch.Tensor]:
    """Per-task TIES task vectors ``[K, *S]``: trimmed, with entries disagreeing with the elected sign zeroed.

    This is what AdaMerging++ learns coefficients over (official ``ties_merging_split``, ``K=20`` -> ``k=0.2``).
    """
    trimmed = _trim(tv, k, scope)
    signs = _elect(trimmed, scope)
    out = {}
    for n, t in trimmed.items():
        s = signs[n].unsqueeze(0)
        keep = torch.where(s > 0, t > 0, t < 0)
        out[n] = t * keep
    return out


def ties_merge(
    base: Mapping[str, torch.Tensor],
    tv: TV,
    k: float = 0.2,
    scale: float = 0.3,
    merge: Literal["mean", "sum"] = "mean",
    scope: Literal["global", "tensor"] = "global",
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * disjoint_merge(ties_split(tv))``; ``merge="mean"`` averages over the tasks that
    kept each entry (the disjoint mean), ``"sum"`` adds them."""
    if merge not in ("mean", "sum"):
        raise ValueError(f"TIES: merge must be 'mean' or 'sum', got {merge!r}")
    scale = check_scale(scale, "ties_merge: scale")
    sel = ties_split(tv, k, scope)
    out = {}
    with torch.no_grad():
        for n, t in sel.items():
            agg = t.float().sum(0)
            if merge == "mean":
                agg = agg / (t != 0).sum(0).clamp(min=1)
            b = base[n].detach()
            out[n] = (b.float() + scale * agg.to(b.device)).to(b.dtype)
    return out


def dare(tv: TV, p: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Drop each task-vector entry with probability ``p`` and rescale the rest by ``1/(1-p)`` (seeded)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE: drop rate p must be in [0, 1), got {p}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for n, t in tv.items():
        keep = torch.rand(t.shape, generator=g) >= p
        out[n] = (t * keep.to(t.device)) / (1.0 - p)
    return out
