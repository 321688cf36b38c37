"""The step benchmark's report: which targets a run met and why (:func:`evaluate_goals`), its markdown table
(:func:`render_markdown`), plot (:func:`render_plot`) and JSON, written by :func:`write_results`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adamerge_fast.io import atomic_path, write_text_atomic

from .protocol import MMAP_THRESHOLD, GiB

# targets per workload and device type, for the default "ours" (auto backend, concat)
GOALS = {
    "vit-b32-cpu": {"cpu": {"speedup_vs_b": 1.5, "mem_vs_b": 0.8}},
    "vit-b32": {"cuda": {"speedup_vs_b": 5.0, "speedup_vs_a": 100.0, "x_floor": 2.0, "mem_vs_b": 0.8}},
    "vit-b32-bf16": {"cuda": {"speedup_vs_b": 5.0, "speedup_vs_a": 100.0, "x_floor": 2.0, "mem_vs_b": 0.8}},
}


def peak_bytes(mem: dict, device: torch.device) -> int:
    """The peak of a memory measurement: ``max_memory_allocated`` on CUDA, the peak RSS on the CPU."""
    return mem["cuda_peak_bytes"] if device.type == "cuda" else mem["peak_rss_bytes"]


def increase_bytes(mem: dict, device: torch.device) -> int:
    """How far a memory measurement's peak rose above the state right after the build."""
    return mem["cuda_peak_increase_bytes"] if device.type == "cuda" else mem["rss_increase_bytes"]


def evaluate_goals(name: str, device: torch.device, res: dict) -> list[dict]:
    goals = GOALS.get(name, {}).get(device.type)
    ours = res.get("default_ours")
    if not goals or not ours or ours not in res["methods"]:
        return []
    r = res["methods"][ours]
    out = []
    for key, thr in goals.items():
        val = r.get(key)
        if key.startswith("speedup"):
            met, text = (val is not None and val >= thr), f">= {thr:g}x"
        else:
            met, text = (val is not None and val <= thr), f"<= {thr:g}x"
        out.append({"goal": key, "target": text, "value": val, "met": bool(met), "method": ours,
                    "note": _goal_note(key, thr, val, res, device)})
    return out


def _goal_note(key: str, thr: float, val, res: dict, device: torch.device) -> str:
    """Why a goal is met or missed, from the measured figures."""
    if val is None:
        return "not measured"
    ours = res["default_ours"]
    fl = res["floor"]
    r = res["methods"][ours]
    if key.startswith("mem"):
        base = "functional_call" if key.endswith("_b") else "official"
        tag = "b" if base == "functional_call" else "a"
        mb = res["methods"].get(base, {}).get("memory", {})
        mo = r.get("memory", {})
        if not mb or "error" in mb or not mo or "error" in mo:
            return "memory not measured"
        common = mb.get("cuda_after_build_bytes") if device.type == "cuda" else mb["rss_after_build_bytes"]
        lower = common / peak_bytes(mb, device)
        s = (f"state common to every method (process + pretrained + task vectors after build) = "
             f"{common / GiB:.2f} GiB = {lower:.2f}x of ({tag})'s peak, so no method can go below {lower:.2f}x; "
             f"ours adds {increase_bytes(mo, device) / GiB:.3f} GiB over it, ({tag}) adds "
             f"{increase_bytes(mb, device) / GiB:.3f} GiB "
             f"({r.get(f'mem_increase_vs_{key[-1]}', float('nan')):.2f}x).")
        mmo, mmb = mo and r.get("memory_mmap"), res["methods"].get(base, {}).get("memory_mmap")
        if mmo and mmb and "error" not in mmo and "error" not in mmb:
            ratio = mmo["peak_rss_bytes"] / mmb["peak_rss_bytes"]
            s += (f" With freed tensors returned to the OS at once (mmap threshold {MMAP_THRESHOLD // 1024} KiB) the "
                  f"peaks are {mmo['peak_rss_bytes'] / GiB:.2f} vs {mmb['peak_rss_bytes'] / GiB:.2f} GiB "
                  f"({ratio:.2f}x; increases {mmo['rss_increase_bytes'] / GiB:.3f} vs "
                  f"{mmb['rss_increase_bytes'] / GiB:.3f} GiB); what the default allocator adds on top is freed "
                  f"memory glibc keeps resident. So on live tensors ours is {ratio:.2f}x of the peer, "
                  f"{'within' if ratio <= thr else 'not within'} the {thr:g}x target, where the common state alone "
                  f"is {mmb['rss_after_build_bytes'] / mmb['peak_rss_bytes']:.2f}x of the peer's peak.")
        if val > thr:
            tvb = res["info"]["task_vector_bytes"]
            s += (f" Missed because the common state dominates: to close it, hold the task vectors in bf16 "
                  f"(task_vector_dtype=torch.bfloat16: -{tvb / 2 / GiB:.2f} GiB, not possible for the peers without "
                  f"changing their numerics) or memory-map them from disk.")
        return s
    if key == "x_floor":
        return (f"floor {fl['floor_s'] * 1e3:.1f} ms ({fl['bound']}-bound: {fl['flops'] / 1e12:.3f} TFLOP at "
                f"{fl['matmul_rate_flops'] / 1e12:.1f} TFLOP/s = {fl['compute_s'] * 1e3:.1f} ms; "
                f"{fl['bytes'] / 1e9:.2f} GB at {fl['copy_bw_bytes_per_s'] / 1e9:.0f} GB/s = "
                f"{fl['memory_s'] * 1e3:.1f} ms)")
    med = r["step_s"]["median"]
    s = (f"ours {med * 1e3:.1f} ms/step = {r['x_floor']:.2f}x the floor ({fl['bound']}-bound, "
         f"{fl['floor_s'] * 1e3:.1f} ms)")
    if val < thr:
        base = "functional_call" if key.endswith("_b") else "official"
        bmed = res["methods"][base]["step_s"]["median"]
        if bmed / fl["floor_s"] < thr:
            s += (f"; ({key[-1]}) takes {bmed * 1e3:.1f} ms, so even a step at the floor would be only "
                  f"{bmed / fl['floor_s']:.2f}x faster")
        else:
            s += (f"; reaching {thr:g}x needs {bmed / thr * 1e3:.1f} ms/step "
                  f"({bmed / thr / fl['floor_s']:.2f}x the floor)")
    return s


# ------------------------------------------------------------------------------------------------ output
def _fmt_b(n) -> str:
    return "-" if n is None else f"{n / GiB:.3f}"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _memory_figures(mem: dict | None, dev: str) -> tuple[int | None, int | None]:
    """(peak, increase over build) of a memory measurement; (None, None) when it is missing or failed."""
    if not mem or "error" in mem:
        return None, None
    if dev == "cuda":
        return mem.get("cuda_peak_bytes"), mem.get("cuda_peak_increase_bytes")
    return mem.get("peak_rss_bytes"), mem.get("rss_increase_bytes")


def render_markdown(result: dict) -> str:
    env = result["env"]
    dev = env["device_type"]
    rates = ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in result["matmul_rate_flops"].items())
    L = [f"# AdaMerging step benchmark ({dev})", "",
         f"- device: **{env['device']}** ({env['cpu_threads']} CPU threads; CPU: {env['cpu_model']})",
         f"- date: {env['date']}; torch {env['torch']}, python {env['python']}"
         + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
         + (f", triton {env['triton']}" if env.get("triton") else "")
         + (f"; git {env['git']}" if env.get("git") else ""),
         f"- backends: {', '.join(f'{k}: {v}' for k, v in env['backend_status'].items())}",
         f"- command: `{result['command']}`",
         f"- load average (1, 5, 15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')} "
         f"(the machine may be shared: only the side-by-side ratios are meaningful)",
         f"- measured in this run: matmul {rates}; "
         f"copy bandwidth {result['copy_bw_bytes_per_s'] / 1e9:.1f} GB/s (read + write)",
         "",
         "Methods: (a) `official` = the official AdaMerging code's step (merge every parameter on the CPU with "
         "autograd per task batch, copy to the device, one backward); (b) `functional_call` = FusionBench's "
         "layer-wise AdaMerging (merge on the device per step, `functional_call` + `backward(retain_graph=True)` per "
         "task); `ours-<backend>-<batching>` = `AdaMergedModel` trained by `adamerge()`. All compute the same "
         "coefficients (checked before timing). Step times are interleaved in one process (ratios are side by "
         "side); memory is measured per method in a fresh process (peak: "
         + ("`torch.cuda.max_memory_allocated`" if dev == "cuda" else "peak RSS (VmHWM reset after the build)")
         + "; +build: the increase over the state right after model + task vectors are built).", ""]
    for w in result["workloads"]:
        if "error" in w:
            L += [f"## {w['workload']}", "", f"**FAILED**: {w['error']}", ""]
            continue
        sp, info, fl = w["spec"], w["info"], w["floor"]
        L += [f"## {w['workload']}", "",
              f"{info['params'] / 1e6:.1f}M parameters in {info['param_tensors']} tensors ({info['weight_dtype']}), "
              f"K={sp['tasks']} task vectors ({info['task_vector_dtype']}, {info['task_vector_bytes'] / GiB:.2f} GiB), "
              f"{sp['batch']} inputs per task, {sp['precision']}, layer-wise. Floor {fl['floor_s'] * 1e3:.1f} ms "
              f"({fl['bound']}-bound: {fl['flops'] / 1e12:.3f} TFLOP / {fl['matmul_rate_flops'] / 1e12:.3f} TFLOP/s "
              f"({fl['matmul_dtype']}) = {fl['compute_s'] * 1e3:.1f} ms; {fl['bytes'] / 1e9:.2f} GB / "
              f"{fl['copy_bw_bytes_per_s'] / 1e9:.1f} GB/s = {fl['memory_s'] * 1e3:.1f} ms).", ""]
        n_req = w["steps_requested"]
        short = [m for m, r in w["methods"].items() if r["step_s"].get("n", 0) < n_req]
        if short:
            L += [f"Timed steps: {n_req} requested; "
                  + ", ".join(f"{m} ran {w['methods'][m]['step_s']['n']}" for m in short)
                  + f" (a method is timed until its steps pass {w.get('max_method_seconds', 0):g} s, at least "
                  f"{w.get('min_steps', 0)} steps: `--max-method-seconds`, `--min-steps`).", ""]
        mem_col = "peak GPU mem GiB" if dev == "cuda" else "peak RSS GiB"
        L += [f"| method | step median ms | min | max | n | speed vs (a) | speed vs (b) | x floor | {mem_col} | "
              "+build GiB | mem vs (a) | mem vs (b) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, r in w["methods"].items():
            st = r["step_s"]
            pk, inc = _memory_figures(r.get("memory"), dev)
            tag = " (default)" if m == w.get("default_ours") else ""
            if not st.get("n"):
                L.append(f"| {m}{tag} | {r.get('error', 'not timed')} | | | 0 | | | | {_fmt_b(pk)} | {_fmt_b(inc)} | "
                         f"{_fmt_x(r.get('mem_vs_a'))} | {_fmt_x(r.get('mem_vs_b'))} |")
                continue
            L.append(f"| {m}{tag} | {st['median'] * 1e3:.1f} | {st['min'] * 1e3:.1f} | {st['max'] * 1e3:.1f} | "
                     f"{st['n']} | {_fmt_x(r.get('speedup_vs_a'))} | {_fmt_x(r.get('speedup_vs_b'))} | "
                     f"{_fmt_x(r.get('x_floor'))} | {_fmt_b(pk)} | {_fmt_b(inc)} | {_fmt_x(r.get('mem_vs_a'))} | "
                     f"{_fmt_x(r.get('mem_vs_b'))} |")
        L.append("")
        mm = {m: r["memory_mmap"] for m, r in w["methods"].items()
              if r.get("memory_mmap") and "error" not in r["memory_mmap"]}
        if mm:
            L += [f"Peak RSS again with glibc's `MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` (each method in a fresh "
                  "process): every freed allocation above 128 KiB goes back to the OS at once, so this peak follows "
                  "the live tensors rather than the free memory glibc keeps resident (which the default column "
                  "includes):", "",
                  "| method | peak RSS GiB | +build GiB | vs (a) | vs (b) |", "|---|---:|---:|---:|---:|"]
            for m, v in mm.items():
                r = w["methods"][m]
                L.append(f"| {m} | {_fmt_b(v['peak_rss_bytes'])} | {_fmt_b(v['rss_increase_bytes'])} | "
                         f"{_fmt_x(r.get('mem_mmap_vs_a'))} | {_fmt_x(r.get('mem_mmap_vs_b'))} |")
            L.append("")
        eq = w["equivalence"]
        tol = eq["tolerance"]
        share = "all" if tol["frac"] == 1.0 else ">= %.0f%% of the" % (100 * tol["frac"])
        L += [f"Equivalence, checked before timing ({eq['steps']} steps from the same init on the same batches, "
              f"{eq['precision']}, against `{eq['reference_method']}`; tolerance |d coef| <= {tol['coef_atol']:g} "
              f"for {share} coefficients, relative loss <= {tol['loss_rtol']:g}): "
              + ", ".join(f"{m} max|dc| {v['max_abs_coef_diff']:.1e} ({100 * v['frac_coef_within_tol']:.1f}% within), "
                          f"loss rel {v['max_rel_loss_diff']:.1e}"
                          for m, v in eq["methods"].items() if m != eq["reference_method"])
              + "." + (f" Dropped: {eq['failed']}." if eq.get("failed") else ""), ""]
        if w.get("official_malloc_trim"):
            L += ["(a) ran with `malloc_trim(0)` after each task's merge: without it, glibc keeps the official "
                  "per-task CPU merge's freed temporaries resident (measured +3.3 GiB RSS per task on ViT-B/32, "
                  "K=8), which exceeds this machine's memory; trimming costs (a) page faults (~10-20% of its step "
                  "on vit-small).", ""]
        if w.get("goals"):
            L += ["Goals (default method `" + w["default_ours"] + "`):", "", "| goal | target | measured | met | why |",
                  "|---|---|---:|---|---|"]
            for g in w["goals"]:
                L.append(f"| {g['goal']} | {g['target']} | {_fmt_x(g['value'])} | {'yes' if g['met'] else '**no**'} "
                         f"| {g['note']} |")
            L.append("")
        if w.get("profile"):
            p = w["profile"]
            L += [f"Where `{p['method']}`'s forward+backward goes (torch.profiler, top ops by self time):", "",
                  "| op | self ms | calls | share |", "|---|---:|---:|---:|"]
            L += [f"| `{r['op']}` | {r['self_ms']:.1f} | {r['calls']} | {100 * r['share']:.1f}% |"
                  for r in p["top_ops"]]
            L.append("")
    if result.get("kernels"):
        L += ["## Kernels", "", "| case | op | backend | ms | GB/s | of copy bw | TFLOP/s | of matmul rate |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
        for k in result["kernels"]:
            L.append(f"| {k['case']} | {k['op']} | {k['backend']} | {k['seconds'] * 1e3:.3f} | {k['GB/s']:.1f} | "
                     f"{100 * k['bw_fraction']:.0f}% | {k['TFLOP/s']:.2f} | {100 * k['flop_fraction']:.0f}% |")
        L.append("")
    if result.get("plot"):
        L += [f"![step time and peak memory]({result['plot']})", ""]
    return "\n".join(L)


def render_plot(result: dict, path: Path) -> bool:
    """Step times (with the floor) and peak memory per method and workload, as a PNG; False without matplotlib
    or without a workload that ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    ws = [w for w in result["workloads"] if "error" not in w]
    if not ws:
        return False
    dev = result["env"]["device_type"]
    height = 3.2 + 0.35 * max(len(w["methods"]) for w in ws) * len(ws)
    fig, axes = plt.subplots(len(ws), 2, figsize=(13, height), squeeze=False)
    for i, w in enumerate(ws):
        ms = [m for m in w["methods"] if w["methods"][m]["step_s"].get("n")]
        med = [w["methods"][m]["step_s"]["median"] * 1e3 for m in ms]
        lo = [m_ - w["methods"][m]["step_s"]["min"] * 1e3 for m_, m in zip(med, ms, strict=True)]
        hi = [w["methods"][m]["step_s"]["max"] * 1e3 - m_ for m_, m in zip(med, ms, strict=True)]
        colors = ["tab:red" if m == "official" else "tab:orange" if m == "functional_call" else "tab:blue" for m in ms]
        ax = axes[i][0]
        ax.barh(ms, med, xerr=[lo, hi], color=colors)
        ax.axvline(w["floor"]["floor_s"] * 1e3, color="k", ls="--", lw=1, label="floor")
        ax.set_xscale("log")
        ax.set_xlabel("step time, ms (median, min-max; log)")
        ax.set_title(f"{w['workload']}: step time")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax = axes[i][1]
        figures = [_memory_figures(w["methods"][m].get("memory"), dev) for m in ms]
        peaks = [(pk or 0) / GiB for pk, _ in figures]
        incs = [(inc or 0) / GiB for _, inc in figures]
        ax.barh(ms, peaks, color=colors, alpha=0.45)
        ax.barh(ms, incs, color=colors)
        handles = [Patch(color="gray", alpha=0.45, label="peak"), Patch(color="gray", label="increase over build")]
        mm = [((w["methods"][m].get("memory_mmap") or {}).get("peak_rss_bytes") or 0) / GiB for m in ms]
        if any(mm):
            ax.scatter(mm, ms, marker="|", s=300, color="k", zorder=3)
            handles.append(ax.scatter([], [], marker="|", s=300, color="k",
                                      label=f"peak, mmap threshold {MMAP_THRESHOLD // 1024} KiB"))
        ax.set_xlabel("GiB (" + ("max_memory_allocated" if dev == "cuda" else "peak RSS") + ")")
        ax.set_title(f"{w['workload']}: peak memory")
        ax.invert_yaxis()
        ax.legend(handles=handles, loc="lower right")
    fig.suptitle(f"AdaMerging step: {result['env']['device']} ({result['env']['date'][:10]})")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_results(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` under ``out_dir``, each written
    atomically; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    if render_plot(result, paths["png"]):
        result["plot"] = paths["png"].name
    else:
        paths.pop("png")
    write_text_atomic(paths["json"], json.dumps(result, indent=1, default=str))
    write_text_atomic(paths["md"], render_markdown(result))
    return paths
