"""The ``adamerge-fast`` command line (also ``python -m adamerge_fast``).

Subcommands:

- ``merge``: data-free merges of checkpoint files (weight averaging, task arithmetic, TIES, DARE) -> safetensors.
- ``adamerge``: AdaMerging (task-wise, layer-wise; ``--ties`` for AdaMerging++) of a model built by a model
  adapter (:mod:`adamerge_fast.models`): an open_clip image encoder (zero-shot heads from class-name files),
  any module built by ``--model-factory`` (heads from checkpoint files), a local Hugging Face CLIP or causal LM
  (next-token entropy). Writes the merged model (safetensors), the coefficients (safetensors) and the history
  (JSON, :func:`adamerge_fast.optim.save_history`); checkpoints and ``--resume``.
- ``plot``: coefficient heatmap (parameter tensor x task) and loss curve of an ``adamerge`` run (PNG).
- ``demo``: the offline digits demo (:mod:`adamerge_fast.demo`).
- ``bench``: the AdaMerging step benchmark of a source checkout (``benchmarks.adamerging_step``).

User errors (a missing or unreadable file, a checkpoint of another architecture, a task without data, a bad option
value, a full disk, a NaN in a result) print one line to stderr and exit with status 1 (2 for command-line usage
errors, 130 for Ctrl-C, also during the start-up imports); ``--debug`` shows the traceback instead. Output locations,
``--device`` and ``--backend`` are checked before any model or data is loaded; an output that would replace an input,
or an earlier run's checkpoint (without ``--resume``/``--overwrite``), is refused.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

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
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
    return v


def _positive_int(s: str) -> int:
    return _number(int, s, lambda v: v >= 1, ">= 1")


def _nonneg_int(s: str) -> int:
    return _number(int, s, lambda v: v >= 0, ">= 0")


def _positive_float(s: str) -> float:
    return _number(float, s, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _finite_float(s: str) -> float:
    return _number(float, s, math.isfinite, "a finite number")


def _not_nan_float(s: str) -> float:
    return _number(float, s, lambda v: not math.isnan(v), "a number (not NaN)")


def _fraction(s: str) -> float:
    return _number(float, s, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def _drop_rate(s: str) -> float:
    return _number(float, s, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


_QUANT_DTYPES = ("int4", "int8")  # quantized task-vector storage (adamerge_fast/ops/quant.py)
_TV_DTYPES = sorted(_DTYPES) + list(_QUANT_DTYPES)
_TV_DTYPE_HELP = ("; int8: one scale per output row, int4: a scale and zero point per 128 input columns, for "
                  "parameters of 2+ dims (the kernels read them without dequantizing in memory)")


def _dtype(name: str | None):
    """A ``--task-vector-dtype`` value: None, a torch dtype, or a quantized format string (``"int8"``/``"int4"``)."""
    import torch

    if name in _QUANT_DTYPES:
        return name
    return None if name is None else getattr(torch, _DTYPES[name])


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import add_arguments as add_demo_arguments
    from .demo_lora import add_arguments as add_demo_lora_arguments
    from .ops import BACKEND_NAMES

    p = _Parser(prog=PROG, description="Fast AdaMerging (adaptive model merging, Yang et al. ICLR 2024) and "
                "static merges.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # ---- merge
    m = sub.add_parser("merge", help="data-free merge of checkpoints (average, task arithmetic, TIES, DARE)",
                       description="Merge fine-tuned checkpoints of one architecture without data, one tensor at a "
                       "time (peak memory about K+2 times the largest tensor): a .safetensors file, or a Hugging "
                       "Face directory (sharded, with the pretrained directory's config and tokenizer files). Every "
                       "floating tensor of the pretrained checkpoint is merged from float32 task vectors and rounded "
                       "to its dtype once; other tensors are copied from it.")
    m.add_argument("--method", required=True, choices=["average", "task-arithmetic", "ties", "dare"],
                   help="average: theta0 + mean_k tau_k; task-arithmetic: theta0 + scale*sum_k w_k tau_k; ties: "
                   "TIES-merging; dare: drop-and-rescale the task vectors, then task arithmetic (or TIES with "
                   "--dare-then ties)")
    m.add_argument("--pretrained", required=True, metavar="PATH",
                   help="pretrained checkpoint (safetensors, HF dir, or torch state dict)")
    m.add_argument("--finetuned", required=True, nargs="+", metavar="PATH", help="fine-tuned checkpoints, one per task")
    m.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="FILE.safetensors (one file) or a directory (Hugging Face layout)")
    m.add_argument("--like", choices=["mergekit"], default=None,
                   help="mergekit 0.1.5's semantics and float32 arithmetic (scale = its lambda, default 1; "
                   "per-tensor TIES keeping exactly int(k*n) entries; +1 for zero sign sums; L1 DARE rescaling; "
                   "see docs/cli.md)")
    m.add_argument("--scale", type=_finite_float, default=None,
                   help="task-arithmetic / TIES / DARE scaling coefficient (mergekit's lambda; default 0.3, "
                   "--like mergekit: 1)")
    m.add_argument("--weights", type=_finite_float, nargs="+", default=None, metavar="W",
                   help="one weight per fine-tuned checkpoint (task arithmetic, TIES, DARE; default 1 each)")
    m.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of the weights (TIES: the weighted disjoint mean, same as --ties-merge "
                   "mean)")
    m.add_argument("--ties-k", type=_fraction, default=None,
                   help="TIES: fraction of each task vector kept (default 0.2; mergekit's density)")
    m.add_argument("--ties-merge", choices=["mean", "sum"], default=None,
                   help="TIES: disjoint mean or sum (default mean)")
    m.add_argument("--ties-scope", choices=["global", "tensor"], default=None,
                   help="TIES: trim over each task's whole vector (default; the official AdaMerging++ code) or per "
                   "tensor (mergekit)")
    m.add_argument("--ties-keep", choices=["ties", "exact"], default=None,
                   help="TIES: keep every entry tied with the threshold (default; official) or exactly "
                   "max(1, int(k*n)) entries (mergekit; ties broken by position)")
    m.add_argument("--sign-tie", choices=["majority", "positive"], default=None,
                   help="TIES: sign of entries whose sign sum is zero: the majority sign (default; official) or +1 "
                   "(mergekit)")
    m.add_argument("--dare-p", type=_drop_rate, default=None, help="DARE: drop probability (default 0.5)")
    m.add_argument("--dare-then", choices=["task-arithmetic", "ties"], default=None,
                   help="DARE: merge the sparsified vectors with (default task-arithmetic; --like mergekit: ties)")
    m.add_argument("--dare-rescale", choices=["inverse", "l1", "none"], default=None,
                   help="DARE: rescale kept entries by 1/(1-p) (default), to the tensor's L1 norm (mergekit), or not")
    m.add_argument("--seed", type=int, default=0, help="DARE random seed")
    m.add_argument("--task-vector-dtype", choices=_TV_DTYPES, default=None,
                   help="round the task vectors to this dtype before merging (default: keep them in float32; "
                   "int8/int4: quantized and dequantized per tensor, as in task vector quantization)")
    m.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="directory output: largest shard (e.g. 5GB, 500MB, 2GiB; default 5GB)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    m.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that are whole pickled objects (runs code from the file)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    # ---- adamerge
    a = sub.add_parser("adamerge",
                       help="AdaMerging: learn merging coefficients by entropy minimization on unlabeled data",
                       description="Learn task-wise or layer-wise merging coefficients (AdaMerging; AdaMerging++ "
                       "with --ties) by minimizing the prediction entropy on each task's unlabeled data. Give ONE "
                       "model spec: --open-clip NAME (image encoder, zero-shot heads from --classnames files), "
                       "--model-factory MODULE:FUNCTION (heads from --heads files), --hf-clip (a Hugging Face CLIP "
                       "directory), or --hf-causal-lm (text data, next-token entropy).")
    spec = a.add_argument_group("model (one of)")
    g = spec.add_mutually_exclusive_group(required=True)
    g.add_argument("--open-clip", metavar="NAME",
                   help="open_clip model name: ViT-B/32, ViT-B/16, ViT-L/14 (or ViT-B-32 ...)")
    g.add_argument("--model-factory", metavar="MODULE:FUNCTION", help="a function returning the backbone nn.Module "
                   "skeleton (MODULE may be a dotted module name or a path to a .py file)")
    g.add_argument("--hf-clip", action="store_true", help="--pretrained is a local Hugging Face CLIP directory "
                   "(CLIPModel; CLIPVisionModelWithProjection with --heads): merge its image encoder, zero-shot heads "
                   "from --classnames")
    g.add_argument("--hf-causal-lm", action="store_true",
                   help="--pretrained/--finetuned are local Hugging Face causal LM directories")
    a.add_argument("--pretrained", required=True, metavar="PATH",
                   help="pretrained weights (a local file or directory; nothing is downloaded)")
    a.add_argument("--finetuned", required=True, nargs="+", metavar="PATH", help="fine-tuned checkpoints, one per task")
    a.add_argument("--data", required=True, nargs="+", metavar="PATH", help="unlabeled data per task: image folder, "
                   ".pt/.npy/.safetensors tensor file, or .txt (LMs)")
    a.add_argument("--task-names", nargs="+", metavar="NAME", help="task names (default: the data paths' stems)")
    a.add_argument("--classnames", nargs="+", metavar="FILE",
                   help="open_clip / HF CLIP: one class name per line, one file per task")
    a.add_argument("--templates", metavar="FILE", help="open_clip / HF CLIP: prompt templates, one per line with {} "
                   "for the class name (default: 'a photo of a {}.')")
    a.add_argument("--heads", nargs="+", metavar="FILE",
                   help="classification heads (weight [C, D], optional bias), one per task")
    a.add_argument("--head-normalize", choices=["auto", "yes", "no"], default="auto",
                   help="L2-normalize features before a --heads head (auto: yes for CLIP models; --model-factory: "
                   "as stored in the file, else no)")
    a.add_argument("--tokenizer", metavar="DIR", help="HF CLIP / LM: tokenizer directory (default: --pretrained)")
    a.add_argument("--max-length", type=_positive_int, default=64,
                   help="LM: tokens per example (padded/truncated, default 64)")
    a.add_argument("--positions", choices=["last", "all"], default="last",
                   help="LM: entropy of the next token after the last real token, or at every real token (each task's "
                   "token-mean over its real tokens)")
    a.add_argument("--fused-entropy", action="store_true",
                   help="LM: compute the entropy from the hidden states and the LM head chunk by chunk "
                   "(ops.linear_entropy), never holding the [tokens, vocabulary] logits")
    a.add_argument("--image-size", type=_positive_int, default=224,
                   help="image folders without open_clip: resize/crop size (default 224)")
    a.add_argument("--granularity", choices=["layer", "task"], default="layer",
                   help="one coefficient per parameter tensor per task (layer), or per task (default layer)")
    a.add_argument("--ties", action="store_true",
                   help="AdaMerging++: learn the coefficients over TIES-trimmed task vectors")
    a.add_argument("--ties-k", type=_fraction, default=0.2,
                   help="AdaMerging++: fraction of each task vector kept (default 0.2)")
    a.add_argument("--init", type=_finite_float, default=0.3, help="initial coefficient (default 0.3, the paper's)")
    a.add_argument("--clamp", type=_not_nan_float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="coefficient range (default 0 1)")
    a.add_argument("--steps", type=_nonneg_int, default=500, help="optimizer steps (default 500)")
    a.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    a.add_argument("--batch-size", type=_positive_int, default=16, help="examples per task per batch (default 16)")
    a.add_argument("--batches-per-step", type=_positive_int, default=1, help="batches per task per step (default 1)")
    a.add_argument("--batch-reduction", choices=["mean", "sum"], default="mean",
                   help="a task's loss over its batches of a step: mean (default) or sum (the official script's step: "
                   "--batches-per-step 2 --batch-reduction sum)")
    a.add_argument("--task-batching", choices=["concat", "sequential"], default="concat",
                   help="one forward over all tasks' batches, or one per task")
    a.add_argument("--backend", default="auto", help=f"op backend: auto, {', '.join(BACKEND_NAMES)} (default auto)")
    a.add_argument("--task-vector-dtype", choices=_TV_DTYPES, default=None,
                   help="storage dtype of the task vectors (default: the checkpoints')" + _TV_DTYPE_HELP)
    a.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the activations of the model's blocks in the backward instead of keeping them "
                   "(torch.utils.checkpoint): less memory, one more forward per step")
    a.add_argument("--plan", action="store_true",
                   help="print the memory plan (pretrained weights, task vectors, coefficients, activations, ...) "
                   "and exit without loading the fine-tuned models")
    a.add_argument("--max-memory", metavar="SIZE",
                   help="refuse to start when the memory plan exceeds SIZE (e.g. 16GiB, 8G, 512MiB), naming what "
                   "would fit")
    a.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a.add_argument("--seed", type=int, default=0, help="data shuffling seed (default 0)")
    a.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader worker processes (default 0)")
    a.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                   help="where the merged model (merged.safetensors; merged/ for Hugging Face models; also "
                   "merged_clip.safetensors for open_clip), coefficients.safetensors, history.json, checkpoint.pt go")
    a.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="Hugging Face output: largest weight shard of merged/ (default 5GB)")
    a.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N",
                   help="write a resumable checkpoint every N steps (0: only at the end)")
    a.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: OUTPUT_DIR/checkpoint.pt); the run's algorithm settings "
                   "must be those stored in it")
    a.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT_DIR that holds an earlier run's checkpoint, replacing it")
    a.add_argument("--cache-dir", metavar="DIR",
                   help="zero-shot head cache (default $ADAMERGE_CACHE or ~/.cache/adamerge_fast)")
    a.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that are whole pickled objects (runs code from the file)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_adamerge)

    # ---- plot
    pl = sub.add_parser("plot", help="coefficient heatmap and loss curve of an adamerge run (PNG)",
                        description="Plot an adamerge run: coefficients.png (parameter tensor x task heatmap) and "
                        "loss.png.")
    pl.add_argument("run", metavar="RUN", help="an adamerge output directory, or its history.json")
    pl.add_argument("-o", "--output-dir", metavar="DIR", help="where to write the PNGs (default: the run directory)")
    pl.add_argument("--title", default=None, help="figure title prefix")
    pl.set_defaults(func=cmd_plot)

    # ---- demo
    d = sub.add_parser("demo", help="offline CPU demo on scikit-learn's digits (about 1-2 minutes)",
                       description="Create a pretrained backbone and fine-tuned task models on scikit-learn's "
                       "digits (cached), merge them with every method, print one table of held-out accuracy.")
    add_demo_arguments(d)
    add_demo_lora_arguments(d)
    d.set_defaults(func=cmd_demo)

    # ---- bench
    b = sub.add_parser("bench", help="run the AdaMerging step benchmark of a source checkout "
                       "(benchmarks.adamerging_step); arguments are passed through", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


# ------------------------------------------------------------------------------------------------- utils
def _die(msg: str) -> None:
    raise UserError(msg)


def _log(msg: str) -> None:
    """Progress information: stdout (stderr carries progress bars and errors only)."""
    print(msg, flush=True)


def _check_writable_dir(d: Path, what: str) -> None:
    """``d`` (or, when it does not exist yet, the nearest existing directory above it) takes new files; else a
    one-line error naming ``what`` (the flag) and the reason (read-only file system, permission denied)."""
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        _die(f"{what} {d}: {p} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        _die(f"{what} {d}: cannot write in {p} ({e.strerror or e})")


def _check_device(name: str):
    """The ``torch.device`` of ``--device``, checked to exist here (before any model or data is loaded)."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        _die(f"--device {name!r} is not a torch device (expected cpu, cuda, cuda:N, ...)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            _die(f"--device {name}: CUDA is not available here ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _die(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # torch raises RuntimeError/AssertionError for an unusable device type
            _die(f"--device {name}: not usable here ({str(e).strip().splitlines()[0] if str(e).strip() else e})")
    return dev


def _check_backend(name: str, device) -> None:
    """``--backend`` names a registered backend that runs on ``device`` (``auto`` always does)."""
    from .ops import BACKEND_NAMES, BackendUnavailableError, get_backend

    if name == "auto":
        return
    if name not in BACKEND_NAMES:
        _die(f"--backend {name!r}: unknown backend; expected one of auto, {', '.join(BACKEND_NAMES)}")
    try:
        reason = get_backend(name).unavailable_reason(device)
    except BackendUnavailableError as e:
        _die(f"--backend {name}: {e}")
    if reason is not None:
        _die(f"--backend {name} cannot run on {device}: {reason}")


# ------------------------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    from ._compat import mmap_large_allocations
    from .export import parse_size
    from .io import check_not_input
    from .merging.stream import format_summary, merge_checkpoints

    t0 = time.perf_counter()
    mmap_large_allocations()  # this process streams tensor-sized buffers: keep freed ones from staying resident
    out = Path(args.output)
    parse_size(args.max_shard_size)  # a bad size fails before any reading
    check_not_input(out, [args.pretrained, *args.finetuned], "merged checkpoint (-o)")
    _check_writable_dir(out.parent if out.parent != Path("") else Path("."), "-o")
    _log(f"{PROG} merge: {len(args.finetuned)} task(s), method {args.method}"
         f"{' (like mergekit)' if args.like else ''} -> {out}")
    merge_checkpoints(
        args.pretrained, args.finetuned, args.method, out, scale=args.scale, weights=args.weights,
        normalize=args.normalize, ties_k=args.ties_k, ties_merge=args.ties_merge, ties_scope=args.ties_scope,
        ties_keep=args.ties_keep, sign_tie=args.sign_tie, dare_p=args.dare_p,
        dare_then=args.dare_then, dare_rescale=args.dare_rescale, seed=args.seed,
        task_vector_dtype=_dtype(args.task_vector_dtype), like=args.like, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty(),
        trust_pickle=args.trust_pickle,
    )
    _log(f"{PROG} merge: wrote {out} in {format_summary(time.perf_counter() - t0)}")
    return 0


# ---------------------------------------------------------------------------------------------- adamerge
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


def _model_adapters() -> dict:
    """The model flags of ``adamerge`` (argparse dests) -> ``(build function, the parameter that takes the flag's
    value or None for a switch, the options passed on)``; every build function also takes ``pretrained``,
    ``finetuned``, ``tasks`` and ``trust_pickle``, and returns a :class:`~adamerge_fast.models.spec.TaskSpec`."""
    from .models import factory, hf, open_clip

    image = ("heads", "head_normalize", "image_size")
    zero_shot = ("classnames", "templates", "cache_dir", "progress")
    return {
        "open_clip": (open_clip.build, "name", ("heads", "head_normalize") + zero_shot),
        "model_factory": (factory.build, "factory", image),
        "hf_clip": (hf.build_clip, None, image + zero_shot + ("tokenizer",)),
        "hf_causal_lm": (hf.build_causal_lm, None, ("tokenizer", "positions", "fused_entropy")),
    }


def _option(args, name: str):
    """An adapter option's value from the parsed command line (plain Python values)."""
    if name == "head_normalize":
        return {"yes": True, "no": False, "auto": None}[args.head_normalize]
    if name == "progress":
        return not args.no_progress
    return getattr(args, name)


def _build_spec(args, tasks: list[str]):
    """The :class:`~adamerge_fast.models.spec.TaskSpec` of the chosen model flag's adapter."""
    for flag, (build, value_param, options) in _model_adapters().items():
        value = getattr(args, flag)
        if value:
            kw = {o: _option(args, o) for o in options}
            if value_param is not None:
                kw[value_param] = value
            return build(pretrained=args.pretrained, finetuned=args.finetuned, tasks=tasks,
                         trust_pickle=args.trust_pickle, **kw)
    raise AssertionError("argparse requires one model flag")


_ADAMERGE_OUTPUTS = ("merged.safetensors", "coefficients.safetensors", "history.json", "checkpoint.pt")


def _check_adamerge_outputs(args, out: Path, ckpt: Path, resume: Path | None) -> None:
    """``-o``: a directory (or a path to create one) that takes new files, whose outputs replace no input, and whose
    checkpoint of an earlier run is replaced only when that run is resumed or ``--overwrite`` is given."""
    from .io import check_not_input

    if out.exists() and not out.is_dir():
        _die(f"-o {out}: exists and is not a directory")
    if ckpt.exists() and not args.overwrite and not (resume is not None and resume.resolve() == ckpt.resolve()):
        _die(f"-o {out}: holds the checkpoint of an earlier run ({ckpt}); continue that run with --resume, replace "
             "it with --overwrite, or choose another output directory")
    inputs = [args.pretrained, *args.finetuned, *args.data, *(args.heads or []), *(args.classnames or []),
              *(p for p in (args.templates, args.tokenizer) if p)]
    for name in _ADAMERGE_OUTPUTS:
        check_not_input(out / name, inputs, f"output {name}")
    _check_writable_dir(out, "-o")


def _run_settings(args) -> dict:
    """The command-line options besides the optimizer's and the model's that decide a run's result (the data order
    and what a batch holds), stored in its checkpoints so that ``--resume`` refuses to change them."""
    return {"seed": args.seed, "batch_size": args.batch_size, "max_length": args.max_length,
            "positions": args.positions, "image_size": args.image_size, "head_normalize": args.head_normalize}


def cmd_adamerge(args) -> int:
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
    # everything the options alone decide, before any model or data is loaded
    _check_adamerge_outputs(args, out, ckpt, resume)
    device = _check_device(args.device)
    _check_backend(args.backend, device)

    from .data import load_task_data
    from .merging import AdaMergedModel
    from .optim import adamerge, save_history

    limit = None
    if args.max_memory is not None:
        from .memory import parse_bytes

        limit = parse_bytes(args.max_memory)
    names = _task_names(args, n)
    spec = _build_spec(args, names)
    data = {t: load_task_data(path, batch_size=args.batch_size, transform=spec.transform, tokenizer=spec.tokenizer,
                              max_length=args.max_length, seed=args.seed, workers=args.workers, task=t)
            for t, path in zip(names, args.data, strict=True)}
    spec.to(args.device).check_data(data, args.device)
    _log(f"{PROG} adamerge: {n} task(s) [{', '.join(spec.tasks)}], {args.granularity}-wise"
         f"{' ++ (TIES)' if args.ties else ''}, {args.steps} steps (setup {time.perf_counter() - t0:.1f}s)")
    from .adapters import is_lora_source

    adapters = any(is_lora_source(f) for f in spec.finetuned)
    if args.plan or limit is not None:
        if adapters:
            _die("--plan / --max-memory: the memory plan covers dense task vectors, not LoRA adapters")
        plan = _memory_plan(args, spec, data, limit)
        if args.plan:
            print(plan.format())
            return 0

    def one_at_a_time(sources: list):  # each fine-tuned checkpoint is dropped once its rows are written
        while sources:
            yield sources.pop(0)

    merged = AdaMergedModel(
        spec.backbone, spec.finetuned if adapters else one_at_a_time(spec.finetuned), granularity=args.granularity,
        init=args.init, clamp=(lo, hi),
        ties={"k": args.ties_k} if args.ties else None, task_vector_dtype=_dtype(args.task_vector_dtype),
        backend=args.backend, task_names=spec.tasks, copy=False, release_finetuned=True,
        checkpoint_activations=args.checkpoint_activations,
    ).to(args.device)
    spec.finetuned.clear()  # the task vectors hold what the merge needs

    def on_step(step, loss, model):
        if _STEP_HOOK is not None:
            _STEP_HOOK(step)

    t1 = time.perf_counter()
    try:
        hist = adamerge(merged, spec.heads, data, steps=args.steps, lr=args.lr, batches_per_step=args.batches_per_step,
                        batch_reduction=args.batch_reduction, task_batching=args.task_batching, device=args.device,
                        checkpoint=ckpt, checkpoint_every=args.checkpoint_every or None, resume=resume,
                        progress=not args.no_progress, callback=on_step, settings=_run_settings(args))
    except KeyboardInterrupt:
        where = (f"; resume from {ckpt} with --resume" if ckpt.exists()
                 else " (no checkpoint yet: use --checkpoint-every N)")
        sys.stderr.write(f"{PROG} adamerge: interrupted{where}\n")
        return 130
    t_opt = time.perf_counter() - t1
    written = _write_merged(args, spec, merged, out)
    merged.save_coefficients(out / "coefficients.safetensors")
    options = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
               for k, v in vars(args).items() if k != "func"}
    save_history(out / "history.json", hist, merged, {"ties": bool(args.ties), "steps": args.steps,
                                                     "model": spec.metadata, "args": options,
                                                     "optimize_seconds": round(t_opt, 3)})
    last = f"{hist.loss[-1]:.4f}" if hist.loss else "n/a"
    _log(f"{PROG} adamerge: final loss {last}; optimization {t_opt:.1f}s, total {time.perf_counter() - t0:.1f}s; "
         f"wrote {', '.join(written)}, coefficients.safetensors, history.json")
    print(merged.format_coefficients(max_rows=24))
    return 0


def _write_merged(args, spec, merged, out: Path) -> list[str]:
    """The merged model as the user's library loads it: a Hugging Face directory ``merged/`` for HF models (with
    ``mergekit_config.yml`` re-applying the coefficients for causal LMs without TIES); for open_clip the merged
    image encoder's state dict ``merged.safetensors`` and the full CLIP state dict ``merged_clip.safetensors``;
    else the backbone's state dict ``merged.safetensors``."""
    from .export import export_merged, mergekit_config, write_mergekit_config

    written = []
    if spec.export is None or spec.export.files_from is None:
        merged.save_merged(out / "merged.safetensors")
        written.append(str(out / "merged.safetensors"))
    if spec.export is None:
        return written
    path = export_merged(merged, spec.export, out / spec.export.name, max_shard_size=args.max_shard_size,
                         overwrite=True)
    written.append(str(path))
    if args.hf_causal_lm:
        from .adapters import is_lora_source

        if args.ties:
            _log(f"{PROG} adamerge: no mergekit_config.yml: mergekit's task arithmetic cannot re-apply coefficients "
                 "learned over TIES-split task vectors")
        elif any(is_lora_source(f) for f in args.finetuned):
            _log(f"{PROG} adamerge: no mergekit_config.yml: the fine-tuned sources are LoRA adapters, which its "
                 "models list does not take as they are")
        else:
            from .io import shape_dtype

            dtype = shape_dtype(spec.export.source(), spec.export.key(merged.param_names[0]))[1]
            cfg = mergekit_config(merged, spec.export, args.pretrained, args.finetuned,
                                  str(dtype).removeprefix("torch."))
            written.append(str(write_mergekit_config(out / "mergekit_config.yml", cfg)))
    return written


def _memory_plan(args, spec, data, limit: int | None):
    """The run's memory plan (:func:`adamerge_fast.memory.plan`), logged in one line; with ``limit``, a run that
    would not fit is refused (one line: the numbers and what would fit) before any fine-tuned tensor is read."""
    from .io import LazyStateDict, PrefixView
    from .memory import alternatives, fmt_bytes, has_blocks, module_bytes, plan, rss_bytes, tensor_bytes
    from .optim import _inputs

    def lazy(sd) -> bool:
        while isinstance(sd, PrefixView):
            sd = sd.sd
        return isinstance(sd, LazyStateDict)

    in_memory = sum(tensor_bytes(sd.values()) for sd in spec.finetuned if not lazy(sd))
    heads_bytes = sum(module_bytes(h) for h in spec.heads.values())
    process = max(0, (rss_bytes() or 0) - module_bytes(spec.backbone) - heads_bytes - in_memory)
    example = _inputs(next(iter(data[spec.tasks[0]])), spec.tasks[0])
    options = dict(batch_size=args.batch_size, task_batching=args.task_batching,
                   task_vector_dtype=_dtype(args.task_vector_dtype), checkpoint_activations=args.checkpoint_activations)

    def make(**opts):
        return plan(spec.backbone, len(spec.tasks), example, heads=spec.heads, batches_per_step=args.batches_per_step,
                    steps=args.steps, granularity=args.granularity, ties=args.ties, backend=args.backend,
                    finetuned_in_memory=in_memory, released=True, process=process, device=args.device, **opts)

    p = make(**options)
    _log(f"{PROG} adamerge: memory plan {p.summary()}")
    if limit is not None and not p.fits(limit):
        fits = alternatives(limit, make, options, can_checkpoint=has_blocks(spec.backbone))
        hint = ("; would fit: " + ", ".join(f"{o} ({fmt_bytes(q.total)})" for o, q in fits)) if fits else (
            "; no single change of task-vector dtype, task batching, checkpointing or batch size fits")
        _die(f"the memory plan needs {fmt_bytes(p.total)} > --max-memory {fmt_bytes(limit)} "
             f"(build {fmt_bytes(p.build)}, step {fmt_bytes(p.step)}: {p.summary()}){hint}")
    return p


# -------------------------------------------------------------------------------------------------- plot
def cmd_plot(args) -> int:
    from .io import existing
    from .optim import load_history
    from .plot import plot_coefficients, plot_loss

    run = existing(args.run, "run directory or history.json")
    hist_path = run / "history.json" if run.is_dir() else run
    if not hist_path.is_file():
        _die(f"{run}: no history.json (is it an adamerge output directory?)")
    h = load_history(hist_path)
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
    if args.lora:  # the second mode: full fine-tunes vs LoRA adapters
        from .demo_lora import run as run_lora

        run_lora(args)
        return 0
    from .demo import run

    run(args)
    return 0


def _checkout_root() -> Path:
    """The directory above the package: the source checkout's root when the package is installed editable."""
    return Path(__file__).resolve().parent.parent


def cmd_bench(args) -> int:
    root = _checkout_root()
    if not (root / "benchmarks" / "adamerging_step" / "__init__.py").is_file():
        _die("the benchmarks live in the source checkout (benchmarks/); run python -m benchmarks.adamerging_step "
             "from a clone")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    harness = importlib.import_module("benchmarks.adamerging_step")
    return int(harness.main(list(args.bench_args), prog=f"{PROG} bench") or 0)


# -------------------------------------------------------------------------------------------------- main
def _user_error_types():
    from .io import CheckpointError
    from .ops import BackendUnavailableError

    return (UserError, CheckpointError, BackendUnavailableError, ValueError, OSError, ImportError, KeyError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        msg = f"missing key {e.args[0]!r}"
    if isinstance(e, OSError) and e.filename and e.strerror:  # a full disk, a read-only location: name the file
        msg = f"{e.filename}: {e.strerror}"
    if isinstance(e, ImportError) and not msg:
        msg = "import failed"
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or os.environ.get("ADAMERGE_DEBUG") == "1"
    rest = argv[1:] if argv[:1] == ["--debug"] else argv
    try:
        if rest[:1] == ["bench"]:  # everything after "bench" belongs to the benchmarks' own parser
            args = argparse.Namespace(command="bench", bench_args=rest[1:], func=cmd_bench, debug=debug)
        else:
            args = build_parser().parse_args(argv)  # imports torch (the backend names): Ctrl-C lands here first
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    debug = debug or args.debug
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except _user_error_types() as e:
        if debug:
            raise
        sys.stderr.write(f"{PROG} {args.command}: error: {_one_line(e)}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
