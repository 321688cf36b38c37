"""The step benchmark's command line: the options, one workload's run (:func:`run_workload`) and :func:`main`."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._env import default_device, env_info, loadavg
from .breakdown import kernel_bench, profile_ours
from .protocol import (
    MMAP_THRESHOLD,
    RESULT_TAG,
    EquivalenceError,
    GiB,
    check_equivalence,
    floor_model,
    measure_copy_bandwidth,
    measure_matmul_rate,
    measure_memory,
    memory_worker,
    stats,
    time_interleaved,
    workload_census,
)
from .report import evaluate_goals, increase_bytes, peak_bytes, render_markdown, write_results
from .runners import available_methods, default_ours, make_runner, malloc_trim, official_trim
from .workloads import DEFAULT_WORKLOADS, WORKLOADS, build_workload, resolve_spec

PROG = "python -m benchmarks.adamerging_step"
RESULTS = Path(__file__).resolve().parent.parent / "results"


def run_workload(name: str, device: torch.device, args, rates: dict, copy_bw: float, log=print) -> dict:
    """One workload: build it, the floor, the equivalence check, the interleaved timing, each method's memory in a
    fresh process, the ratios and the goals; returns the workload's entry of the result JSON."""
    overrides = {"tasks": args.tasks, "batch": args.batch, "impl": args.vit_impl}
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
        log(f"[{name}] equivalence OK: " + ", ".join(f"{k} |dc|<={v['max_abs_coef_diff']:.1e}"
                                                    for k, v in res["equivalence"]["methods"].items()))
        log(f"[{name}] timing {steps} interleaved steps (+{args.warmup} warm-up) ...")
        cap = args.max_method_seconds
        if cap is None:
            cap = wl.spec.get("max_method_seconds", 180.0)
        min_steps = args.min_steps if args.min_steps is not None else wl.spec.get("min_steps", 3)
        res["max_method_seconds"], res["min_steps"] = cap, min_steps
        times = time_interleaved(runners, steps, args.warmup, cap, min_steps, log=log, failed=failed)
    finally:
        for r in runners:
            r.close()
        runners.clear()
        gc.collect()
    for m in methods:
        res["methods"][m] = {"step_s": stats(times.get(m, []))}
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
    malloc_trim()  # hand this process's freed heap back before the memory subprocesses run beside it
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_memory:
        mem_methods = [m.strip() for m in args.memory_methods.split(",")] if args.memory_methods else methods
        for m in (m for m in methods if m in mem_methods):
            log(f"[{name}] memory: {m} in a fresh process ({args.mem_steps} steps) ...")
            mem = measure_memory(name, m, device, overrides, args.mem_steps, args.seed, trim, args.threads)
            res["methods"][m]["memory"] = mem
            if "error" in mem:
                log(f"    ERROR: {mem['error']}")
            else:
                log(f"    peak {peak_bytes(mem, device) / GiB:.3f} GiB, "
                    f"+{increase_bytes(mem, device) / GiB:.3f} GiB over build")
            if device.type == "cpu" and args.live_memory:
                mem = measure_memory(name, m, device, overrides, args.mem_steps, args.seed, trim, args.threads,
                                     mmap_threshold=MMAP_THRESHOLD)
                res["methods"][m]["memory_mmap"] = mem
                if "error" not in mem:
                    log(f"    with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}: peak {mem['peak_rss_bytes'] / GiB:.3f} "
                        f"GiB, +{mem['rss_increase_bytes'] / GiB:.3f} GiB over build")

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
                r[f"mem_vs_{tag}"] = peak_bytes(mb, device) / peak_bytes(mm, device)
                r[f"mem_increase_vs_{tag}"] = increase_bytes(mb, device) / max(increase_bytes(mm, device), 1)
            mb, mm = r.get("memory_mmap", {}), res["methods"].get(base, {}).get("memory_mmap", {})
            if base in methods and mb and mm and "error" not in mb and "error" not in mm:
                r[f"mem_mmap_vs_{tag}"] = mb["peak_rss_bytes"] / mm["peak_rss_bytes"]
    res["default_ours"] = default_ours(device, methods)
    res["goals"] = evaluate_goals(name, device, res)
    return res


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "End-to-end AdaMerging step benchmark: ours vs the official code's and FusionBench's approaches "
        "(same coefficients checked first; interleaved timing; per-method memory in fresh processes; the floor)."))
    p.add_argument("--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: cpu: "
                   f"{','.join(DEFAULT_WORKLOADS['cpu'])}; cuda: {','.join(DEFAULT_WORKLOADS['cuda'])})")
    p.add_argument("--methods", help="comma-separated subset (default: every method available on the device)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per method (default: per workload, 10; 5 on vit-b32-cpu)")
    p.add_argument("--warmup", type=int, default=0,
                   help="extra warm-up steps per method (default 0: the equivalence check's steps are the warm-up)")
    p.add_argument("--check-steps", type=int, default=2, help="steps of the equivalence check (default 2)")
    p.add_argument("--max-method-seconds", type=float, default=None,
                   help="stop timing a method once its timed steps exceed this (default: per workload, 180; 60 on "
                   "vit-b32-cpu)")
    p.add_argument("--min-steps", type=int, default=None,
                   help="timed steps every method gets regardless of the cap (default: per workload, 3; 1 on "
                   "vit-b32-cpu)")
    p.add_argument("--mem-steps", type=int, default=1,
                   help="steps of each fresh-process memory run (default 1: every step allocates alike)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--memory-methods", help="comma-separated methods whose memory is measured (default: all run)")
    p.add_argument("--no-live-memory", dest="live_memory", action="store_false",
                   help="CPU: skip the second memory run per method with glibc's mmap threshold fixed at 128 KiB")
    p.add_argument("--vit-impl", choices=("auto", "open_clip", "torch"), default=None,
                   help="ViT towers from open_clip or the plain-torch copy of them (default auto: open_clip when "
                   "installed)")
    p.add_argument("--tasks", type=int, default=None, help="override the number of tasks K")
    p.add_argument("--batch", type=int, default=None, help="override the inputs per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP stalls when other jobs load the cores")
    p.add_argument("--official-trim", choices=("auto", "on", "off"), default="auto",
                   help="malloc_trim after each task of (a) (auto: only where its heap growth would exhaust memory)")
    p.add_argument("--kernels", dest="kernels", action="store_true", default=None,
                   help="per-kernel GB/s and TFLOP/s (default: on CUDA)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler breakdown of ours")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--stem", default=None, help="file name stem (default: adamerging_step_<cpu|cuda>[_<workloads>])")
    p.add_argument("--quick", action="store_true", help="small matmul/bandwidth calibration (tests; floors less exact)")
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown and plot of an earlier run's JSON")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the benchmark with the command-line arguments ``argv`` (default: ``sys.argv[1:]``); ``prog`` names the
    command in the help and in the recorded command line. Returns the exit status (1: the equivalence check
    failed)."""
    args = _parser(prog).parse_args(argv)
    if args._worker:
        res = memory_worker(json.loads(args._worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
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
    device = default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    default = DEFAULT_WORKLOADS.get(device.type, DEFAULT_WORKLOADS["cpu"])
    workloads = [w.strip() for w in args.workloads.split(",")] if args.workloads else default
    for w in workloads:
        resolve_spec(w)
    out_dir = Path(args.out) if args.out else RESULTS
    stem = args.stem or f"adamerging_step_{device.type}" + ("" if workloads == default else "_" + "+".join(workloads))
    cmd = prog + " " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(s: str) -> None:
        print(s, flush=True)

    result: dict[str, Any] = {"benchmark": "adamerging_step", "command": cmd.strip(), "env": env_info(device),
                              "workloads": []}
    log(f"device: {result['env']['device']}; backends: {result['env']['backend_status']}")
    if args.quick:
        rates = {dt: measure_matmul_rate(device, d, n=256, reps=2)
                 for dt, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        copy_bw = measure_copy_bandwidth(device, nbytes=16 * 1024**2, reps=2)
    else:
        rates = {"fp32": measure_matmul_rate(device, torch.float32)}
        if device.type == "cuda":
            rates["bf16"] = measure_matmul_rate(device, torch.bfloat16)
        else:
            rates["bf16"] = measure_matmul_rate(device, torch.bfloat16, n=1024, reps=2)
        copy_bw = measure_copy_bandwidth(device)
    result["matmul_rate_flops"], result["copy_bw_bytes_per_s"] = rates, copy_bw
    log("matmul " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in rates.items())
        + f"; copy {copy_bw / 1e9:.1f} GB/s")

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
    result["env"]["loadavg_end"] = loadavg()
    paths = write_results(result, out_dir, stem)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    print(render_markdown(result))
    return 1 if failed else 0
