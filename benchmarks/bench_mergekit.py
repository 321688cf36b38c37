"""Static merges side by side with mergekit 0.1.5: wall time, peak RSS, outputs tensor by tensor, under a memory cap.

The benchmark makes its inputs: a Llama-architecture base and 3 fine-tunes in bf16 as sharded Hugging Face
directories (``small``: about 28M parameters; ``1b``: TinyLlama-1.1B's shape, 1.1B parameters, 2.2 GB per
model), written tensor by tensor under ``--workdir`` (default /tmp) and deleted at the end. Each merge runs as its
own process: ``python -m adamerge_fast merge ...`` and mergekit's ``mergekit-yaml`` (through
``benchmarks/mergekit_shim.py`` in ``.venv-mergekit``, made by ``make bench-mergekit``), one after the other;
wall time is the process's, peak RSS its ``ru_maxrss`` (``os.wait4``), so both include start-up and imports.

Matched semantics (mergekit configured with ``dtype: float32, out_dtype: bfloat16``):

- ``task_arithmetic``: mergekit ``task_arithmetic`` with weight 0.3 per model (``normalize: false``) vs ours
  ``--method task-arithmetic --scale 0.3`` (float64 accumulation; mergekit float32: some elements one bf16 ulp
  apart) and ``--like mergekit --weights 0.3 0.3 0.3`` (mergekit's float32 order: equal outputs expected);
- ``ties``: mergekit ``ties`` (density 0.2, weight 1, ``normalize: true``) vs ours ``--method ties --like mergekit
  --ties-k 0.2`` (per-tensor trimming to exactly int(0.2 n) entries, +1 for zero sign sums, the weighted disjoint
  mean); ties in magnitude at the threshold are broken by ``torch.argsort`` in both; also ours with the same
  flags spelled out (``--ties-scope tensor --ties-keep exact --sign-tie positive --scale 1``): float64, ties at the
  threshold kept by position (a linear-time selection instead of a sort), so it differs where the tie order does;
- ``dare_ties``: mergekit ``dare_ties`` (density 0.5, ``rescale: true``: the kept entries rescaled to the task
  vector's L1 norm) vs ours ``--method dare --like mergekit --dare-p 0.5``: the same semantics, but the random
  masks come from different generators, so outputs differ where the masks do (reported, not expected equal).
- ``ties_global`` (ours only): the official AdaMerging++ TIES (global top-k per task: thresholds found exactly in
  two streaming passes, a third for the majority sign), which mergekit does not offer.

Memory cap: each capped run is started inside a cgroup with a hard memory limit below the total input size
(cgroup v1 ``memory.limit_in_bytes`` here; cgroup v2 ``memory.max`` where that is mounted; no swap). The cap
counts page cache too, which the kernel reclaims under it; a process that needs more is killed (reported).

Usage::

    make bench-mergekit                       # .venv-mergekit, then the small size and the 1b size
    python -m benchmarks.bench_mergekit --sizes small --methods task_arithmetic ties
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamerge_fast.export import CheckpointWriter
from adamerge_fast.io import load_state_dict, streaming

from ._env import ROOT, env_info, loadavg, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MERGEKIT_PYTHON = ROOT / ".venv-mergekit" / "bin" / "python"
SHIM = Path(__file__).resolve().parent / "mergekit_shim.py"
K = 3

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=16000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}

# method -> (our command-line flags, mergekit's method and parameters); ours_exact: also the float64 default
METHODS = {
    "task_arithmetic": dict(
        ours={"mergekit order": ["--method", "task-arithmetic", "--like", "mergekit", "--weights", "0.3", "0.3", "0.3"],
              "float64": ["--method", "task-arithmetic", "--scale", "0.3"]},
        mergekit=("task_arithmetic", {"weight": 0.3}, {"normalize": False})),
    "ties": dict(
        ours={"mergekit order": ["--method", "ties", "--like", "mergekit", "--ties-k", "0.2"],
              "float64, index tie order": ["--method", "ties", "--ties-scope", "tensor", "--ties-keep", "exact",
                                           "--sign-tie", "positive", "--scale", "1", "--ties-k", "0.2"]},
        mergekit=("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True})),
    "dare_ties": dict(
        ours={"mergekit order": ["--method", "dare", "--like", "mergekit", "--dare-p", "0.5"]},
        mergekit=("dare_ties", {"weight": 1.0, "density": 0.5}, {"normalize": False, "rescale": True})),
    "ties_global": dict(
        ours={"official": ["--method", "ties", "--ties-k", "0.2", "--scale", "1.0"]}, mergekit=None),
}


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(size: str, root: Path, seed: int = 0) -> tuple[Path, list[Path], int]:
    """Base + K fine-tunes (bf16, ``model-*.safetensors`` shards of 1 GB, ``config.json``), written tensor by
    tensor; returns the directories and the parameter count. Fine-tunes move every weight by N(0, 0.002^2)
    (the base's weights are N(0, 0.02^2), norms 1)."""
    from adamerge_fast.models.hf import tiny_llama_config

    cfg = tiny_llama_config(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    tf = __import__("transformers")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()}
    entries = [(k, s, torch.bfloat16) for k, s in shapes.items()]
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(K)]
    g = torch.Generator().manual_seed(seed)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(d, entries, max_shard_size="1GB")) for d in dirs]
        for k, s, _ in entries:
            b = torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=g)
            writers[0].write(k, b.bfloat16())
            for w in writers[1:]:
                w.write(k, (b + 0.002 * torch.randn(s, generator=g)).bfloat16())
            del b
    for d in dirs:
        cfg.save_pretrained(d)
    return dirs[0], dirs[1:], sum(torch.Size(s).numel() for s in shapes.values())


# -------------------------------------------------------------------------------------------- memory cap
class MemoryCap:
    """A cgroup with a hard memory limit that a child process joins before it runs (cgroup v2 ``memory.max``, or
    cgroup v1 ``memory.limit_in_bytes``); :attr:`how` names the mechanism, or why there is none."""

    def __init__(self, limit: int):
        self.limit, self.dir, self.how = limit, None, None
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if v2.exists():
                rel = Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip().lstrip("/")
                d = Path("/sys/fs/cgroup") / rel / f"amf-bench-{os.getpid()}"
                d.mkdir()
                (d / "memory.max").write_text(str(limit))
                self.dir, self.how = d, "cgroup v2 memory.max"
            else:
                line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines()
                            if x.split(":")[1].split(",").count("memory"))
                d = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") / f"amf-bench-{os.getpid()}"
                d.mkdir()
                (d / "memory.limit_in_bytes").write_text(str(limit))
                self.dir, self.how = d, "cgroup v1 memory.limit_in_bytes"
        except (OSError, StopIteration, IndexError) as e:
            self.how = f"unavailable ({e})"

    def join(self) -> None:  # runs in the child between fork and exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        out = {}
        for f in ("memory.max_usage_in_bytes", "memory.failcnt", "memory.peak", "memory.events"):
            if (self.dir / f).exists():
                out[f] = (self.dir / f).read_text().strip()
        return out

    def close(self) -> None:
        if self.dir is not None:
            with contextlib.suppress(OSError):
                self.dir.rmdir()


# ------------------------------------------------------------------------------------------------- runs
def run(cmd: list[str], cap: MemoryCap | None, log: Path) -> dict:
    """Run ``cmd`` as a child process (in ``cap``'s cgroup); wall time and the child's peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             preexec_fn=cap.join if cap is not None and cap.dir is not None else None)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc  # reaped by wait4 above
    res = {"rc": rc, "wall_s": round(wall, 2), "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3),
           "completed": rc == 0}
    if rc != 0:
        res["log_tail"] = log.read_text()[-800:]
    return res


def mergekit_config(method: str, base: Path, fts: list[Path]) -> dict:
    name, model_params, params = METHODS[method]["mergekit"]
    return {"merge_method": name, "base_model": str(base),
            "models": [{"model": str(f), "parameters": dict(model_params)} for f in fts],
            "parameters": params, "dtype": "float32", "out_dtype": "bfloat16"}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: the largest absolute difference and how many elements differ."""
    sa, sb = streaming(load_state_dict(a)), streaming(load_state_dict(b))
    if set(sa.keys()) != set(sb.keys()):
        return {"keys_differ": sorted(set(sa.keys()) ^ set(sb.keys()))[:5]}
    worst, differ, total, worst_key = 0.0, 0, 0, None
    for k in sa.keys():
        x, y = sa[k].float(), sb[k].float()
        d = (x - y).abs()
        m = float(d.max()) if d.numel() else 0.0
        differ += int((x != y).sum())
        total += x.numel()
        if m > worst:
            worst, worst_key = m, k
    return {"max_abs_diff": worst, "worst_tensor": worst_key, "differing_elements": differ, "elements": total,
            "differing_fraction": differ / total}


def bench_size(size: str, methods: list[str], cap_gib: float | None, cap_methods: list[str], work: Path,
               mk_available: bool, cap_only: bool = False, variants: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    base, fts, params = make_inputs(size, work / "inputs")
    in_bytes = sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors"))
    res = {"size": size, "parameters": params, "input_bytes_total": in_bytes, "make_inputs_s":
           round(time.perf_counter() - t0, 1), "runs": []}
    out_root = work / "out"
    out_root.mkdir()
    caps = [None] + ([int(cap_gib * 2**30)] if cap_gib else [])

    def one(cmd, name, limit, **info):
        cap = MemoryCap(limit) if limit is not None else None  # a fresh cgroup per run: its own statistics
        try:
            r = run(cmd, cap, out_root / f"{name}.log")
        finally:
            if cap is not None:
                info.update(cap_mechanism=cap.how, cap_stats=cap.stats() if cap.dir is not None else {})
                cap.close()
        r.update(info, cap_gib=cap_gib if limit else None)
        res["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        return r

    for method in methods:
        spec = METHODS[method]
        for limit in caps:
            if (limit is not None and method not in cap_methods) or (limit is None and cap_only
                                                                        and method in cap_methods):
                continue
            tag = f"{method}{'-cap' if limit else ''}"
            outs = {}
            for variant, flags in spec["ours"].items():
                if variants is not None and variant not in variants:
                    continue
                out = out_root / f"ours-{tag}-{variant.replace(' ', '_')}"
                cmd = [sys.executable, "-m", "adamerge_fast", "merge", "--pretrained", str(base), "--finetuned",
                       *map(str, fts), "-o", str(out), "--no-progress", "--max-shard-size", "1GB", *flags]
                r = one(cmd, out.name, limit, tool="adamerge_fast", method=method, variant=variant)
                outs[variant] = out if r["completed"] else None
            if spec["mergekit"] is not None and mk_available and (variants is None or "mergekit" in variants):
                cfg = out_root / f"mergekit-{tag}.yml"
                cfg.write_text(json.dumps(mergekit_config(method, base, fts), indent=2))
                out = out_root / f"mergekit-{tag}"
                cmd = [str(MERGEKIT_PYTHON), str(SHIM), str(cfg), str(out), "--random-seed", "0", "--quiet",
                       "--no-copy-tokenizer", "--out-shard-size", "500M"]
                r = one(cmd, out.name, limit, tool="mergekit", method=method, variant="mergekit 0.1.5")
                if r["completed"]:
                    r["vs_ours"] = {v: compare(o, out) for v, o in outs.items() if o is not None}
                    print(json.dumps({"vs_ours": r["vs_ours"]}), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            for o in outs.values():
                if o is not None:
                    shutil.rmtree(o, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------------------------- report
def report(res: dict) -> str:
    env = res["env"]
    L = ["# Static merges: adamerge_fast vs mergekit 0.1.5", "",
         f"{env['date']}, {env['device']} ({env['nproc']} cores), torch {env['torch']}, git {env['git']}; load "
         f"average at start {env['loadavg_start']}, at end {res.get('loadavg_end')}.",
         "Last command: `" + res["command"] + "`.", "",
         "Each merge is its own process (wall time and peak RSS of the whole process, start-up and imports "
         "included). Inputs: a Llama-architecture bf16 base + 3 fine-tunes, sharded safetensors; mergekit with "
         "`dtype: float32, out_dtype: bfloat16`. Semantics and their differences: see the module docstring of "
         "`benchmarks/bench_mergekit.py`.", ""]
    for s in res["sizes"]:
        L += [f"## {s['size']}: {s['parameters'] / 1e6:.0f}M parameters, inputs "
              f"{s['input_bytes_total'] / 2**30:.2f} GiB in total (4 models)", "",
              f"{s.get('date')}: `{s.get('command')}`; load average at the end {s.get('loadavg_end')}; inputs made "
              f"in {s['make_inputs_s']} s.", "",
              "| method | tool | variant | memory cap | wall (s) | peak RSS (GiB) | completed | vs ours: max abs diff"
              " / differing elements |",
              "|---|---|---|---|---:|---:|---|---|"]
        for r in s["runs"]:
            cap = f"{r['cap_gib']} GiB" if r.get("cap_gib") else "-"
            vs = "; ".join(f"{v}: {c.get('max_abs_diff', 'n/a'):.3g} / {c.get('differing_elements', 'n/a')} "
                           f"({100 * c.get('differing_fraction', 0):.4f}%)" for v, c in r.get("vs_ours", {}).items())
            L.append(f"| {r['method']} | {r['tool']} | {r['variant']} | {cap} | {r['wall_s']} | {r['peak_rss_gib']} "
                     f"| {'yes' if r['completed'] else 'no (rc ' + str(r['rc']) + ')'} | {vs} |")
        L.append("")
    caps = {r.get("cap_mechanism") for s in res["sizes"] for r in s["runs"] if r.get("cap_mechanism")}
    if caps:
        L += [f"Memory cap mechanism: {', '.join(sorted(caps))} (hard: no swap on this machine)."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mergekit", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "1b"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--cap-gib", type=float, default=4.0, help="memory cap of the capped runs (default 4 GiB)")
    p.add_argument("--cap-methods", nargs="*", choices=list(METHODS), default=["ties", "ties_global"],
                   help="methods also run under the cap")
    p.add_argument("--cap-only", action="store_true", help="run the --cap-methods only under the cap")
    p.add_argument("--variants", nargs="+", default=None,
                   help="only these of our variants (names as in the report; 'mergekit' for mergekit's run)")
    p.add_argument("--append", action="store_true",
                   help="keep the other sizes of an existing result file (a size run again replaces its entry)")
    p.add_argument("--workdir", default=None, help="where the inputs and outputs go (default: a /tmp directory)")
    p.add_argument("--output", default=str(RESULTS / "mergekit"), help="results prefix (.json, .md)")
    args = p.parse_args(argv)
    mk = MERGEKIT_PYTHON.exists()
    if not mk:
        print(f"{MERGEKIT_PYTHON} not found: mergekit runs skipped (make bench-mergekit creates it)", file=sys.stderr)
    res = {"env": env_info("cpu"), "command": "python -m benchmarks.bench_mergekit " + " ".join(argv or sys.argv[1:]),
           "mergekit_available": mk, "sizes": []}
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"amf-bench-mergekit-{size}-", dir=args.workdir))
        try:
            res["sizes"].append(bench_size(size, args.methods, args.cap_gib, args.cap_methods, work, mk,
                                           args.cap_only, args.variants))
            res["sizes"][-1].update(command=res["command"], date=res["env"]["date"], loadavg_end=loadavg())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = loadavg()
    out = Path(args.output)
    if args.append and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        done = {s["size"] for s in res["sizes"]}
        res["earlier"] = [{k: old[k] for k in ("command", "env", "loadavg_end") if k in old}] + old.get("earlier", [])
        res["sizes"] = [s for s in old["sizes"] if s["size"] not in done] + res["sizes"]
    md = report(res)
    write_results(out, res, md, indent=2)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
