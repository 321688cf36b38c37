"""Static (data-free) merges on stacked task vectors ``{name: [K, *S]}``.

- :func:`weight_average`: ``theta_0 + mean_k tau_k`` (the mean of the fine-tuned models).
- :func:`task_arithmetic`: ``theta_0 + scale * sum_k w_k tau_k`` (Ilharco et al.; ``w_k = 1`` unless
  ``weights`` are given; ``normalize`` divides by ``sum_k w_k``).
- :func:`ties_split` / :func:`ties_merge`: TIES (Yadav et al.): trim each task vector to its top-``k``
  fraction by magnitude, elect a sign per entry by the sign of the (weighted) sum over tasks, keep only
  entries agreeing with it (the per-task "split" form AdaMerging++ feeds to AdaMerging), and take their
  (weighted) disjoint mean, or sum. Trimming:

  * ``keep="ties"`` (default, the official AdaMerging++ code): keep every magnitude ``>=`` the
    ``(d - int(d*k))``-th smallest, i.e. ``int(d*k) + 1`` entries of ``d`` plus every entry tied with the
    threshold;
  * ``keep="exact"``: exactly ``max(1, int(d*k))`` entries (mergekit's count); entries tied with the threshold
    are kept in order of their flat index (over the tensors in order for ``scope="global"``) until the count
    is reached.

  ``scope="global"`` trims over each task's whole flattened vector as the official AdaMerging++ code does;
  ``scope="tensor"`` trims each tensor separately (as mergekit). An entry whose sign sum is exactly zero
  takes the majority sign (``sign_tie="majority"``, the official code: the sign of the sum of the elected
  signs over the vector, or the tensor) or ``+1`` (``sign_tie="positive"``, mergekit).
- :func:`dare`: drop each entry with probability ``p`` (seeded) and rescale the survivors by ``1/(1-p)``
  (``rescale="inverse"``, the DARE paper), to the task vector's L1 norm per tensor (``"l1"``, mergekit), or not.

Precision: task vectors are computed in float32 (float64 for float64 inputs; exact for bf16/fp16 inputs) and
every combination with the base is accumulated in float64 through :func:`adamerge_fast.ops.merge` and rounded to
the base's dtype once. A bf16 result then equals the float64 reference rounded once in every element but those
whose exact value lies within float64 rounding of a midpoint of the bf16 grid, where two float64 evaluation
orders may round apart (measured: 5 in 10^6 elements with a coefficient of 0.3, none with dyadic coefficients);
float32 accumulation rounds about 5 in 10^4 bf16 elements the other way. For fp32 checkpoints the same holds
with 29 bits of float64 slack instead of 45 (about 1 in 100 elements lie that close with a coefficient of 0.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch

from .. import ops
from ..ops._common import acc_dtype

TV = Mapping[str, torch.Tensor]
Keep = Literal["ties", "exact"]
SignTie = Literal["majority", "positive"]
Rescale = Literal["inverse", "l1", "none"]


def _K(tv: TV) -> int:
    if not tv:
        raise ValueError("empty task vectors")
    return next(iter(tv.values())).shape[0]


def coefficients(K: int, scale: float = 1.0, weights: Sequence[float] | None = None,
                 normalize: bool = False) -> torch.Tensor:
    """The float64 coefficient of each task: ``scale * w_k`` (``w_k = 1`` without ``weights``), divided by
    ``sum_k w_k`` with ``normalize`` (a sum below 1e-8 in magnitude counts as 1, as mergekit)."""
    w = _weights(K, weights)
    c = float(scale) * w
    if normalize:
        s = float(w.sum())
        c = c / (s if abs(s) >= 1e-8 else 1.0)
    return c


def _weights(K: int, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(K, dtype=torch.float64)
    w = torch.as_tensor(list(weights) if not isinstance(weights, torch.Tensor) else weights, dtype=torch.float64)
    if w.shape != (K,):
        raise ValueError(f"weights: expected one weight per task ({K}), got {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    return w


def combine(base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor, backend=None) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` (``deltas[K, *S]``) accumulated in float64 by
    :func:`adamerge_fast.ops.merge` and rounded once to ``base.dtype``."""
    b = base.detach()
    return ops.merge(b, deltas.detach().to(b.device), coef.to(device=b.device, dtype=torch.float64), backend=backend)


def _combine(base: Mapping[str, torch.Tensor], tv: TV, coef: torch.Tensor, backend=None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: combine(base[k], d, coef, backend) for k, d in tv.items()}


def weight_average(base: Mapping[str, torch.Tensor], tv: TV, *, backend=None) -> dict[str, torch.Tensor]:
    """``theta_0 + mean_k tau_k`` for every key of ``tv`` (``base[name]: [*S]``, ``tv[name]: [K, *S]``)."""
    K = _K(tv)
    return _combine(base, tv, coefficients(K, 1.0 / K), backend)


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
    base: Mapping[str, torch.Tensor], tv: TV, scale: float = 0.3, *, weights: Sequence[float] | None = None,
    normalize: bool = False, backend=None,
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * sum_k w_k tau_k`` (divided by ``sum_k w_k`` with ``normalize``); ``w_k = 1`` without
    ``weights`` (``[K]``). 0.3: the AdaMerging paper's task-arithmetic setting."""
    scale = check_scale(scale, "task_arithmetic: scale")
    return _combine(base, tv, coefficients(_K(tv), scale, weights, normalize), backend)


# ------------------------------------------------------------------------------------------------- TIES
def check_ties_options(k: float, scope: str = "global", keep: str = "ties", sign_tie: str = "majority",
                       merge: str = "mean") -> None:
    """ValueError naming the first bad TIES option."""
    check_ties_k(k)
    for name, value, allowed in (("scope", scope, ("global", "tensor")), ("keep", keep, ("ties", "exact")),
                                 ("sign_tie", sign_tie, ("majority", "positive")), ("merge", merge, ("mean", "sum"))):
        if value not in allowed:
            raise ValueError(f"TIES: {name} must be {' or '.join(map(repr, allowed))}, got {value!r}")


def keep_rank(n: int, k: float, keep: Keep) -> int:
    """The rank ``r`` (1 = largest) of the threshold magnitude among ``n`` entries: ``"ties"`` keeps
    ``|x| >= the r-th largest`` with ``r = int(n*k) + 1`` (the official ``kthvalue(n - int(n*k))``), ``"exact"``
    keeps exactly ``r = max(1, int(n*k))`` entries."""
    m = int(n * k)
    return min(n, m + 1) if keep == "ties" else max(1, m)


@dataclass
class TiesPlan:
    """What trimming and sign election need beyond the tensor at hand.

    ``thresholds``: ``[K]`` per-task magnitude thresholds (``scope="global"``); ``budgets``: per task, how many
    entries tied with the threshold are still to be kept (``keep="exact"``, global; consumed in tensor order);
    ``majority``: the sign that zero sign sums take (``sign_tie="majority"``, global)."""

    k: float = 0.2
    scope: str = "global"
    keep: str = "ties"
    sign_tie: str = "majority"
    weights: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    budgets: list[int] | None = None
    majority: float | None = None
    _budgets0: list[int] | None = field(default=None, repr=False)

    def restart(self) -> None:
        """Reset the tie budgets for another pass over the tensors in the same order."""
        if self._budgets0 is not None:
            self.budgets = list(self._budgets0)


def _magnitudes(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` as ``[K, n]`` in the compute dtype (float32, float64 for float64)."""
    K = t.shape[0]
    return t.reshape(K, -1).to(acc_dtype(t.dtype)).abs()


def _first_ties(eq: torch.Tensor, need: int) -> torch.Tensor:
    """``eq[n]`` (bool) with only its first ``need`` True entries left True (in place; memory in proportion to the
    True entries when there are more than ``need``)."""
    idx = eq.nonzero().reshape(-1)
    if idx.numel() > max(need, 0):
        eq[idx[max(need, 0):]] = False
    return eq


def trim(t: torch.Tensor, plan: TiesPlan) -> torch.Tensor:
    """``t[K, *S]`` with all but each task's top entries zeroed (see the module docstring); one task's magnitudes
    at a time."""
    out = t.clone()
    if plan.k >= 1.0:
        return out
    K = t.shape[0]
    flat = out.reshape(K, -1)
    n = flat.shape[1]
    for i in range(K):
        a = _magnitudes(flat[i:i + 1])[0]
        if plan.scope == "tensor":
            r = keep_rank(n, plan.k, plan.keep)
            th = a.kthvalue(n - r + 1).values if n else a.new_zeros(())
            mask = a >= th if plan.keep == "ties" else (a > th) | _first_ties(a == th, r - int((a > th).sum()))
        else:
            th = plan.thresholds[i].to(device=a.device, dtype=a.dtype)
            if plan.keep == "ties":
                mask = a >= th
            else:
                take = _first_ties(a == th, plan.budgets[i])
                plan.budgets[i] -= int(take.sum())
                mask = (a > th) | take
        flat[i].mul_(mask)
        del a, mask
    return out


def sign_sum(trimmed: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sign(sum_k w_k trimmed[k])`` per entry (``[*S]``; 0 where the sum is zero), summed in the compute dtype."""
    acc = acc_dtype(trimmed.dtype)
    if weights is None:
        s = trimmed.to(acc).sum(0)
    else:
        s = (trimmed.to(acc) * weights.to(acc).reshape(-1, *([1] * (trimmed.dim() - 1)))).sum(0)
    return torch.sign(s)


def elect(trimmed: torch.Tensor, plan: TiesPlan) -> torch.Tensor:
    """The elected sign per entry of ``trimmed[K, *S]``: the sign of the (weighted) sum; zero sums take ``+1``
    (``sign_tie="positive"``) or the majority sign (global: ``plan.majority``; per tensor: this tensor's)."""
    s = sign_sum(trimmed, plan.weights)
    if plan.sign_tie == "positive":
        fill = 1.0
    elif plan.scope == "global":
        fill = plan.majority
    else:
        fill = float(torch.sign(s.sum()))
    s[s == 0] = fill
    return s


def select(trimmed: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``trimmed[K, *S]`` with entries disagreeing with ``signs[*S]`` zeroed (zeros never agree)."""
    s = signs.unsqueeze(0)
    return trimmed * torch.where(s > 0, trimmed > 0, trimmed < 0)


def disjoint_merge(base: torch.Tensor, sel: torch.Tensor, scale: float, merge: str,
                   weights: torch.Tensor | None = None, backend=None) -> torch.Tensor:
    """``base + scale * agg`` rounded once, with ``agg = sum_k w_k sel[k]`` (``merge="sum"``) or that divided by
    ``sum_k w_k [sel[k] != 0]`` where nonzero (``"mean"``, the disjoint mean); float64 arithmetic."""
    K = sel.shape[0]
    w = _weights(K, None if weights is None else weights.tolist())
    if merge == "sum":
        return combine(base, sel, float(scale) * w, backend)
    zero = torch.zeros(sel.shape[1:], dtype=torch.float64, device=sel.device)
    num = ops.merge(zero, sel, w.to(sel.device), backend=backend)
    den = ops.merge(zero, (sel != 0).to(sel.dtype), w.to(sel.device), backend=backend)
    den[den == 0] = 1.0
    return combine(base, num.div_(den).unsqueeze(0), torch.tensor([float(scale)], dtype=torch.float64), backend)


def global_thresholds(tv: TV, plan: TiesPlan) -> None:
    """Fill ``plan.thresholds`` (and ``plan.budgets`` for ``keep="exact"``) from all of ``tv`` at once: per
    task, the ``keep_rank``-th largest magnitude over the concatenated vector."""
    K = _K(tv)
    th, budgets = [], []
    for i in range(K):
        flat = torch.cat([_magnitudes(t[i:i + 1]).reshape(-1) for t in tv.values()])
        n = flat.numel()
        r = keep_rank(n, plan.k, plan.keep)
        v = flat.kthvalue(n - r + 1).values
        th.append(v)
        budgets.append(r - int((flat > v).sum()))
        del flat
    plan.thresholds = torch.stack(th)
    if plan.keep == "exact":
        plan.budgets, plan._budgets0 = list(budgets), list(budgets)


def ties_plan(tv: TV, k: float = 0.2, scope: str = "global", keep: Keep = "ties", sign_tie: SignTie = "majority",
              weights: Sequence[float] | None = None) -> TiesPlan:
    """A :class:`TiesPlan` with its global parts computed from the in-memory ``tv`` (one pass of trimming for the
    global majority sign)."""
    check_ties_options(k, scope, keep, sign_tie)
    K = _K(tv)
    plan = TiesPlan(k=k, scope=scope, keep=keep, sign_tie=sign_tie,
                    weights=None if weights is None else _weights(K, weights))
    if scope == "global" and k < 1.0:
        global_thresholds(tv, plan)
    if scope == "global" and sign_tie == "majority":
        total = 0.0
        for t in tv.values():
            total += float(sign_sum(trim(t, plan), plan.weights).sum())
        plan.restart()
        plan.majority = float(torch.sign(torch.tensor(total)))
    return plan


def ties_split(tv: TV, k: float = 0.2, scope: Literal["global", "tensor"] = "global", *, keep: Keep = "ties",
               sign_tie: SignTie = "majority", weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Per-task TIES task vectors ``[K, *S]``: trimmed, with entries disagreeing with the elected sign zeroed
    (in ``tv``'s dtype: only zeros are written).

    This is what AdaMerging++ learns coefficients over (official ``ties_merging_split``, ``K=20`` -> ``k=0.2``).
    ``weights`` (``[K]``) weight the sign election as mergekit does.
    """
    plan = ties_plan(tv, k, scope, keep, sign_tie, weights)
    out = {}
    for n, t in tv.items():
        trimmed = trim(t, plan)
        out[n] = select(trimmed, elect(trimmed, plan))
    return out


def ties_merge(
    base: Mapping[str, torch.Tensor],
    tv: TV,
    k: float = 0.2,
    scale: float = 0.3,
    merge: Literal["mean", "sum"] = "mean",
    scope: Literal["global", "tensor"] = "global",
    *,
    keep: Keep = "ties",
    sign_tie: SignTie = "majority",
    weights: Sequence[float] | None = None,
    backend=None,
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * disjoint_merge(ties_split(tv))``; ``merge="mean"`` averages over the tasks that
    kept each entry (weighted by ``weights`` when given: mergekit's ``normalize: true``), ``"sum"`` adds them
    (weighted: mergekit's ``normalize: false``). ``scale`` is mergekit's ``lambda``."""
    check_ties_options(k, scope, keep, sign_tie, merge)
    scale = check_scale(scale, "ties_merge: scale")
    plan = ties_plan(tv, k, scope, keep, sign_tie, weights)
    out = {}
    with torch.no_grad():
        for n, t in tv.items():
            trimmed = trim(t, plan)
            sel = select(trimmed, elect(trimmed, plan))
            out[n] = disjoint_merge(base[n], sel, scale, merge, plan.weights, backend)
    return out


# ------------------------------------------------------------------------------------------------- DARE
def check_dare_options(p: float, rescale: str = "inverse") -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE: drop rate p must be in [0, 1), got {p}")
    if rescale not in ("inverse", "l1", "none"):
        raise ValueError(f"DARE: rescale must be 'inverse', 'l1' or 'none', got {rescale!r}")


def dare_tensor(t: torch.Tensor, p: float, g: torch.Generator, rescale: Rescale = "inverse") -> torch.Tensor:
    """One tensor ``t[K, *S]`` of :func:`dare`: its keep mask is ``torch.rand(t.shape, generator=g) >= p``;
    the result is in the compute dtype (float32, float64 for float64)."""
    keep = torch.rand(t.shape, generator=g) >= p
    x = t.to(acc_dtype(t.dtype))
    out = x * keep.to(t.device)
    if rescale == "inverse":
        out /= 1.0 - p
    elif rescale == "l1":
        for i in range(t.shape[0]):  # mergekit: match the L1 norm of the tensor's task vector (1e-7 guard)
            before, after = x[i].abs().sum(), out[i].abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                out[i] *= before / after
    return out


def dare(tv: TV, p: float, seed: int = 0, *, rescale: Rescale = "inverse") -> dict[str, torch.Tensor]:
    """Drop each task-vector entry with probability ``p`` (one seeded generator over the tensors in order) and
    rescale the rest: by ``1/(1-p)`` (``"inverse"``), to each task's per-tensor L1 norm (``"l1"``, mergekit's
    ``rescale: true``), or not (``"none"``). Results in float32 (float64 for float64 task vectors)."""
    check_dare_options(p, rescale)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {n: dare_tensor(t, p, g, rescale) for n, t in tv.items()}
