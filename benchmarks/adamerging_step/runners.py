"""The methods the step benchmark compares, one :class:`Runner` each: the peers' approaches (a) ``official``
and (b) ``functional_call``, and ours, ``AdaMergedModel`` trained by ``adamerge()`` (c, d)."""

from __future__ import annotations

import copy
import threading
import time

import torch
from torch import nn

from adamerge_fast import ops
from adamerge_fast._compat import malloc_trim
from adamerge_fast.merging import AdaMergedModel
from adamerge_fast.optim import adamerge

from .._env import measured_backends
from .workloads import Workload, sync

INIT, LR, BETAS, CLAMP = 0.3, 1e-3, (0.9, 0.999), (0.0, 1.0)
BASELINES = ("official", "functional_call")
BATCHINGS = ("concat", "sequential")


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """The official ``softmax_entropy(x).mean(0)`` (over every leading position; fp32 for low-precision logits)."""
    z = logits.reshape(-1, logits.shape[-1])
    if z.dtype in (torch.bfloat16, torch.float16):
        z = z.float()
    return -(z.softmax(1) * z.log_softmax(1)).sum(1).mean(0)


def share_module(m: nn.Module) -> nn.Module:
    """A structural copy of ``m`` whose parameters and buffers are ``m``'s own tensors (no memory)."""
    memo = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
    return copy.deepcopy(m, memo)


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
        params = tuple(sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, alph[j].cpu(), strict=True)))
                       for j, p in enumerate(zip(*self.paramslist, strict=True)))
        params = tuple(p.to(wl.device) for p in params)
        with wl.autocast_ctx():
            feature = torch.func.functional_call(wl.model, dict(zip(wl.names, params, strict=True)), (x,))
            return wl.heads[task](feature)

    def step(self) -> float:
        wl = self.wl
        sync(wl.device)
        t0 = time.perf_counter()
        losses = 0.0
        for t in range(wl.K):
            outputs = self.forward(wl.batch(t, self.steps_done), t)
            if self.trim:  # see official_trim(): hand glibc's free-but-kept heap back (not in the official code)
                malloc_trim()
            loss = entropy_loss(outputs)
            losses += loss
        self.opt.zero_grad()
        losses.backward()
        self.opt.step()
        self.last_loss = float(losses.detach())
        sync(wl.device)
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
        for weight, task_vector in zip(layer_wise_weight, self.task_vectors, strict=True):
            for w, (name, param) in zip(weight, task_vector, strict=True):
                state_dict[name] = state_dict[name] + param * w
        self._merged_state_dict = state_dict

    def step(self) -> float:
        wl = self.wl
        sync(wl.device)
        t0 = time.perf_counter()
        total = 0.0
        for t in range(wl.K):
            with wl.autocast_ctx():
                features = torch.func.functional_call(wl.model, self._merged_state_dict,
                                                      (wl.batch(t, self.steps_done),))
                logits = wl.heads[t](features)
            loss = entropy_loss(logits)
            loss.backward(retain_graph=True)
            total = total + loss.detach()  # no host sync per task (FusionBench logs loss.item() once per step)
        self.opt.step()
        self.opt.zero_grad()
        self.merge_weights()
        self.last_loss = float(total)
        sync(wl.device)
        self.steps_done += 1
        return time.perf_counter() - t0

    def coefficients(self):
        return self.merge_weight.detach().clamp(*CLAMP).float().cpu().clone()

    def close(self):
        self._merged_state_dict = None


class _Stop(Exception):
    pass


class OursRunner(Runner):
    """(c, d) ``AdaMergedModel`` trained by ``adamerge()`` itself, in a worker thread paused between steps: the
    first task's data iterable blocks until the next step is asked for, the callback marks the step's end."""

    def __init__(self, wl: Workload, backend: str, task_batching: str, model: AdaMergedModel | None = None,
                 name: str | None = None):  # fmt: skip
        """``model``: an ``AdaMergedModel`` built elsewhere (e.g. on LoRA adapters, ``benchmarks.bench_lora``);
        default: one over ``wl.task_vectors``."""
        self.wl, self.task_batching = wl, task_batching
        self.name = name or f"ours-{backend}-{task_batching}"
        # copy=False on a structural copy sharing the pretrained tensors: no second copy of the weights
        self.model = model if model is not None else AdaMergedModel(
            share_module(wl.model), task_vectors=wl.task_vectors, granularity="layer", init=INIT, clamp=CLAMP,
            backend=backend, copy=False)  # fmt: skip
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
        sync(self.wl.device)
        self.t_end = time.perf_counter()
        self.last_loss = float(loss)
        self._coef = model.coefficients.detach().float().cpu().clone()
        self._done.release()

    def _run(self):
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
        sync(self.wl.device)
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
    """Both baselines, then ours for every backend timed on ``device`` (triton only on CUDA) x batching; on CUDA
    also ``ours-auto-*``, the backend chosen per op (``merge_many`` and ``merged_linear`` may differ there)."""
    backends = measured_backends(device) + (["auto"] if device.type == "cuda" else [])
    return list(BASELINES) + [f"ours-{be}-{tb}" for be in backends for tb in BATCHINGS]


def default_ours(device: torch.device, methods: list[str]) -> str | None:
    """The method a user gets by default: the ``auto`` backend for merged_linear, ``concat``."""
    try:
        be = ops.resolve("auto", "merged_linear", device)
    except Exception:
        be = "reference"
    for name in ("ours-auto-concat", f"ours-{be}-concat", "ours-reference-concat"):
        if name in methods:
            return name
    ours = [m for m in methods if m.startswith("ours-")]
    return ours[0] if ours else None


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
    """The runner of ``method``: ``official``, ``functional_call`` or ``ours-<backend>-<batching>``."""
    if method == "official":
        return OfficialRunner(wl, trim)
    if method == "functional_call":
        return FunctionalCallRunner(wl)
    parts = method.split("-")
    if len(parts) == 3 and parts[0] == "ours" and parts[1] in (*ops.BACKEND_NAMES, "auto") and parts[2] in BATCHINGS:
        return OursRunner(wl, parts[1], parts[2])
    raise SystemExit(f"unknown method {method!r}")
