"""A memory plan before a run: what an AdaMerging run will hold, item by item, so that a run that cannot fit is
refused before it loads the fine-tuned models instead of being killed halfway.

:func:`plan` needs only the pretrained module (its shapes and dtypes: the task vectors need not exist yet), the
number of tasks, one example batch and the options; :func:`plan_for_model` plans for an
:class:`~adamerge_fast.merging.AdaMergedModel` already built. Items (bytes):

- ``pretrained``, ``heads``: the tensors of the backbone and of the task heads (distinct storages).
- ``task_vectors``: the stacked task vectors at the chosen storage (``K x`` the merged parameters).
- ``finetuned``: fine-tuned models the caller holds in memory (in-memory modules / state dicts not released), and
  ``loading``: the one model being read while the task vectors are built (paths, loaders), plus the build's
  temporaries (:data:`~adamerge_fast.merging.task_vectors.DIFF_CHUNK` float64 chunks; TIES' copies).
- ``coefficients``: the coefficient table, its gradient, Adam's two moments, and the history's per-step copies.
- ``activations``: the peak of the step's tensors, traced: one optimizer step's forward and backward (the chosen
  task batching, batch size, heads and entropy) run on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes
  only, nothing allocated), with a dispatch mode adding up the storages alive at each op, plus the workspace each
  fused op allocates inside its kernel (:func:`op_workspace`), which fake tensors cannot see.
- ``process``: what the process holds besides (the interpreter, torch, libraries); the command line measures it.
- ``runtime``: what no tensor accounts for, calibrated on this project's CPU machine (glibc malloc, 2 threads):
  :data:`RUNTIME_BYTES` of one-time state of the first backward (thread pools, kernel caches, the autograd engine)
  plus :data:`ALLOCATOR_OVERHEAD` times the activations (temporaries inside aten kernels, per-thread arenas and
  fragmentation). Measured: the tensors alive at each op of a real step, tracked the same way, agree with the fake
  trace within 2%, and the process's peak RSS exceeds them by 0.3-0.6 of the activations on the workloads of
  ``benchmarks/results/memory_plan.md``.

Two phases: ``build`` (pretrained + fine-tuned models + task vectors being filled) and ``step``; the plan's total
is the larger. ``benchmarks/bench_memory.py`` compares totals with measured peak RSS.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .merging.adamerged import AdaMergedModel, _meta_template, block_paths
from .merging.build import DenseRows, RowStorage
from .merging.task_vectors import DIFF_CHUNK
from .models.lm_head import mean_entropy, rows_of, split_rows
from .optim import _call, _concat

GiB = 1 << 30
RUNTIME_BYTES = 128 << 20  # see the module docstring: the first backward's one-time state
ALLOCATOR_OVERHEAD = 0.35  # see the module docstring: kernel temporaries and fragmentation, per byte of activations


def fmt_bytes(n: float) -> str:
    """``n`` bytes as ``"1.23 GiB"`` / ``"45.6 MiB"`` / ``"789 KiB"``."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale or unit == "KiB":
            return f"{n / scale:.3g} {unit}" if unit != "KiB" else f"{n / scale:.0f} KiB"
    return f"{n} B"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(s: str) -> int:
    """``"8GiB"``, ``"8 GB"``, ``"512M"`` (decimal), ``"1.5e9"`` -> bytes; ``ValueError`` naming the text."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {s!r} (expected e.g. 8GiB, 16G, 512MiB, 2e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def rss_bytes(field_name: str = "VmRSS") -> int | None:
    """The process's resident set (``VmRSS``) or peak (``VmHWM``) from ``/proc/self/status``; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once; meta tensors by size)."""
    seen: dict[Any, int] = {}
    for t in tensors:
        if t is None:
            continue
        if t.is_meta:
            seen[id(t)] = t.numel() * t.element_size()
        else:
            st = t.untyped_storage()
            seen[(st.device.type, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def module_bytes(m: nn.Module) -> int:
    return tensor_bytes(list(m.parameters()) + [b for b in m.buffers() if b is not None])


# --------------------------------------------------------------------------------------------- the tracer
def op_workspace(name: str, args: tuple) -> int:
    """Bytes a fused op of this package allocates inside its kernel (invisible to fake tensors), by op name and
    (fake) arguments: the merged weight and fp32 weight gradient of ``merged_linear`` (just-in-time strategy), the
    fp32 temporaries of ``entropy``, the merged head, logits tiles and ``[V, D]`` accumulator of
    ``linear_entropy``. An upper estimate for the fused GPU strategies."""
    def nb(t, dtype=None):
        return 0 if t is None else t.numel() * (dtype.itemsize if dtype else t.element_size())

    f32 = torch.float32
    if name == "merged_linear":  # the merged weight, in the weight's dtype and fp32
        return nb(args[1]) + nb(args[1], f32)
    if name == "merged_linear_backward":  # merged weight (dx) + dW = dy^T x (dcoef_w)
        return nb(args[2]) + nb(args[2], f32)
    if name == "entropy":
        return 3 * nb(args[0], f32)
    if name == "entropy_backward":
        return 4 * nb(args[1], f32)
    if name.startswith("linear_entropy"):
        h, w0, tau_w = (args[1], args[2], args[4]) if name == "linear_entropy_backward" else (args[0], args[1],
                                                                                               args[3])
        chunk = args[-2]
        V = w0.shape[0]
        tile = min(chunk, h.shape[0]) * V * 4
        merged = nb(w0) if tau_w is not None else 0
        grads = name != "linear_entropy" and (name == "linear_entropy_backward" or any(args[8:13]))
        return merged + 3 * tile + (nb(w0, f32) if grads else 0)  # the tile, p, a 16-bit matmul output
    return 0


class _Tracker(TorchDispatchMode):
    """Adds up the bytes of the storages produced by the ops run under it while they are alive; ``peak`` is the
    largest sum seen, counting each fused op's workspace while it runs."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _gone(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = func.name().partition("::")
        if ns == "adamerge_fast":
            self.peak = max(self.peak, self.live + op_workspace(name.split(".")[0], tuple(args)))
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                st = o.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = st.nbytes()
                self.live += n
                self._seen[key] = weakref.ref(st, lambda _r, key=key, n=n: self._gone(key, n))
        self.peak = max(self.peak, self.live)
        return out


def _fake_like(fake_mode, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    with fake_mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def _example_inputs(example, batch_size: int | None):
    """``example`` (a batch: tensor / mapping of tensors / tuple whose first item is the input) as a spec of shapes
    ``{key or None: (shape, dtype)}`` with the batch dimension set to ``batch_size`` (when given). An
    ``attention_mask`` is dropped (the plan counts every token as real: an upper bound on an LM's rows)."""
    if isinstance(example, (tuple, list)):
        example = example[0]
    items = example.items() if isinstance(example, Mapping) else [(None, example)]
    spec = {}
    for k, t in items:
        if k == "attention_mask":
            continue
        shape = tuple(t.shape)
        if batch_size is not None:
            shape = (batch_size, *shape[1:])
        spec[k] = (shape, t.dtype)
    return spec


def _fake_batch(fake_mode, spec, device):
    with fake_mode:
        made = {k: torch.empty(shape, dtype=dt, device=device) for k, (shape, dt) in spec.items()}
    return made[None] if list(made) == [None] else made


def trace_step(model: AdaMergedModel, heads: Mapping[str, nn.Module], spec, *, tasks: int,
               task_batching: str = "concat", batches_per_step: int = 1, device="cpu") -> int:
    """Peak bytes of the tensors of one optimizer step of :func:`adamerge_fast.optim.adamerge` on ``model`` (a
    meta-device :class:`AdaMergedModel`, converted to fake tensors here), each task's batch of the shapes in
    ``spec`` (:func:`_example_inputs`), ``tasks`` tasks through ``heads`` (one per task, cycled)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = model._apply(lambda t: _fake_like(fake_mode, t, device))
    model.raw_coefficients.requires_grad_(True)
    head_list = list(heads.values()) if heads else [nn.Identity()]
    fheads = [_meta_template(h)._apply(lambda t: _fake_like(fake_mode, t, device)) for h in head_list]
    head_of = [fheads[i % len(fheads)] for i in range(tasks)]
    tr = _Tracker()
    with fake_mode, tr:
        batches = [[_fake_batch(fake_mode, spec, device) for _ in range(batches_per_step)] for _ in range(tasks)]
        if task_batching == "concat":
            flat = [b for bs in batches for b in bs]
            feats = _call(model, _concat(flat))
            per = rows_of(feats) // sum(_rows(b) for b in flat)  # rows per example: the same for all (no padding)
            parts = iter(split_rows(feats, [per * _rows(b) for b in flat]))
            total = 0.0
            for t in range(tasks):
                total = total + sum(mean_entropy(head_of[t](next(parts))) for _ in range(batches_per_step))
            del feats, parts
            total.backward()
        else:
            for t in range(tasks):
                lt = sum(mean_entropy(head_of[t](_call(model, b))) for b in batches[t])
                lt.backward()
                del lt
    return tr.peak


def _rows(b) -> int:
    return (b if isinstance(b, torch.Tensor) else next(iter(b.values()))).shape[0]


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Bytes per item (see the module docstring), the two phase peaks, and the options planned for."""

    items: dict[str, int]
    build: int
    step: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return max(self.build, self.step)

    def fits(self, limit: int) -> bool:
        return self.total <= limit

    def summary(self) -> str:
        """One line: the total and the largest items."""
        o = self.options
        parts = [f"pretrained {fmt_bytes(self.items['pretrained'])}",
                 f"task vectors {fmt_bytes(self.items['task_vectors'])} ({o.get('storage', '?')})",
                 f"activations {fmt_bytes(self.items['activations'])} ({o.get('task_batching')} batching of "
                 f"{o.get('tasks')} tasks x {o.get('batch_size')})"]
        for k in ("finetuned", "loading", "coefficients", "process"):
            if self.items.get(k):
                parts.append(f"{k} {fmt_bytes(self.items[k])}")
        return f"{fmt_bytes(self.total)} ({', '.join(parts)})"

    def format(self) -> str:
        """A table: one line per item and per phase."""
        names = {"process": "process (interpreter, libraries)", "pretrained": "pretrained weights",
                 "heads": "task heads", "task_vectors": f"task vectors ({self.options.get('storage', '?')})",
                 "finetuned": "fine-tuned models held in memory", "loading": "one fine-tuned model being read + "
                 "build temporaries", "coefficients": "coefficients, gradient, Adam state, history",
                 "data": "input batches", "runtime": "runtime state, kernel temporaries, allocator",
                 "activations": f"activations and workspace ({self.options.get('task_batching')} "
                 f"batching, {self.options.get('tasks')} tasks x {self.options.get('batch_size')}"
                 f"{', checkpointed blocks' if self.options.get('checkpoint_activations') else ''})"}
        w = max(len(v) for v in names.values())
        lines = ["memory plan:"]
        for k, v in self.items.items():
            lines.append(f"  {names.get(k, k):<{w}}  {fmt_bytes(v):>10}")
        lines.append(f"  {'peak while building the task vectors':<{w}}  {fmt_bytes(self.build):>10}")
        lines.append(f"  {'peak during an optimizer step':<{w}}  {fmt_bytes(self.step):>10}")
        lines.append(f"  {'total (the larger)':<{w}}  {fmt_bytes(self.total):>10}")
        return "\n".join(lines)


def _storage_name(storage: RowStorage, dtype) -> str:
    if isinstance(storage, DenseRows):
        return str(storage.dtype or dtype).replace("torch.", "")
    return type(storage).__name__


def plan(
    pretrained: nn.Module,
    num_tasks: int,
    example,
    *,
    heads: Mapping[str, nn.Module] | None = None,
    batch_size: int | None = None,
    task_batching: str = "concat",
    batches_per_step: int = 1,
    steps: int = 500,
    task_vector_dtype: torch.dtype | None = None,
    storage: RowStorage | None = None,
    granularity: str = "layer",
    ties: bool = False,
    checkpoint_activations: bool | Callable = False,
    backend: str = "auto",
    finetuned_in_memory: int = 0,
    loading: int | None = None,
    released: bool = False,
    built: bool = False,
    process: int = 0,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """The memory plan of an AdaMerging run (see the module docstring); nothing is allocated.

    Args:
        pretrained: the backbone (real or meta tensors: only shapes and dtypes are read).
        num_tasks: K. ``example``: one task's batch (tensor, mapping, or ``(inputs, labels)``; shapes matter,
            values do not), its batch dimension replaced by ``batch_size`` when given.
        heads: ``{task: head}`` (cycled over the tasks); default: entropy of the backbone's output itself.
        task_batching, batches_per_step, steps: as :func:`adamerge_fast.optim.adamerge`.
        task_vector_dtype / storage: the task vectors' storage (default: the pretrained dtypes, dense).
        granularity, ties, checkpoint_activations, backend: as :class:`AdaMergedModel`.
        finetuned_in_memory: bytes of fine-tuned models the caller holds in memory. ``released``: they are
            released as their rows are taken (``release_finetuned``). ``loading``: bytes of one fine-tuned model
            read from a file or loader (default: the pretrained parameters' size; 0 when every model is in memory).
        built: the task vectors exist already (no build phase). ``process``: bytes of the process besides.
    """
    storage = storage if storage is not None else DenseRows(task_vector_dtype)
    named = [(n, p) for n, p in pretrained.named_parameters() if p.is_floating_point()]
    K = int(num_tasks)
    tv_bytes = sum(storage.nbytes(tuple(p.shape), p.dtype, K) for _, p in named)
    param_bytes = tensor_bytes(p for _, p in named)
    items: dict[str, int] = {"process": int(process), "pretrained": module_bytes(pretrained),
                             "heads": sum(module_bytes(h) for h in (heads or {}).values()),
                             "task_vectors": tv_bytes, "finetuned": int(finetuned_in_memory)}
    if loading is None:
        loading = 0 if finetuned_in_memory else param_bytes
    largest = max((p.numel() for _, p in named), default=0)
    temporaries = 2 * 8 * min(DIFF_CHUNK, largest)  # float64 difference chunks
    if ties:  # trimmed copy + split copy of the task vectors, fp32 magnitudes and signs of one model
        temporaries += 2 * tv_bytes + 2 * 4 * sum(p.numel() for _, p in named)
    items["loading"] = 0 if built else int(loading) + temporaries
    rows = len(named) if granularity == "layer" else 1
    items["coefficients"] = rows * K * 4 * (4 + int(steps))
    spec = _example_inputs(example, batch_size)
    per_batch = sum(math.prod(s) * dt.itemsize for s, dt in spec.values())
    items["data"] = per_batch * K * batches_per_step
    # the activations: a fake step on a meta copy of the merged model
    meta = _meta_template(pretrained)
    tv_dtype = task_vector_dtype if isinstance(storage, DenseRows) else None
    tv = {n: torch.empty((K, *p.shape), dtype=tv_dtype or p.dtype, device="meta") for n, p in named}
    model = AdaMergedModel(meta, task_vectors=tv, granularity=granularity, backend=backend,
                           checkpoint_activations=checkpoint_activations)
    items["activations"] = trace_step(model, heads or {}, spec, tasks=K, task_batching=task_batching,
                                      batches_per_step=batches_per_step, device=device)
    items["runtime"] = RUNTIME_BYTES + int(ALLOCATOR_OVERHEAD * items["activations"])
    base = items["process"] + items["pretrained"] + items["heads"]
    if built:
        build = 0
    elif released:  # the fine-tuned models leave as the task vectors fill: the worst moment is the first model
        build = base + items["finetuned"] + tv_bytes // K + items["loading"]
    else:
        build = base + items["finetuned"] + tv_bytes + items["loading"]
    held = 0 if released else items["finetuned"]
    step = base + tv_bytes + held + items["coefficients"] + items["data"] + items["activations"] + items["runtime"]
    opts = dict(storage=_storage_name(storage, named[0][1].dtype if named else None), task_batching=task_batching,
                tasks=K, batch_size=next(iter(spec.values()))[0][0] if spec else None,
                checkpoint_activations=bool(checkpoint_activations), batches_per_step=batches_per_step)
    return MemoryPlan(items, build, step, opts)


def plan_for_model(model: AdaMergedModel, example, *, heads: Mapping[str, nn.Module] | None = None,
                   batch_size: int | None = None, tasks: int | None = None, task_batching: str = "concat",
                   batches_per_step: int = 1, steps: int = 500, process: int = 0) -> MemoryPlan:
    """The plan of running :func:`adamerge_fast.optim.adamerge` on an :class:`AdaMergedModel` already built (its
    task vectors exist: no build phase; their storage bytes are the real ones). ``tasks``: tasks per step (default
    the model's K)."""
    K = model.num_tasks
    tasks = K if tasks is None else int(tasks)
    tv_bytes = tensor_bytes(model._row_tensors(n)[1] for n in model.param_names)
    meta = _meta_template(model._template)
    tv = {n: torch.empty_like(model._row_tensors(n)[1], device="meta") for n in model.param_names}
    # the meta model shares this model's checkpointed paths
    ck = (lambda p, m: p in set(model.checkpointed)) if model.checkpointed else False
    fake = AdaMergedModel(meta, task_vectors=tv, granularity=model.granularity, backend=model.backend,
                          checkpoint_activations=ck)
    spec = _example_inputs(example, batch_size)
    act = trace_step(fake, heads or {}, spec, tasks=tasks, task_batching=task_batching,
                     batches_per_step=batches_per_step, device=model.raw_coefficients.device)
    everything = tensor_bytes([*model.skeleton.buffers(), *model._generic_task_vectors.buffers()])
    items = {"process": int(process), "pretrained": everything - tv_bytes,
             "heads": sum(module_bytes(h) for h in (heads or {}).values()), "task_vectors": tv_bytes,
             "finetuned": 0, "loading": 0,
             "coefficients": model.raw_coefficients.numel() * 4 * (4 + int(steps)),
             "data": sum(math.prod(s) * dt.itemsize for s, dt in spec.values()) * tasks * batches_per_step,
             "activations": act, "runtime": RUNTIME_BYTES + int(ALLOCATOR_OVERHEAD * act)}
    step = sum(items.values())
    storage = str(next(iter(model._row_tensors(n)[1] for n in model.param_names)).dtype).replace("torch.", "")
    opts = dict(storage=storage, task_batching=task_batching, tasks=tasks,
                batch_size=next(iter(spec.values()))[0][0] if spec else None,
                checkpoint_activations=bool(model.checkpointed), batches_per_step=batches_per_step)
    return MemoryPlan(items, 0, step, opts)


def alternatives(limit: int, make: Callable[..., MemoryPlan], current: Mapping[str, Any], *,
                 can_checkpoint: bool = True) -> list[tuple[str, MemoryPlan]]:
    """What would fit under ``limit``: ``[(option, plan)]`` for another task-vector dtype (bfloat16), sequential
    task batching, checkpointed blocks, and the largest batch size that fits — each alone, from ``current`` (the
    keyword arguments of ``make``, a function returning a plan)."""
    out = []
    tries = []
    if current.get("task_vector_dtype") not in (torch.bfloat16, torch.float16):
        tries.append(("--task-vector-dtype bfloat16", {"task_vector_dtype": torch.bfloat16}))
    if current.get("task_batching") == "concat":
        tries.append(("--task-batching sequential", {"task_batching": "sequential"}))
    if can_checkpoint and not current.get("checkpoint_activations"):
        tries.append(("--checkpoint-activations", {"checkpoint_activations": True}))
    for label, change in tries:
        p = make(**{**current, **change})
        if p.fits(limit):
            out.append((label, p))
    b = current.get("batch_size")
    if b and b > 1:  # the largest batch that fits (the plan grows with the batch: bisection)
        lo, hi, best = 1, b - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            p = make(**{**current, "batch_size": mid})
            if p.fits(limit):
                best, lo = (mid, p), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            out.append((f"--batch-size {best[0]}", best[1]))
    return out


def has_blocks(module: nn.Module) -> bool:
    return bool(block_paths(module))


__all__ = ["MemoryPlan", "plan", "plan_for_model", "trace_step", "op_workspace", "alternatives", "parse_bytes",
           "fmt_bytes", "rss_bytes", "tensor_bytes", "module_bytes", "has_blocks", "RUNTIME_BYTES",
           "ALLOCATOR_OVERHEAD"]
