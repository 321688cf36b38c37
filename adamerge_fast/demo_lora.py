"""``adamerge-fast demo --lora``: the digits demo with LoRA fine-tunes of its backbone beside the full fine-tunes.

Each task is fine-tuned a second time as LoRA adapters (rank ``--lora-rank`` on all five linear layers of the
demo's MLP, ``lora_alpha = 2 r``, A from ``randn / sqrt(in)`` and B from zeros as PEFT initializes them, the
pretrained weights and the task's fixed head frozen; AdamW and the one-cycle schedule of the full fine-tunes at
10x their learning rate; written in plain torch, no PEFT). Then, for the full fine-tunes and for the adapters:
the individual models, task arithmetic (λ = 0.3) and layer-wise AdaMerging (the demo's 500 steps on unlabeled test
inputs), with the held-out accuracy and the bytes of task vectors AdaMerging holds. The adapters go to
``AdaMergedModel`` as ``{name: (A, B, scale)}`` mappings and stay low-rank (:mod:`adamerge_fast.merging.lora`).

Adapters are cached beside the demo's models (``lora_r{r}_{task}.safetensors``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .demo import (
    DemoConfig,
    DigitsTasks,
    Row,
    _evaluate,
    _test_loaders,
    _train,
    _with_state,
    config_from_args,
    create_models,
    default_cache_dir,
    format_table,
)

LORA_VERSION = 1  # bump when the adapter training changes, to invalidate cached adapters
LR_FACTOR = 10.0  # the adapters' learning rate, relative to the full fine-tunes'


class _LoraMLP(nn.Module):
    """The frozen pretrained backbone with trainable adapters: ``W = W0 + (alpha / r) B @ A`` on each linear
    layer, run through ``torch.func.functional_call``."""

    def __init__(self, pre: nn.Module, rank: int, seed: int):
        super().__init__()
        self.pre, self.scale = pre, 2.0  # lora_alpha = 2r
        g = torch.Generator().manual_seed(seed)
        self.names = [n for n, p in pre.named_parameters() if p.dim() == 2]  # the linear layers' weights
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for n in self.names:
            out_f, in_f = pre.get_parameter(n).shape
            self.a.append(nn.Parameter(torch.randn(rank, in_f, generator=g) / in_f**0.5))
            self.b.append(nn.Parameter(torch.zeros(out_f, rank)))

    def forward(self, x):
        w = {n: self.pre.get_parameter(n) + self.scale * b @ a for n, a, b in zip(self.names, self.a, self.b,
                                                                                  strict=True)}  # fmt: skip
        return torch.func.functional_call(self.pre, w, (x,))

    def adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        return {n: (a.detach().clone(), b.detach().clone(), self.scale)
                for n, a, b in zip(self.names, self.a, self.b, strict=True)}  # fmt: skip


def lora_finetune(cfg: DemoConfig, rank: int, data: DigitsTasks, pre: nn.Module, heads, cache_dir: Path | None,
                  log: Callable[[str], None] = print) -> dict[str, dict]:
    """``{task: {weight name: (A, B, scale)}}``: one LoRA fine-tune of ``pre`` per task (from the cache if there)."""
    from safetensors.torch import load_file

    from .io import save_safetensors

    root = Path(cache_dir) / cfg.model_key() if cache_dir is not None else None
    out = {}
    pre.requires_grad_(False)
    for i, t in enumerate(cfg.tasks):
        f = root / f"lora_r{rank}_v{LORA_VERSION}_{t}.safetensors" if root is not None else None
        if f is not None and f.is_file():
            sd = load_file(str(f))
            out[t] = {n[: -len(".A")]: (sd[n], sd[n[: -len(".A")] + ".B"], 2.0) for n in sd if n.endswith(".A")}
            continue
        t0 = time.perf_counter()
        m = _LoraMLP(pre, rank, cfg.seed + 100 + i)
        _train(m, heads[t], data.inputs(t, "train"), data.labels("train"), cfg.finetune_epochs,
               cfg.finetune_lr * LR_FACTOR, cfg.train_batch, cfg.seed + 1 + i, list(m.a) + list(m.b))  # fmt: skip
        out[t] = m.adapter()
        log(f"models: LoRA (r={rank}) fine-tuned on {t} ({time.perf_counter() - t0:.1f}s)")
        if f is not None:
            tensors = {f"{n}.{k}": v for n, (a, b, _) in out[t].items() for k, v in (("A", a), ("B", b))}
            save_safetensors(tensors, f, {"producer": "adamerge_fast.demo_lora", "rank": str(rank)})
    return out


def _materialized(pre: nn.Module, adapter: dict) -> nn.Module:
    """The fine-tuned model an adapter stands for (``W0 + s B @ A``)."""
    sd = {n: p.detach() + s * b @ a if n in adapter else p.detach()
          for n, p in pre.named_parameters() for a, b, s in [adapter.get(n, (None, None, None))]}  # fmt: skip
    return _with_state(pre, sd)


@dataclass
class LoraDemoResult:
    cfg: DemoConfig
    rank: int
    rows: list[Row]
    bytes: dict[str, int]
    timings: dict[str, float]

    def gap(self) -> float:
        """Layer-wise AdaMerging on the adapters minus on the full fine-tunes, average accuracy (points)."""
        avg = {r.name: r.avg for r in self.rows}
        return avg[f"Layer-wise AdaMerging, LoRA r={self.rank}"] - avg["Layer-wise AdaMerging, full fine-tunes"]


def evaluate_lora(cfg: DemoConfig, rank: int = 8, *, cache_dir: Path | None = None, backend: str = "auto",
                  progress: bool = True, log: Callable[[str], None] = print) -> LoraDemoResult:
    """Individual models, task arithmetic (λ = 0.3) and layer-wise AdaMerging, for the demo's full fine-tunes and
    for LoRA fine-tunes of rank ``rank``; held-out accuracy and task-vector bytes."""
    from .merging import AdaMergedModel, task_arithmetic, task_vectors
    from .optim import adamerge

    tasks = list(cfg.tasks)
    data = DigitsTasks(cfg)
    pre, fts, heads, _ = create_models(cfg, data, cache_dir, log)
    adapters = lora_finetune(cfg, rank, data, pre, heads, cache_dir, log)
    loras = {t: _materialized(pre, adapters[t]) for t in tasks}
    base = dict(pre.named_parameters())
    rows, nbytes, timings = [], {}, {}
    for kind, models, sources in (("full fine-tunes", fts, [fts[t] for t in tasks]),
                                  (f"LoRA r={rank}", loras, [adapters[t] for t in tasks])):  # fmt: skip
        rows.append(Row(f"Individual, {kind}", {t: _evaluate(models[t], heads, data, [t])[0][t] for t in tasks}))
        tv = task_vectors(pre, [models[t] for t in tasks])
        rows.append(Row(f"Task arithmetic (λ=0.3), {kind}", _evaluate(_with_state(pre, task_arithmetic(base, tv, 0.3)),
                                                                     heads, data, tasks)[0]))  # fmt: skip
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        merged = AdaMergedModel(pre, sources, granularity="layer", init=cfg.init, backend=backend, task_names=tasks)
        adamerge(merged, heads, _test_loaders(cfg, data), steps=cfg.steps, lr=cfg.lr, progress=progress)
        name = f"Layer-wise AdaMerging, {kind}"
        rows.append(Row(name, _evaluate(_with_state(pre, merged.merged_state_dict()), heads, data, tasks)[0]))
        timings[name] = round(time.perf_counter() - t0, 2)
        nbytes[name] = sum(t.numel() * t.element_size() for t in merged.buffers()) - sum(
            p.numel() * p.element_size() for p in pre.parameters())  # what it holds beyond the pretrained weights
        log(f"{name}: {cfg.steps} steps in {timings[name]:.1f}s")
    return LoraDemoResult(cfg, rank, rows, nbytes, timings)


def report_lora(res: LoraDemoResult, out: Path, log: Callable[[str], None] = print) -> dict:
    """Print the table and write ``demo_lora.md`` / ``demo_lora.json`` to ``out`` (atomically)."""
    from .io import write_text_atomic

    cfg, tasks = res.cfg, list(res.cfg.tasks)
    table = format_table(res.rows, tasks, markdown=True)
    held = "; ".join(f"{k.split(', ')[1]}: {v / 1024:.0f} KiB" for k, v in res.bytes.items())
    summary = (f"Layer-wise AdaMerging on the LoRA adapters is {res.gap():+.1f} points against the full fine-tunes "
               f"on the average. Task vectors AdaMerging holds beyond the pretrained weights: {held}.")
    print()
    print(f"Held-out accuracy (%), full vs LoRA (r={res.rank}) fine-tunes; AdaMerging: {cfg.steps} steps, lr {cfg.lr}")
    print(format_table(res.rows, tasks))
    print(summary)
    md = ["# AdaMerging demo: full fine-tunes vs LoRA adapters", "",
          f"The digits demo's tasks fine-tuned twice: the whole backbone (the demo's models) and LoRA adapters of rank "
          f"{res.rank} on its five linear layers (lora_alpha = 2r, the frozen backbone and head, "
          f"{LR_FACTOR:g}x the full fine-tunes' learning rate). Layer-wise AdaMerging: {cfg.steps} Adam steps "
          f"(lr {cfg.lr}) on batches of {cfg.batch_size} unlabeled test inputs per task; on the adapters it runs "
          "`merged_lora_linear` (nothing densified). Held-out accuracy (%). Command: `adamerge-fast demo --lora`.",
          "", table, "", summary, ""]  # fmt: skip
    out = Path(out)
    write_text_atomic(out / "demo_lora.md", "\n".join(md))
    result = {"config": asdict(cfg), "rank": res.rank, "tasks": tasks,
              "rows": [{"name": r.name, "acc": r.acc, "avg": r.avg} for r in res.rows],
              "task_vector_bytes": res.bytes, "timings_s": res.timings, "gap_points": res.gap()}  # fmt: skip
    write_text_atomic(out / "demo_lora.json", json.dumps(result, indent=1) + "\n")
    log(f"wrote {out / 'demo_lora.md'}, demo_lora.json")
    return result


def add_arguments(p) -> None:
    """The options of ``adamerge-fast demo`` that select and shape this mode."""
    p.add_argument("--lora", action="store_true",
                   help="instead of every method: full fine-tunes vs LoRA fine-tunes of the backbone (individual, "
                   "task arithmetic, layer-wise AdaMerging; writes demo_lora.md/json)")
    p.add_argument("--lora-rank", type=int, default=8, help="--lora: rank of the adapters (default 8)")


def run(args) -> dict:
    """``adamerge-fast demo --lora`` with the options of :func:`adamerge_fast.demo.add_arguments` and
    :func:`add_arguments`; returns ``demo_lora.json``."""
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    torch.set_num_threads(max(1, int(args.threads)))
    cfg = config_from_args(args)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = evaluate_lora(cfg, args.lora_rank, cache_dir=cache, backend=args.backend, progress=not args.no_progress,
                        log=log)  # fmt: skip
    return report_lora(res, Path(args.output_dir), log=log)
