"""FusionBench's merged-model wrappers on this package's merged layers (a drop-in for ``fusion_bench`` 0.2.33).

``from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel`` becomes
``from adamerge_fast.compat.fusion_bench import LayerWiseMergedModel`` (likewise ``TaskWiseMergedModel``,
``get_layer_wise_weights``, ``get_task_wise_weights``, ``merge_weights``, ``merge_and_unload``,
``fix_other_parts``); FusionBench's algorithms drive them unchanged. The classes are :class:`AdaMergedModel`\\ s
set up with FusionBench's rules:

- rows: one per parameter of ``pretrained_model.named_parameters()`` that ``requires_grad`` (layer-wise), or one
  in total (task-wise); frozen parameters keep their pretrained values and have no row;
- ``merge_weight``: the trainable leaf ``nn.Parameter`` in FusionBench's orientation, ``[K, L]`` (layer-wise) or
  ``[K]`` (task-wise), so ``torch.optim.Adam([module.merge_weight], ...)`` works as written;
- ``clamp_weights``: clamp to [0, 1] in the forward; ``normalized_merging_weights``: then a softmax over the K
  models of each layer; ``sparsity_ratio``: each 2-D task vector loses the ``int(columns * ratio)`` smallest
  magnitudes of every row (ties: lower column first), once, at construction.

What differs, and why (``docs/dropin.md``):

- FusionBench merges once per ``merge_weights()`` call and its forward reuses that cached state dict; here every
  forward merges from the current ``merge_weight`` (the merged weight is never held). FusionBench's loops call
  ``merge_weights()`` after every optimizer step, so both give the same numbers there; without that call
  FusionBench would run on stale weights and this class would not. ``merge_weights()`` without a mask therefore
  only clears a mask and returns ``None``.
- ``merge_weights(task_vector_mask=...)``: a mask (possibly requiring grad) multiplies each task vector
  elementwise, which the fused kernels do not do; the masked state dict is merged in plain torch and cached, and
  the forward runs it through ``torch.func.functional_call`` until the next ``merge_weights()`` — FusionBench's own
  path.
- No side effects on the inputs: FusionBench turns the fine-tuned models into task vectors in place (deleting
  their frozen parameters), freezes the pretrained model, and ``merge_and_unload()`` loads the merged weights
  into ``pretrained_model`` itself; here the inputs stay as they were and ``merge_and_unload()`` returns a new
  module of the pretrained architecture. ``merge_weight`` is a float32 copy of the given tensor, not a parameter
  sharing its storage.
- Tied weights (one parameter under several names): FusionBench merges the first name and feeds the pretrained
  tensor under the others (``tie_weights=False``); here every name gets the merged tensor. ``tie_weights`` and
  ``strict`` are kept as attributes and used only on the masked path.
- ``task_vectors`` is a list of K ``{name: tensor}`` dicts (views of the stored stacks), not an
  ``nn.ModuleList`` of models; pruned task vectors are stored dense (zeros), not as sparse tensors.
"""

from __future__ import annotations

import copy as _copy
import functools
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..merging.adamerged import AdaMergedModel
from ..merging.task_vectors import task_vectors as make_task_vectors


def get_layer_wise_weights(num_models: int, num_layers: int, init_values: float | None = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """``torch.full((num_models, num_layers), init_values)``; ``init_values`` defaults to ``1 / num_models``."""
    if num_models < 1 or num_layers < 1:
        raise ValueError(f"get_layer_wise_weights: num_models and num_layers must be >= 1, got {num_models}, "
                         f"{num_layers}")
    return torch.full((num_models, num_layers), 1.0 / num_models if init_values is None else init_values, dtype=dtype)


def get_task_wise_weights(num_models: int, init_values: float | None = None) -> Tensor:
    """``torch.full((num_models,), init_values)`` in float32; ``init_values`` defaults to ``1 / num_models``."""
    if num_models < 1:
        raise ValueError(f"get_task_wise_weights: num_models must be >= 1, got {num_models}")
    return torch.full((num_models,), 1.0 / num_models if init_values is None else init_values, dtype=torch.float32)


def prune_smallest_(tv: Tensor, sparsity_ratio: float) -> Tensor:
    """Zero, in place, the ``int(tv.shape[-1] * sparsity_ratio)`` smallest-magnitude entries of every row of ``tv``
    (``[..., rows, columns]``; ties: lower column first) — FusionBench's unstructured magnitude pruning of a 2-D
    task vector, applied to each task of a stack ``[K, rows, columns]`` at once. Returns ``tv``."""
    if not 0.0 <= sparsity_ratio <= 1.0:
        raise ValueError(f"sparsity_ratio must be in [0, 1], got {sparsity_ratio}")
    n = int(tv.shape[-1] * sparsity_ratio)
    if n:
        order = torch.sort(tv.abs(), dim=-1, stable=True).indices[..., :n]
        tv.scatter_(-1, order, 0)
    return tv


def _forward_model(module: nn.Module, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None):
    return module(*args, **(kwargs or {}))


class _FusionBenchWrapper(AdaMergedModel):
    """What both wrappers share: task vectors of the ``requires_grad`` parameters, FusionBench's attributes."""

    _granularity = "layer"
    _layout = "tasks_rows"

    def __init__(self, weight: Tensor, pretrained_model: nn.Module, finetuned_models: Sequence[nn.Module], *,
                 clamp_weights: bool, tie_weights: bool, strict: bool, sparsity_ratio: float | None,
                 normalized_merging_weights: bool, backend: str, task_vector_dtype: torch.dtype | None):
        if not isinstance(pretrained_model, nn.Module):
            raise TypeError(f"pretrained_model must be an nn.Module, got {type(pretrained_model).__name__}")
        if not isinstance(weight, Tensor):
            raise TypeError(f"the merging weights must be a tensor, got {type(weight).__name__}")
        names = [n for n, p in pretrained_model.named_parameters() if p.requires_grad and p.is_floating_point()]
        if not names:
            raise ValueError("pretrained_model has no parameter that requires grad: nothing to merge")
        tv = make_task_vectors(pretrained_model, list(finetuned_models), keys=names, dtype=task_vector_dtype)
        if sparsity_ratio is not None:
            for t in tv.values():
                if t.dim() == 3:  # a 2-D parameter, stacked over the K tasks
                    prune_smallest_(t, sparsity_ratio)
        super().__init__(
            pretrained_model, task_vectors=tv, granularity=self._granularity, init=weight,
            clamp=(0.0, 1.0) if clamp_weights else None, normalize="softmax" if normalized_merging_weights else None,
            backend=backend, parameter_filter="requires_grad", coefficient_layout=self._layout,
        )  # fmt: skip
        self.clamp_weights, self.tie_weights, self.strict = clamp_weights, tie_weights, strict
        self.sparsity_ratio, self.normalized_merging_weights = sparsity_ratio, normalized_merging_weights
        self.task_vector_dtype = task_vector_dtype
        object.__setattr__(self, "_pretrained_model", pretrained_model)  # not a submodule: not copied or moved
        self._task_vector_mask: Mapping[str, Tensor] | None = None
        self._masked_state: dict[str, Tensor] | None = None

    # ---- FusionBench's attributes
    @property
    def merge_weight(self) -> nn.Parameter:
        """The trainable merging weights, ``[K, L]`` (layer-wise) or ``[K]`` (task-wise): ``raw_coefficients``."""
        return self.raw_coefficients

    @property
    def pretrained_model(self) -> nn.Module:
        """The pretrained model given to the constructor (never modified)."""
        return self._pretrained_model

    @property
    def task_vectors(self) -> list[dict[str, Tensor]]:
        """K dicts ``{parameter name: task vector}`` (views of the stored stacks), one per fine-tuned model."""
        stacks = {n: self._row_tensors(n)[1] for n in self.param_names}
        return [{n: t[k] for n, t in stacks.items()} for k in range(self.num_tasks)]

    @property
    def forward_model(self):
        """``forward_model(args=(...), kwargs={...})`` runs the merged model, as FusionBench's ``functools.partial``
        of ``functional_call`` does."""
        return functools.partial(_forward_model, self)

    # ---- merging
    def _merged_tensors(self, task_vector_mask: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Every state-dict entry (and non-persistent buffer) of the pretrained architecture: ``base + sum_k
        w[k, row] * mask[name] * tau_k`` for the rows (differentiable in the weights and the mask), the pretrained
        tensor for the rest. Tied names all get the merged tensor."""
        coefs = self.coefficients
        merged: dict[str, Tensor] = {}
        for name in self.param_names:
            base, tau, r = self._row_tensors(name)
            c = coefs[r].reshape(-1, *[1] * base.dim())
            delta = (c * tau.to(c.dtype)).sum(0)
            if task_vector_mask is not None:
                if name not in task_vector_mask:
                    raise KeyError(f"task_vector_mask has no entry for parameter {name!r}")
                delta = delta * task_vector_mask[name]
            merged[name] = (base + delta).to(base.dtype)
        out = {}
        for key in self._template.state_dict(keep_vars=True):
            out[key] = merged[self.param_names[self._aliases[key]]] if key in self._aliases else self._fixed_tensor(key)
        for key, _ in self._template.named_buffers():
            out.setdefault(key, self._fixed_tensor(key))
        return out

    def merge_weights(self, task_vector_mask: Mapping[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """Without a mask: nothing to cache (every forward merges from ``merge_weight``), clears a previous mask,
        returns ``None``. With ``task_vector_mask`` (``{name: tensor of the parameter's shape}``): merges the masked
        state dict in plain torch, caches it for the following forwards (until the next call) and returns it."""
        self._task_vector_mask = task_vector_mask
        self._masked_state = None if task_vector_mask is None else self._merged_tensors(task_vector_mask)
        return self._masked_state

    def forward(self, *args, **kwargs):
        if self._masked_state is None:
            return super().forward(*args, **kwargs)
        runner = self.__dict__.get("_masked_runner")
        if runner is None:  # a structural copy on the meta device: every tensor comes from the masked state dict
            runner = _copy.deepcopy(self._template)
            object.__setattr__(self, "_masked_runner", runner)
        runner.train(self.training)
        return torch.func.functional_call(runner, self._masked_state, args, kwargs, tie_weights=self.tie_weights,
                                          strict=False)

    def merge_and_unload(self, task_vector_mask: Mapping[str, Tensor] | None = None, copy: bool = False) -> nn.Module:
        """A new module of the pretrained architecture holding the merged weights (masked by ``task_vector_mask``).
        ``copy`` is accepted for FusionBench's signature: the pretrained model is never written either way."""
        if task_vector_mask is None:
            return self.to_module()
        with torch.no_grad():
            sd = self._merged_tensors(task_vector_mask)
        m = self.to_module()
        m.load_state_dict({k: sd[k] for k in m.state_dict()})
        return m


class LayerWiseMergedModel(_FusionBenchWrapper):
    """``theta_0 + sum_k w[k, l] tau_k`` per parameter ``l``, with ``w = merge_weight`` ``[K, L]`` (clamped to
    [0, 1] with ``clamp_weights``, then a softmax over K with ``normalized_merging_weights``).

    Args:
        layer_wise_weight: the initial weights ``[K, L]``, ``L`` = the parameters of ``pretrained_model`` that
            require grad (:func:`get_layer_wise_weights`).
        pretrained_model: the pretrained ``nn.Module``; finetuned_models: K modules of its architecture.
        clamp_weights, tie_weights, strict, sparsity_ratio, normalized_merging_weights: FusionBench's options (see
            the module docstring).
        backend: op backend of :class:`AdaMergedModel`; task_vector_dtype: storage dtype of the task vectors.
    """

    def __init__(self, layer_wise_weight: Tensor, pretrained_model: nn.Module, finetuned_models: Sequence[nn.Module],
                 clamp_weights: bool = True, tie_weights: bool = False, strict: bool = True,
                 sparsity_ratio: float | None = None, normalized_merging_weights: bool = False, *,
                 backend: str = "auto", task_vector_dtype: torch.dtype | None = None):
        super().__init__(layer_wise_weight, pretrained_model, finetuned_models, clamp_weights=clamp_weights,
                         tie_weights=tie_weights, strict=strict, sparsity_ratio=sparsity_ratio,
                         normalized_merging_weights=normalized_merging_weights, backend=backend,
                         task_vector_dtype=task_vector_dtype)


class TaskWiseMergedModel(_FusionBenchWrapper):
    """``theta_0 + sum_k w[k] tau_k`` with ``w = merge_weight`` ``[K]`` (clamped to [0, 1] with ``clamp_weights``).

    Args:
        task_wise_weight: the initial weights ``[K]`` (:func:`get_task_wise_weights`).
        pretrained_model, finetuned_models, clamp_weights, tie_weights, strict: as :class:`LayerWiseMergedModel`.
        task_vector_dtype: storage dtype of the task vectors (FusionBench's option).
        backend: op backend of :class:`AdaMergedModel`.
    """

    _granularity = "task"
    _layout = "tasks"

    def __init__(self, task_wise_weight: Tensor, pretrained_model: nn.Module, finetuned_models: Sequence[nn.Module],
                 clamp_weights: bool = True, tie_weights: bool = False, strict: bool = True,
                 task_vector_dtype: torch.dtype | None = None, *, backend: str = "auto"):
        super().__init__(task_wise_weight, pretrained_model, finetuned_models, clamp_weights=clamp_weights,
                         tie_weights=tie_weights, strict=strict, sparsity_ratio=None,
                         normalized_merging_weights=False, backend=backend, task_vector_dtype=task_vector_dtype)


_WRAPPERS = (LayerWiseMergedModel, TaskWiseMergedModel)


def merge_weights(module: nn.Module) -> None:
    """Call ``merge_weights()`` on every wrapper within ``module`` (FusionBench's module-level helper)."""
    if isinstance(module, _WRAPPERS):
        module.merge_weights()
        return
    for child in module.children():
        merge_weights(child)


def merge_and_unload(module: nn.Module) -> nn.Module:
    """``module`` with every wrapper in it replaced by its ``merge_and_unload()`` result (the module itself when it
    is one)."""
    if isinstance(module, _WRAPPERS):
        return module.merge_and_unload()
    for name, child in list(module.named_children()):
        new = merge_and_unload(child)
        if new is not child:
            setattr(module, name, new)
    return module


def fix_other_parts(module: nn.Module) -> nn.Module:
    """Freeze every parameter of ``module`` except the wrappers' ``merge_weight``."""
    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, _WRAPPERS):
            m.merge_weight.requires_grad_(True)
    return module


__all__ = [
    "get_layer_wise_weights",
    "get_task_wise_weights",
    "prune_smallest_",
    "LayerWiseMergedModel",
    "TaskWiseMergedModel",
    "merge_weights",
    "merge_and_unload",
    "fix_other_parts",
]
