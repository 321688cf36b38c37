"""LoRA adapters as task vectors inside :class:`~adamerge_fast.merging.AdaMergedModel`, never densified.

A layer whose weight only has LoRA task vectors (``s_k B_k A_k``; adapters read and matched by
:mod:`adamerge_fast.adapters`) becomes :class:`MergedLoRALinear`, which calls
:func:`adamerge_fast.ops.merged_lora_linear` on ``W0`` and the concatenated adapters of the tasks that have one
there. What else an adapter holds (PEFT's ``modules_to_save``, trained biases, norms) is a dense task vector
``value - base`` and takes the dense path. A parameter that a task does not touch has a zero task vector for that
task, and nothing is stored for it: each parameter keeps the list of tasks that touch it, and the coefficient
columns of those tasks are gathered (``coefs[row, tasks]``) where it is merged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import ops
from ..adapters import (
    LoraAdapter,
    LoraModule,
    as_adapter,
    is_conv1d,
    is_lora_source,
    resolve,
    transposed_parameters,
)
from ..io import check_fits
from .task_vectors import as_state_dict, rounded_difference_

# -------------------------------------------------------------------------------------- the model's view
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def rewritable_weights(model: nn.Module) -> set[str]:
    """The weights whose module can run as :class:`MergedLoRALinear`: ``nn.Linear`` or GPT-2's ``Conv1D`` with
    untied parameters, not inside an ``nn.MultiheadAttention`` (which reads its projections' weights directly)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    mha = {path for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    out = set()
    for path, m in model.named_modules():
        if (type(m) in _LINEARS or is_conv1d(m)) and path.rpartition(".")[0] not in mha:
            params = [p for p in (m.weight, getattr(m, "bias", None)) if p is not None]
            if all(counts.get(id(p), 0) == 1 for p in params):
                out.add((path + "." if path else "") + "weight")
    return out


@dataclass
class LoraStack:
    """The LoRA task vectors of one weight: the adapters of the tasks ``tasks`` concatenated along the rank."""

    tasks: list[int]
    a: torch.Tensor  # [R, in]
    b: torch.Tensor  # [out, R]
    ranks: list[int]
    scale: torch.Tensor  # [len(tasks)] fp32
    transposed: bool


@dataclass
class LoraTaskVectors:
    """What :class:`~adamerge_fast.merging.AdaMergedModel` holds for LoRA sources: ``lora`` (weights run by
    :class:`MergedLoRALinear`), ``dense`` stacked task vectors ``[len(tasks), *shape]`` with ``dense_tasks``
    (the tasks they belong to); a parameter in neither is untouched by every task."""

    num_tasks: int
    lora: dict[str, LoraStack]
    dense: dict[str, torch.Tensor]
    dense_tasks: dict[str, list[int]]


def collect(
    pretrained: nn.Module,
    params: Mapping[str, torch.Tensor],
    sources: Sequence[Any],
    *,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> LoraTaskVectors:
    """The task vectors of ``sources`` (one per task: a LoRA adapter in any form :func:`is_lora_source` accepts, or
    a full fine-tuned model / state dict / checkpoint, whose every parameter is a dense task vector) against the
    floating parameters ``params`` (``{name: tensor}``) of ``pretrained`` that get a coefficient row. Adapters stay
    low-rank on the weights :func:`rewritable_weights` names when no task has a dense task vector there; elsewhere
    they are materialized (``s B A``, one tensor at a time). ``dtype``: storage dtype of adapters and task vectors
    (default: their own, the pretrained parameter's for dense ones)."""
    if len(sources) == 0:
        raise ValueError("need at least one fine-tuned model or adapter (got zero tasks)")
    # adapters are matched against every parameter; entries for parameters outside ``params`` (a parameter filter)
    # are dropped: those keep their pretrained values
    shapes = {n: tuple(p.shape) for n, p in pretrained.named_parameters() if torch.is_floating_point(p)}
    transposed, rewritable = transposed_parameters(pretrained), rewritable_weights(pretrained)
    lora_of: dict[str, list[tuple[int, LoraModule]]] = {}
    # per parameter, (task, fine-tuned value or exact difference, pretrained value or None, entry name, source name)
    dense_of: dict[str, list[tuple[int, torch.Tensor, torch.Tensor | None, str, str | None]]] = {}
    for i, src in enumerate(sources):
        if is_lora_source(src):
            res = resolve(as_adapter(src, i), shapes, transposed)
            for n, m in res.lora.items():
                if n in params:
                    lora_of.setdefault(n, []).append((i, m))
            for n, v in res.dense.items():
                if n in params:
                    dense_of.setdefault(n, []).append((i, v, params[n], f"task vector {i}: key {n!r}",
                                                       f"{res.source}: key {n!r}"))
        else:  # a full fine-tuned model: every parameter a dense task vector
            sd = as_state_dict(src, trust_pickle=trust_pickle)
            what = src if isinstance(src, (str, os.PathLike)) else f"fine-tuned model {i}"
            check_fits(params, sd, str(what), check_dtype=True, ref_name="the pretrained model")
            for n in params:
                dense_of.setdefault(n, []).append((i, sd[n], params[n], f"task vector {i}: key {n!r}",
                                                   f"{what}: key {n!r}"))
    out = LoraTaskVectors(len(sources), {}, {}, {})
    for n in params:  # named_parameters order
        entries = lora_of.get(n, [])
        dense = dense_of.get(n, [])
        if entries and (dense or n not in rewritable):  # this weight takes the dense path: materialize the adapters
            dense = sorted(dense + [(i, m.delta(), None, f"task vector {i}: key {n!r}", None) for i, m in entries],
                           key=lambda e: e[0])
            entries = []
        if entries:
            a = torch.cat([m.a.detach().to(dtype or m.a.dtype) for _, m in entries])
            b = torch.cat([m.b.detach().to(dtype or m.b.dtype) for _, m in entries], dim=1)
            device = params[n].device
            out.lora[n] = LoraStack([i for i, _ in entries], a.to(device), b.to(device), [m.rank for _, m in entries],
                                    torch.tensor([m.scale for _, m in entries], dtype=torch.float32, device=device),
                                    bool(entries[0][1].transposed))  # fmt: skip
        if dense:
            st = torch.empty((len(dense), *params[n].shape), dtype=dtype or params[n].dtype, device=params[n].device)
            for j, (_, value, base, what, source) in enumerate(dense):  # each rounded once into the storage dtype
                rounded_difference_(st[j], value, None if base is None else base.detach(), what, source)
            out.dense[n], out.dense_tasks[n] = st, [e[0] for e in dense]
    return out


# -------------------------------------------------------------------------------------------- the layer
class MergedLoRALinear(nn.Module):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight is ``W0 + sum_k c[w_row, tasks[k]] s_k B_k A_k`` and whose
    bias is ``b0 + sum_j c[b_row, b_tasks[j]] tau_b[j]``; runs :func:`adamerge_fast.ops.merged_lora_linear`."""

    def __init__(self, ctx, w0: torch.Tensor, stack: LoraStack, w_row: int, b0=None, tau_b=None, b_tasks=None,
                 b_row=None, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self._ctx = ctx
        self.transposed = stack.transposed
        self.register_buffer("w0", w0.t() if stack.transposed else w0, persistent=False)  # [out, in] (a view)
        self.register_buffer("lora_a", stack.a, persistent=False)  # [R, in]
        self.register_buffer("lora_b", stack.b, persistent=False)  # [out, R]
        self.register_buffer("scale", stack.scale, persistent=False)  # [k]
        self.register_buffer("w_tasks", torch.tensor(stack.tasks, dtype=torch.long, device=w0.device),
                             persistent=False)  # fmt: skip
        self.register_buffer("b0", b0, persistent=False)  # [out] | None
        self.register_buffer("tau_b", tau_b, persistent=False)  # [kb, out] | None
        tb = None if tau_b is None else torch.tensor(b_tasks, dtype=torch.long, device=w0.device)
        self.register_buffer("b_tasks", tb, persistent=False)
        self.ranks, self.w_row, self.b_row, self.backend = list(stack.ranks), w_row, b_row, backend

    def forward(self, x):
        c = self._ctx.get()
        cw = c[self.w_row].index_select(0, self.w_tasks)
        cb = None if self.tau_b is None else c[self.b_row].index_select(0, self.b_tasks)
        return ops.merged_lora_linear(x, self.w0, self.lora_a, self.lora_b, self.ranks, cw, self.scale, self.b0,
                                      self.tau_b, cb, backend=self.backend)  # fmt: skip

    @torch.no_grad()
    def merged_weight(self, coefs: torch.Tensor) -> torch.Tensor:
        """``W0 + sum_k c_k s_k B_k A_k`` in the original layout and dtype (materialized: the one ``[out, in]``
        tensor, at the end)."""
        c = coefs[self.w_row].index_select(0, self.w_tasks).float() * self.scale.float()
        rows = torch.repeat_interleave(c, torch.tensor(self.ranks, device=c.device), output_size=sum(self.ranks))
        w = torch.addmm(self.w0.float(), self.lora_b.float() * rows, self.lora_a.float())
        return (w.t() if self.transposed else w).to(self.w0.dtype).contiguous()

    @torch.no_grad()
    def merged_bias(self, coefs: torch.Tensor) -> torch.Tensor | None:
        if self.b0 is None or self.tau_b is None:
            return self.b0
        return ops.merge(self.b0, self.tau_b, coefs[self.b_row].index_select(0, self.b_tasks), backend=self.backend)

    def extra_repr(self):
        return (f"in={self.w0.shape[1]}, out={self.w0.shape[0]}, ranks={self.ranks}, "
                f"tasks={self.w_tasks.tolist()}, row={self.w_row}")  # fmt: skip


def merged_lora_modules(model, skel: nn.Module, store: LoraTaskVectors) -> list[tuple[str, MergedLoRALinear]]:
    """``[(path, MergedLoRALinear)]`` for every module of ``skel`` whose weight has LoRA task vectors in ``store``
    (the bias merged when some task has a dense task vector for it). ``model``: the
    :class:`~adamerge_fast.merging.AdaMergedModel` being built (its coefficient context, rows, backend)."""
    out = []
    for path, m in skel.named_modules():
        pre = path + "." if path else ""
        stack = store.lora.get(pre + "weight")
        if stack is None:
            continue
        bias = getattr(m, "bias", None)
        bname = pre + "bias"
        tau_b = store.dense.get(bname) if bias is not None else None
        out.append((path, MergedLoRALinear(
            model._ctx, m.weight.detach(), stack, model._coef_row(pre + "weight"),
            None if bias is None else bias.detach(), tau_b, store.dense_tasks.get(bname),
            model._coef_row(bname) if tau_b is not None else None, model.backend,
        )))  # fmt: skip
    return out


def merge_groups(bases, deltas, table: torch.Tensor, groups, backend: str) -> list[torch.Tensor]:
    """``merge_many`` over parameters whose task vectors cover different task subsets: ``groups`` is a list of
    ``(positions, tasks)`` (long tensors); each group is one ``merge_many`` with the coefficient columns
    ``tasks`` of its rows of ``table``."""
    out: list[torch.Tensor | None] = [None] * len(bases)
    for pos, tasks in groups:
        idx = pos.tolist()
        merged = ops.merge_many([bases[i] for i in idx], [deltas[i] for i in idx],
                                table.index_select(0, pos).index_select(1, tasks), backend=backend)  # fmt: skip
        for i, t in zip(idx, merged, strict=True):
            out[i] = t
    return out  # type: ignore[return-value]


def task_groups(names: Sequence[str], tasks_of: Mapping[str, list[int]], device) -> list[tuple]:
    """``[(positions, tasks)]`` as long tensors on ``device``: the positions in ``names`` that share one task
    subset, for :func:`merge_groups`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(tuple(tasks_of[n]), []).append(i)
    return [(torch.tensor(pos, dtype=torch.long, device=device), torch.tensor(t, dtype=torch.long, device=device))
            for t, pos in groups.items()]  # fmt: skip


__all__ = [
    "LoraAdapter",
    "LoraStack",
    "LoraTaskVectors",
    "MergedLoRALinear",
    "collect",
    "merge_groups",
    "merged_lora_modules",
    "rewritable_weights",
    "task_groups",
]
