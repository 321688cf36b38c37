"""The official AdaMerging script's ``AdaMerging`` module on this package's merged layers (a drop-in for
``src/main_{task,layer}_wise_adamerging.py`` of the paper's repository).

- :class:`AdaMerging` takes the script's own ``paramslist`` / ``model`` / ``names`` / ``exam_datasets`` plus the
  heads, and has the script's ``lambdas()``, ``lambdas_raw``, ``collect_trainable_params()``,
  ``get_classification_head()``, ``get_image_encoder()`` and ``forward(inp, dataset_name)``, so the script's loop
  runs on it unchanged. :meth:`AdaMerging.from_checkpoints` builds it straight from the official
  ``zeroshot.pt`` / ``finetuned.pt`` / ``head_<task>.pt`` files, read without running their pickled code.
- :data:`OFFICIAL_STEP`: the script's step for :func:`adamerge_fast.adamerge` — two batches per task per step
  (``if i > 0: break``), their batch-mean entropies summed. :func:`fresh_batches` reproduces the script's data
  order: a new pass over the loader (a new shuffle) every step, its first batches taken.

What differs from the script (``docs/dropin.md``): the script merges every parameter on the CPU and copies the
merged model to the GPU on every forward, with ``requires_grad`` on the pretrained weights and task vectors;
here the merge runs inside the merged layers on the coefficients' device and only the coefficients get
gradients. ``get_image_encoder()`` returns a new module holding the merged weights instead of writing them into
``model``. :meth:`~AdaMerging.from_checkpoints` merges the image tower (``CLIP.visual``) only: the script's table
also has rows for the text-side tensors an ``ImageEncoder`` keeps (``token_embedding``, ``ln_final``, ...), which
never receive a gradient and stay at the prior.
"""

from __future__ import annotations

import copy as _copy
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..merging.adamerged import AdaMergedModel
from ..merging.task_vectors import Source

#: keyword arguments of :func:`adamerge_fast.adamerge` for the official step: two batches per task, summed
OFFICIAL_STEP = {"batches_per_step": 2, "batch_reduction": "sum"}

#: (width, patch size) of the image tower's first convolution -> open_clip model name (:meth:`from_checkpoints`)
_CLIP_BY_CONV1 = {(768, 32): "ViT-B-32", (768, 16): "ViT-B-16", (1024, 14): "ViT-L-14", (64, 8): "small"}


def fresh_batches(loader: Iterable, per_step: int = 2) -> Iterator[Any]:
    """The official script's data order as one endless stream: for every step, a new iterator over ``loader``
    (a shuffling DataLoader reshuffles) and its first ``per_step`` batches. Feed it to :func:`adamerge_fast.adamerge`
    with ``batches_per_step=per_step``."""
    if per_step < 1:
        raise ValueError(f"fresh_batches: per_step must be >= 1, got {per_step}")
    while True:
        it = iter(loader)
        for i in range(per_step):
            try:
                yield next(it)
            except StopIteration:
                raise ValueError(f"fresh_batches: the loader gave {i} batch(es) in a pass, {per_step} are taken per "
                                 "step") from None


def _set_parameter(root: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_path, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(mod_path) if mod_path else root, leaf, value)


def _heads_by_task(heads, tasks: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(heads, Mapping):
        missing = [t for t in tasks if t not in heads]
        if missing:
            raise ValueError(f"heads: no head for task {missing[0]!r}")
        return {t: heads[t] for t in tasks}
    heads = list(heads)
    if len(heads) != len(tasks):
        raise ValueError(f"heads: {len(heads)} heads for {len(tasks)} tasks")
    return dict(zip(tasks, heads))


class AdaMerging(nn.Module):
    """The official ``AdaMerging`` module: ``forward(inp, dataset_name)`` = that task's head on the merged model.

    Args:
        paramslist: ``[pretrained tensors, task vector 1 tensors, ..., task vector K tensors]``, each a sequence
            aligned with ``names`` (the script's ``paramslist``).
        model: the module the script merges (its ``ModelWrapper``), with or without its parameters (the script's
            ``make_functional`` removes them); it is not modified.
        names: the parameter names of ``model``, in ``named_parameters()`` order (the script's ``names``).
        exam_datasets: the K task names, in ``paramslist`` order.
        heads: one head per task: ``{dataset_name: module}`` or a sequence in ``exam_datasets`` order (the script
            loads them with ``get_classification_head(args, dataset_name)``).
        granularity: ``"layer"`` (``main_layer_wise_adamerging.py``: one row per tensor) or ``"task"`` (one row).
        prior: the initial coefficient (0.3).
        device: where the merged model, the coefficients and the heads live (default: where they are).
        backend, task_vector_dtype: as :class:`~adamerge_fast.AdaMergedModel`.
    """

    def __init__(self, paramslist: Sequence[Sequence[Tensor]], model: nn.Module, names: Sequence[str],
                 exam_datasets: Sequence[str], *, heads, granularity: str = "layer", prior: float = 0.3,
                 device: torch.device | str | None = None, backend: str = "auto",
                 task_vector_dtype: torch.dtype | None = None):
        super().__init__()
        names = list(names)
        if len(paramslist) < 2:
            raise ValueError(f"paramslist needs the pretrained tensors and at least one task vector, got "
                             f"{len(paramslist)} entries")
        if len(paramslist) - 1 != len(exam_datasets):
            raise ValueError(f"paramslist has {len(paramslist) - 1} task vectors for {len(exam_datasets)} datasets")
        for i, ps in enumerate(paramslist):
            if len(ps) != len(names):
                raise ValueError(f"paramslist[{i}] has {len(ps)} tensors for {len(names)} names")
        # the script's model has had its parameters deleted: give a structural copy the pretrained ones again
        module = _copy.deepcopy(model, {id(p): p for p in model.parameters()})
        for n, t in zip(names, paramslist[0]):
            _set_parameter(module, n, nn.Parameter(t.detach(), requires_grad=False))
        order = [n for n, _ in module.named_parameters()]
        if order != names:
            raise ValueError("names must list the model's parameters in named_parameters() order; the model has "
                             f"{order[:3]}... for names {names[:3]}...")
        tv = {n: torch.stack([ps[i].detach() for ps in paramslist[1:]]) for i, n in enumerate(names)}
        merged = AdaMergedModel(module, task_vectors=tv, granularity=granularity, init=prior, clamp=(0.0, 1.0),
                                task_vector_dtype=task_vector_dtype, backend=backend, task_names=exam_datasets,
                                copy=False)
        self._setup(merged, exam_datasets, heads, device)

    def _setup(self, merged: AdaMergedModel, exam_datasets: Sequence[str], heads, device) -> None:
        self.merged = merged
        self.exam_datasets = list(exam_datasets)
        rows = merged.coefficients.shape[0]
        self.register_buffer("pretrain_lambdas", torch.ones(rows, 1, device=merged.raw_coefficients.device),
                             persistent=False)
        self.classifier = []
        for t, head in _heads_by_task(heads, self.exam_datasets).items():
            self.add_module(f"classifier_{t}", head)
            self.classifier.append(f"classifier_{t}")
        if device is not None:
            self.to(device)

    @classmethod
    def from_checkpoints(cls, zeroshot: str | Path | nn.Module, finetuned: Sequence[Source],
                         heads: Sequence[str | Path | nn.Module] | Mapping[str, str | Path | nn.Module], *,
                         exam_datasets: Sequence[str] | None = None, granularity: str = "layer",
                         ties: bool | Mapping[str, Any] | None = None, prior: float = 0.3, model: str | None = None,
                         device: torch.device | str | None = None, backend: str = "auto",
                         task_vector_dtype: torch.dtype | None = None) -> AdaMerging:
        """An :class:`AdaMerging` straight from checkpoints, without the ``paramslist`` plumbing.

        Args:
            zeroshot: the official ``zeroshot.pt`` (a pickled ``ImageEncoder``, read without running its code), any
                CLIP checkpoint :func:`~adamerge_fast.models.open_clip.create_clip` reads, or the module to merge.
            finetuned: one ``finetuned.pt`` (or any checkpoint :func:`~adamerge_fast.models.open_clip.
                visual_state_dict` reads; with a module ``zeroshot``: modules or state dicts of it) per task.
            heads: the ``head_<task>.pt`` files (official pickles need no opt-in) or head modules, one per task
                (a sequence in ``exam_datasets`` order or a mapping task -> head).
            exam_datasets: task names (default: the mapping's keys, else ``task0``, ``task1``, ...).
            granularity, prior: as the constructor; ties: AdaMerging++ (:class:`~adamerge_fast.AdaMergedModel`).
            model: the open_clip model name (default: inferred from the image tower: ViT-B-32, ViT-B-16, ViT-L-14).
        """
        from ..models import open_clip as oc
        from ..models.heads import load_head

        if exam_datasets is None:
            exam_datasets = list(heads) if isinstance(heads, Mapping) else [f"task{i}" for i in range(len(finetuned))]
        exam_datasets = list(exam_datasets)
        if len(finetuned) != len(exam_datasets):
            raise ValueError(f"{len(finetuned)} fine-tuned checkpoints for {len(exam_datasets)} datasets")
        if isinstance(zeroshot, nn.Module):
            backbone, fts = zeroshot, list(finetuned)
        else:
            from ..io import existing, load_state_dict

            path = existing(zeroshot, "zero-shot checkpoint")
            sd = load_state_dict(path)
            backbone = oc.image_encoder(oc.create_clip(model or _infer_clip_name(sd, path), sd))
            fts = [oc.visual_state_dict(existing(f, "fine-tuned checkpoint") if isinstance(f, (str, Path)) else f)
                   for f in finetuned]
        head_map = {t: h if isinstance(h, nn.Module) else load_head(h)
                    for t, h in _heads_by_task(heads, exam_datasets).items()}
        merged = AdaMergedModel(backbone, fts, granularity=granularity, init=prior, clamp=(0.0, 1.0), ties=ties,
                                task_vector_dtype=task_vector_dtype, backend=backend, task_names=exam_datasets)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(merged, exam_datasets, head_map, device)
        return self

    # ---- the script's API
    @property
    def lambdas_raw(self) -> nn.Parameter:
        """The trainable coefficients ``[rows, K]`` (rows = tensors, or 1 task-wise), before the clamp."""
        return self.merged.raw_coefficients

    def lambdas(self) -> Tensor:
        """``[rows, 1 + K]``: the pretrained model's fixed 1, then the coefficients clamped to [0, 1]."""
        return torch.cat((self.pretrain_lambdas, self.merged.coefficients), 1)

    def collect_trainable_params(self) -> list[nn.Parameter]:
        return [self.lambdas_raw]

    def get_classification_head(self, dataset_name: str) -> nn.Module:
        return getattr(self, f"classifier_{dataset_name}")

    def get_image_encoder(self) -> nn.Module:
        """A new module of the merged model's architecture holding the current merged weights."""
        return self.merged.to_module()

    def forward(self, inp, dataset_name: str) -> Tensor:
        return self.get_classification_head(dataset_name)(self.merged(inp))


def _infer_clip_name(sd: Mapping[str, Tensor], path) -> str:
    """The open_clip model whose image tower's first convolution has the checkpoint's shape."""
    key = next((k for k in sd.keys() if k.endswith("visual.conv1.weight")), None)
    if key is None:
        raise ValueError(f"{path}: no visual.conv1.weight: not a CLIP image encoder? (pass model=NAME)")
    width, _, patch, _ = tuple(sd[key].shape)
    if (width, patch) not in _CLIP_BY_CONV1:
        raise ValueError(f"{path}: an image tower of width {width} and patch {patch} is none of "
                         f"{sorted(set(_CLIP_BY_CONV1.values()))}: pass model=<open_clip name>")
    return _CLIP_BY_CONV1[(width, patch)]


__all__ = ["AdaMerging", "OFFICIAL_STEP", "fresh_batches"]
