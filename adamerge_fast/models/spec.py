"""What a model adapter builds: :class:`TaskSpec`, and the steps every adapter shares.

An adapter (``models.open_clip.build``, ``models.hf.build_clip``, ``models.hf.build_causal_lm``,
``models.factory.build``) takes plain arguments (paths, names, options) and returns a :class:`TaskSpec`: the
pretrained backbone, the fine-tuned checkpoints checked against it, one head per task, and how to read the
tasks' data. ``adamerge-fast adamerge`` looks the adapter up by its model flag; from Python::

    spec = open_clip.build("ViT-B/32", "ViT-B-32.pt", ["ft/a.pt", "ft/b.pt"], ["a", "b"], classnames=[...])
    merged = AdaMergedModel(spec.backbone, spec.finetuned, task_names=spec.tasks)
    adamerge(merged, spec.heads, data)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..adapters import AdapterCheckpoint, as_adapter, check_adapter, is_lora_source
from ..io import check_fits, existing, load_state_dict
from .heads import load_head, read_lines

#: a fine-tuned model as an adapter takes it: a checkpoint path or a state dict
Source = str | os.PathLike | Mapping[str, torch.Tensor]


@dataclass
class TaskSpec:
    """A merge problem as a model adapter builds it.

    Attributes:
        backbone: the pretrained module AdaMerging merges (eval mode).
        finetuned: one state dict per task, in task order, each checked by :func:`load_finetuned` to hold the
            backbone's parameters with their shapes and dtypes (lazily read where the file format allows).
        heads: ``{task: head}`` in task order; a head maps the backbone's output to that task's logits
            ``[B, C]``.
        transform: image-folder data: PIL image -> input tensor (``None``: the model takes no images).
        tokenizer: text data: an HF tokenizer (``None``: the model takes no text).
        metadata: strings that describe the model (``model``, ``component``), recorded in the run's history.
        rows_per_example: the backbone gives one output row per example, so the tasks' batches may run
            through one forward (``task_batching="concat"``); ``False`` for a causal LM scoring every token.
        head_files: ``{task: file}`` for heads read from files (named in error messages).
        export: how to write the merged backbone as the model the user came with (:class:`ExportSpec`);
            ``None``: its own state dict (``merged.safetensors``).
    """

    backbone: nn.Module
    finetuned: list[Mapping[str, torch.Tensor]]
    heads: dict[str, nn.Module]
    transform: Callable | None = None
    tokenizer: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    rows_per_example: bool = True
    head_files: dict[str, str] = field(default_factory=dict)
    export: "ExportSpec | None" = None

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def to(self, device: torch.device | str) -> "TaskSpec":
        """Move the backbone (eval mode) and the heads to ``device``; the fine-tuned state dicts stay put."""
        self.backbone.to(device).eval()
        for h in self.heads.values():
            h.to(device)
        return self

    def check_data(self, data: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Run the backbone and each task's head on the first example of that task's data (a DataLoader or
        anything with a ``dataset``), so that data of the wrong shape or a head of the wrong width fails here,
        with the task named (one-line ``ValueError``), rather than inside the optimizer."""
        for t, dl in data.items():
            x = _first_example(dl)
            if x is None:
                continue
            with torch.no_grad():
                try:
                    if isinstance(x, Mapping):
                        feats = self.backbone(**{k: v[None].to(device) for k, v in x.items()})
                    else:
                        feats = self.backbone(x[None].to(device))
                except RuntimeError as e:
                    shape = list(x.shape) if isinstance(x, torch.Tensor) else {k: list(v.shape) for k, v in x.items()}
                    raise ValueError(f"task {t!r}: the model cannot run on its data (one example has shape {shape}): "
                                     f"{str(e).splitlines()[0]}") from None
                try:
                    self.heads[t](feats)
                except RuntimeError:
                    w = getattr(self.heads[t], "weight", None)
                    want = f"{w.shape[1]} features" if w is not None else "other features"
                    src = f" ({self.head_files[t]})" if t in self.head_files else ""
                    raise ValueError(f"task {t!r}: its head{src} expects {want}, the model outputs shape "
                                     f"{list(feats.shape[1:])}") from None


@dataclass
class ExportSpec:
    """Where the merged backbone goes in the checkpoint the user came with.

    Attributes:
        source: reads the original model's full state dict (lazily), as its own loader expects the keys; the
            merged tensors replace their entries, every other entry is copied.
        key: backbone parameter name -> its key in ``source()`` (e.g. ``lm.model.x`` -> ``model.x``).
        files_from: a Hugging Face directory: the output is a directory of that model class with its config,
            tokenizer/processor and generation files copied; ``None``: one ``.safetensors`` file.
        name: the output's name inside the run directory (``merged`` for a directory, ``merged.safetensors``).
    """

    source: Callable[[], Mapping[str, torch.Tensor]]
    key: Callable[[str], str]
    files_from: Path | None = None
    name: str = "merged.safetensors"


def _first_example(loader) -> Any:
    ds = getattr(loader, "dataset", None)
    if ds is None or len(ds) == 0:
        return None
    item = ds[0]
    return item[0] if isinstance(item, (tuple, list)) else item


def per_task(values: Sequence | None, tasks: Sequence[str], what: str) -> list:
    """``list(values)``, checked to hold one entry per task; ``what`` names the argument in the error."""
    n = len(tasks)
    if values is None:
        raise ValueError(f"{what} is required: one per task ({n} tasks)")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} gives {len(values)} for {n} tasks (one per task, in the order of the fine-tuned "
                         "checkpoints)")
    return values


def load_finetuned(
    sources: Iterable[Source],
    reference: nn.Module | Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str] | None = None,
    transform_keys: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
    trust_pickle: bool = False,
    ref_name: str = "the pretrained model",
) -> list[Mapping[str, torch.Tensor]]:
    """Read each fine-tuned checkpoint and check that it fits ``reference``.

    ``sources``: checkpoint paths (read by :func:`adamerge_fast.io.load_state_dict`, lazily for safetensors;
    whole pickles only with ``trust_pickle``) or state dicts; LoRA adapters (PEFT adapter directories, ``{name: (A, B,
    scale)}`` mappings: :mod:`adamerge_fast.adapters`) are checked against a module ``reference`` and returned as
    :class:`~adamerge_fast.adapters.LoraAdapter` (``AdaMergedModel`` keeps them low-rank), or against a state-dict
    ``reference`` returned as the fine-tuned checkpoint they stand for
    (:class:`~adamerge_fast.adapters.AdapterCheckpoint`). ``transform_keys`` maps a checkpoint's key layout
    to the reference's (e.g. :func:`adamerge_fast.models.open_clip.visual_state_dict`). Each result must hold
    ``keys`` (default: every parameter of a module reference, every key of a state-dict reference) with the
    reference's shapes and dtypes (:func:`adamerge_fast.io.check_fits`), else a one-line ``CheckpointError``
    naming the file; a missing path raises ``FileNotFoundError``.
    """
    keys = None if keys is None else list(keys)
    out = []
    for i, src in enumerate(sources):
        if is_lora_source(src):  # a LoRA adapter: checked against the model (prefixes inferred, no transform_keys)
            if isinstance(reference, nn.Module):
                out.append(check_adapter(src, reference, i))
            else:
                out.append(AdapterCheckpoint(reference, as_adapter(src, i)))
            continue
        if isinstance(src, Mapping):
            sd, what = src, f"fine-tuned state dict {i}"
        else:
            sd, what = load_state_dict(existing(src, "fine-tuned checkpoint"), trust_pickle=trust_pickle), str(src)
        if transform_keys is not None:
            sd = transform_keys(sd)
        check_fits(reference, sd, what, keys=keys, check_dtype=True, ref_name=ref_name)
        out.append(sd)
    return out


def load_heads(
    heads: Sequence[str | os.PathLike | nn.Module], tasks: Sequence[str], *, normalize: bool | None = None,
    trust_pickle: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({task: head}, {task: file})`` from one head file (:func:`adamerge_fast.models.heads.load_head`, with
    ``normalize``) or head module per task."""
    out, files = {}, {}
    for t, h in zip(tasks, per_task(heads, tasks, "heads"), strict=True):
        if isinstance(h, nn.Module):
            out[t] = h
        else:
            out[t], files[t] = load_head(h, normalize=normalize, trust_pickle=trust_pickle), str(h)
    return out, files


def text_list(value: str | os.PathLike | Sequence[str], what: str) -> list[str]:
    """A list of strings given as such, or as a text file of one per line (:func:`read_lines`: blank lines and
    ``#`` comments skipped)."""
    if isinstance(value, (str, os.PathLike)):
        return read_lines(Path(value), what)
    return list(value)


__all__ = ["TaskSpec", "ExportSpec", "Source", "per_task", "load_finetuned", "load_heads", "text_list"]
