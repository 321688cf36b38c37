"""LoRA adapters as task vectors: one layer-wise AdaMerging step on a Llama-shaped stack with K rank-r adapters.

``python -m benchmarks.bench_lora [--hidden 1024 --mlp 2816 --layers 4 --tasks 8 --rank 16 ...]`` compares, side by
side in one run (equivalence check first, then interleaved timing, then each method's memory in a fresh process):

- ``ours-lora``: ``AdaMergedModel(pretrained, [adapter mappings])`` trained by ``adamerge()``: the adapters stay
  low-rank, every projection runs :func:`adamerge_fast.ops.merged_lora_linear`;
- ``ours-dense`` (a): the dense task vectors ``s_k B_k A_k`` materialized once (zeros for the parameters no
  adapter touches, as full fine-tuned checkpoints would give), then our dense path (``merged_linear``);
- ``functional_call`` (b): FusionBench's layer-wise AdaMerging on the same dense task vectors (merge every weight
  once per step, ``torch.func.functional_call`` and a backward per task; ``benchmarks.adamerging_step``'s runner).

The model: ``benchmarks.adamerging_step.workloads.LlamaStack`` (RMSNorm, q/k/v/o, SwiGLU MLP), random init, fp32;
adapters on all seven projections of every layer (alpha = 2r), random A and B; one frozen random head per task on
every position; ``--batch`` sequences of ``--seq`` tokens per task, all tasks' batches in one forward (``concat``)
for ours. Memory: the peak RSS (``VmHWM``, reset once the method's model and task vectors are built and the
caller's adapter tensors are dropped, as ``benchmarks.adamerging_step`` does) of a fresh process per method, minus
the RSS of the process before anything of the workload existed (python, torch and their runtime state, warmed by
one step of the same method on a tiny stack), with glibc's default allocator and with
``MALLOC_MMAP_THRESHOLD_=131072`` (freed buffers returned at once, so the peak follows the live tensors). The
memory goal of ours: peak <= the pretrained weights + 1.5x the adapters' bytes + the activations (every tensor
the forward over all tasks' batches writes, counted by :func:`benchmarks.adamerging_step.protocol.workload_census`).

Results: ``benchmarks/results/lora_step_cpu.{json,md}`` (``--out``), with the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adamerge_fast.merging import AdaMergedModel

from ._env import ROOT, env_info, loadavg, write_results
from .adamerging_step.protocol import (
    MMAP_THRESHOLD,
    RESULT_TAG,
    _proc_status_kb,
    _reset_peak_rss,
    _warm_runtime,
    check_equivalence,
    stats,
    time_interleaved,
    workload_census,
)
from .adamerging_step.runners import CLAMP, INIT, FunctionalCallRunner, OursRunner, share_module
from .adamerging_step.workloads import LlamaStack, Workload

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("ours-lora", "ours-dense", "functional_call")
MiB = 1024**2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(cfg: dict, dense: bool) -> tuple[Workload, list[dict]]:
    """The pretrained stack, K adapter mappings ``{weight name: (A, B, alpha / r)}`` on every projection, heads and
    batches, all deterministic in ``cfg["seed"]``; with ``dense``: also the materialized dense task vectors
    ``{name: [K, *shape]}`` (``wl.task_vectors``) and ``wl.info["materialize_seconds"]``."""
    g = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = LlamaStack(cfg["vocab"], cfg["hidden"], cfg["mlp"], cfg["layers"], cfg["heads"])
    model = model.float().eval().requires_grad_(False)
    params = dict(model.named_parameters())
    names = list(params)
    targets = [n for n in names if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS]
    r, K = cfg["rank"], cfg["tasks"]
    adapters = []
    for _ in range(K):
        ad = {}
        for n in targets:
            out_f, in_f = params[n].shape
            a = torch.randn(r, in_f, generator=g) * in_f**-0.5
            b = torch.randn(out_f, r, generator=g) * 0.01
            ad[n] = (a, b, 2.0)  # lora_alpha = 2r
        adapters.append(ad)
    tv: dict[str, torch.Tensor] = {}
    info = {"params": sum(p.numel() for p in params.values()), "param_tensors": len(names),
            "lora_weights": len(targets), "pretrained_bytes": sum(p.numel() * 4 for p in params.values()),
            "adapter_bytes": sum(a.numel() * 4 + b.numel() * 4 for ad in adapters for a, b, _ in ad.values())}
    if dense:
        t0 = time.perf_counter()
        for n in names:
            st = torch.zeros((K, *params[n].shape))
            for k, ad in enumerate(adapters):
                if n in ad:
                    a, b, s = ad[n]
                    torch.mm(b, a, out=st[k]).mul_(s)
            tv[n] = st
        info["materialize_seconds"] = round(time.perf_counter() - t0, 3)
        info["task_vector_bytes"] = sum(t.numel() * 4 for t in tv.values())
    heads = []
    for _ in range(K):
        h = nn.Linear(cfg["hidden"], cfg["classes"], bias=False)
        with torch.no_grad():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * cfg["hidden"] ** -0.5 * 3)
        heads.append(h.requires_grad_(False))
    batches = [[torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g) for _ in range(2)]
               for _ in range(K)]  # fmt: skip
    spec = dict(cfg, kind="llama", precision="fp32")
    wl = Workload("lora-llama", spec, torch.device("cpu"), model, names, tv, heads, batches, None, info=info)
    return wl, adapters


def make_runner(method: str, wl: Workload, adapters: list[dict]):
    if method == "ours-lora":
        model = AdaMergedModel(share_module(wl.model), adapters, granularity="layer", init=INIT, clamp=CLAMP,
                               copy=False)  # fmt: skip
        return OursRunner(wl, "auto", "concat", model=model, name="ours-lora")
    if method == "ours-dense":
        return OursRunner(wl, "auto", "concat", name="ours-dense")
    if method == "functional_call":
        return FunctionalCallRunner(wl)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ------------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    return (_proc_status_kb("VmRSS") or 0) * 1024


def worker(cfg: dict) -> dict:
    """In a fresh process: the runtime's own RSS, then the workload and method, ``mem_steps`` steps; memory."""
    torch.set_num_threads(cfg["threads"])
    # the runtime's one-time state (modules imported on first use, thread pools, the autograd engine, allocator
    # arenas): one step of the same method on a tiny stack, before the baseline is read
    tiny = dict(cfg, hidden=64, mlp=128, layers=1, heads=4, vocab=64, classes=16, tasks=2, rank=2, seq=4)
    wl, adapters = build(tiny, dense=cfg["method"] != "ours-lora")
    runner = make_runner(cfg["method"], wl, adapters)
    runner.step()
    runner.close()
    del runner, wl, adapters
    gc.collect()
    out = {"method": cfg["method"], "rss_runtime_bytes": _rss()}
    wl, adapters = build(cfg, dense=cfg["method"] != "ours-lora")
    _warm_runtime(wl)
    runner = make_runner(cfg["method"], wl, adapters)
    del adapters  # the caller's copies: every method now holds what it runs on (ours: the concatenated adapters)
    gc.collect()
    out["build_peak_rss_bytes"] = (_proc_status_kb("VmHWM") or 0) * 1024
    out["rss_after_build_bytes"] = _rss()
    out["hwm_reset"] = _reset_peak_rss()
    out["step_times"] = [runner.step() for _ in range(cfg["mem_steps"])]
    runner.close()
    out["peak_rss_bytes"] = (_proc_status_kb("VmHWM") or 0) * 1024
    out["peak_above_runtime_bytes"] = out["peak_rss_bytes"] - out["rss_runtime_bytes"]
    return out


def measure(cfg: dict, method: str, mmap_threshold: int | None) -> dict:
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--_worker", json.dumps(dict(cfg, method=method))]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"worker exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"}


# ------------------------------------------------------------------------------------------------- report
def render(res: dict) -> str:
    cfg, info, env = res["config"], res["info"], res["env"]
    t = res["timing"]
    ref_a, ref_b = t["ours-dense"]["median"], t["functional_call"]["median"]
    lines = [
        "# LoRA adapters as task vectors: one AdaMerging step (CPU)",
        "",
        f"`{res['command']}` on {env['device']} ({env['cpu_threads']} threads), {env['date']}, git {env['git']}, "
        f"load average {env['loadavg_start']} -> {res['loadavg_end']}.",
        "",
        f"Llama-shaped stack: hidden {cfg['hidden']}, MLP {cfg['mlp']}, {cfg['layers']} layers "
        f"({info['params'] / 1e6:.1f}M parameters, {info['pretrained_bytes'] / MiB:.0f} MiB fp32); {cfg['tasks']} "
        f"adapters of rank {cfg['rank']} on all 7 projections of every layer ({info['adapter_bytes'] / MiB:.1f} MiB "
        f"fp32 in all; the dense task vectors they stand for: {info['task_vector_bytes'] / MiB:.0f} MiB); "
        f"{cfg['batch']} x {cfg['seq']} tokens per task, {cfg['classes']}-way frozen heads; layer-wise, "
        f"{res['equivalence']['steps']} steps checked equal first (max |d coef| "
        + ", ".join(f"{k} {v['max_abs_coef_diff']:.1e}" for k, v in res["equivalence"]["methods"].items())
        + f"); {cfg['steps']} interleaved timed steps after {cfg['warmup']} warm-up.",
        "",
        "| method | step (median) | vs (a) | vs (b) | step peak above runtime | same, MMAP_THRESHOLD | built state |"
        " build peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        mem, memt = res["memory"][m]["default"], res["memory"][m]["mmap_threshold"]
        med = t[m]["median"]
        build_state = mem["rss_after_build_bytes"] - mem["rss_runtime_bytes"]
        lines.append(f"| {m} | {med:.3f} s | {ref_a / med:.2f}x | {ref_b / med:.2f}x | "
                     f"{mem['peak_above_runtime_bytes'] / MiB:.0f} MiB | "
                     f"{memt['peak_above_runtime_bytes'] / MiB:.0f} MiB | {build_state / MiB:.0f} MiB | "
                     f"{(mem['build_peak_rss_bytes'] - mem['rss_runtime_bytes']) / MiB:.0f} MiB |")  # fmt: skip
    g = res["goals"]
    lines += [
        "",
        f"(a) also spent {info['materialize_seconds']:.2f} s once materializing the dense task vectors (not in its "
        "step time). 'vs' columns: how many times faster than (a) / (b) (their median over ours). Memory columns "
        "(RSS above the warmed runtime, glibc's default allocator unless marked): the peak during the steps "
        "(VmHWM reset after the build), the state once built (the caller's adapter tensors dropped), and the peak "
        "while building (the caller's adapters and the method's own copy both alive).",
        "",
        f"Memory goal of ours: peak <= pretrained {g['pretrained_bytes'] / MiB:.0f} MiB + 1.5 x adapters "
        f"{g['adapter_bytes'] / MiB:.1f} MiB + activations {g['activation_bytes'] / MiB:.0f} MiB = "
        f"{g['budget_bytes'] / MiB:.0f} MiB: measured {g['peak_bytes'] / MiB:.0f} MiB with glibc's default allocator, "
        f"{g['peak_mmap_bytes'] / MiB:.0f} MiB with MALLOC_MMAP_THRESHOLD_ -> "
        f"{'met' if g['memory_met'] else 'NOT met'} ({'met' if g['memory_met_mmap'] else 'not met'} with the "
        f"threshold). Speed goal (faster than (a) and (b)): {'met' if g['speed_met'] else 'NOT met'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--classes", type=int, default=256, help="width of each task's frozen head")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="sequences per task per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--check-steps", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "lora_step_cpu"), help="result path without suffix")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args._worker))), flush=True)
        return 0
    torch.set_num_threads(args.threads)
    cfg = {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "heads", "vocab", "classes", "tasks", "rank",
                                         "batch", "seq", "steps", "warmup", "mem_steps", "threads", "seed")}
    res = {"command": "python -m benchmarks.bench_lora " + " ".join(sys.argv[1:] if argv is None else argv),
           "config": cfg, "env": env_info("cpu")}
    print("building the workload (dense task vectors included, for (a) and (b)) ...", flush=True)
    wl, adapters = build(cfg, dense=True)
    res["info"] = wl.info
    census = workload_census(wl)
    runners = [make_runner(m, wl, adapters) for m in METHODS]
    res["equivalence"] = check_equivalence(runners, wl, args.check_steps)
    print("equivalence OK; timing ...", flush=True)
    times = time_interleaved(runners, args.steps, args.warmup, None)
    res["timing"] = {m: stats(times[m]) for m in METHODS}
    for r in runners:
        r.close()
    del runners, wl, adapters
    gc.collect()
    res["memory"] = {}
    for m in METHODS:
        res["memory"][m] = {"default": measure(cfg, m, None), "mmap_threshold": measure(cfg, m, MMAP_THRESHOLD)}
        for v in res["memory"][m].values():
            if "error" in v:
                raise SystemExit(f"memory worker for {m} failed: {v['error']}")
        print(f"memory {m}: " + ", ".join(f"{k} {v['peak_above_runtime_bytes'] / MiB:.0f} MiB"
                                          for k, v in res["memory"][m].items()), flush=True)  # fmt: skip
    info = res["info"]
    budget = info["pretrained_bytes"] + 1.5 * info["adapter_bytes"] + census["activation_bytes"]
    ours = res["memory"]["ours-lora"]
    t = res["timing"]
    res["goals"] = {
        "pretrained_bytes": info["pretrained_bytes"], "adapter_bytes": info["adapter_bytes"],
        "activation_bytes": census["activation_bytes"], "budget_bytes": budget,
        "peak_bytes": ours["default"]["peak_above_runtime_bytes"],
        "peak_mmap_bytes": ours["mmap_threshold"]["peak_above_runtime_bytes"],
        "memory_met": ours["default"]["peak_above_runtime_bytes"] <= budget,
        "memory_met_mmap": ours["mmap_threshold"]["peak_above_runtime_bytes"] <= budget,
        "speed_met": t["ours-lora"]["median"] < min(t["ours-dense"]["median"], t["functional_call"]["median"]),
    }  # fmt: skip
    res["census"] = census
    res["loadavg_end"] = loadavg()
    md = render(res)
    write_results(args.out, res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
