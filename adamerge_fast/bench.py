"""End-to-end AdaMerging step benchmark: ours against the peers' approaches, side by side in one run.

``adamerge-fast bench`` and ``python -m benchmarks.adamerging_step`` both call :func:`main`.

Methods (all layer-wise, init 0.3, clamp [0, 1], Adam lr 1e-3 betas (0.9, 0.999), one batch per task per step,
the loss the sum over tasks of the batch-mean softmax entropy of a fixed per-task head):

- ``official`` (a): the official AdaMerging code (EnnengYang/AdaMerging, ``main_layer_wise_adamerging.py``):
  for every task batch, every parameter is merged on the CPU with autograd (``sum(p_k * lambda_k)`` over the
  pretrained weights with coefficient 1 and the K task vectors, a Python loop over parameters), copied to the
  device and run through the model (``torch.func.functional_call`` in place of its ``make_functional`` /
  ``load_weights``); the task losses are summed and one backward and one Adam step follow. Each task's graph,
  holding that task's device copy of the merged weights, lives until the backward.
- ``functional_call`` (b): FusionBench's layer-wise AdaMerging (``LayerWiseMergedModel.merge_weights`` +
  ``LayerWiseAdaMergingAlgorithm.test_time_adaptation``): merged on the device once per step by a Python
  loop over tasks and parameters (``sd[name] = sd[name] + tau * w``), a ``functional_call`` forward and a
  ``backward(retain_graph=True)`` per task (autograd holds the merged weights; every backward builds their
  full-size gradients and multiplies them with every task vector), Adam, then the merge for the next step.
- ``ours-<backend>-<concat|sequential>`` (c, d): :class:`adamerge_fast.AdaMergedModel` driven by
  :func:`adamerge_fast.adamerge` itself (run in a worker thread and paused between steps, so what is timed is
  the library's own loop) for every backend available on the device (``reference``, ``cpu``, ``triton``,
  ``cuda``) and both ``task_batching`` modes.

Both peers use the official ``softmax_entropy`` formula (FusionBench adds an ``eps`` inside the log; left out
so all methods compute the same function). Before anything is timed, every method runs ``--check-steps`` steps
from the same initial coefficients on the same batches and its losses and coefficient tables are compared with
``official`` (fp32: 1e-5 absolute on the coefficients, 1e-4 relative on the loss); a mismatch aborts.

Timing: all methods live in one process and their steps are interleaved (ABCABC..., the order rotated every
round) so that a noisy, shared machine affects them alike; only ratios from one run are meaningful. Memory:
each method is re-run in a fresh subprocess (``--mem-steps`` steps) which reports its peak (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the peak RSS, ``VmHWM`` reset after the model and task vectors are
built, and ``ru_maxrss``) and the increase over the state right after the model and task vectors are built.

The floor: ``max(matmul FLOPs / matmul rate, bytes that must move / copy bandwidth)`` with the matmul rate and
copy bandwidth measured in the same run; FLOPs = 3x the backbone forward (forward, input gradient, coefficient
gradient ``dy^T x``) + 2x the frozen heads; bytes = every task vector and pretrained weight read once forward
and once backward, plus every forward activation written and read once.

Workloads (``--workloads``): on the CPU ``vit-small`` (a reduced ViT) and ``vit-b32-cpu`` (the issue's CPU goal:
ViT-B/32 image tower, 8 tasks x 2 images); on CUDA ``vit-b32`` / ``vit-b32-bf16`` (8 tasks x 16 images, fp32 /
bf16 autocast), ``vit-l14`` (bf16 autocast; ``vit-l14-fp32``) and ``llama7b`` (4 decoder layers shaped like
Llama-2-7B, hidden 4096, MLP 11008, K=3 bf16 task vectors, 2 x 256 tokens per task, 32000-way heads). A GPU
workload takes a few minutes (``official`` is slow and capped by ``--max-method-seconds``), so on a machine with a
per-command time limit run one workload per command; each writes its own ``adamerging_step_cuda_<workload>.*``::

    python -m benchmarks.adamerging_step --workloads vit-b32
    python -m benchmarks.adamerging_step --workloads vit-b32-bf16 --no-kernels
    python -m benchmarks.adamerging_step --workloads vit-l14 --no-kernels
    python -m benchmarks.adamerging_step --workloads llama7b --no-kernels

A method that runs out of GPU memory is dropped from the run and reported as such. Results: JSON, markdown and a
PNG under ``benchmarks/results/`` (``--out``), with the device, date, versions and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bench_report import MMAP_THRESHOLD, GiB, _inc, _peak, evaluate_goals, render_markdown, write_results

INIT, LR, BETAS, CLAMP = 0.3, 1e-3, (0.9, 0.999), (0.0, 1.0)
BASELINES = ("official", "functional_call")
OURS_BACKENDS = ("reference", "cpu", "triton", "cuda")
BATCHINGS = ("concat", "sequential")


# ----------------------------------------------------------------------------------------------- imports
def _import_open_clip():
    """open_clip, after the package's torchvision workaround (see adamerge_fast._compat)."""
    from ._compat import import_open_clip

    return import_open_clip()


# ------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def env_info(device: torch.device) -> dict:
    from . import ops

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_model()}",
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "platform": platform.platform(),
        "git": _git_rev(),
        "backend_status": ops.backend_status(device),
        "loadavg_start": _loadavg(),
    }
    try:
        from .ops.cpp_backend import extension_info

        info["extension"] = extension_info()
    except Exception as e:  # not built
        info["extension"] = f"not loaded: {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- workloads
WORKLOADS: dict[str, dict] = {
    # tests only
    "vit-tiny": dict(kind="vit", vision=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
                     embed_dim=32, tasks=3, batch=2, precision="fp32", steps=2),
    "llama-tiny": dict(kind="llama", hidden=64, mlp=172, layers=2, heads=4, vocab=128, seq=16, tasks=3, batch=2,
                       precision="fp32", steps=2),
    "vit-tiny-bf16": dict(kind="vit", vision=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
                          embed_dim=32, tasks=3, batch=2, precision="bf16-autocast", steps=2),
    "llama-tiny-bf16": dict(kind="llama", hidden=64, mlp=172, layers=2, heads=4, vocab=128, seq=16, tasks=3, batch=2,
                            precision="bf16", steps=2),
    # CPU: a reduced ViT that runs in a minute, and the CPU goal workload
    "vit-small": dict(kind="vit", vision=dict(image_size=224, patch_size=32, width=384, layers=6, head_width=64),
                      embed_dim=512, tasks=8, batch=2, precision="fp32", steps=10),
    # (a) takes minutes per step here: after the 2 checked steps it is timed until 60 s are spent (at least 1 step)
    "vit-b32-cpu": dict(kind="vit", model="ViT-B-32", tasks=8, batch=2, precision="fp32", steps=5,
                        max_method_seconds=60, min_steps=1),
    # GPU
    "vit-b32": dict(kind="vit", model="ViT-B-32", tasks=8, batch=16, precision="fp32", steps=10),
    "vit-b32-bf16": dict(kind="vit", model="ViT-B-32", tasks=8, batch=16, precision="bf16-autocast", steps=10),
    # ViT-L/14 at 8 x 16 images keeps ~55 GiB of fp32 activations alive in one concat step: bf16 autocast by default
    "vit-l14": dict(kind="vit", model="ViT-L-14", tasks=8, batch=16, precision="bf16-autocast", steps=10),
    "vit-l14-fp32": dict(kind="vit", model="ViT-L-14", tasks=8, batch=16, precision="fp32", steps=10),
    # 7B-shaped decoder layers, K=3 bf16 task vectors, bf16 weights, 2 x 256 tokens per task, vocab heads
    "llama7b": dict(kind="llama", hidden=4096, mlp=11008, layers=4, heads=32, vocab=32000, seq=256,
                    tasks=3, batch=2, precision="bf16", steps=10),
}
DEFAULT_WORKLOADS = {"cpu": ["vit-small", "vit-b32-cpu"], "cuda": ["vit-b32", "vit-b32-bf16", "vit-l14", "llama7b"]}

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LlamaBlock(nn.Module):
    """A Llama-shaped decoder block: RMSNorm, q/k/v/o projections with causal SDPA (no RoPE), SwiGLU MLP."""

    def __init__(self, hidden: int, mlp: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, D // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaStack(nn.Module):
    """Token embedding, a few decoder blocks, the final RMSNorm; returns hidden states ``[B, T, hidden]``."""

    def __init__(self, vocab: int, hidden: int, mlp: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaBlock(hidden, mlp, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)


@dataclass
class Workload:
    name: str
    spec: dict
    device: torch.device
    model: nn.Module  # the pretrained model (frozen, eval)
    names: list[str]  # the merged parameters, in named_parameters() order: the rows of the coefficient table
    task_vectors: dict[str, torch.Tensor]  # {name: [K, *shape]} on the device
    heads: list[nn.Module]
    batches: list[list[torch.Tensor]]  # [task][pool index] model inputs; step s uses pool index s % len
    autocast: torch.dtype | None
    tv_cpu: dict[str, torch.Tensor] | None = None  # CPU copies for the official baseline (lazily)
    info: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return len(self.heads)

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def batch(self, task: int, step: int) -> torch.Tensor:
        pool = self.batches[task]
        return pool[step % len(pool)]

    def cpu_task_vectors(self) -> dict[str, torch.Tensor]:
        if self.tv_cpu is None:
            self.tv_cpu = self.task_vectors if self.device.type == "cpu" else {n: t.cpu() for n, t in self.task_vectors.items()}
        return self.tv_cpu


def _resolve_spec(name: str, overrides: dict | None = None) -> dict:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    spec = dict(WORKLOADS[name])
    for k, v in (overrides or {}).items():
        if v is not None:
            spec[k] = v
    return spec


def build_workload(name: str, device: torch.device, overrides: dict | None = None, seed: int = 0) -> Workload:
    """The pretrained model (random init: values do not change speed), K random task vectors, K fixed random
    heads and a pool of 2 input batches per task, all deterministic in ``seed``."""
    spec = _resolve_spec(name, overrides)
    K, B, pool = spec["tasks"], spec["batch"], 2
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prec = spec["precision"]
    wdtype = torch.bfloat16 if prec == "bf16" else torch.float32
    autocast = torch.bfloat16 if prec == "bf16-autocast" else None
    if spec["kind"] == "vit":
        open_clip = _import_open_clip()
        from open_clip.model import _build_vision_tower

        if "model" in spec:
            cfg = open_clip.get_model_config(spec["model"])
            embed_dim, vision = cfg["embed_dim"], dict(cfg["vision_cfg"])
        else:
            embed_dim, vision = spec["embed_dim"], dict(spec["vision"])
        with torch.device(device):
            model = _build_vision_tower(embed_dim, vision)
        feat, classes = embed_dim, spec.get("classes", 10)
        size = vision.get("image_size", 224)
        batches = [[torch.randn(B, 3, size, size, generator=g).to(device) for _ in range(pool)] for _ in range(K)]
    elif spec["kind"] == "llama":
        with torch.device(device):
            model = LlamaStack(spec["vocab"], spec["hidden"], spec["mlp"], spec["layers"], spec["heads"])
        feat, classes = spec["hidden"], spec["vocab"]
        batches = [[torch.randint(0, spec["vocab"], (B, spec["seq"]), generator=g).to(device) for _ in range(pool)] for _ in range(K)]
    else:
        raise ValueError(f"unknown workload kind {spec['kind']!r}")
    model = model.to(wdtype).eval().requires_grad_(False)
    names = [n for n, p in model.named_parameters() if torch.is_floating_point(p)]
    params = dict(model.named_parameters())
    tv_dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    scale = spec.get("tv_scale", 1e-3)
    # Task vectors: windows of one random pool at random offsets (values do not change speed; generating
    # K x |theta| fresh normals takes minutes on a small CPU), built one parameter at a time on the device.
    pool_n = 1 << 22
    rand_pool = torch.randn(pool_n, generator=g).mul_(scale).to(device)
    offsets = torch.randint(0, pool_n, (len(names), K), generator=g).tolist()
    tvs = {}
    for i, n in enumerate(names):
        p = params[n]
        t = torch.empty((K, *p.shape), device=device, dtype=tv_dtype)
        for k in range(K):
            _fill_from_pool(t[k].view(-1), rand_pool, offsets[i][k])
        tvs[n] = t
    heads = []
    for _ in range(K):
        h = nn.Linear(feat, classes, bias=spec["kind"] == "vit")
        with torch.no_grad():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * feat**-0.5 * 3)
            if h.bias is not None:
                h.bias.zero_()
        heads.append(h.to(device=device, dtype=wdtype).requires_grad_(False))
    info = {
        "params": sum(params[n].numel() for n in names),
        "param_tensors": len(names),
        "weight_dtype": str(wdtype).replace("torch.", ""),
        "task_vector_dtype": str(tv_dtype).replace("torch.", ""),
        "pretrained_bytes": sum(params[n].numel() * params[n].element_size() for n in names),
        "task_vector_bytes": sum(t.numel() * t.element_size() for t in tvs.values()),
    }
    return Workload(name, spec, device, model, names, tvs, heads, batches, autocast, info=info)


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, off: int) -> None:
    pos, n = 0, flat.numel()
    while pos < n:
        take = min(n - pos, pool.numel() - off)
        flat[pos:pos + take].copy_(pool[off:off + take])
        pos, off = pos + take, 0


def _entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """The official ``softmax_entropy(x).mean(0)`` (over every leading position; fp32 for low-precision logits)."""
    z = logits.reshape(-1, logits.shape[-1])
    if z.dtype in (torch.bfloat16, torch.float16):
        z = z.float()
    return -(z.softmax(1) * z.log_softmax(1)).sum(1).mean(0)


# ------------------------------------------------------------------------------------------------ methods
class Runner:
    """One method. ``step()`` runs one AdaMerging step and returns its wall time (device-synchronized)."""

    name = "?"
    last_loss: float = float("nan")

    def step(self) -> float:
        raise NotImplementedError

    def coefficients(self) -> torch.Tensor:
        """The clamped coefficient table ``[rows, K]`` (fp32, CPU)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class OfficialRunner(Runner):
    """(a) The official code: per task batch, merge every parameter on the CPU with autograd, copy to the
    device, forward; sum the task losses; one backward; Adam on CPU coefficients. (The official script also marks
    the pretrained weights and task vectors ``requires_grad_()``, so its backward additionally builds K+1
    model-sized gradients it never uses; that is left out here, which makes (a) faster and smaller.)"""

    name = "official"

    def __init__(self, wl: Workload, trim: bool = False):
        self.wl, self.trim = wl, trim
        params = dict(wl.model.named_parameters())
        tv = wl.cpu_task_vectors()
        base = tuple(params[n].detach().cpu() for n in wl.names)  # the official paramslist[0] (CPU)
        self.paramslist = [base] + [tuple(tv[n][k] for n in wl.names) for k in range(wl.K)]
        rows = len(wl.names)
        self.pretrain_lambdas = torch.ones(rows, 1)
        self.lambdas_raw = nn.Parameter(torch.full((rows, wl.K), INIT))
        self.opt = torch.optim.Adam([self.lambdas_raw], lr=LR, betas=BETAS, weight_decay=0.0)
        self.steps_done = 0

    def lambdas(self):
        return torch.cat((self.pretrain_lambdas, torch.clamp(self.lambdas_raw, min=CLAMP[0], max=CLAMP[1])), 1)

    def forward(self, x, task):
        wl = self.wl
        alph = self.lambdas()
        params = tuple(sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, alph[j].cpu()))) for j, p in enumerate(zip(*self.paramslist)))
        params = tuple(p.to(wl.device) for p in params)
        with wl.autocast_ctx():
            feature = torch.func.functional_call(wl.model, dict(zip(wl.names, params)), (x,))
            return wl.heads[task](feature)

    def step(self) -> float:
        wl = self.wl
        _sync(wl.device)
        t0 = time.perf_counter()
        losses = 0.0
        for t in range(wl.K):
            outputs = self.forward(wl.batch(t, self.steps_done), t)
            if self.trim:  # see official_trim(): hand glibc's free-but-kept heap back (not in the official code)
                _malloc_trim()
            loss = _entropy_loss(outputs)
            losses += loss
        self.opt.zero_grad()
        losses.backward()
        self.opt.step()
        self.last_loss = float(losses.detach())
        _sync(wl.device)
        self.steps_done += 1
        return time.perf_counter() - t0

    def coefficients(self):
        return self.lambdas_raw.detach().clamp(*CLAMP).float().cpu().clone()


class FunctionalCallRunner(Runner):
    """(b) FusionBench's LayerWiseMergedModel + layer-wise AdaMerging: merge on the device once per step (a
    Python loop over tasks and parameters), per task a functional_call forward and backward(retain_graph=True),
    Adam, re-merge."""

    name = "functional_call"

    def __init__(self, wl: Workload):
        self.wl = wl
        params = dict(wl.model.named_parameters())
        self.pretrained_sd = {n: params[n] for n in wl.names}
        # FusionBench keeps the task vectors as K modules; here row k of the stacked tensors (a view, same memory)
        self.task_vectors = [[(n, wl.task_vectors[n][k]) for n in wl.names] for k in range(wl.K)]
        # FusionBench's merge_weight is [num_models, num_layers]; held transposed to share the [rows, K] layout
        self.merge_weight = nn.Parameter(torch.full((len(wl.names), wl.K), INIT, device=wl.device))
        self.opt = torch.optim.Adam([self.merge_weight], lr=LR, betas=BETAS)
        self.steps_done = 0
        self.merge_weights()

    def merge_weights(self):
        layer_wise_weight = self.merge_weight.clamp(*CLAMP).t()  # [K, rows]
        state_dict = dict(self.pretrained_sd)
        for weight, task_vector in zip(layer_wise_weight, self.task_vectors):
            for w, (name, param) in zip(weight, task_vector):
                state_dict[name] = state_dict[name] + param * w
        self._merged_state_dict = state_dict

    def step(self) -> float:
        wl = self.wl
        _sync(wl.device)
        t0 = time.perf_counter()
        total = 0.0
        for t in range(wl.K):
            with wl.autocast_ctx():
                logits = wl.heads[t](torch.func.functional_call(wl.model, self._merged_state_dict, (wl.batch(t, self.steps_done),)))
            loss = _entropy_loss(logits)
            loss.backward(retain_graph=True)
            total = total + loss.detach()  # no host sync per task (FusionBench logs loss.item() once per step)
        self.opt.step()
        self.opt.zero_grad()
        self.merge_weights()
        self.last_loss = float(total)
        _sync(wl.device)
        self.steps_done += 1
        return time.perf_counter() - t0

    def coefficients(self):
        return self.merge_weight.detach().clamp(*CLAMP).float().cpu().clone()

    def close(self):
        self._merged_state_dict = None


class _Stop(Exception):
    pass


def _share_module(m: nn.Module) -> nn.Module:
    """A structural copy of ``m`` whose parameters and buffers are ``m``'s own tensors (no memory)."""
    memo = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
    return copy.deepcopy(m, memo)


class OursRunner(Runner):
    """(c, d) ``AdaMergedModel`` trained by ``adamerge()`` itself, in a worker thread paused between steps: the
    first task's data iterable blocks until the next step is asked for, the callback marks the step's end."""

    def __init__(self, wl: Workload, backend: str, task_batching: str):
        from .merging import AdaMergedModel

        self.wl, self.backend, self.task_batching = wl, backend, task_batching
        self.name = f"ours-{backend}-{task_batching}"
        # copy=False on a structural copy sharing the pretrained tensors: no second copy of the weights
        self.model = AdaMergedModel(_share_module(wl.model), task_vectors=wl.task_vectors, granularity="layer",
                                    init=INIT, clamp=CLAMP, backend=backend, copy=False)
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop, self.error = False, None
        self.t_start = self.t_end = 0.0
        self._coef = self.model.coefficients.detach().float().cpu().clone()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _gate(self, batches):
        i = 0
        dev = self.wl.device.type
        while True:
            self._go.acquire()
            if self._stop:
                raise _Stop
            # autocast is per thread; set it per step (the equivalence check runs autocast workloads in fp32)
            torch.set_autocast_enabled(dev, self.wl.autocast is not None)
            if self.wl.autocast is not None:
                torch.set_autocast_dtype(dev, self.wl.autocast)
            torch.clear_autocast_cache()
            self.t_start = time.perf_counter()
            yield batches[i % len(batches)]
            i += 1

    class _Gated:
        def __init__(self, runner, batches):
            self.runner, self.batches = runner, batches

        def __iter__(self):
            return self.runner._gate(self.batches)

    def _callback(self, step, loss, model):
        _sync(self.wl.device)
        self.t_end = time.perf_counter()
        self.last_loss = float(loss)
        self._coef = model.coefficients.detach().float().cpu().clone()
        self._done.release()

    def _run(self):
        from .optim import adamerge

        wl = self.wl
        if wl.device.type == "cuda":
            torch.cuda.set_device(wl.device)  # the current device is per thread
        heads = {f"task{t}": wl.heads[t] for t in range(wl.K)}
        data = {f"task{t}": (self._Gated(self, wl.batches[t]) if t == 0 else wl.batches[t]) for t in range(wl.K)}
        try:
            adamerge(self.model, heads, data, steps=1 << 40, lr=LR, betas=BETAS, task_batching=self.task_batching,
                     device=wl.device, progress=False, callback=self._callback)
        except _Stop:
            pass
        except BaseException as e:  # reported by step()
            self.error = e
            self._done.release()

    def step(self) -> float:
        _sync(self.wl.device)
        self._go.release()
        while not self._done.acquire(timeout=1.0):
            if not self._thread.is_alive():
                break
        if self.error is not None:
            raise RuntimeError(f"{self.name}: adamerge failed: {self.error!r}") from self.error
        return self.t_end - self.t_start

    def coefficients(self):
        return self._coef

    def close(self):
        if self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join(timeout=60)
        self.model = None


def available_methods(device: torch.device) -> list[str]:
    """Both baselines, then ours for every backend that runs on ``device`` (triton only on CUDA) x batching."""
    from . import ops

    status = ops.backend_status(device)
    out = list(BASELINES)
    for be in OURS_BACKENDS:
        if status.get(be) != "available" or (be == "triton" and device.type != "cuda"):
            continue
        out += [f"ours-{be}-{tb}" for tb in BATCHINGS]
    return out


def default_ours(device: torch.device, methods: list[str]) -> str | None:
    """The method a user gets by default: the ``auto`` backend for merged_linear, ``concat``."""
    from . import ops

    try:
        be = ops.resolve("auto", "merged_linear", device)
    except Exception:
        be = "reference"
    for name in (f"ours-{be}-concat", "ours-reference-concat"):
        if name in methods:
            return name
    ours = [m for m in methods if m.startswith("ours-")]
    return ours[0] if ours else None


def _malloc_trim() -> None:
    fn = getattr(_malloc_trim, "fn", None)
    if fn is None:
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            fn = False
        _malloc_trim.fn = fn
    if fn:
        fn(0)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def official_trim(wl: Workload, mode: str) -> bool:
    """Whether (a) calls ``malloc_trim(0)`` after each task's merge. The official per-task CPU merge allocates
    and frees ~2K+2 model-sized temporaries per task; glibc keeps most of them as free-but-resident heap (measured
    here: +3.3 GiB of RSS per task on ViT-B/32 with K=8, ~10x the model), which would exceed this machine's
    memory before the backward. ``auto`` trims only when ~10 x model x tasks would pass half the available memory;
    trimming costs (a) page faults (~10-20% of its step on vit-small), so it is off where not needed."""
    if mode in ("on", "off"):
        return mode == "on"
    return 10 * wl.info["pretrained_bytes"] * wl.K > 0.5 * _mem_available()


def make_runner(method: str, wl: Workload, trim: bool = False) -> Runner:
    if method == "official":
        return OfficialRunner(wl, trim)
    if method == "functional_call":
        return FunctionalCallRunner(wl)
    parts = method.split("-")
    if len(parts) == 3 and parts[0] == "ours" and parts[1] in OURS_BACKENDS and parts[2] in BATCHINGS:
        return OursRunner(wl, parts[1], parts[2])
    raise SystemExit(f"unknown method {method!r}")


# -------------------------------------------------------------------------------------------- equivalence
class EquivalenceError(RuntimeError):
    pass


def _is_oom(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__
    return False


def _step_or_oom(r: Runner, runners: list[Runner], failed: dict[str, str], where: str, log=print) -> float | None:
    """``r.step()``; on out-of-memory, close ``r``, drop it from ``runners``, note it in ``failed``."""
    try:
        return r.step()
    except Exception as e:
        if not _is_oom(e):
            raise
        failed[r.name] = f"out of memory during {where}"
        log(f"    {r.name}: out of memory during {where}; dropped")
        r.close()
        runners.remove(r)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _tolerances(wl: Workload) -> dict:
    if wl.autocast is None and wl.spec["precision"] == "fp32":
        return {"coef_atol": 1e-5, "loss_rtol": 1e-4, "frac": 1.0}
    # bf16 weights: the peers round the merged weights to bf16 after every term, ours once. Adam's first steps move
    # a coefficient by about lr * sign(grad), so a coefficient whose gradient is within rounding noise of 0 may move
    # the other way (a 2e-3 difference); the bulk must agree.
    return {"coef_atol": 1e-4, "loss_rtol": 3e-2, "frac": 0.9}


def check_equivalence(runners: list[Runner], wl: Workload, steps: int = 2, failed: dict[str, str] | None = None,
                      log=print) -> dict:
    """Run ``steps`` steps of every runner (fresh, same init, same batches) and compare each with the first
    (``official`` when present): losses and coefficient tables. Autocast workloads are checked with autocast off
    (fp32, the tight tolerance); bf16-weight workloads with the bf16 tolerance. Raises :class:`EquivalenceError`.
    A method that runs out of (GPU) memory is dropped from ``runners`` and noted in ``failed``."""
    failed = {} if failed is None else failed
    traj: dict[str, list[tuple[float, torch.Tensor]]] = {r.name: [] for r in runners}
    saved_autocast, wl.autocast = wl.autocast, None
    try:
        for _ in range(steps):
            for r in list(runners):
                if _step_or_oom(r, runners, failed, "the equivalence check", log) is not None:
                    traj[r.name].append((r.last_loss, r.coefficients()))
    finally:
        wl.autocast = saved_autocast
    if len(runners) < 2:
        raise EquivalenceError(f"[{wl.name}] fewer than two methods ran: {failed}")
    tol = _tolerances(dataclasses.replace(wl, autocast=None))
    ref = runners[0].name
    report = {"reference_method": ref, "steps": steps, "tolerance": tol, "methods": {}, "failed": dict(failed),
              "precision": "fp32" + (" (autocast off for the check)" if saved_autocast is not None else "")
              if tol["frac"] == 1.0 else wl.spec["precision"]}
    problems = []
    for r in runners:
        worst_c, worst_l, frac_ok, where = 0.0, 0.0, 1.0, None
        for s, ((loss_ref, c_ref), (loss, c)) in enumerate(zip(traj[ref], traj[r.name])):
            if not (math.isfinite(loss) and torch.isfinite(c).all()):
                problems.append(f"{r.name}: non-finite loss/coefficients at step {s + 1}")
                continue
            d = (c - c_ref).abs()
            if float(d.max()) > worst_c:
                worst_c = float(d.max())
                row = int(d.max(1).values.argmax())
                where = f"step {s + 1}, row {row} ({wl.names[row]})"
            frac_ok = min(frac_ok, float((d <= tol["coef_atol"]).float().mean()))
            worst_l = max(worst_l, abs(loss - loss_ref) / max(abs(loss_ref), 1e-12))
        ok = worst_l <= tol["loss_rtol"] and frac_ok >= tol["frac"] and (tol["frac"] < 1.0 or worst_c <= tol["coef_atol"])
        report["methods"][r.name] = {"max_abs_coef_diff": worst_c, "max_rel_loss_diff": worst_l,
                                     "frac_coef_within_tol": frac_ok, "worst_at": where, "ok": ok,
                                     "losses": [lo for lo, _ in traj[r.name]]}
        if not ok:
            problems.append(f"{r.name} vs {ref}: max |d coef| = {worst_c:.3g} at {where} (tol {tol['coef_atol']:g}), "
                            f"{100 * frac_ok:.1f}% of coefficients within tol, max rel loss diff = {worst_l:.3g} "
                            f"(tol {tol['loss_rtol']:g})")
    report["ok"] = not problems
    if problems:
        raise EquivalenceError(f"[{wl.name}] methods disagree after {steps} steps from the same init on the same "
                               "batches; nothing was timed:\n  " + "\n  ".join(problems))
    return report


# ------------------------------------------------------------------------------------------------ timing
def time_interleaved(runners: list[Runner], steps: int, warmup: int, max_seconds: float | None, min_steps: int = 3,
                     log: Callable[[str], None] = print, failed: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Step times, interleaved: every round runs one step of each method, the order rotated by one per round.
    A method whose timed steps already exceed ``max_seconds`` (with at least ``min_steps``) sits out the rest."""
    failed = {} if failed is None else failed
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rnd in range(warmup + steps):
        n = len(runners)
        order = [runners[(i + rnd) % n] for i in range(n)]
        ran = {}
        for r in order:
            ts = times[r.name]
            if rnd >= warmup and max_seconds is not None and len(ts) >= min_steps and sum(ts) > max_seconds:
                continue
            t = _step_or_oom(r, runners, failed, "timing", log)
            if t is None:
                continue
            if rnd >= warmup:
                ts.append(t)
                ran[r.name] = t
        if rnd >= warmup:
            log(f"    round {rnd - warmup + 1}/{steps}: " + ", ".join(f"{k} {v:.3f}s" for k, v in ran.items()))
    return times


def _stats(ts: list[float]) -> dict:
    if not ts:
        return {"n": 0}
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "mean": statistics.fmean(ts), "n": len(ts), "times": ts}


# ------------------------------------------------------------------------------------------------ memory
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(cfg: dict) -> dict:
    """In a fresh process: build the workload, then the method, run ``steps`` steps; report memory."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    wl = build_workload(cfg["workload"], device, cfg.get("overrides"), cfg.get("seed", 0))
    _warm_runtime(wl)
    gc.collect()
    out: dict[str, Any] = {"method": cfg["method"], "workload": cfg["workload"]}
    rss_build = (_proc_status_kb("VmRSS") or 0) * 1024
    out["rss_after_build_bytes"] = rss_build
    out["hwm_reset"] = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_after_build_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    runner = make_runner(cfg["method"], wl, cfg.get("trim", False))
    ts = [runner.step() for _ in range(cfg["steps"])]
    runner.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_increase_bytes"] = out["cuda_peak_bytes"] - out["cuda_after_build_bytes"]
    hwm = (_proc_status_kb("VmHWM") or 0) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["ru_maxrss_bytes"] = maxrss
    out["peak_rss_bytes"] = hwm if out["hwm_reset"] and hwm else maxrss
    out["rss_increase_bytes"] = out["peak_rss_bytes"] - rss_build
    out["step_times"] = ts
    return out


def _warm_runtime(wl: Workload) -> None:
    """One plain forward of the pretrained model on one input and a tiny backward, so that the one-time runtime
    state (thread pools, oneDNN kernels, the autograd engine; ~0.15 GiB of RSS) is part of the build state that
    every method's increase is measured from, not of the first method step."""
    x = wl.batch(0, 0)[:1]
    with wl.autocast_ctx():
        y = wl.model(x)
    (y.float().sum() * torch.ones((), device=wl.device, requires_grad=True)).backward()
    _sync(wl.device)




def measure_memory(workload: str, method: str, device: torch.device, overrides: dict | None, steps: int,
                   seed: int = 0, trim: bool = False, threads: int | None = None, timeout: float | None = None,
                   mmap_threshold: int | None = None) -> dict:
    """Run one method in a fresh process and return its memory figures. ``mmap_threshold``: start the process with
    glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so that every freed allocation above it goes back to the OS at once
    and the peak RSS follows the live tensors rather than what the allocator keeps."""
    cfg = {"workload": workload, "method": method, "device": str(device), "overrides": overrides, "steps": steps,
           "seed": seed, "trim": trim, "threads": threads}
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "adamerge_fast.bench", "--_worker", json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    return {"error": f"worker exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"}


# ------------------------------------------------------------------------------------------------- floor
def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an ``n x n x n`` matmul."""
    n = n or (8192 if device.type == "cuda" else 1536)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """Best-of-``reps`` bytes/s of ``dst.copy_(src)``, counting the read and the write (2 x size)."""
    nbytes = nbytes or (2 * GiB if device.type == "cuda" else 512 * 1024**2)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


class _Census(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmul FLOPs (torch's flop registry, plus CPU flash attention) and the bytes of every fresh
    (non-view) tensor an op writes, except casts/copies of the weights themselves."""

    def __init__(self, weight_ptrs: set[int]):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.weight_ptrs = flop_registry, weight_ptrs
        self.flops = 0
        self.act_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        pkt = func._overloadpacket
        if pkt in self.registry:
            self.flops += int(self.registry[pkt](*args, **kwargs, out_val=out))
        elif "scaled_dot_product" in pkt.__name__ or "flash_attention" in pkt.__name__:
            q, k = args[0], args[1]
            self.flops += 4 * q.numel() // q.shape[-1] * k.shape[-2] * q.shape[-1]
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ins = {t.data_ptr() for t in leaves}
        is_cast = pkt.__name__ in ("_to_copy", "clone", "copy_", "to") and leaves and leaves[0].data_ptr() in self.weight_ptrs
        if not is_cast:  # fresh tensors only: not views, in-place results or casts of the weights
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in ins:
                    self.act_bytes += t.numel() * t.element_size()
        return out


def workload_census(wl: Workload) -> dict:
    """Forward FLOPs and activation bytes of the plain pretrained model on one step's data (all tasks)."""
    x = torch.cat([wl.batch(t, 0) for t in range(wl.K)])
    ptrs = {p.data_ptr() for p in wl.model.parameters()}
    was = wl.model.training
    wl.model.train()  # keeps nn.MultiheadAttention off its inference fast path (dropout is 0)
    try:
        with torch.no_grad(), wl.autocast_ctx(), _Census(ptrs) as c:
            feats = wl.model(x)
    finally:
        wl.model.train(was)
    rows = feats.numel() // feats.shape[-1]
    head_flops = sum(2 * rows // wl.K * h.in_features * h.out_features for h in wl.heads)
    head_bytes = sum(p.numel() * p.element_size() for h in wl.heads for p in h.parameters())
    logits_bytes = rows * wl.heads[0].out_features * (2 if wl.autocast or wl.spec["precision"] == "bf16" else 4)
    return {"backbone_fwd_flops": c.flops, "head_fwd_flops": head_flops, "activation_bytes": c.act_bytes + logits_bytes,
            "head_bytes": head_bytes}


def floor_model(wl: Workload, census: dict, matmul_rate: float, copy_bw: float) -> dict:
    flops = 3 * census["backbone_fwd_flops"] + 2 * census["head_fwd_flops"]
    weights = wl.info["task_vector_bytes"] + wl.info["pretrained_bytes"] + census["head_bytes"]
    nbytes = 2 * weights + 2 * census["activation_bytes"]
    t_c, t_m = flops / matmul_rate, nbytes / copy_bw
    return {"flops": flops, "bytes": nbytes, "matmul_rate_flops": matmul_rate, "copy_bw_bytes_per_s": copy_bw,
            "compute_s": t_c, "memory_s": t_m, "floor_s": max(t_c, t_m), "bound": "compute" if t_c >= t_m else "memory"}


# ----------------------------------------------------------------------------------------------- kernels
def kernel_bench(device: torch.device, matmul_rates: dict[str, float], copy_bw: float, reps: int = 20,
                 small: bool = False) -> list[dict]:
    """Per-op throughput of every available backend on workload-shaped inputs: achieved GB/s against the
    measured copy bandwidth and TFLOP/s against the measured matmul rate (GPU; ``small`` for tests)."""
    from . import ops

    status = ops.backend_status(device)
    backends = [b for b in OURS_BACKENDS if status.get(b) == "available" and not (b == "triton" and device.type != "cuda")]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    if small:
        cases = [("vit-b32 mlp.c_fc", 64, 32, 48, 4, torch.float32, torch.float32)]
        ent = (64, 10)
    else:
        cases = [("vit-b32 mlp.c_fc (fp32)", 8 * 16 * 50, 768, 3072, 8, torch.float32, torch.float32),
                 ("vit-l14 mlp.c_fc (fp32)", 8 * 16 * 257, 1024, 4096, 8, torch.float32, torch.float32),
                 ("llama7b mlp.up (bf16, bf16 tv)", 3 * 2 * 256, 4096, 11008, 3, torch.bfloat16, torch.bfloat16)]
        ent = (3 * 2 * 256, 32000)
    out = []

    def timeit(fn):
        fn()
        _sync(device)
        ts = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for label, M, IN, OUT, K, wdt, tdt in cases:
        x, w0, tau, b0 = rnd(M, IN, dtype=wdt), rnd(OUT, IN, dtype=wdt), rnd(K, OUT, IN, dtype=tdt) * 1e-2, rnd(OUT, dtype=wdt)
        taub, c = rnd(K, OUT, dtype=tdt) * 1e-2, torch.full((K,), 0.3, device=device)
        cg = c.clone().requires_grad_(True)
        s_w, s_t, s_x = w0.element_size(), tau.element_size(), x.element_size()
        rate = matmul_rates["bf16" if wdt == torch.bfloat16 else "fp32"]
        wbytes = OUT * IN * (s_w + K * s_t)
        for be in backends:
            row = {"case": label, "backend": be, "M": M, "in": IN, "out": OUT, "K": K, "rate": rate}
            t = timeit(lambda: ops.merge(w0, tau, c, backend=be))
            out.append(dict(row, op="merge", seconds=t, bytes=wbytes + OUT * IN * s_w, flops=2 * K * OUT * IN))
            t = timeit(lambda: ops.merged_linear(x, w0, tau, c, b0, taub, c, backend=be))
            out.append(dict(row, op="merged_linear fwd", seconds=t, bytes=M * IN * s_x + wbytes + M * OUT * s_x, flops=2 * M * IN * OUT))
            xg = x.clone().requires_grad_(True)
            dy = rnd(M, OUT, dtype=wdt)

            def fb():
                y = ops.merged_linear(xg, w0, tau, cg, b0, taub, cg, backend=be)
                torch.autograd.grad(y, (xg, cg), dy)

            t = timeit(fb)
            # necessary traffic: forward (x, weights, y) + backward (dy, x, weights for dx, task vectors for dcoef, dx)
            nb = (M * IN * s_x + wbytes + M * OUT * s_x) + (M * OUT * s_x + M * IN * s_x + wbytes + K * OUT * IN * s_t + M * IN * s_x)
            out.append(dict(row, op="merged_linear fwd+bwd", seconds=t, bytes=nb, flops=3 * 2 * M * IN * OUT))
    # merge_many on a ViT-B/32-like list of the "other" parameters (LayerNorms, biases, embeddings, conv)
    shapes = [(768,)] * 50 + [(3072,)] * 12 + [(768, 3, 32, 32), (50, 768), (768, 512)] if not small else [(32,)] * 4 + [(16, 8)]
    K = 8 if not small else 4
    bases = [rnd(*s) for s in shapes]
    deltas = [rnd(K, *s) * 1e-2 for s in shapes]
    coefs = torch.full((len(shapes), K), 0.3, device=device)
    n_el = sum(math.prod(s) for s in shapes)
    ent_x = rnd(*ent)
    for be in backends:
        t = timeit(lambda: ops.merge_many(bases, deltas, coefs, backend=be))
        out.append({"case": f"{len(shapes)} small tensors, K={K}", "backend": be, "op": "merge_many", "seconds": t,
                    "bytes": n_el * 4 * (K + 2), "flops": 2 * K * n_el, "rate": matmul_rates["fp32"]})
    for be in backends:
        try:
            t = timeit(lambda: ops.entropy(ent_x, backend=be))
        except Exception:
            continue
        out.append({"case": f"entropy [{ent[0]}, {ent[1]}]", "backend": be, "op": "entropy", "seconds": t,
                    "bytes": ent_x.numel() * 4 + ent[0] * 4, "flops": 0, "rate": matmul_rates["fp32"]})
    for r in out:
        r["GB/s"] = r["bytes"] / r["seconds"] / 1e9
        r["bw_fraction"] = r["bytes"] / r["seconds"] / copy_bw
        r["TFLOP/s"] = r["flops"] / r["seconds"] / 1e12
        r["flop_fraction"] = r["flops"] / r["seconds"] / r.pop("rate")
    return out


# --------------------------------------------------------------------------------------------- profiling
def profile_ours(wl: Workload, backend: str, top: int = 12) -> list[dict]:
    """One concat step of AdaMergedModel (forward + backward, no optimizer) under torch.profiler: the top ops by
    self time, to say where the step goes."""
    from . import ops
    from .merging import AdaMergedModel

    model = AdaMergedModel(_share_module(wl.model), task_vectors=wl.task_vectors, granularity="layer", init=INIT,
                           clamp=CLAMP, backend=backend, copy=False)
    x = torch.cat([wl.batch(t, 0) for t in range(wl.K)])
    sizes = [wl.batch(t, 0).shape[0] for t in range(wl.K)]

    def once():
        with wl.autocast_ctx():
            parts = torch.split(model(x), sizes)
            loss = sum(ops.entropy(wl.heads[t](parts[t])).mean() for t in range(wl.K))
        loss.backward()
        model.raw_coefficients.grad = None

    once()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if wl.device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        once()
        _sync(wl.device)
    avgs = prof.key_averages()
    key = "self_cpu_time_total"
    if wl.device.type == "cuda":
        key = "self_device_time_total" if avgs and hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
    evs = sorted(avgs, key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    total = sum(getattr(e, key, 0) or 0 for e in avgs)
    rows = [{"op": e.key, "self_ms": (getattr(e, key, 0) or 0) / 1e3, "calls": e.count,
             "share": (getattr(e, key, 0) or 0) / total if total else 0.0} for e in evs[:top]]
    return rows


# ------------------------------------------------------------------------------------------------ driver
def run_workload(name: str, device: torch.device, args, rates: dict, copy_bw: float, log=print) -> dict:
    overrides = {"tasks": args.tasks, "batch": args.batch}
    log(f"[{name}] building workload on {device} ...")
    t0 = time.perf_counter()
    wl = build_workload(name, device, overrides, args.seed)
    log(f"[{name}] built in {time.perf_counter() - t0:.1f}s: {wl.info['params'] / 1e6:.1f}M params in "
        f"{wl.info['param_tensors']} tensors, K={wl.K}, {wl.spec['batch']} inputs/task, {wl.spec['precision']}")
    methods = available_methods(device)
    if args.methods:
        want = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in want if m not in methods]
        if bad:
            raise SystemExit(f"method(s) {bad} not available here; available: {methods}")
        methods = want
    steps = args.steps if args.steps is not None else wl.spec.get("steps", 10)
    res: dict[str, Any] = {"workload": name, "spec": wl.spec, "info": wl.info, "methods": {}, "steps_requested": steps}

    # floor inputs first (the plain model, nothing else built yet)
    census = workload_census(wl)
    dt = "bf16" if (wl.autocast is not None or wl.spec["precision"] == "bf16") else "fp32"
    res["floor"] = floor_model(wl, census, rates[dt], copy_bw)
    res["floor"].update({"census": census, "matmul_dtype": dt})

    trim = official_trim(wl, args.official_trim) if "official" in methods else False
    res["official_malloc_trim"] = trim
    runners = []
    try:
        for m in methods:
            runners.append(make_runner(m, wl, trim))
        log(f"[{name}] equivalence check: {args.check_steps} steps of {', '.join(methods)}")
        failed: dict[str, str] = {}
        res["equivalence"] = check_equivalence(runners, wl, args.check_steps, failed, log)
        log(f"[{name}] equivalence OK: " + ", ".join(f"{k} |dc|<={v['max_abs_coef_diff']:.1e}" for k, v in res["equivalence"]["methods"].items()))
        log(f"[{name}] timing {steps} interleaved steps (+{args.warmup} warm-up) ...")
        cap = args.max_method_seconds if args.max_method_seconds is not None else wl.spec.get("max_method_seconds", 180.0)
        min_steps = args.min_steps if args.min_steps is not None else wl.spec.get("min_steps", 3)
        res["max_method_seconds"], res["min_steps"] = cap, min_steps
        times = time_interleaved(runners, steps, args.warmup, cap, min_steps, log=log, failed=failed)
    finally:
        for r in runners:
            r.close()
        runners.clear()
        gc.collect()
    for m in methods:
        res["methods"][m] = {"step_s": _stats(times.get(m, []))}
        if m in failed:
            res["methods"][m]["error"] = failed[m]

    if args.profile and device.type in ("cpu", "cuda"):
        best = default_ours(device, methods)
        if best:
            be = best.split("-")[1]
            res["profile"] = {"method": best, "top_ops": profile_ours(wl, be)}
    floor_s = res["floor"]["floor_s"]
    del wl
    gc.collect()
    _malloc_trim()  # hand this process's freed heap back before the memory subprocesses run beside it
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_memory:
        for m in methods:
            log(f"[{name}] memory: {m} in a fresh process ({args.mem_steps} steps) ...")
            res["methods"][m]["memory"] = measure_memory(name, m, device, overrides, args.mem_steps, args.seed, trim, args.threads)
            mem = res["methods"][m]["memory"]
            if "error" in mem:
                log(f"    ERROR: {mem['error']}")
            else:
                log(f"    peak {_peak(mem, device) / GiB:.3f} GiB, +{_inc(mem, device) / GiB:.3f} GiB over build")
            if device.type == "cpu" and args.live_memory:
                mem = measure_memory(name, m, device, overrides, args.mem_steps, args.seed, trim, args.threads,
                                     mmap_threshold=MMAP_THRESHOLD)
                res["methods"][m]["memory_mmap"] = mem
                if "error" not in mem:
                    log(f"    with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}: peak {mem['peak_rss_bytes'] / GiB:.3f} GiB, "
                        f"+{mem['rss_increase_bytes'] / GiB:.3f} GiB over build")

    # ratios
    med = {m: res["methods"][m]["step_s"].get("median") for m in methods}
    for m in methods:
        r = res["methods"][m]
        r["x_floor"] = med[m] / floor_s if med[m] else None
        for base, tag in (("official", "a"), ("functional_call", "b")):
            if base in methods and med[m] and med.get(base):
                r[f"speedup_vs_{tag}"] = med[base] / med[m]
            mb, mm = r.get("memory", {}), res["methods"].get(base, {}).get("memory", {})
            if base in methods and mb and mm and "error" not in mb and "error" not in mm:
                r[f"mem_vs_{tag}"] = _peak(mb, device) / _peak(mm, device)
                r[f"mem_increase_vs_{tag}"] = _inc(mb, device) / max(_inc(mm, device), 1)
            mb, mm = r.get("memory_mmap", {}), res["methods"].get(base, {}).get("memory_mmap", {})
            if base in methods and mb and mm and "error" not in mb and "error" not in mm:
                r[f"mem_mmap_vs_{tag}"] = mb["peak_rss_bytes"] / mm["peak_rss_bytes"]
    res["default_ours"] = default_ours(device, methods)
    res["goals"] = evaluate_goals(name, device, res)
    return res


# -------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adamerge-fast bench", description=(
        "End-to-end AdaMerging step benchmark: ours vs the official code's and FusionBench's approaches "
        "(same coefficients checked first; interleaved timing; per-method memory in fresh processes; the floor)."))
    p.add_argument("--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: cpu: "
                   f"{','.join(DEFAULT_WORKLOADS['cpu'])}; cuda: {','.join(DEFAULT_WORKLOADS['cuda'])})")
    p.add_argument("--methods", help="comma-separated subset (default: every method available on the device)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default: per workload, 10; 5 on vit-b32-cpu)")
    p.add_argument("--warmup", type=int, default=0,
                   help="extra warm-up steps per method (default 0: the equivalence check's steps are the warm-up)")
    p.add_argument("--check-steps", type=int, default=2, help="steps of the equivalence check (default 2)")
    p.add_argument("--max-method-seconds", type=float, default=None,
                   help="stop timing a method once its timed steps exceed this (default: per workload, 180; 60 on vit-b32-cpu)")
    p.add_argument("--min-steps", type=int, default=None,
                   help="timed steps every method gets regardless of the cap (default: per workload, 3; 1 on vit-b32-cpu)")
    p.add_argument("--mem-steps", type=int, default=1,
                   help="steps of each fresh-process memory run (default 1: every step allocates alike)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--no-live-memory", dest="live_memory", action="store_false",
                   help="CPU: skip the second memory run per method with glibc's mmap threshold fixed at 128 KiB")
    p.add_argument("--tasks", type=int, default=None, help="override the number of tasks K")
    p.add_argument("--batch", type=int, default=None, help="override the inputs per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP stalls when other jobs load the cores")
    p.add_argument("--official-trim", choices=("auto", "on", "off"), default="auto",
                   help="malloc_trim after each task of (a) (auto: only where its heap growth would exhaust memory)")
    p.add_argument("--kernels", dest="kernels", action="store_true", default=None, help="per-kernel GB/s and TFLOP/s (default: on CUDA)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler breakdown of ours")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results beside the package)")
    p.add_argument("--stem", default=None, help="file name stem (default: adamerging_step_<cpu|cuda>[_<workloads>])")
    p.add_argument("--quick", action="store_true", help="small matmul/bandwidth calibration (tests; floors less exact)")
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown and plot of an earlier run's JSON")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "adamerge-fast bench") -> int:
    args = _parser().parse_args(argv)
    if args._worker:
        res = _worker(json.loads(args._worker))
        print("@@RESULT@@" + json.dumps(res), flush=True)
        return 0
    if args.render:
        src = Path(args.render)
        result = json.loads(src.read_text())
        for w in result["workloads"]:  # goal notes follow the current wording
            if "error" not in w:
                w["goals"] = evaluate_goals(w["workload"], torch.device(result["env"]["device_type"]), w)
        paths = write_results(result, src.parent, src.stem)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    default = DEFAULT_WORKLOADS.get(device.type, DEFAULT_WORKLOADS["cpu"])
    workloads = [w.strip() for w in args.workloads.split(",")] if args.workloads else default
    for w in workloads:
        _resolve_spec(w)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    stem = args.stem or f"adamerging_step_{device.type}" + ("" if workloads == default else "_" + "+".join(workloads))
    cmd = prog + " " + " ".join(sys.argv[1:] if argv is None else argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    result: dict[str, Any] = {"benchmark": "adamerging_step", "command": cmd.strip(), "env": env_info(device), "workloads": []}
    log(f"device: {result['env']['device']}; backends: {result['env']['backend_status']}")
    if args.quick:
        rates = {dt: measure_matmul_rate(device, d, n=256, reps=2) for dt, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        copy_bw = measure_copy_bandwidth(device, nbytes=16 * 1024**2, reps=2)
    else:
        rates = {"fp32": measure_matmul_rate(device, torch.float32)}
        if device.type == "cuda":
            rates["bf16"] = measure_matmul_rate(device, torch.bfloat16)
        else:
            rates["bf16"] = measure_matmul_rate(device, torch.bfloat16, n=1024, reps=2)
        copy_bw = measure_copy_bandwidth(device)
    result["matmul_rate_flops"], result["copy_bw_bytes_per_s"] = rates, copy_bw
    log("matmul " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in rates.items()) + f"; copy {copy_bw / 1e9:.1f} GB/s")

    failed = False
    for w in workloads:
        try:
            result["workloads"].append(run_workload(w, device, args, rates, copy_bw, log=log))
        except EquivalenceError as e:
            log(f"ABORT: {e}")
            result["workloads"].append({"workload": w, "error": str(e)})
            failed = True
            break
        except torch.cuda.OutOfMemoryError as e:
            log(f"[{w}] out of memory: {e}")
            result["workloads"].append({"workload": w, "error": f"out of memory: {e}"})
            gc.collect()
            torch.cuda.empty_cache()
    if args.kernels or (args.kernels is None and device.type == "cuda"):
        log("kernels ...")
        result["kernels"] = kernel_bench(device, rates, copy_bw, small=device.type != "cuda")
    result["env"]["loadavg_end"] = _loadavg()
    paths = write_results(result, out_dir, stem)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    print(render_markdown(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
