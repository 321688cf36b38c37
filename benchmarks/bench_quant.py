"""One AdaMerging step with fp32, bf16, int8 and int4 task vectors: task-vector bytes, peak RSS (each storage in a
fresh process) and step time (all storages interleaved in one process), on the step benchmark's workloads.

The workload is :mod:`benchmarks.adamerging_step.workloads` (default ``vit-b32-cpu``: the open_clip ViT-B/32 image
tower, random init, 8 tasks x 2 images, layer-wise); its random fp32 task vectors are converted to each storage one
parameter at a time (bf16: a cast; int8/int4: :func:`adamerge_fast.ops.quant.quantize`, parameters of 2+ dims; the
others stay fp32), and the fp32 ones are dropped unless fp32 is measured. The method is ours
(``AdaMergedModel`` + ``adamerge()``, backend ``--backend``, concat task batching) as in
``benchmarks/adamerging_step/runners.py``; its ``AdaMergedModel`` holds the task vectors as given.

- Memory: per storage, a fresh ``python -m benchmarks.bench_quant --_worker`` builds the workload and its task
  vectors, records the RSS, resets the peak (``/proc/self/clear_refs``), builds the model, runs ``--mem-steps``
  steps and reports the peak RSS (``VmHWM``) and its increase over the build.
- Time: every storage's model in one process, ``--steps`` steps interleaved (the order rotated every round) after
  ``--check-steps`` untimed steps; medians. The losses and coefficients after the untimed steps are reported
  against fp32 (quantization changes the values a little: not a check, a record).

Usage::

    python -m benchmarks.bench_quant                          # vit-b32-cpu; writes results/quant_step_cpu.{json,md}
    python -m benchmarks.bench_quant --workload vit-small --steps 3 --out /tmp/q
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from adamerge_fast.merging.quantized import nbytes
from adamerge_fast.ops.quant import quantize

from ._env import ROOT, env_info, loadavg, write_results
from .adamerging_step.protocol import (
    RESULT_TAG,
    _proc_status_kb,
    _reset_peak_rss,
    _warm_runtime,
    stats,
    time_interleaved,
)
from .adamerging_step.runners import OursRunner, malloc_trim
from .adamerging_step.workloads import build_workload

RESULTS = Path(__file__).resolve().parent / "results"
STORAGES = ("fp32", "bf16", "int8", "int4")
GiB = 1024**3


def convert(tv: dict, storage: str) -> dict:
    """The fp32 task vectors ``{name: [K, *S]}`` in ``storage``, one parameter at a time (``tv`` is emptied)."""
    out = {}
    for n in list(tv):
        t = tv.pop(n)
        if storage == "bf16":
            out[n] = t.to(torch.bfloat16)
        elif storage in ("int8", "int4") and t.dim() >= 3:
            out[n] = quantize(t, storage)
        else:
            out[n] = t
        del t
    return out


def build(workload: str, storages, seed: int = 0):
    """The workload with its task vectors in each of ``storages``: ``(wl, {storage: task vectors})``."""
    wl = build_workload(workload, torch.device("cpu"), None, seed)
    fp32 = wl.task_vectors
    wl.task_vectors = None
    tvs = {}
    for s in storages:
        if s == "fp32":
            continue
        tvs[s] = convert(dict(fp32), s) if "fp32" in storages else convert(fp32, s)
    if "fp32" in storages:
        tvs = {"fp32": fp32, **tvs}
    del fp32
    gc.collect()
    malloc_trim()
    return wl, {s: tvs[s] for s in storages}


def runner(wl, tv, storage: str, backend: str) -> OursRunner:
    wl.task_vectors = tv
    r = OursRunner(wl, backend, "concat")
    r.name = f"ours-{backend}-concat-{storage}"
    wl.task_vectors = None
    return r


def memory_worker(cfg: dict) -> dict:
    """In a fresh process: build the workload and one storage's task vectors, then the model; run the steps."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    wl, tvs = build(cfg["workload"], [cfg["storage"]], cfg.get("seed", 0))
    tv = tvs[cfg["storage"]]
    _warm_runtime(wl)
    gc.collect()
    malloc_trim()
    out = {"storage": cfg["storage"], "task_vector_bytes": nbytes(tv)}
    out["rss_after_build_bytes"] = (_proc_status_kb("VmRSS") or 0) * 1024
    out["hwm_reset"] = _reset_peak_rss()
    r = runner(wl, tv, cfg["storage"], cfg["backend"])
    del tvs, tv
    out["step_times"] = [r.step() for _ in range(cfg["steps"])]
    r.close()
    hwm = (_proc_status_kb("VmHWM") or 0) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_rss_bytes"] = hwm if out["hwm_reset"] and hwm else maxrss
    out["rss_increase_bytes"] = out["peak_rss_bytes"] - out["rss_after_build_bytes"]
    return out


def measure_memory(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_quant", "--_worker", json.dumps(cfg)], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"worker exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"}


def goals(res: dict) -> list[dict]:
    """int8 <= 0.3x and int4 <= 0.17x of the fp32 task-vector bytes; the int8 step no slower than the bf16 step."""
    out = []
    b = res["task_vector_bytes"]
    if "fp32" in b:
        for s, thr in (("int8", 0.3), ("int4", 0.17)):
            if s in b:
                out.append({"goal": f"{s} task-vector bytes <= {thr}x fp32", "met": b[s] <= thr * b["fp32"],
                            "detail": f"{b[s] / GiB:.3f} GiB = {b[s] / b['fp32']:.3f}x of {b['fp32'] / GiB:.3f} GiB"})
    t = {s: res["step"][s].get("median") for s in res["step"]}
    if t.get("int8") and t.get("bf16"):
        out.append({"goal": "int8 step no slower than bf16 (median, interleaved)", "met": t["int8"] <= t["bf16"],
                    "detail": f"{t['int8']:.2f} s vs {t['bf16']:.2f} s (int8 / bf16 = {t['int8'] / t['bf16']:.3f})"})
    return out


def render(res: dict) -> str:
    e = res["env"]
    lines = [
        "# Quantized task vectors: one AdaMerging step (CPU)", "",
        f"- date: {e['date']}; machine: {e.get('cpu_model')}, torch threads {e.get('cpu_threads')}; "
        f"load average start/end {e.get('loadavg_start')} / {res.get('loadavg_end')}",
        f"- command: `{res['command']}`",
        f"- workload: {res['workload']} ({res['info']['params'] / 1e6:.1f}M parameters in "
        f"{res['info']['param_tensors']} tensors, K={res['K']}), layer-wise, ours with backend `{res['backend']}`, "
        f"concat task batching; steps timed interleaved: {res['steps']} (after {res['check_steps']} untimed)",
        "- memory: each storage in a fresh process (build, reset the peak, model + "
        f"{res['mem_steps']} step(s)); peak RSS = VmHWM",
        "",
        "| task vectors | bytes | vs fp32 | step (median) | vs bf16 | peak RSS | vs fp32 | increase over build | "
        "loss after check steps | max abs coef diff vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    b, st, mem = res["task_vector_bytes"], res["step"], res["memory"]
    for s in res["storages"]:
        m = mem.get(s, {})
        t = st.get(s, {}).get("median")
        tb = st.get("bf16", {}).get("median")
        pk = m.get("peak_rss_bytes")
        pk32 = mem.get("fp32", {}).get("peak_rss_bytes")
        chk = res["check"].get(s, {})

        def f(x, fmt):
            return "n/a" if x is None else format(x, fmt)

        lines.append(
            f"| {s} | {b[s] / GiB:.3f} GiB | {f(b[s] / b['fp32'] if 'fp32' in b else None, '.3f')}x | "
            f"{f(t, '.2f')} s | {f(t / tb if t and tb else None, '.3f')}x | {f(pk / GiB if pk else None, '.2f')} GiB | "
            f"{f(pk / pk32 if pk and pk32 else None, '.3f')}x | "
            f"{f(m.get('rss_increase_bytes', 0) / GiB if pk else None, '.2f')} GiB | {f(chk.get('loss'), '.5f')} | "
            f"{f(chk.get('max_abs_coef_diff'), '.2e')} |")
    lines += ["", "## Goals", "", "| goal | met | detail |", "|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['goal']} | {'yes' if g['met'] else '**no**'} | {g['detail']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="vit-b32-cpu")
    ap.add_argument("--storages", default=",".join(STORAGES), help="comma-separated, from fp32,bf16,int8,int4")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per storage (interleaved)")
    ap.add_argument("--check-steps", type=int, default=1, help="untimed steps first (warm-up; losses recorded)")
    ap.add_argument("--mem-steps", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "quant_step_cpu"), help="output path without extension")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(RESULT_TAG + json.dumps(memory_worker(json.loads(args._worker))), flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    bad = [s for s in storages if s not in STORAGES]
    if bad:
        raise SystemExit(f"unknown storage(s) {bad}; choose from {STORAGES}")
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    res = {"command": "python -m benchmarks.bench_quant " + " ".join(argv_used), "env": env_info(torch.device("cpu")),
           "workload": args.workload, "storages": storages, "backend": args.backend, "steps": args.steps,
           "check_steps": args.check_steps, "mem_steps": args.mem_steps}
    wl, tvs = build(args.workload, storages)
    res["info"], res["K"] = wl.info, wl.K
    res["task_vector_bytes"] = {s: nbytes(tv) for s, tv in tvs.items()}
    print(json.dumps(res["task_vector_bytes"]), flush=True)
    runners = [runner(wl, tvs[s], s, args.backend) for s in storages]
    del tvs
    try:
        res["check"] = {}
        for _ in range(args.check_steps):
            for r in runners:
                r.step()
        ref = runners[0].coefficients()
        for s, r in zip(storages, runners, strict=True):
            res["check"][s] = {"loss": r.last_loss, "max_abs_coef_diff": float((r.coefficients() - ref).abs().max())}
        times = time_interleaved(runners, args.steps, 0, None)
    finally:
        for r in runners:
            r.close()
    res["step"] = {s: stats(times[r.name]) for s, r in zip(storages, runners, strict=True)}
    del runners, wl
    gc.collect()
    malloc_trim()
    res["memory"] = {}
    if not args.no_memory:
        for s in storages:
            print(f"memory: {s} in a fresh process ...", flush=True)
            res["memory"][s] = measure_memory({"workload": args.workload, "storage": s, "backend": args.backend,
                                               "steps": args.mem_steps, "threads": args.threads})
            print(json.dumps({k: v for k, v in res["memory"][s].items() if k != "step_times"}), flush=True)
    res["loadavg_end"] = loadavg()
    res["goals"] = goals(res)
    md = render(res)
    write_results(args.out, res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
