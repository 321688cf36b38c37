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
  vectors are read once per step for the coefficient gradient. Same gradient as the official loop. A model with
  several output rows per example (a causal LM scoring every real token) is split by its ``rows_per_example``.

A head may return logits ``[N, C]`` or a :class:`~adamerge_fast.models.lm_head.LinearHeadInputs` (hidden states +
the LM head, from a model built with ``fused_entropy=True``): its mean entropy then comes from
:func:`adamerge_fast.ops.linear_entropy`, which never holds the ``[N, V]`` logits.
- ``"sequential"``: one forward and one backward per task, so a task's graph is freed before the next and
  activation memory stays at one task's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .io import CheckpointError, NonFiniteError, save_torch, write_text_atomic
from .merging.adamerged import AdaMergedModel
from .models.lm_head import LinearHeadInputs, mean_entropy, rows_of, split_rows


@dataclass
class History:
    """Per step: the summed loss, each task's loss, and (a CPU copy of) the clamped coefficient table."""

    loss: list[float] = field(default_factory=list)
    task_loss: list[dict[str, float]] = field(default_factory=list)
    coefficients: list[torch.Tensor] = field(default_factory=list)

    def state(self) -> dict:
        return {"loss": self.loss, "task_loss": self.task_loss, "coefficients": self.coefficients}


def _inputs(batch: Any, task: str) -> Any:
    """Model input of a batch: a tensor, a mapping of tensors (keyword inputs), or the first item of a
    ``(inputs, labels, ...)`` tuple — labels are never used. Anything else: ``TypeError`` naming the task."""
    inp = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(inp, torch.Tensor):
        return inp
    if isinstance(inp, Mapping) and inp and all(isinstance(v, torch.Tensor) for v in inp.values()):
        return inp
    if isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} whose first item is {type(inp).__name__}" if batch else "an empty tuple"
    elif isinstance(batch, Mapping):
        got = "a mapping with non-tensor values" if batch else "an empty mapping"
    else:
        got = type(batch).__name__
    raise TypeError(f"task {task!r}: a batch must be a tensor, a mapping of tensors (keyword inputs), or a tuple/list "
                    f"whose first item is one; got {got}")


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


def _split_outputs(model, feats, inp, sizes: list[int]) -> list:
    """The model's output for a concatenated batch, split back into one part per batch of ``sizes`` examples.

    A model whose forward gives a variable number of rows per example (a causal LM scoring every real token)
    says how many with ``rows_per_example(**inputs) -> [B]`` (:meth:`AdaMergedModel.rows_per_example`); the rows
    are then grouped by example. Otherwise the output has one row per example."""
    fn = getattr(model, "rows_per_example", None)
    counts = None if fn is None else _call(fn, inp)
    if counts is not None:
        per_example = counts.tolist()  # one host sync per step
        groups, i = [], 0
        for n in sizes:
            groups.append(int(sum(per_example[i:i + n])))
            i += n
        sizes = groups
    if rows_of(feats) != sum(sizes):
        raise ValueError(f"task_batching='concat': the model returned {rows_of(feats)} rows for {sum(sizes)} "
                         "expected (one per example, or as its rows_per_example() says); use "
                         "task_batching='sequential'")
    return split_rows(feats, sizes)


class _Cycle:
    """Cycles an iterable forever, re-iterating it when exhausted (a fresh epoch of a DataLoader)."""

    def __init__(self, name: str, iterable: Iterable):
        self.name, self.iterable = name, iterable
        self.it: Iterator | None = None
        self.drawn = 0  # batches drawn so far

    def next(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.iterable)
            try:
                batch = next(self.it)
                self.drawn += 1
                return batch
            except StopIteration:
                self.it = None
        if self.drawn:
            raise ValueError(
                f"task {self.name!r}: its data ran out after {self.drawn} batches and iterating it again yielded "
                "nothing (a one-shot iterator or generator?): pass a re-iterable (a list, a DataLoader) or an endless "
                "iterator"
            )
        raise ValueError(f"task {self.name!r} has no data (its iterable yielded nothing)")

    def skip(self, n: int) -> None:
        """Move past ``n`` batches: without reading them where the iterable can (``skip_batches(n)``, as the loaders of
        :mod:`adamerge_fast.data` over indexable datasets), else by drawing them."""
        fast = getattr(self.iterable, "skip_batches", None)
        if callable(fast) and self.it is None:
            fast(n)
            self.drawn += n
            return
        for _ in range(n):
            self.next()


def _head_logits(head: Callable, task: str, feats, rows: int, step: int):
    """``head(feats)``, checked to be logits with at least one row per example (``[B, C]``, or ``[B, ..., C]``), or a
    :class:`~adamerge_fast.models.lm_head.LinearHeadInputs` with at least one row per example."""
    z = head(feats)
    if isinstance(z, LinearHeadInputs):  # hidden states + the LM head: linear_entropy takes them (fused_entropy)
        if z.rows < rows:
            raise ValueError(f"task {task!r}: its head returned {z.rows} rows for a batch of {rows} examples at step "
                             f"{step}; expected one row per example or more")
        return z
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        got = f"a tensor of shape {list(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"task {task!r}: its head returned {got} at step {step}; expected logits [B, C] (B = {rows} "
                         "examples, C classes)")
    n = math.prod(z.shape[:-1])
    if n < rows:
        raise ValueError(f"task {task!r}: its head returned {n} rows for a batch of {rows} examples at step {step} "
                         f"(shape {list(z.shape)}); expected logits [B, C] with one row per example")
    return z


def _check_number(name: str, v: Any, ok: Callable[[float], bool], expected: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"adamerge: {name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"adamerge: {name} must be a finite number {expected}, got {v}")
    return float(v)


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"adamerge: {name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"adamerge: {name} must be >= {lo}, got {v}")
    return v


def _json_settings(settings: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``settings`` as plain JSON values (tuples become lists), so that a stored and a new copy compare equal."""
    try:
        return json.loads(json.dumps(dict(settings)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"adamerge: {what} must hold JSON values (numbers, strings, lists, dicts): {e}") from None


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
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[int, float, AdaMergedModel], None] | None = None,
    settings: Mapping[str, Any] | None = None,
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
        checkpoint, checkpoint_every: write coefficients + Adam state + history atomically at the end and, with
            ``checkpoint_every=N`` (N >= 1), every N steps.
        resume: a checkpoint to continue from; the data iterables are fast-forwarded past the batches it
            already used (without reading them where the iterable can skip, see :mod:`adamerge_fast.data`), so a
            resumed run equals an uninterrupted one for deterministic data. ``steps`` must not be below the
            checkpoint's step.
        settings: more settings of the run that define its result (JSON values, e.g. the data seed and batch
            size), stored in the checkpoints with ``lr``, ``betas``, ``batches_per_step``, the task order and
            ``model.algorithm_settings()``; resuming with any of them changed raises :class:`CheckpointError`
            naming the setting and both values.
    Returns:
        :class:`History` (loss, per-task losses and coefficient table per step).
    Raises:
        :class:`~adamerge_fast.io.NonFiniteError` when a task's loss or the coefficient gradient is NaN/inf (naming
        the task and step; raised before that step's update, so ``model`` keeps the last good coefficients and the
        last checkpoint written stays as it is), or when an update makes the coefficients NaN/inf.
    """
    from tqdm.auto import tqdm

    tasks = list(heads)
    if not tasks:
        raise ValueError("adamerge: no tasks (heads is empty)")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"adamerge: task {missing[0]!r} has a head but no data")
    not_callable = [t for t in tasks if not callable(heads[t])]
    if not_callable:
        raise TypeError(f"adamerge: the head of task {not_callable[0]!r} is not callable")
    if task_batching not in ("concat", "sequential"):
        raise ValueError(f"adamerge: task_batching must be 'concat' or 'sequential', got {task_batching!r}")
    _check_int("steps", steps, 0)
    _check_int("batches_per_step", batches_per_step, 1)
    lr = _check_number("lr", lr, lambda v: v > 0, "> 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"adamerge: betas must be two numbers in [0, 1), got {betas!r}")
    betas = tuple(_check_number("betas", b, lambda v: 0 <= v < 1, "in [0, 1)") for b in betas)
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint is None:
            raise ValueError("adamerge: checkpoint_every given without checkpoint (the file to write)")
    if batch_reduction not in ("mean", "sum"):
        raise ValueError(f"adamerge: batch_reduction must be 'mean' or 'sum', got {batch_reduction!r}")
    divisor = batches_per_step if batch_reduction == "mean" else 1
    run_settings = _json_settings(
        {"lr": lr, "betas": list(betas), "batches_per_step": batches_per_step, "batch_reduction": batch_reduction,
         "tasks": tasks,
         **model.algorithm_settings(), **dict(settings or {})}, "settings")  # fmt: skip
    device = torch.device(device) if device is not None else model.raw_coefficients.device
    opt = torch.optim.Adam([model.raw_coefficients], lr=lr, betas=betas)
    hist = History()
    cycles = {t: _Cycle(t, data[t]) for t in tasks}
    start = 0
    last_checkpoint: tuple[Any, int] | None = None  # (file, step) of the newest checkpoint on disk
    if resume is not None:
        start = _load_checkpoint(resume, model, opt, hist, run_settings)
        if steps < start:
            raise ValueError(f"adamerge: steps={steps} is below the checkpoint's step {start} ({resume}); a resumed "
                             f"run continues to steps >= {start}")
        last_checkpoint = (resume, start)
        for t in tasks:  # fast-forward the data to where the interrupted run stopped
            cycles[t].skip(start * batches_per_step)

    def stop(what: str, step: int) -> NonFiniteError:
        kept = (f"; the last checkpoint ({last_checkpoint[0]}, step {last_checkpoint[1]}) is kept as it was"
                if last_checkpoint else "; no checkpoint was written")
        return NonFiniteError(f"adamerge: {what} at step {step}{kept}")

    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="adamerge",
               dynamic_ncols=True)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        batches = {t: [_to(_inputs(cycles[t].next(), t), device) for _ in range(batches_per_step)] for t in tasks}
        task_loss: dict[str, torch.Tensor] = {}  # detached; read back once per step (one host sync)
        if task_batching == "concat":
            flat = [b for t in tasks for b in batches[t]]
            inp = _concat(flat)
            feats = _call(model, inp)
            sizes = [_batch_size(b) for b in flat]
            parts = iter(_split_outputs(model, feats, inp, sizes))
            rows = iter(sizes)
            total = 0.0
            for t in tasks:
                lt = sum(mean_entropy(_head_logits(heads[t], t, next(parts), next(rows), step))
                         for _ in range(batches_per_step)) / divisor
                task_loss[t] = lt.detach()
                total = total + lt
            total.backward()
        else:
            for t in tasks:
                lt = sum(mean_entropy(_head_logits(heads[t], t, _call(model, b), _batch_size(b), step))
                         for b in batches[t]) / divisor
                lt.backward()
                task_loss[t] = lt.detach()
        # the losses and whether the gradient is finite, read back in one host sync before the update
        grad = model.raw_coefficients.grad
        grad_ok = torch.isfinite(grad).all() if grad is not None else torch.ones((), dtype=torch.bool)
        losses = torch.stack(list(task_loss.values())).float()
        read = torch.cat([losses, grad_ok.to(losses.device, torch.float32).reshape(1)])
        *values, grad_finite = read.cpu().tolist()
        for t, v in zip(tasks, values, strict=True):
            if not math.isfinite(v):
                raise stop(f"the entropy loss of task {t!r} is {v} (a NaN or inf in its data, its head's logits or the "
                           "merged model's output); stopped before the update", step)
        if grad_finite != 1.0:
            raise stop("the coefficient gradient is NaN or inf although every loss is finite; stopped before the "
                       "update", step)
        opt.step()
        task_loss_f = dict(zip(task_loss, values, strict=True))
        loss = sum(values)
        hist.loss.append(loss)
        hist.task_loss.append(task_loss_f)
        hist.coefficients.append(model.coefficients.detach().float().cpu().clone())
        if not bool(torch.isfinite(model.raw_coefficients.detach()).all()):
            raise stop(f"the update made the coefficients NaN or inf (lr {lr} too large?)", step)
        bar.set_postfix(loss=f"{loss:.4f}")
        if callback is not None:
            callback(step, loss, model)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint, model, opt, hist, step + 1, run_settings)
            last_checkpoint = (checkpoint, step + 1)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, opt, hist, max(steps, start), run_settings)
    return hist


CHECKPOINT_FORMAT = "adamerge_fast.checkpoint/2"


def _feed(h, obj: Any) -> None:
    """Feed ``obj`` (tensors, mappings, sequences, plain values) to the hash ``h`` in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's payload: every entry but ``digest``, tensors by dtype, shape and bytes."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(path, model: AdaMergedModel, opt: torch.optim.Optimizer, hist: History, step: int,
                    settings: Mapping[str, Any] | None = None) -> None:
    """Coefficients, Adam state, history, the step reached, the run's ``settings`` and a digest of all of it, written
    atomically; :class:`~adamerge_fast.io.NonFiniteError` (nothing written) when the coefficients are NaN/inf."""
    raw = model.raw_coefficients.detach().cpu()
    if not bool(torch.isfinite(raw).all()):
        raise NonFiniteError(f"{path}: not written: raw_coefficients hold NaN or inf values at step {step}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": model.fingerprint(),
        "step": step,
        "settings": dict(settings or {}),
        "raw_coefficients": raw,
        "optimizer": opt.state_dict(),
        "history": hist.state(),
    }
    payload["digest"] = payload_digest(payload)
    save_torch(payload, path)


def _load_checkpoint(path, model: AdaMergedModel, opt: torch.optim.Optimizer, hist: History,
                     settings: Mapping[str, Any]) -> int:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: resume file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not an adamerge_fast checkpoint ({e})") from e
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt == "adamerge_fast.checkpoint/1":
        raise CheckpointError(f"{path}: written by an older adamerge_fast (format {fmt}, without the run's settings "
                              "and a digest): it cannot be resumed safely; start a new run")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an adamerge_fast checkpoint")
    if ck.get("digest") != payload_digest(ck):
        raise CheckpointError(f"{path}: the checkpoint does not match its digest (altered or damaged after it was "
                              "written); resume from another checkpoint or start a new run")
    if ck["fingerprint"] != model.fingerprint():
        raise CheckpointError(
            f"{path}: checkpoint is from another model (fingerprint {ck['fingerprint']}, this model "
            f"{model.fingerprint()}: granularity, task count or parameter shapes differ)"
        )
    old = ck["settings"]
    for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
            raise CheckpointError(
                f"{path}: resuming would change the setting {key!r} from {old.get(key)!r} (the checkpoint's) to "
                f"{settings.get(key)!r}; resume with the checkpoint's settings, or start a new run"
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


__all__ = ["adamerge", "History", "save_checkpoint", "save_history", "load_history", "payload_digest",
           "HISTORY_FORMAT", "CHECKPOINT_FORMAT"]
