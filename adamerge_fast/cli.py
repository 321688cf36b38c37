"""The ``adamerge-fast`` command line (also ``python -m adamerge_fast``).

Subcommands:

- ``merge``: data-free merges of checkpoint files (weight averaging, task arithmetic, TIES, DARE) -> safetensors.
- ``adamerge``: AdaMerging (task-wise, layer-wise; ``--ties`` for AdaMerging++) of an open_clip image encoder
  (zero-shot heads from class-name files), of any module built by ``--model-factory`` (heads from checkpoint
  files), or of a local Hugging Face causal LM (next-token entropy). Writes the merged model (safetensors),
  the coefficients (safetensors) and the history (JSON); checkpoints and ``--resume``.
- ``plot``: coefficient heatmap (parameter tensor x task) and loss curve of an ``adamerge`` run (PNG).
- ``demo``: the offline digits demo (:mod:`adamerge_fast.demo`).
- ``bench``: the benchmarks (:mod:`adamerge_fast.bench`).

User errors (a missing file, a checkpoint of another architecture, a task without data, a bad option value)
print one line to stderr and exit with status 1 (2 for command-line usage errors); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

PROG = "adamerge-fast"

#: called as ``_STEP_HOOK(step)`` after every optimizer step of ``adamerge`` (tests use it to interrupt a run)
_STEP_HOOK: Callable[[int], None] | None = None


class UserError(Exception):
    """An error caused by the input or the options: reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (plus a pointer to --help), exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _number(kind, s: str, ok, what: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
    return v


def _positive_int(s: str) -> int:
    return _number(int, s, lambda v: v >= 1, ">= 1")


def _nonneg_int(s: str) -> int:
    return _number(int, s, lambda v: v >= 0, ">= 0")


def _positive_float(s: str) -> float:
    return _number(float, s, lambda v: v > 0, "> 0")


def _fraction(s: str) -> float:
    return _number(float, s, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def _drop_rate(s: str) -> float:
    return _number(float, s, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, _DTYPES[name])


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fast AdaMerging (adaptive model merging, Yang et al. ICLR 2024) and static merges.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # ---- merge
    m = sub.add_parser("merge", help="data-free merge of checkpoints (average, task arithmetic, TIES, DARE)",
                       description="Merge fine-tuned checkpoints of one architecture without data; write safetensors. "
                       "Every floating tensor of the pretrained checkpoint is merged; other tensors are copied from it.")
    m.add_argument("--method", required=True, choices=["average", "task-arithmetic", "ties", "dare"],
                   help="average: theta0 + mean_k tau_k; task-arithmetic: theta0 + scale*sum_k tau_k; ties: TIES-merging; "
                   "dare: drop-and-rescale the task vectors, then task arithmetic (or TIES with --dare-then ties)")
    m.add_argument("--pretrained", required=True, metavar="PATH", help="pretrained checkpoint (safetensors, HF dir, or torch state dict)")
    m.add_argument("--finetuned", required=True, nargs="+", metavar="PATH", help="fine-tuned checkpoints, one per task")
    m.add_argument("-o", "--output", required=True, metavar="FILE", help="merged checkpoint to write (.safetensors)")
    m.add_argument("--scale", type=float, default=0.3, help="task-arithmetic / TIES / DARE scaling coefficient (default 0.3)")
    m.add_argument("--ties-k", type=_fraction, default=0.2, help="TIES: fraction of each task vector kept (default 0.2)")
    m.add_argument("--ties-merge", choices=["mean", "sum"], default="mean", help="TIES: disjoint mean or sum (default mean)")
    m.add_argument("--ties-scope", choices=["global", "tensor"], default="global", help="TIES: trim over the whole vector or per tensor")
    m.add_argument("--dare-p", type=_drop_rate, default=0.5, help="DARE: drop probability (default 0.5)")
    m.add_argument("--dare-then", choices=["task-arithmetic", "ties"], default="task-arithmetic", help="DARE: merge the sparsified vectors with")
    m.add_argument("--seed", type=int, default=0, help="DARE random seed")
    m.add_argument("--task-vector-dtype", choices=sorted(_DTYPES), default=None, help="storage dtype of the task vectors")
    m.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are whole pickled objects (runs code from the file)")
    m.set_defaults(func=cmd_merge)

    # ---- adamerge
    a = sub.add_parser("adamerge", help="AdaMerging: learn merging coefficients by entropy minimization on unlabeled data",
                       description="Learn task-wise or layer-wise merging coefficients (AdaMerging; AdaMerging++ with --ties) by "
                       "minimizing the prediction entropy on each task's unlabeled data. Give ONE model spec: "
                       "--open-clip NAME (image encoder, zero-shot heads from --classnames files), --model-factory "
                       "MODULE:FUNCTION (heads from --heads files), --hf-clip (a Hugging Face CLIP directory), or --hf-causal-lm "
                       "(text data, next-token entropy).")
    spec = a.add_argument_group("model (one of)")
    g = spec.add_mutually_exclusive_group(required=True)
    g.add_argument("--open-clip", metavar="NAME", help="open_clip model name: ViT-B/32, ViT-B/16, ViT-L/14 (or ViT-B-32 ...)")
    g.add_argument("--model-factory", metavar="MODULE:FUNCTION", help="a function returning the backbone nn.Module skeleton "
                   "(MODULE may be a dotted module name or a path to a .py file)")
    g.add_argument("--hf-clip", action="store_true", help="--pretrained is a local Hugging Face CLIP directory (CLIPModel; "
                   "CLIPVisionModelWithProjection with --heads): merge its image encoder, zero-shot heads from --classnames")
    g.add_argument("--hf-causal-lm", action="store_true", help="--pretrained/--finetuned are local Hugging Face causal LM directories")
    a.add_argument("--pretrained", required=True, metavar="PATH", help="pretrained weights (a local file or directory; nothing is downloaded)")
    a.add_argument("--finetuned", required=True, nargs="+", metavar="PATH", help="fine-tuned checkpoints, one per task")
    a.add_argument("--data", required=True, nargs="+", metavar="PATH", help="unlabeled data per task: image folder, .pt/.npy/.safetensors tensor file, or .txt (LMs)")
    a.add_argument("--task-names", nargs="+", metavar="NAME", help="task names (default: the data paths' stems)")
    a.add_argument("--classnames", nargs="+", metavar="FILE", help="open_clip / HF CLIP: one class name per line, one file per task")
    a.add_argument("--templates", metavar="FILE", help="open_clip / HF CLIP: prompt templates, one per line with {} for the class name (default: 'a photo of a {}.')")
    a.add_argument("--heads", nargs="+", metavar="FILE", help="classification heads (weight [C, D], optional bias), one per task")
    a.add_argument("--head-normalize", choices=["auto", "yes", "no"], default="auto", help="L2-normalize features before a --heads head (auto: as stored in the file, else no)")
    a.add_argument("--tokenizer", metavar="DIR", help="HF CLIP / LM: tokenizer directory (default: --pretrained)")
    a.add_argument("--max-length", type=_positive_int, default=64, help="LM: tokens per example (padded/truncated, default 64)")
    a.add_argument("--positions", choices=["last", "all"], default="last", help="LM: entropy of the next token after the last real token, or at every real token (needs --task-batching sequential)")
    a.add_argument("--image-size", type=_positive_int, default=224, help="image folders without open_clip: resize/crop size (default 224)")
    a.add_argument("--granularity", choices=["layer", "task"], default="layer", help="one coefficient per parameter tensor per task (layer), or per task (default layer)")
    a.add_argument("--ties", action="store_true", help="AdaMerging++: learn the coefficients over TIES-trimmed task vectors")
    a.add_argument("--ties-k", type=_fraction, default=0.2, help="AdaMerging++: fraction of each task vector kept (default 0.2)")
    a.add_argument("--init", type=float, default=0.3, help="initial coefficient (default 0.3, the paper's)")
    a.add_argument("--clamp", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"), help="coefficient range (default 0 1)")
    a.add_argument("--steps", type=_nonneg_int, default=500, help="optimizer steps (default 500)")
    a.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    a.add_argument("--batch-size", type=_positive_int, default=16, help="examples per task per batch (default 16)")
    a.add_argument("--batches-per-step", type=_positive_int, default=1, help="batches per task per step (default 1)")
    a.add_argument("--task-batching", choices=["concat", "sequential"], default="concat", help="one forward over all tasks' batches, or one per task")
    a.add_argument("--backend", default="auto", help="op backend: auto, reference, cpu, triton, cuda (default auto)")
    a.add_argument("--task-vector-dtype", choices=sorted(_DTYPES), default=None, help="storage dtype of the task vectors (default: the checkpoints')")
    a.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a.add_argument("--seed", type=int, default=0, help="data shuffling seed (default 0)")
    a.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader worker processes (default 0)")
    a.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="where merged.safetensors, coefficients.safetensors, history.json, checkpoint.pt go")
    a.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N", help="write a resumable checkpoint every N steps (0: only at the end)")
    a.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT", help="continue from a checkpoint (default: OUTPUT_DIR/checkpoint.pt)")
    a.add_argument("--cache-dir", metavar="DIR", help="zero-shot head cache (default $ADAMERGE_CACHE or ~/.cache/adamerge_fast)")
    a.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are whole pickled objects (runs code from the file)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_adamerge)

    # ---- plot
    pl = sub.add_parser("plot", help="coefficient heatmap and loss curve of an adamerge run (PNG)",
                        description="Plot an adamerge run: coefficients.png (parameter tensor x task heatmap) and loss.png.")
    pl.add_argument("run", metavar="RUN", help="an adamerge output directory, or its history.json")
    pl.add_argument("-o", "--output-dir", metavar="DIR", help="where to write the PNGs (default: the run directory)")
    pl.add_argument("--title", default=None, help="figure title prefix")
    pl.set_defaults(func=cmd_plot)

    # ---- demo
    d = sub.add_parser("demo", help="offline CPU demo on scikit-learn's digits (about 1-2 minutes)",
                       description="Create a pretrained backbone and fine-tuned task models on scikit-learn's digits (cached), "
                       "merge them with every method, print one table of held-out accuracy.")
    from .demo import add_arguments as _demo_args

    _demo_args(d)
    d.set_defaults(func=cmd_demo)

    # ---- bench
    b = sub.add_parser("bench", help="run the benchmarks (adamerge_fast.bench); arguments are passed through", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


# ------------------------------------------------------------------------------------------------- utils
def _die(msg: str) -> None:
    raise UserError(msg)


def _exists(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")
    return p


def _write_json(obj: Any, path) -> None:
    from .io import atomic_path

    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _log(msg: str) -> None:
    """Progress information: stdout (stderr carries progress bars and errors only)."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    import torch

    from .io import load_state_dict, save_safetensors
    from .merging import dare, task_arithmetic, task_vectors, ties_merge, weight_average
    from .merging.task_vectors import floating_keys

    t0 = time.perf_counter()
    out = Path(args.output)
    if out.suffix != ".safetensors":
        _die(f"{out}: the output must be a .safetensors file")
    base = load_state_dict(_exists(args.pretrained, "pretrained checkpoint"), trust_pickle=args.trust_pickle)
    keys = floating_keys(base)
    if not keys:
        _die(f"{args.pretrained}: no floating-point tensors to merge")
    fts = []
    for f in args.finetuned:
        sd = load_state_dict(_exists(f, "fine-tuned checkpoint"), trust_pickle=args.trust_pickle)
        _check_same_arch(base, sd, keys, f, args.pretrained)
        fts.append(sd)
    _log(f"{PROG} merge: {len(fts)} task(s), {len(keys)} tensors, method {args.method}")
    tv = task_vectors(base, fts, keys=keys, dtype=_dtype(args.task_vector_dtype))
    meta = {"producer": "adamerge_fast", "method": args.method, "tasks": str(len(fts))}
    if args.method == "average":
        merged = weight_average(base, tv)
    elif args.method == "task-arithmetic":
        merged = task_arithmetic(base, tv, args.scale)
        meta["scale"] = str(args.scale)
    elif args.method == "ties":
        merged = ties_merge(base, tv, k=args.ties_k, scale=args.scale, merge=args.ties_merge, scope=args.ties_scope)
        meta.update(scale=str(args.scale), ties_k=str(args.ties_k), ties_merge=args.ties_merge, ties_scope=args.ties_scope)
    else:
        tv = dare(tv, args.dare_p, seed=args.seed)
        if args.dare_then == "ties":
            merged = ties_merge(base, tv, k=args.ties_k, scale=args.scale, merge=args.ties_merge, scope=args.ties_scope)
        else:
            merged = task_arithmetic(base, tv, args.scale)
        meta.update(scale=str(args.scale), dare_p=str(args.dare_p), dare_then=args.dare_then, seed=str(args.seed))
    result = {}
    for k in base.keys():
        t = merged[k] if k in merged else base[k]
        result[k] = t.to(base[k].dtype) if isinstance(t, torch.Tensor) else t
    save_safetensors(result, out, meta)
    _log(f"{PROG} merge: wrote {out} ({len(result)} tensors) in {time.perf_counter() - t0:.1f}s")
    return 0


def _check_same_arch(base, sd, keys, path, base_path) -> None:
    from .io import CheckpointError

    have = set(sd.keys())
    missing = [k for k in keys if k not in have]
    if missing:
        raise CheckpointError(
            f"{path}: not a checkpoint of the pretrained model's architecture: {len(missing)} of its {len(keys)} tensors "
            f"are missing, e.g. {missing[0]!r} (in {base_path})"
        )
    from .models.open_clip import shape_dtype

    for k in keys:
        (a, da), (b, db) = shape_dtype(base, k), shape_dtype(sd, k)
        if a != b:
            raise CheckpointError(f"{path}: not a checkpoint of the pretrained model's architecture: {k!r} has shape {list(b)}, the pretrained has {list(a)}")
        if da != db:
            raise CheckpointError(f"{path}: {k!r} has dtype {db}, the pretrained has {da} (convert it first)")


# ---------------------------------------------------------------------------------------------- adamerge
def _load_factory(spec: str):
    if ":" not in spec:
        _die(f"--model-factory must be MODULE:FUNCTION, got {spec!r}")
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = _exists(mod_name, "model factory file")
        sp = importlib.util.spec_from_file_location(f"_adamerge_factory_{path.stem}", path)
        mod = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            _die(f"--model-factory: cannot import module {mod_name!r} ({e})")
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        _die(f"--model-factory: {mod_name!r} has no function {fn_name!r}")
    return fn


def _task_names(args, n: int) -> list[str]:
    if args.task_names:
        if len(args.task_names) != n:
            _die(f"--task-names gives {len(args.task_names)} names for {n} tasks")
        names = list(args.task_names)
    else:
        names = [Path(d).stem or f"task{i}" for i, d in enumerate(args.data)]
    if len(set(names)) != len(names):
        names = [f"{i}:{nm}" for i, nm in enumerate(names)]
    return names


def _per_task(values, n: int, flag: str) -> list:
    if values is None:
        _die(f"{flag} is required: one per task ({n} tasks)")
    if len(values) != n:
        _die(f"{flag} gives {len(values)} files for {n} tasks (one per task, in the order of --finetuned)")
    return values


def _build_spec(args, n: int):
    """(backbone module, fine-tuned state dicts, heads, data loaders, extra metadata)."""
    from .data import load_task_data
    from .models.heads import ClassificationHead, file_identity, load_head, read_lines
    from .models.open_clip import check_fits, load_into, visual_state_dict

    names = _task_names(args, n)
    trust = args.trust_pickle
    tokenizer, transform = None, None
    meta: dict[str, str] = {}
    if args.open_clip:
        from .io import load_state_dict as _lsd
        from .models import open_clip as oc

        model = oc.create_clip(args.open_clip, _exists(args.pretrained, "pretrained checkpoint"), trust_pickle=trust)
        backbone = oc.image_encoder(model)
        try:
            transform = oc.preprocess_for(model)
        except Exception:  # torchvision unusable: the plain PIL transform
            from .data import ImageTransform

            size = backbone.image_size
            transform = ImageTransform(size[0] if isinstance(size, (tuple, list)) else size)
        fts = []
        for f in args.finetuned:
            sd = visual_state_dict(_lsd(_exists(f, "fine-tuned checkpoint"), trust_pickle=trust))
            check_fits(backbone, sd, f"{f}", check_dtype=True)
            fts.append(sd)
        if args.heads:
            heads = [load_head(h, normalize=_head_norm(args.head_normalize, True), trust_pickle=trust) for h in _per_task(args.heads, n, "--heads")]
        else:
            classfiles = _per_task(args.classnames, n, "--classnames (or --heads)")
            templates = read_lines(args.templates, "templates file") if args.templates else list(oc.DEFAULT_TEMPLATES)
            tok = oc.tokenizer_for(args.open_clip)
            wid = file_identity(args.pretrained)
            heads = []
            for f in classfiles:
                classes = read_lines(f, "class-names file")
                heads.append(oc.cached_zero_shot_head(args.open_clip, model, tok, classes, templates, weights_id=wid, cache_dir=args.cache_dir,
                                                         progress=not args.no_progress))
        model.transformer = None  # the text tower is no longer needed
        meta.update(model=f"open_clip:{oc.canonical_name(args.open_clip)}", component="visual")
    elif args.model_factory:
        factory = _load_factory(args.model_factory)
        backbone = factory()
        import torch

        if not isinstance(backbone, torch.nn.Module):
            _die(f"--model-factory {args.model_factory} returned {type(backbone).__name__}, not an nn.Module")
        from .io import load_state_dict as _lsd

        load_into(backbone, _lsd(_exists(args.pretrained, "pretrained checkpoint"), trust_pickle=trust), f"{args.pretrained}")
        fts = []
        for f in args.finetuned:
            sd = _lsd(_exists(f, "fine-tuned checkpoint"), trust_pickle=trust)
            check_fits(backbone, sd, f"{f}", check_dtype=True)
            fts.append(sd)
        heads = [load_head(h, normalize=_head_norm(args.head_normalize, None), trust_pickle=trust) for h in _per_task(args.heads, n, "--heads")]
        from .data import ImageTransform

        transform = ImageTransform(args.image_size)
        meta.update(model=f"factory:{args.model_factory}")
    elif args.hf_clip:
        from .data import CLIP_MEAN, CLIP_STD, ImageTransform
        from .io import load_state_dict as _lsd
        from .models import hf
        from .models.heads import cached_head, head_key

        pre_dir = _exists(args.pretrained, "pretrained CLIP directory")
        if args.heads:
            backbone = hf.CLIPImageEncoder.from_pretrained(pre_dir)
            heads = [load_head(h, normalize=_head_norm(args.head_normalize, True), trust_pickle=trust) for h in _per_task(args.heads, n, "--heads")]
        else:
            classfiles = _per_task(args.classnames, n, "--classnames (or --heads)")
            clip = hf.load_clip(pre_dir)
            backbone = hf.CLIPImageEncoder.from_model(clip)
            tok = hf.load_tokenizer(args.tokenizer or pre_dir)
            templates = read_lines(args.templates, "templates file") if args.templates else ["a photo of a {}."]
            wid = file_identity(pre_dir)
            heads = []
            for f in classfiles:
                classes = read_lines(f, "class-names file")
                key = head_key("hf-clip", wid, classes, templates)
                heads.append(cached_head(key, lambda c=classes: hf.clip_zero_shot_head(clip, tok, c, templates, progress=not args.no_progress),
                                        args.cache_dir))
            del clip
        size = backbone.vision_model.config.image_size if hasattr(backbone.vision_model, "config") else args.image_size
        transform = ImageTransform(size, CLIP_MEAN, CLIP_STD)
        fts = []
        for f in args.finetuned:
            sd = _lsd(_exists(f, "fine-tuned checkpoint"), trust_pickle=trust)
            check_fits(backbone, sd, f"{f}", check_dtype=True)
            fts.append(sd)
        meta.update(model="hf-clip", component="vision_model+visual_projection")
    else:
        from .io import load_state_dict as _lsd
        from .models import hf

        lm = hf.load_causal_lm(_exists(args.pretrained, "pretrained model directory"))
        backbone = hf.CausalLMForEntropy(lm, positions=args.positions)
        tokenizer = hf.load_tokenizer(args.tokenizer or args.pretrained)
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        if args.positions == "all" and args.task_batching == "concat":
            _die("--positions all gives one row per token, not per example: use --task-batching sequential")
        fts = []
        for f in args.finetuned:
            sd = _lsd(_exists(f, "fine-tuned checkpoint"), trust_pickle=trust)
            sd = _prefixed(sd, "lm.")
            check_fits(backbone, sd, f"{f}", check_dtype=True)
            fts.append(sd)
        heads = [hf.IdentityHead() for _ in range(n)]
        meta.update(model="hf-causal-lm", component="lm")
    for h in heads:
        if isinstance(h, ClassificationHead):
            h.to(args.device)
    heads_d = dict(zip(names, heads))
    data = {}
    for name, path in zip(names, args.data):
        data[name] = load_task_data(path, batch_size=args.batch_size, transform=transform, tokenizer=tokenizer,
                                    max_length=args.max_length, seed=args.seed, workers=args.workers, task=name)
    backbone.to(args.device).eval()
    _check_tasks(backbone, heads_d, data, args.device, dict(zip(names, args.heads)) if args.heads else None)
    return backbone, fts, heads_d, data, meta


def _first_example(loader):
    ds = getattr(loader, "dataset", None)
    if ds is None or len(ds) == 0:
        return None
    item = ds[0]
    if isinstance(item, (tuple, list)):
        item = item[0]
    return item


def _check_tasks(backbone, heads, data, device, head_files=None) -> None:
    """Run the pretrained backbone and each head on one example per task, so that data of the wrong shape or a
    head of the wrong width fails here, with the task named, rather than inside the optimizer."""
    import torch

    for t, dl in data.items():
        x = _first_example(dl)
        if x is None:
            continue
        with torch.no_grad():
            try:
                if isinstance(x, dict):
                    feats = backbone(**{k: v[None].to(device) for k, v in x.items()})
                else:
                    feats = backbone(x[None].to(device))
            except RuntimeError as e:
                shape = list(x.shape) if isinstance(x, torch.Tensor) else {k: list(v.shape) for k, v in x.items()}
                _die(f"task {t!r}: the model cannot run on its data (one example has shape {shape}): {str(e).splitlines()[0]}")
            try:
                heads[t](feats)
            except RuntimeError:
                w = getattr(heads[t], "weight", None)
                want = f"{w.shape[1]} features" if w is not None else "other features"
                src = f" ({head_files[t]})" if head_files and head_files.get(t) else ""
                _die(f"task {t!r}: its head{src} expects {want}, the model outputs shape {list(feats.shape[1:])}")


def _prefixed(sd, prefix: str):
    """A lazy view adding ``prefix`` to every key (LM checkpoints hold the LM's keys; the wrapper nests it)."""
    from collections.abc import Mapping

    class _View(Mapping):
        def __getitem__(self, k):
            if not k.startswith(prefix):
                raise KeyError(k)
            return sd[k[len(prefix):]]

        def __iter__(self):
            return (prefix + k for k in sd.keys())

        def __len__(self):
            return len(sd)

    return _View()


def _head_norm(choice: str, auto):
    return {"yes": True, "no": False}.get(choice, auto)


def cmd_adamerge(args) -> int:
    import torch

    from .merging import AdaMergedModel
    from .optim import adamerge

    t0 = time.perf_counter()
    n = len(args.finetuned)
    if len(args.data) != n:
        _die(f"--data gives {len(args.data)} paths for {n} fine-tuned checkpoints (one per task, in the same order)")
    lo, hi = args.clamp
    if lo > hi:
        _die(f"--clamp: LO ({lo}) is above HI ({hi})")
    out = Path(args.output_dir)
    ckpt = out / "checkpoint.pt"
    resume = None
    if args.resume:
        resume = ckpt if args.resume == "auto" else Path(args.resume)
        if not resume.is_file():
            _die(f"{resume}: no checkpoint to resume from")
    backbone, fts, heads, data, meta = _build_spec(args, n)
    backbone = backbone.to(args.device).eval()
    tasks = list(heads)
    _log(f"{PROG} adamerge: {n} task(s) [{', '.join(tasks)}], {args.granularity}-wise{' ++ (TIES)' if args.ties else ''}, "
         f"{args.steps} steps (setup {time.perf_counter() - t0:.1f}s)")
    merged = AdaMergedModel(
        backbone, fts, granularity=args.granularity, init=args.init, clamp=(lo, hi),
        ties={"k": args.ties_k} if args.ties else None, task_vector_dtype=_dtype(args.task_vector_dtype),
        backend=args.backend, task_names=tasks, copy=False,
    ).to(args.device)
    del fts

    def on_step(step, loss, model):
        if _STEP_HOOK is not None:
            _STEP_HOOK(step)

    t1 = time.perf_counter()
    try:
        hist = adamerge(merged, heads, data, steps=args.steps, lr=args.lr, batches_per_step=args.batches_per_step,
                        task_batching=args.task_batching, device=args.device, checkpoint=ckpt,
                        checkpoint_every=args.checkpoint_every, resume=resume, progress=not args.no_progress, callback=on_step)
    except KeyboardInterrupt:
        where = f"; resume from {ckpt} with --resume" if ckpt.exists() else " (no checkpoint yet: use --checkpoint-every N)"
        sys.stderr.write(f"{PROG} adamerge: interrupted{where}\n")
        return 130
    t_opt = time.perf_counter() - t1
    with torch.no_grad():
        merged.save_merged(out / "merged.safetensors")
    merged.save_coefficients(out / "coefficients.safetensors")
    table = merged.coefficient_table()
    stride = max(1, len(hist.coefficients) // 100)
    traj = [[float(v) for v in c.float().mean(0).tolist()] for c in hist.coefficients[::stride]]
    _write_json({
        "format": "adamerge_fast.history/1",
        "tasks": tasks,
        "granularity": args.granularity,
        "ties": bool(args.ties),
        "steps": args.steps,
        "loss": [float(x) for x in hist.loss],
        "task_loss": hist.task_loss,
        "coefficient_rows": [r for r, _ in table],
        "coefficients": [v for _, v in table],
        "trajectory_stride": stride,
        "mean_coefficient_trajectory": traj,
        "model": meta,
        "args": {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in vars(args).items() if k != "func"},
        "optimize_seconds": round(t_opt, 3),
    }, out / "history.json")
    last = f"{hist.loss[-1]:.4f}" if hist.loss else "n/a"
    _log(f"{PROG} adamerge: final loss {last}; optimization {t_opt:.1f}s, total {time.perf_counter() - t0:.1f}s; wrote "
         f"{out / 'merged.safetensors'}, coefficients.safetensors, history.json")
    print(merged.format_coefficients(max_rows=24))
    return 0


# -------------------------------------------------------------------------------------------------- plot
def _save_fig(fig, path) -> None:
    from .io import atomic_path

    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_coefficients(rows: Sequence[str], tasks: Sequence[str], values, path, title: str | None = None) -> Path:
    """Heatmap of a coefficient table (rows: parameter tensors or "all"; columns: tasks), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    v = np.asarray(values, dtype=float).reshape(len(rows), len(tasks))
    h = min(max(2.0, 0.16 * len(rows) + 1.2), 60.0)
    w = max(4.0, 0.9 * len(tasks) + 3.5)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7 if len(rows) > 30 else 9)
    ax.set_xlabel("task")
    ax.set_ylabel("layer (parameter tensor)" if len(rows) > 1 else "")
    fig.colorbar(im, ax=ax, label="merging coefficient λ")
    ax.set_title(title or "AdaMerging coefficients")
    _save_fig(fig, path)
    plt.close(fig)
    return Path(path)


def plot_loss(loss: Sequence[float], path, task_loss: Sequence[dict] | None = None, title: str | None = None) -> Path:
    """Entropy loss per step (sum over tasks, and each task's) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(1, len(loss) + 1), loss, label="sum over tasks", color="black", lw=1.5)
    if task_loss:
        for t in task_loss[0]:
            ax.plot(range(1, len(task_loss) + 1), [d[t] for d in task_loss], lw=0.8, alpha=0.7, label=t)
    ax.set_xlabel("step")
    ax.set_ylabel("mean prediction entropy")
    ax.set_title(title or "AdaMerging objective")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)
    return Path(path)


def cmd_plot(args) -> int:
    run = _exists(args.run, "run directory or history.json")
    hist_path = run / "history.json" if run.is_dir() else run
    if not hist_path.is_file():
        _die(f"{run}: no history.json (is it an adamerge output directory?)")
    try:
        h = json.loads(hist_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        _die(f"{hist_path}: not a JSON file ({e})")
    if not isinstance(h, dict) or h.get("format") != "adamerge_fast.history/1":
        _die(f"{hist_path}: not an adamerge history file")
    out = Path(args.output_dir) if args.output_dir else hist_path.parent
    pre = f"{args.title}: " if args.title else ""
    p1 = plot_coefficients(h["coefficient_rows"], h["tasks"], h["coefficients"], out / "coefficients.png",
                           f"{pre}{h['granularity']}-wise AdaMerging{'++' if h.get('ties') else ''} coefficients")
    p2 = plot_loss(h["loss"], out / "loss.png", h.get("task_loss"), f"{pre}entropy loss")
    print(p1)
    print(p2)
    return 0


# --------------------------------------------------------------------------------------------- demo/bench
def cmd_demo(args) -> int:
    from .demo import run

    run(args)
    return 0


def cmd_bench(args) -> int:
    try:
        bench = importlib.import_module("adamerge_fast.bench")
    except ModuleNotFoundError as e:
        if e.name not in ("adamerge_fast.bench",):
            raise
        _die("the benchmarks are not available: adamerge_fast.bench is missing from this installation")
    rc = bench.main(list(args.bench_args))
    return int(rc or 0)


# -------------------------------------------------------------------------------------------------- main
def _user_error_types():
    from .io import CheckpointError
    from .ops import BackendUnavailableError

    return (UserError, CheckpointError, BackendUnavailableError, ValueError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ImportError, KeyError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        msg = f"missing key {e.args[0]!r}"
    if isinstance(e, ImportError) and not msg:
        msg = "import failed"
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or os.environ.get("ADAMERGE_DEBUG") == "1"
    parser = build_parser()
    rest = argv[1:] if argv[:1] == ["--debug"] else argv
    try:
        if rest[:1] == ["bench"]:  # everything after "bench" belongs to the benchmarks' own parser
            args = argparse.Namespace(command="bench", bench_args=rest[1:], func=cmd_bench, debug=debug)
        else:
            args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    debug = debug or args.debug
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except _user_error_types() as e:
        if debug:
            raise
        sys.stderr.write(f"{PROG} {args.command}: error: {_one_line(e)}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
