"""The step benchmark's measuring protocol: the equivalence check that comes before any timing, the interleaved
timing, the memory of each method in a fresh process, and the floor (matmul rate, copy bandwidth, the FLOPs and
bytes of a step)."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from .._env import ROOT
from .runners import Runner, make_runner
from .workloads import Workload, build_workload, sync

GiB = 1024**3
# glibc's MALLOC_MMAP_THRESHOLD_ of the second memory measurement (freed allocations above it go back at once)
MMAP_THRESHOLD = 128 * 1024
RESULT_TAG = "@@RESULT@@"  # the line of a memory worker's stdout that carries its JSON result


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
    if tol["frac"] == 1.0:
        precision = "fp32" + (" (autocast off for the check)" if saved_autocast is not None else "")
    else:
        precision = wl.spec["precision"]
    report = {"reference_method": ref, "steps": steps, "tolerance": tol, "methods": {}, "failed": dict(failed),
              "precision": precision}
    problems = []
    for r in runners:
        worst_c, worst_l, frac_ok, where = 0.0, 0.0, 1.0, None
        for s, ((loss_ref, c_ref), (loss, c)) in enumerate(zip(traj[ref], traj[r.name], strict=False)):
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
        ok = (worst_l <= tol["loss_rtol"] and frac_ok >= tol["frac"]
              and (tol["frac"] < 1.0 or worst_c <= tol["coef_atol"]))
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
                     log: Callable[[str], None] = print,
                     failed: dict[str, str] | None = None) -> dict[str, list[float]]:
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


def stats(ts: list[float]) -> dict:
    """Median, min, max, mean and count of the step times ``ts`` (and the times themselves)."""
    if not ts:
        return {"n": 0}
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "mean": statistics.fmean(ts),
            "n": len(ts), "times": ts}


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


def memory_worker(cfg: dict) -> dict:
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
    sync(wl.device)


def measure_memory(workload: str, method: str, device: torch.device, overrides: dict | None, steps: int,
                   seed: int = 0, trim: bool = False, threads: int | None = None,
                   mmap_threshold: int | None = None) -> dict:
    """Run one method in a fresh process (``python -m benchmarks.adamerging_step --_worker``, from the checkout)
    and return its memory figures. ``mmap_threshold``: start the process with glibc's ``MALLOC_MMAP_THRESHOLD_``
    fixed, so that every freed allocation above it goes back to the OS at once and the peak RSS follows the live
    tensors rather than what the allocator keeps."""
    cfg = {"workload": workload, "method": method, "device": str(device), "overrides": overrides, "steps": steps,
           "seed": seed, "trim": trim, "threads": threads}
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "benchmarks.adamerging_step", "--_worker", json.dumps(cfg)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
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
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
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
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
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
        is_cast = (pkt.__name__ in ("_to_copy", "clone", "copy_", "to") and leaves
                   and leaves[0].data_ptr() in self.weight_ptrs)
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
    return {"backbone_fwd_flops": c.flops, "head_fwd_flops": head_flops,
            "activation_bytes": c.act_bytes + logits_bytes, "head_bytes": head_bytes}


def floor_model(wl: Workload, census: dict, matmul_rate: float, copy_bw: float) -> dict:
    """The floor of one step: ``max(FLOPs / matmul_rate, bytes / copy_bw)`` with FLOPs = 3x the backbone forward
    + 2x the heads, bytes = the weights and task vectors read forward and backward + the activations written and
    read once."""
    flops = 3 * census["backbone_fwd_flops"] + 2 * census["head_fwd_flops"]
    weights = wl.info["task_vector_bytes"] + wl.info["pretrained_bytes"] + census["head_bytes"]
    nbytes = 2 * weights + 2 * census["activation_bytes"]
    t_c, t_m = flops / matmul_rate, nbytes / copy_bw
    return {"flops": flops, "bytes": nbytes, "matmul_rate_flops": matmul_rate, "copy_bw_bytes_per_s": copy_bw,
            "compute_s": t_c, "memory_s": t_m, "floor_s": max(t_c, t_m),
            "bound": "compute" if t_c >= t_m else "memory"}
