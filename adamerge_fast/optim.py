"""The entropy optimizer: AdaMerging's test-time objective.

Each step, for each task in ``heads`` order: the next batch (or ``batches_per_step`` batches) of that task's
*unlabeled* data, the merged model's forward, that task's head, the batch-mean softmax entropy. The losses
are summed over tasks and one Adam step (betas (0.9, 0.999), lr 1e-3 by default) updates the raw
coefficients — the official algorithm. A task's several batches per step are averaged
(``batch_reduction="mean"``) or summed (``"sum"``); the official script's step is two batches per task, summed
(``batches_per_step=2, batch_reduction="sum"``, :data:`adamerge_fast.compat.official.OFFICIAL_STEP`).

``task_batching``:
- ``"concat"`` (default): the merged backbone is the same for every task within a step, so all tasks' batches
  go through one backbone forward, concatenated, and are split only at the heads. One backward; the task
  vectors are read once per step for the coefficient gradient. Same gradient as the official loop.
- ``"sequential"``: one forward and one backward per task, so a task's graph is freed before the next and
  activation memory stays at one task's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from . import ops
from .io import CheckpointError, save_torch, write_text_atomic
from .merging.adamerged import AdaMergedModel


@dataclass
class History:
    """Per step: the summed loss, each task's loss, and (a CPU copy of) the clamped coefficient table."""

    loss: list[float] = field(default_factory=list)
    task_loss: list[dict[str, float]] = field(default_factory=list)
    coefficients: list[torch.Tensor] = field(default_factory=list)

    def state(self) -> dict:
        return {"loss": self.loss, "task_loss": self.task_loss, "coefficients": self.coefficients}


def _inputs(batch: Any) -> Any:
    """Model input of a batch: a tensor, a mapping of tensors (keyword inputs), or the first item of a
    ``(inputs, labels, ...)`` tuple — labels are never used."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _batch_size(inp: Any) -> int:
    if isinstance(inp, torch.Tensor):
        return inp.shape[0]
    if isinstance(inp, Mapping):
        return next(iter(inp.values())).shape[0]
    raise TypeError("a batch must be a tensor, a mapping of tensors, or a tuple whose first item is one; got "
                    f"{type(inp).__name__}")


def _concat(inps: list[Any]) -> Any:
    if isinstance(inps[0], torch.Tensor):
        shapes = {tuple(t.shape[1:]) for t in inps}
        if len(shapes) > 1:
            raise ValueError(f"task_batching='concat' needs batches of one shape per sample, got {sorted(shapes)}; "
                             "use task_batching='sequential'")
        return torch.cat(inps)
    keys = inps[0].keys()
    return {k: _concat([i[k] for i in inps]) for k in keys}


def _to(inp: Any, device) -> Any:
    if device is None:
        return inp
    if isinstance(inp, torch.Tensor):
        return inp.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in inp.items()}


def _call(model, inp):
    return model(**inp) if isinstance(inp, Mapping) else model(inp)


class _Cycle:
    """Cycles an iterable forever, re-iterating it when exhausted (a fresh epoch of a DataLoader)."""

    def __init__(self, name: str, iterable: Iterable):
        self.name, self.iterable = name, iterable
        self.it: Iterator | None = None

    def next(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.iterable)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise ValueError(f"task {self.name!r} has no data (its iterable yielded nothing)")


def adamerge(
    model: AdaMergedModel,
    heads: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    data: Mapping[str, Iterable],
    steps: int = 500,
    lr: float = 1e-3,
    batches_per_step: int = 1,
    *,
    batch_reduction: str = "mean",
    betas: tuple[float, float] = (0.9, 0.999),
    task_batching: str = "concat",
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[int, float, AdaMergedModel], None] | None = None,
) -> History:
    """Learn ``model``'s coefficients by minimising the summed per-task batch-mean prediction entropy.

    Args:
        model: an :class:`AdaMergedModel`; its output is fed to each task's head.
        heads: ``{task: head}``; a head maps the model output to that task's logits ``[B, C]``. Its order is
            the task order.
        data: ``{task: iterable of batches}`` (cycled); a batch is a tensor, a mapping of tensors (keyword
            inputs), or a tuple whose first item is the input (labels ignored).
        steps, lr, betas: Adam on ``model.raw_coefficients``, whatever its layout (official: 500, 1e-3,
            (0.9, 0.999)).
        batches_per_step: batches per task per step.
        batch_reduction: a task's loss is the mean (``"mean"``) or the sum (``"sum"``, the official script's) of its
            batches' batch-mean entropies.
        task_batching: ``"concat"`` or ``"sequential"`` (see the module docstring).
        device: where batches are moved (default: where the coefficients live).
        checkpoint, checkpoint_every: write coefficients + Adam state + history every N steps (atomically).
        resume: a checkpoint to continue from; the data iterables are fast-forwarded past the batches it
            already used, so a resumed run equals an uninterrupted one for deterministic data.
    Returns:
        :class:`History` (loss, per-task losses and coefficient table per step).
    """
    from tqdm.auto import tqdm

    tasks = list(heads)
    if not tasks:
        raise ValueError("adamerge: no tasks (heads is empty)")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"adamerge: task {missing[0]!r} has a head but no data")
    if task_batching not in ("concat", "sequential"):
        raise ValueError(f"adamerge: task_batching must be 'concat' or 'sequential', got {task_batching!r}")
    if batches_per_step < 1 or steps < 0:
        raise ValueError("adamerge: steps must be >= 0 and batches_per_step >= 1")
    if batch_reduction not in ("mean", "sum"):
        raise ValueError(f"adamerge: batch_reduction must be 'mean' or 'sum', got {batch_reduction!r}")
    divisor = batches_per_step if batch_reduction == "mean" else 1
    device = torch.device(device) if device is not None else model.raw_coefficients.device
    opt = torch.optim.Adam([model.raw_coefficients], lr=lr, betas=betas)
    hist = History()
    cycles = {t: _Cycle(t, data[t]) for t in tasks}
    start = 0
    if resume is not None:
        start = _load_checkpoint(resume, model, opt, hist)
        for t in tasks:  # fast-forward the data to where the interrupted run stopped
            for _ in range(start * batches_per_step):
                cycles[t].next()

    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="adamerge",
               dynamic_ncols=True)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        batches = {t: [_to(_inputs(cycles[t].next()), device) for _ in range(batches_per_step)] for t in tasks}
        task_loss: dict[str, torch.Tensor] = {}  # detached; read back once per step (one host sync)
        if task_batching == "concat":
            flat = [b for t in tasks for b in batches[t]]
            sizes = [_batch_size(b) for b in flat]
            feats = _call(model, _concat(flat))
            parts = iter(torch.split(feats, sizes))
            total = 0.0
            for t in tasks:
                lt = sum(ops.entropy(heads[t](next(parts))).mean() for _ in range(batches_per_step)) / divisor
                task_loss[t] = lt.detach()
                total = total + lt
            total.backward()
        else:
            for t in tasks:
                lt = sum(ops.entropy(heads[t](_call(model, b))).mean() for b in batches[t]) / divisor
                lt.backward()
                task_loss[t] = lt.detach()
        opt.step()
        values = torch.stack(list(task_loss.values())).float().cpu().tolist()
        task_loss_f = dict(zip(task_loss, values, strict=True))
        loss = sum(values)
        hist.loss.append(loss)
        hist.task_loss.append(task_loss_f)
        hist.coefficients.append(model.coefficients.detach().float().cpu().clone())
        bar.set_postfix(loss=f"{loss:.4f}")
        if callback is not None:
            callback(step, loss, model)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint, model, opt, hist, step + 1)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, opt, hist, max(steps, start))
    return hist


def save_checkpoint(path, model: AdaMergedModel, opt: torch.optim.Optimizer, hist: History, step: int) -> None:
    """Coefficients, Adam state, history and the step reached, written atomically."""
    save_torch(
        {
            "format": "adamerge_fast.checkpoint/1",
            "fingerprint": model.fingerprint(),
            "step": step,
            "raw_coefficients": model.raw_coefficients.detach().cpu(),
            "optimizer": opt.state_dict(),
            "history": hist.state(),
        },
        path,
    )


def _load_checkpoint(path, model: AdaMergedModel, opt: torch.optim.Optimizer, hist: History) -> int:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: resume file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not an adamerge_fast checkpoint ({e})") from e
    if not isinstance(ck, dict) or ck.get("format") != "adamerge_fast.checkpoint/1":
        raise CheckpointError(f"{path}: not an adamerge_fast checkpoint")
    if ck["fingerprint"] != model.fingerprint():
        raise CheckpointError(
            f"{path}: checkpoint is from another model (fingerprint {ck['fingerprint']}, this model "
            f"{model.fingerprint()}: granularity, task count or parameter shapes differ)"
        )
    with torch.no_grad():
        model.raw_coefficients.copy_(ck["raw_coefficients"])
    opt.load_state_dict(ck["optimizer"])
    h = ck["history"]
    hist.loss[:] = h["loss"]
    hist.task_loss[:] = h["task_loss"]
    hist.coefficients[:] = h["coefficients"]
    return int(ck["step"])


HISTORY_FORMAT = "adamerge_fast.history/1"
_HISTORY_KEYS = ("tasks", "granularity", "loss", "task_loss", "coefficient_rows", "coefficients")


def save_history(path, hist: History, model: AdaMergedModel, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a run's history as JSON (``adamerge_fast.history/1``), atomically.

    Keys: ``format``; ``tasks`` and ``granularity`` (of ``model``); ``loss`` (summed over tasks) and
    ``task_loss`` (``{task: loss}``) per step; ``coefficient_rows`` and ``coefficients``: ``model``'s final
    clamped coefficient table (row names, then one list of per-task values per row); ``trajectory_stride`` and
    ``mean_coefficient_trajectory``: each task's coefficient averaged over the rows, every ``stride``-th step
    (at most 100 points); then the items of ``extra`` (JSON values, e.g. the run's options).
    """
    table = model.coefficient_table()
    stride = max(1, len(hist.coefficients) // 100)
    obj = {
        "format": HISTORY_FORMAT,
        "tasks": list(model.task_names),
        "granularity": model.granularity,
        "loss": [float(x) for x in hist.loss],
        "task_loss": hist.task_loss,
        "coefficient_rows": [r for r, _ in table],
        "coefficients": [v for _, v in table],
        "trajectory_stride": stride,
        "mean_coefficient_trajectory": [[float(v) for v in c.float().mean(0).tolist()]
                                        for c in hist.coefficients[::stride]],
        **(extra or {}),
    }
    return write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def load_history(path) -> dict[str, Any]:
    """A history file written by :func:`save_history`, as a dict; ``ValueError`` naming the file when it is not
    one (not JSON, another format, or missing one of the keys above)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON file ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{p}: not an adamerge history file (format {HISTORY_FORMAT})")
    missing = [k for k in _HISTORY_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{p}: adamerge history file without {missing[0]!r}")
    return obj


__all__ = ["adamerge", "History", "save_checkpoint", "save_history", "load_history", "HISTORY_FORMAT"]
