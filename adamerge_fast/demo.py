"""The offline demo (``adamerge-fast demo`` / ``make demo``): AdaMerging on scikit-learn's digits, CPU only.

The setting mirrors the paper's at toy scale:

- **data**: scikit-learn's ``load_digits`` (1797 8x8 images, shipped with the package), split 70/30 stratified.
  Six tasks classify the ten digits under a different fixed input transform: rotated 90 degrees, rotated 180,
  mirrored, intensity-inverted, a fixed pixel permutation, cyclically shifted by 3 pixels. Each image is
  standardized (zero mean, unit variance) after its transform.
- **pretrained backbone**: an MLP (64 -> 256 -> 256 -> 256 -> 64, GELU, LayerNorm) trained on the *upright*
  digits of the training split.
- **heads** (fixed, like the paper's zero-shot heads): per task, the L2-normalized mean pretrained feature of
  each class on that task's training images, times a logit scale of 30; features are L2-normalized first.
- **fine-tuned task models**: the whole backbone fine-tuned per task with its head frozen.
- **merging** touches the backbone only. AdaMerging minimizes the prediction entropy on the *test inputs of
  every task, without labels* (labels are used only to score). Task arithmetic is shown at the paper's
  lambda = 0.3 and at the lambda of a grid whose merged model has the lowest entropy on the unlabeled test
  inputs (again no labels).

Models are created on the first run and cached under ``$ADAMERGE_CACHE/demo`` (default
``~/.cache/adamerge_fast/demo``), keyed by a hash of the configuration; everything is seeded and runs with a
fixed thread count, so runs are deterministic. Outputs: ``runs/demo/results.md`` (the table), ``results.json``,
``coefficients_layerwise.png`` (the layer-wise coefficient heatmap) and ``loss.png``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .optim import History

DEMO_VERSION = 1  # bump when the model-creation code changes, to invalidate caches

TASKS = ("rot90", "rot180", "mirror", "invert", "permute", "shift")


@dataclass(frozen=True)
class DemoConfig:
    tasks: tuple[str, ...] = TASKS
    width: int = 256
    depth: int = 4
    feature_dim: int = 64
    logit_scale: float = 30.0
    pretrain_epochs: int = 20
    pretrain_lr: float = 3e-3
    finetune_epochs: int = 15
    finetune_lr: float = 3e-4
    train_batch: int = 64
    test_fraction: float = 0.3
    seed: int = 0
    # AdaMerging (not part of the cache key)
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 64
    init: float = 0.3
    ties_k: float = 0.2
    ta_grid: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))

    def model_key(self) -> str:
        d = asdict(self)
        for k in ("steps", "lr", "batch_size", "init", "ties_k", "ta_grid"):
            d.pop(k)
        d["version"] = DEMO_VERSION
        d["torch"] = ".".join(torch.__version__.split(".")[:2])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


QUICK = DemoConfig(pretrain_epochs=10, finetune_epochs=8, steps=40, lr=3e-3)


# ------------------------------------------------------------------------------------------------ data
def _transforms(seed: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed + 1))
    return {
        "upright": lambda x: x,
        "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
        "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
        "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
        "mirror": lambda x: torch.flip(x, (-1,)),
        "flipud": lambda x: torch.flip(x, (-2,)),
        "invert": lambda x: 1.0 - x,
        "permute": lambda x: x.reshape(-1, 64)[:, perm].reshape(-1, 8, 8),
        "shift": lambda x: torch.roll(x, (3, 3), (-2, -1)),
    }


def _standardize(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-6)


class DigitsTasks:
    """Train/test tensors per task: ``inputs(task, split) -> [N, 64]`` (standardized), ``labels(split) -> [N]``."""

    def __init__(self, cfg: DemoConfig):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:
            raise ImportError(f"the demo needs scikit-learn (pip install 'adamerge-fast[demo]'): {e}") from e
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        idx = list(range(len(y)))
        tr, te = train_test_split(idx, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=d.target)
        self.x = {"train": x[tr], "test": x[te]}
        self.y = {"train": y[tr], "test": y[te]}
        self.tf = _transforms(cfg.seed)
        unknown = [t for t in cfg.tasks if t not in self.tf]
        if unknown:
            raise ValueError(f"demo: unknown task {unknown[0]!r} (known: {', '.join(self.tf)})")

    def inputs(self, task: str, split: str) -> torch.Tensor:
        return _standardize(self.tf[task](self.x[split]))

    def labels(self, split: str) -> torch.Tensor:
        return self.y[split]


# ---------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """The demo backbone: ``64 -> width (GELU) -> [LayerNorm, Linear, GELU] x (depth-1) -> LayerNorm -> Linear``."""

    def __init__(self, width: int = 256, depth: int = 4, out: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()]
        layers += [nn.LayerNorm(width), nn.Linear(width, out)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))


class CosineHead(nn.Module):
    """``scale * normalize(features) @ normalize(prototypes).T`` (trainable only during pretraining)."""

    def __init__(self, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.prototypes = nn.Parameter(prototypes.clone())
        self.scale = scale

    def forward(self, f):
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.prototypes, dim=-1).T


def _as_classification_head(h: CosineHead):
    from .models.heads import ClassificationHead

    return ClassificationHead(h.scale * F.normalize(h.prototypes.detach(), dim=-1), None, normalize=True)


def _train(model: nn.Module, head: nn.Module, x, y, epochs: int, lr: float, batch: int, seed: int, params) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(y)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            b = order[i : i + batch]
            loss = F.cross_entropy(head(model(x[b])), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def default_cache_dir() -> Path:
    from .models.heads import default_cache_dir as base

    return base() / "demo"


def create_models(cfg: DemoConfig, data: DigitsTasks, cache_dir: Path | None, log=print):
    """(pretrained backbone, {task: fine-tuned backbone}, {task: ClassificationHead}), from the cache if present."""
    from safetensors.torch import load_file

    from .io import save_safetensors
    from .models.heads import ClassificationHead

    key = cfg.model_key()
    root = Path(cache_dir) / key if cache_dir is not None else None
    files = ["pretrained.safetensors", "heads.safetensors"] + [f"finetuned_{t}.safetensors" for t in cfg.tasks]
    if root is not None and all((root / f).is_file() for f in files):
        pre = MLP(cfg.width, cfg.depth, cfg.feature_dim)
        pre.load_state_dict(load_file(str(root / "pretrained.safetensors")))
        fts = {}
        for t in cfg.tasks:
            m = MLP(cfg.width, cfg.depth, cfg.feature_dim)
            m.load_state_dict(load_file(str(root / f"finetuned_{t}.safetensors")))
            fts[t] = m.eval()
        hs = load_file(str(root / "heads.safetensors"))
        heads = {t: ClassificationHead(hs[t], None, normalize=True) for t in cfg.tasks}
        log(f"models: loaded from the cache {root}")
        return pre.eval(), fts, heads, 0.0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pre = MLP(cfg.width, cfg.depth, cfg.feature_dim)
    ph = CosineHead(torch.randn(10, cfg.feature_dim), cfg.logit_scale)
    xtr, ytr = data.inputs("upright", "train"), data.labels("train")
    _train(pre, ph, xtr, ytr, cfg.pretrain_epochs, cfg.pretrain_lr, cfg.train_batch, cfg.seed,
           list(pre.parameters()) + list(ph.parameters()))
    log(f"models: pretrained the backbone on upright digits ({time.perf_counter() - t0:.1f}s)")
    fts, heads = {}, {}
    for i, t in enumerate(cfg.tasks):
        t1 = time.perf_counter()
        x = data.inputs(t, "train")
        with torch.no_grad():
            f = F.normalize(pre(x), dim=-1)
        protos = torch.stack([f[ytr == c].mean(0) for c in range(10)])
        head = CosineHead(protos, cfg.logit_scale).requires_grad_(False)
        m = copy.deepcopy(pre)
        _train(m, head, x, ytr, cfg.finetune_epochs, cfg.finetune_lr, cfg.train_batch, cfg.seed + 1 + i,
               list(m.parameters()))
        fts[t], heads[t] = m, _as_classification_head(head)
        log(f"models: fine-tuned on {t} ({time.perf_counter() - t1:.1f}s)")
    if root is not None:
        meta = {"config": json.dumps(asdict(cfg)), "producer": "adamerge_fast.demo"}
        for t in cfg.tasks:
            save_safetensors(fts[t].state_dict(), root / f"finetuned_{t}.safetensors", meta)
        save_safetensors({t: heads[t].weight for t in cfg.tasks}, root / "heads.safetensors", meta)
        save_safetensors(pre.state_dict(), root / "pretrained.safetensors", meta)  # last: marks the cache complete
        log(f"models: cached in {root}")
    return pre, fts, heads, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _evaluate(backbone: nn.Module, heads, data: DigitsTasks, tasks) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy % per task, mean prediction entropy per task) on the held-out split."""
    from .ops import entropy

    acc, ent = {}, {}
    y = data.labels("test")
    for t in tasks:
        logits = heads[t](backbone(data.inputs(t, "test")))
        acc[t] = 100.0 * (logits.argmax(-1) == y).float().mean().item()
        ent[t] = entropy(logits.float()).mean().item()
    return acc, ent


def _with_state(template: nn.Module, sd) -> nn.Module:
    m = copy.deepcopy(template)
    m.load_state_dict({**m.state_dict(), **{k: v.detach() for k, v in sd.items()}})
    return m.eval()


@dataclass
class Row:
    name: str
    acc: dict[str, float]

    @property
    def avg(self) -> float:
        return sum(self.acc.values()) / len(self.acc)


def format_table(rows: list[Row], tasks, markdown: bool = False) -> str:
    w = max(len(r.name) for r in rows)
    cols = list(tasks) + ["Avg"]
    if markdown:
        lines = ["| Method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for r in rows:
            lines.append(f"| {r.name} | " + " | ".join(f"{r.acc[t]:.1f}" for t in tasks) + f" | **{r.avg:.1f}** |")
        return "\n".join(lines)
    cw = max(7, max(len(c) for c in cols) + 1)
    head = f"{'Method':<{w}} " + "".join(f"{c:>{cw}}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<{w}} " + "".join(f"{r.acc[t]:>{cw}.1f}" for t in tasks) + f"{r.avg:>{cw}.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def add_arguments(p) -> None:
    from .ops import BACKEND_NAMES

    p.add_argument("--quick", action="store_true",
                   help="a reduced configuration (shorter training, 40 AdaMerging steps) for tests")
    p.add_argument("--steps", type=int, default=None, help="AdaMerging steps per run (default 500; quick: 40)")
    p.add_argument("--lr", type=float, default=None, help="AdaMerging Adam learning rate (default 1e-3; quick: 3e-3)")
    p.add_argument("--output-dir", default="runs/demo",
                   help="where results.md, results.json and the PNGs go (default runs/demo)")
    p.add_argument("--save-figure", metavar="PNG", default=None,
                   help="also copy the layer-wise coefficient heatmap to this path")
    p.add_argument("--cache-dir", default=None,
                   help="model cache (default $ADAMERGE_CACHE/demo or ~/.cache/adamerge_fast/demo)")
    p.add_argument("--no-cache", action="store_true", help="always create the models, write no cache")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: deterministic and fastest at this size)")
    p.add_argument("--backend", default="auto",
                   help=f"op backend for AdaMerging: auto, {', '.join(BACKEND_NAMES)} (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compact", action="store_true",
                   help="instead of every method: layer-wise AdaMerging with fp32, int8 and int4 task vectors "
                   "(accuracy and task-vector bytes; writes demo_compact.md/json)")


def config_from_args(args) -> DemoConfig:
    """:data:`QUICK` or the default :class:`DemoConfig`, with ``args.steps`` / ``args.lr`` when given."""
    cfg = QUICK if args.quick else DemoConfig()
    if args.steps is not None:
        if args.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {args.steps}")
        cfg = replace(cfg, steps=args.steps)
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        cfg = replace(cfg, lr=args.lr)
    return cfg


@dataclass
class DemoResult:
    """The demo's evaluation: one :class:`Row` per method, the layer-wise AdaMerging run's final coefficient table
    and loss history, and the wall-clock seconds of each stage (``create_seconds``: creating the models, 0 when
    they came from the cache)."""

    cfg: DemoConfig
    rows: list[Row]
    coefficient_rows: list[str]
    coefficients: list[list[float]]
    layerwise_history: History
    timings: dict[str, float]
    create_seconds: float

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    def summary(self) -> str:
        """How far task arithmetic (λ=0.3) is below the individual models, and what layer-wise AdaMerging
        recovers."""
        avg = {r.name: r.avg for r in self.rows}
        ind, ta, lw = avg["Individual (fine-tuned)"], avg["Task arithmetic (λ=0.3)"], avg["Layer-wise AdaMerging"]
        gap = ind - ta
        rec = 100.0 * (lw - ta) / gap if gap > 0 else float("nan")
        return (f"task arithmetic (λ=0.3) is {gap:.1f} points below the individual models; layer-wise AdaMerging "
                f"{'recovers' if lw >= ta else 'loses'} {abs(lw - ta):.1f} points ({rec:.0f}% of the gap)")


def _static_rows(cfg: DemoConfig, pre: nn.Module, fts, heads, data: DigitsTasks) -> list[Row]:
    """Weight averaging, task arithmetic (λ=0.3, and the λ of :attr:`DemoConfig.ta_grid` whose merge has the
    lowest entropy on the unlabeled test inputs), TIES-merging."""
    from .merging import task_arithmetic, task_vectors, ties_merge, weight_average

    tasks = list(cfg.tasks)
    base = dict(pre.named_parameters())
    tv = task_vectors(pre, [fts[t] for t in tasks])

    def evaluate(sd):
        return _evaluate(_with_state(pre, sd), heads, data, tasks)

    rows = [Row("Weight averaging", evaluate(weight_average(base, tv))[0]),
            Row("Task arithmetic (λ=0.3)", evaluate(task_arithmetic(base, tv, 0.3))[0])]
    best = None
    for lam in cfg.ta_grid:  # lambda chosen by the entropy on the unlabeled test inputs: no labels
        a, e = evaluate(task_arithmetic(base, tv, lam))
        score = sum(e.values())
        if best is None or score < best[0] - 1e-9:
            best = (score, lam, a)
    rows.append(Row(f"Task arithmetic (λ={best[1]:.1f}, min entropy)", best[2]))
    rows.append(Row(f"TIES-merging (k={cfg.ties_k}, λ=1)", evaluate(ties_merge(base, tv, k=cfg.ties_k, scale=1.0))[0]))
    return rows


def _test_loaders(cfg: DemoConfig, data: DigitsTasks) -> dict:
    """Per task, the shuffled (seeded) batches of unlabeled test inputs that AdaMerging sees. Each AdaMerging run
    takes fresh loaders: a loader's generator advances with every pass, so shared loaders would hand each later run
    another batch order."""
    loaders = {}
    for t in cfg.tasks:
        g = torch.Generator().manual_seed(cfg.seed)
        loaders[t] = torch.utils.data.DataLoader(data.inputs(t, "test"), batch_size=cfg.batch_size, shuffle=True,
                                                 generator=g, drop_last=True)
    return loaders


def evaluate_methods(cfg: DemoConfig, *, cache_dir: Path | None = None, backend: str = "auto", progress: bool = True,
                     log: Callable[[str], None] = print) -> DemoResult:
    """Create (or load from ``cache_dir``) the models of ``cfg``, merge them with every method and score each
    merged model's held-out accuracy per task."""
    from .merging import AdaMergedModel
    from .optim import adamerge

    t_start = time.perf_counter()
    tasks = list(cfg.tasks)
    data = DigitsTasks(cfg)
    pre, fts, heads, t_create = create_models(cfg, data, cache_dir, log)
    timings: dict[str, float] = {"models": round(time.perf_counter() - t_start, 2)}

    rows = [Row("Pretrained", _evaluate(pre, heads, data, tasks)[0]),
            Row("Individual (fine-tuned)", {t: _evaluate(fts[t], heads, data, [t])[0][t] for t in tasks})]
    t0 = time.perf_counter()
    rows += _static_rows(cfg, pre, fts, heads, data)
    timings["static merges"] = round(time.perf_counter() - t0, 2)

    layerwise = None
    for label, gran, ties in (("Task-wise AdaMerging", "task", None), ("Layer-wise AdaMerging", "layer", None),
                              ("Layer-wise AdaMerging++", "layer", {"k": cfg.ties_k})):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        merged = AdaMergedModel(pre, [fts[t] for t in tasks], granularity=gran, init=cfg.init, ties=ties,
                                backend=backend, task_names=tasks)
        hist = adamerge(merged, heads, _test_loaders(cfg, data), steps=cfg.steps, lr=cfg.lr, progress=progress)
        rows.append(Row(label, _evaluate(_with_state(pre, merged.merged_state_dict()), heads, data, tasks)[0]))
        timings[label] = round(time.perf_counter() - t0, 2)
        log(f"{label}: {cfg.steps} steps in {timings[label]:.1f}s")
        if gran == "layer" and ties is None:
            layerwise = (merged.coefficient_table(), hist)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    table, hist = layerwise
    return DemoResult(cfg, rows, [r for r, _ in table], [v for _, v in table], hist, timings, t_create)


def print_report(res: DemoResult) -> None:
    """The accuracy table, the summary line and the timings, on stdout."""
    cfg = res.cfg
    print()
    print(f"Held-out accuracy (%) on scikit-learn digits, {len(res.tasks)} tasks; AdaMerging: {cfg.steps} steps, "
          f"lr {cfg.lr}, {cfg.batch_size} unlabeled test inputs per task per step")
    print(format_table(res.rows, res.tasks))
    print(res.summary())
    cached = " (cache)" if res.create_seconds == 0.0 else ""
    print(f"time: models {res.timings['models']:.1f}s{cached}, total {res.timings['total']:.1f}s")


def write_outputs(res: DemoResult, out: Path, *, save_figure: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Write ``results.md`` (the table), ``results.json`` (returned), ``coefficients_layerwise.png`` and
    ``loss.png`` to ``out``; copy the heatmap to ``save_figure`` when given. Every file is written atomically."""
    from .io import atomic_path, write_text_atomic
    from .plot import plot_coefficients, plot_loss

    cfg, tasks, total = res.cfg, res.tasks, res.timings["total"]
    out = Path(out)
    heat = plot_coefficients(res.coefficient_rows, tasks, res.coefficients, out / "coefficients_layerwise.png",
                             "Layer-wise AdaMerging coefficients (digits demo)")
    lh = res.layerwise_history
    plot_loss(lh.loss, out / "loss.png", lh.task_loss, "Layer-wise AdaMerging: entropy on unlabeled test inputs")
    if save_figure:
        dst = Path(save_figure)
        with atomic_path(dst, ".png") as tmp:
            shutil.copyfile(heat, tmp)
        log(f"heatmap copied to {dst}")
    created = ("models from the cache" if res.create_seconds == 0.0
               else f"{res.create_seconds:.1f}s to create the models")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items() if k not in ("total", "models"))
    md = [
        "# AdaMerging demo: scikit-learn digits",
        "",
        f"Held-out accuracy (%), {len(tasks)} tasks (the ten digits under a fixed transform each). Pretrained "
        "backbone: an MLP trained on upright digits; fine-tuned: the whole backbone per task with a fixed "
        "prototype head. AdaMerging: "
        f"{cfg.steps} Adam steps (lr {cfg.lr}) on the entropy of batches of {cfg.batch_size} unlabeled test inputs "
        "per task; the 'min entropy' task-arithmetic λ is chosen on the same unlabeled inputs. Labels are used only "
        "to score.",
        "",
        format_table(res.rows, tasks, markdown=True),
        "",
        res.summary() + ".",
        "",
        f"Time: {total:.1f}s in total ({created}; {stages}).",
        "",
        "![layer-wise coefficients](coefficients_layerwise.png)",
        "",
    ]
    write_text_atomic(out / "results.md", "\n".join(md))
    result = {
        "config": asdict(cfg),
        "tasks": tasks,
        "rows": [{"name": r.name, "acc": r.acc, "avg": r.avg} for r in res.rows],
        "timings_s": res.timings,
        "layerwise_coefficients": {"rows": res.coefficient_rows, "values": res.coefficients},
    }
    write_text_atomic(out / "results.json", json.dumps(result, indent=1) + "\n")
    log(f"wrote {out / 'results.md'}, results.json, coefficients_layerwise.png, loss.png")
    return result


# ------------------------------------------------------------------------------------------- compact mode
@dataclass(frozen=True)
class CompactRow:
    """One row of ``demo --compact``: layer-wise AdaMerging with one storage of the task vectors.

    ``build(pretrained, finetuned)`` returns the keyword arguments of :class:`~adamerge_fast.AdaMergedModel` that
    select the storage (``task_vector_dtype=...``); a row may also return its own ``finetuned=`` sources (e.g. LoRA
    fine-tunes of the same backbone) or ``task_vectors=``. Add a row by appending to :data:`COMPACT_ROWS`."""

    label: str
    build: Callable[[nn.Module, list], dict]


COMPACT_ROWS: list[CompactRow] = [
    CompactRow("fp32 task vectors", lambda pre, fts: {"task_vector_dtype": None}),
    CompactRow("int8 task vectors (scale per row)", lambda pre, fts: {"task_vector_dtype": "int8"}),
    CompactRow("int4 task vectors (scale + zero per 128 columns)", lambda pre, fts: {"task_vector_dtype": "int4"}),
]


@dataclass
class CompactResult:
    """``demo --compact``: per storage row, the held-out accuracy of layer-wise AdaMerging and the task-vector
    bytes; the first row is the reference (fp32)."""

    cfg: DemoConfig
    rows: list[Row]
    bytes: dict[str, int]
    timings: dict[str, float]

    def deltas(self) -> dict[str, float]:
        """Average accuracy of each row minus the first row's, in points."""
        ref = self.rows[0].avg
        return {r.name: r.avg - ref for r in self.rows}


def evaluate_compact(cfg: DemoConfig, rows: list[CompactRow] | None = None, *, cache_dir: Path | None = None,
                     backend: str = "auto", progress: bool = True, log: Callable[[str], None] = print
                     ) -> CompactResult:
    """Layer-wise AdaMerging of the demo's models once per storage row (:data:`COMPACT_ROWS`), same data, same
    steps, same seed: how much accuracy compact task vectors cost."""
    from .merging import AdaMergedModel
    from .optim import adamerge

    rows = COMPACT_ROWS if rows is None else rows
    tasks = list(cfg.tasks)
    data = DigitsTasks(cfg)
    pre, fts, heads, _ = create_models(cfg, data, cache_dir, log)
    out, nbytes, timings = [], {}, {}
    for row in rows:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        kw = {"finetuned": [fts[t] for t in tasks], **row.build(pre, [fts[t] for t in tasks])}
        if "task_vectors" in kw:
            kw.pop("finetuned")
        merged = AdaMergedModel(pre, granularity="layer", init=cfg.init, backend=backend, task_names=tasks, **kw)
        adamerge(merged, heads, _test_loaders(cfg, data), steps=cfg.steps, lr=cfg.lr, progress=progress)
        out.append(Row(f"Layer-wise AdaMerging, {row.label}",
                       _evaluate(_with_state(pre, merged.merged_state_dict()), heads, data, tasks)[0]))
        nbytes[out[-1].name] = merged.task_vector_bytes()
        timings[row.label] = round(time.perf_counter() - t0, 2)
        log(f"{row.label}: {cfg.steps} steps in {timings[row.label]:.1f}s")
    return CompactResult(cfg, out, nbytes, timings)


def _compact_table(res: CompactResult, markdown: bool) -> str:
    table = format_table(res.rows, list(res.cfg.tasks), markdown=markdown).splitlines()
    ref_bytes = res.bytes[res.rows[0].name]
    extra = [(f"{res.bytes[r.name] / 1024:.0f} KiB", f"{res.bytes[r.name] / ref_bytes:.3f}x", f"{d:+.1f}")
             for r, d in zip(res.rows, res.deltas().values(), strict=True)]
    if markdown:
        head = [table[0] + " task vectors | vs first | Δ avg |", table[1] + "---:|---:|---:|"]
        return "\n".join(head + [line + f" {b} | {x} | {d} |" for line, (b, x, d) in zip(table[2:], extra,
                                                                                          strict=True)])
    head = [table[0] + f"{'TV bytes':>12}{'vs first':>10}{'Δ avg':>8}", table[1] + "-" * 30]
    return "\n".join(head + [line + f"{b:>12}{x:>10}{d:>8}" for line, (b, x, d) in zip(table[2:], extra,
                                                                                       strict=True)])


def write_compact(res: CompactResult, out: Path, log: Callable[[str], None] = print) -> dict:
    """Print the compact table and write ``demo_compact.md`` / ``demo_compact.json`` to ``out`` (atomically)."""
    from .io import write_text_atomic

    cfg = res.cfg
    print()
    print(f"Layer-wise AdaMerging with compact task vectors, held-out accuracy (%); {cfg.steps} steps, lr {cfg.lr}")
    print(_compact_table(res, markdown=False))
    out = Path(out)
    md = ["# AdaMerging demo with compact task vectors", "",
          f"Layer-wise AdaMerging of the digits demo's models ({len(cfg.tasks)} tasks, {cfg.steps} Adam steps, lr "
          f"{cfg.lr}, batches of {cfg.batch_size} unlabeled test inputs per task), once per storage of the task "
          "vectors, same data and seed. Held-out accuracy (%); task-vector bytes as held by `AdaMergedModel`; "
          "Δ avg against the first row. Command: `adamerge-fast demo --compact`.", "",
          _compact_table(res, markdown=True), ""]
    write_text_atomic(out / "demo_compact.md", "\n".join(md))
    result = {"config": asdict(cfg), "tasks": list(cfg.tasks),
              "rows": [{"name": r.name, "acc": r.acc, "avg": r.avg, "task_vector_bytes": res.bytes[r.name],
                        "delta_avg": res.deltas()[r.name]} for r in res.rows],
              "timings_s": res.timings}
    write_text_atomic(out / "demo_compact.json", json.dumps(result, indent=1) + "\n")
    log(f"wrote {out / 'demo_compact.md'}, demo_compact.json")
    return result


def run(args) -> dict:
    """Run the demo with the options of :func:`add_arguments`: evaluate every method, print the report, write the
    outputs to ``args.output_dir``; returns the results (``results.json``). With ``args.compact``: the compact
    task-vector rows instead (:func:`evaluate_compact`; ``demo_compact.json``)."""
    torch.set_num_threads(max(1, int(args.threads)))
    cfg = config_from_args(args)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if getattr(args, "compact", False):
        res = evaluate_compact(cfg, cache_dir=cache, backend=args.backend, progress=not args.no_progress, log=log)
        return write_compact(res, Path(args.output_dir), log=log)
    res = evaluate_methods(cfg, cache_dir=cache, backend=args.backend, progress=not args.no_progress, log=log)
    print_report(res)
    return write_outputs(res, Path(args.output_dir), save_figure=args.save_figure, log=log)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="adamerge-fast demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
