"""GPU benchmark of every op on every backend that runs on CUDA (``cuda``, ``triton``, ``reference``), so that the
``auto`` order per op (``adamerge_fast/ops/__init__.py``) can be set from data. Needs a CUDA device.

Ceilings measured first, in the same process: device-to-device copy bandwidth (bytes read + written / time of a
1 GiB ``copy_``) and the matmul rate (8192^3 ``torch.mm``, fp32 at torch's current precision and bf16).

Sections (each row: op, shape, dtypes, backend, median ms of ``triton.testing.do_bench`` with the L2 flushed):

* ``merge`` / ``dcoef`` of one 4096 x 4096 layer and ``merge_many`` / ``dcoef_many`` over a ViT-B/32 parameter list
  (K = 8 fp32 and K = 3 bf16 task vectors): GB/s of the bytes the op must move, and its fraction of the copy rate;
* ``merged_linear`` at (out, in) in {768x768, 3072x768, 768x3072, 4096x4096} and M in {1, 16, 256, 4096, 16384}:
  forward and forward + backward (dx, dcoef_w, dcoef_b through autograd) of materialize-then-matmul (plain torch
  autograd, the merged weight and its gradient in full), and of every backend, Triton's fused and jit strategies
  separately; TFLOP/s (2 M out in forward, 6 M out in forward + backward) against the matmul rate; and the
  coefficient gradient ``dcoef_w`` alone per backend (the issue-12 item-2 question: tensor cores or not);
* ``entropy`` forward and backward of [128, 1000], [4096, 32000] and [16384, 128256] bf16 logits: GB/s.

``auto_suggestion`` in the JSON: per op, the backends ordered by the geometric mean of their times over the rows
where all of them ran. ``--budget-s``: sections stop adding rows once the budget is spent (the JSON says which were
cut); the JSON is rewritten after every section, so a run stopped from outside keeps what it measured.

Usage::

    python -m benchmarks.bench_gpu_ops [--quick] [--budget-s 75] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

import adamerge_fast as af
from adamerge_fast.io import write_text_atomic
from adamerge_fast.ops import backend_status, get_backend

from ._env import env_info, loadavg

LINEAR_SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out, in)
LINEAR_MS = [1, 16, 256, 4096, 16384]
CONFIGS = [("K8-fp32", 8, torch.float32, torch.float32), ("K3-bf16", 3, torch.bfloat16, torch.bfloat16)]
ENTROPY = [(128, 1000), (4096, 32000), (16384, 128256)]
VIT_B32 = [(768, 3, 32, 32), (768,), (50, 768), (768, 512), (768,), (768,)] + [
    (768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,), (768, 3072),
    (768,)] * 12  # fmt: skip
GB = 1e9


def bench_ms(fn, rep_ms: int = 20) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``: L2 flushed before every call, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))


def copy_rate(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src), 50) * 1e-3)


def matmul_rate(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda").to(dtype), torch.randn(n, n, device="cuda").to(dtype)
    return 2 * n**3 / (bench_ms(lambda: torch.mm(a, b), 50) * 1e-3)


class Run:
    """Rows, budget and the output files of one benchmark run."""

    def __init__(self, out_dir: Path, stem: str, budget_s: float, header: dict):
        self.t0, self.budget = time.perf_counter(), budget_s
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.result = dict(header, rows=[], cut=[])

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def over(self, section: str, what: str) -> bool:
        if self.left() > 0:
            return False
        self.result["cut"].append(f"{section}: {what} and later rows (budget {self.budget:.0f}s spent)")
        return True

    def add(self, **row) -> None:
        self.result["rows"].append(row)
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.t0
        self.result["auto_suggestion"] = auto_suggestion(self.result["rows"])
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.json_path, json.dumps(self.result, indent=1) + "\n")
        write_text_atomic(self.md_path, render_markdown(self.result))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _backends() -> list[str]:
    status = backend_status("cuda")
    return [b for b in ("cuda", "triton", "reference") if status.get(b) == "available"]


# ------------------------------------------------------------------------------------------------- merges
def bench_merges(run: Run, quick: bool) -> None:
    copy = run.result["copy_Bps"]
    for label, K, bdt, ddt in CONFIGS:
        cases = [("4096x4096", [(4096, 4096)]), ("vit-b32", VIT_B32[: 30 if quick else None])]
        for set_name, shapes in cases:
            if run.over("merges", f"{label} {set_name}"):
                return
            bases = [torch.randn(s, device="cuda").to(bdt) for s in shapes]
            deltas = [(torch.randn(K, *s, device="cuda") * 0.01).to(ddt) for s in shapes]
            coefs = torch.rand(len(shapes), K, device="cuda")
            n = sum(b.numel() for b in bases)
            merge_bytes = n * (2 * bdt.itemsize + K * ddt.itemsize)
            dcoef_bytes = n * (bdt.itemsize + K * ddt.itemsize)
            for backend in _backends():
                be = get_backend(backend)
                if len(shapes) == 1:
                    ops = (("merge", partial(be.merge, bases[0], deltas[0], coefs[0]), merge_bytes),
                           ("dcoef", partial(be.dcoef, bases[0], deltas[0]), dcoef_bytes))  # fmt: skip
                else:
                    ops = (("merge_many", partial(be.merge_many, bases, deltas, coefs), merge_bytes),
                           ("dcoef_many", partial(be.dcoef_many, bases, deltas), dcoef_bytes))  # fmt: skip
                for op, fn, nbytes in ops:
                    ms = bench_ms(fn)
                    run.add(section="merges", op=op, case=f"{set_name} {label}", backend=backend, tensors=len(shapes),
                            elements=n, ms=ms, GBps=nbytes / (ms * 1e-3) / GB, of_copy=nbytes / (ms * 1e-3) / copy)
            del bases, deltas
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- merged_linear
def _materialized(x, w0, tau_w, coef_w, b0, tau_b, coef_b):
    # materialize-then-matmul in plain torch autograd: the merged weight (and its gradient) exist in full
    w = w0 + torch.einsum("k,koi->oi", coef_w.to(tau_w.dtype), tau_w)
    b = b0 + torch.einsum("k,ko->o", coef_b.to(tau_b.dtype), tau_b)
    return torch.nn.functional.linear(x, w.to(x.dtype), b.to(x.dtype))


def _with_strategy(strategy, fn):
    from adamerge_fast.ops.triton_kernels import merged_linear as tml

    old, tml.STRATEGY = tml.STRATEGY, strategy
    try:
        return fn()
    finally:
        tml.STRATEGY = old


def bench_linear(run: Run, quick: bool) -> None:
    rates = run.result["matmul_flops"]
    shapes = LINEAR_SHAPES[:2] if quick else LINEAR_SHAPES
    ms_list = [16, 4096] if quick else LINEAR_MS
    backends = _backends()
    for label, K, dt, tdt in CONFIGS:
        rate = rates["bf16" if dt == torch.bfloat16 else "fp32"]
        for out_f, in_f in shapes:
            w0 = (torch.randn(out_f, in_f, device="cuda") * in_f**-0.5).to(dt)
            tau_w = (torch.randn(K, out_f, in_f, device="cuda") * 0.1 * in_f**-0.5).to(tdt)
            b0, tau_b = torch.randn(out_f, device="cuda").to(dt), (torch.randn(K, out_f, device="cuda") * 0.1).to(tdt)
            for M in ms_list:
                if run.over("merged_linear", f"{label} {out_f}x{in_f} M={M}"):
                    return
                x = torch.randn(M, in_f, device="cuda").to(dt).requires_grad_()
                cw = torch.full((K,), 0.3, device="cuda", requires_grad=True)
                cb = torch.full((K,), 0.3, device="cuda", requires_grad=True)
                dy = torch.randn(M, out_f, device="cuda").to(dt)
                args = (x, w0, tau_w, cw, b0, tau_b, cb)
                variants = {"materialize": partial(_materialized, *args)}
                for b in backends:
                    variants[b] = partial(af.merged_linear, *args, backend=b)
                if "triton" in backends:
                    for s in ("fused", "jit"):
                        variants[f"triton-{s}"] = partial(_with_strategy, s, variants["triton"])
                flops = 2 * M * out_f * in_f
                base_fb = None
                for name, fwd in variants.items():
                    try:
                        t_f = bench_ms(fwd)
                        t_fb = bench_ms(lambda fwd=fwd: fwd().backward(dy))
                    except torch.cuda.OutOfMemoryError:
                        t_f = t_fb = float("nan")
                        torch.cuda.empty_cache()
                    x.grad = cw.grad = cb.grad = None
                    base_fb = t_fb if name == "materialize" else base_fb
                    run.add(section="merged_linear", op="merged_linear", case=f"{label} {out_f}x{in_f} M={M}",
                            backend=name, M=M, out=out_f, inp=in_f, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                            fwd_TFLOPs=flops / (t_f * 1e-3) / 1e12, fwd_bwd_TFLOPs=3 * flops / (t_fb * 1e-3) / 1e12,
                            of_matmul=3 * flops / (t_fb * 1e-3) / rate, speedup_vs_materialize=base_fb / t_fb)
                # the coefficient gradient alone (dW = dy^T x contracted with the task vectors)
                dcw_args = (dy, x.detach(), w0, tau_w, cw.detach(), None, False, True, False)
                for b in backends:
                    t = bench_ms(partial(get_backend(b).merged_linear_bwd, *dcw_args))
                    run.add(section="merged_linear", op="dcoef_w", case=f"{label} {out_f}x{in_f} M={M}", backend=b,
                            M=M, ms=t, TFLOPs=flops / (t * 1e-3) / 1e12, of_matmul=flops / (t * 1e-3) / rate)
            del w0, tau_w
            torch.cuda.empty_cache()
    from adamerge_fast.ops.triton_kernels import merged_linear as tml

    run.result["tuned"] = [dict(key=[str(p) for p in k], strategy=v) for k, v in tml.tuned_strategies().items()]


# ------------------------------------------------------------------------------------------------- entropy
def bench_entropy(run: Run, quick: bool) -> None:
    copy = run.result["copy_Bps"]
    for N, C in ENTROPY[:2] if quick else ENTROPY:
        if run.over("entropy", f"{N}x{C}"):
            return
        z = (torch.randn(N, C, device="cuda") * 3).to(torch.bfloat16)
        g = torch.rand(N, device="cuda")
        for backend in _backends():
            be = get_backend(backend)
            t_f, t_b = bench_ms(partial(be.entropy_fwd, z)), bench_ms(partial(be.entropy_bwd, g, z))
            run.add(section="entropy", op="entropy_fwd", case=f"{N}x{C} bf16", backend=backend, ms=t_f,
                    GBps=z.numel() * 2 / (t_f * 1e-3) / GB, of_copy=z.numel() * 2 / (t_f * 1e-3) / copy)
            run.add(section="entropy", op="entropy_bwd", case=f"{N}x{C} bf16", backend=backend, ms=t_b,
                    GBps=z.numel() * 4 / (t_b * 1e-3) / GB, of_copy=z.numel() * 4 / (t_b * 1e-3) / copy)
        del z
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- report
def auto_suggestion(rows) -> dict:
    """Per op: the real backends (cuda, triton, reference) ordered by the geometric mean of their time over the cases
    where every one of them was timed, with that mean."""
    out = {}
    for op in sorted({r["op"] for r in rows}):
        times: dict[str, dict[str, float]] = {}
        for r in rows:
            if r["op"] == op and r["backend"] in ("cuda", "triton", "reference"):
                t = r.get("fwd_bwd_ms", r.get("ms"))
                if t is not None and math.isfinite(t):
                    times.setdefault(r["backend"], {})[r["case"]] = t
        if not times:
            continue
        common = set.intersection(*(set(v) for v in times.values()))
        if not common:
            continue
        gm = {b: math.exp(sum(math.log(v[c]) for c in common) / len(common)) for b, v in times.items()}
        out[op] = {"order": sorted(gm, key=gm.get), "geomean_ms": gm, "cases": len(common)}
    return out


def render_markdown(res: dict) -> str:
    lines = [f"# GPU op benchmark: {res['device']} ({res['date']})", "",
             f"torch {res['torch']}, triton {res['triton']}; copy {res['copy_Bps'] / GB:.0f} GB/s; matmul "
             + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in res["matmul_flops"].items())
             + f"; {res.get('elapsed_s', 0):.0f} s", "",
             "`auto` suggestion per op (geometric mean over the cases every backend ran):", ""]  # fmt: skip
    for op, s in res.get("auto_suggestion", {}).items():
        lines.append(f"- `{op}`: " + " < ".join(f"{b} ({s['geomean_ms'][b]:.3g} ms)" for b in s["order"])
                     + f" over {s['cases']} cases")  # fmt: skip
    for section, cols in (("merges", ["op", "case", "backend", "ms", "GBps", "of_copy"]),
                          ("merged_linear", ["op", "case", "backend", "fwd_ms", "fwd_bwd_ms", "ms", "fwd_bwd_TFLOPs",
                                             "TFLOPs", "of_matmul", "speedup_vs_materialize"]),
                          ("entropy", ["op", "case", "backend", "ms", "GBps", "of_copy"])):  # fmt: skip
        rows = [r for r in res["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += ["", f"## {section}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    if res.get("cut"):
        lines += ["", "Cut by the time budget: " + "; ".join(res["cut"])]
    return "\n".join(lines) + "\n"


SECTIONS = {"merges": bench_merges, "linear": bench_linear, "entropy": bench_entropy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections from {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--budget-s", type=float, default=600.0, help="stop adding rows after this many seconds")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    p.add_argument("--stem", default="gpu_ops", help="file name stem (default gpu_ops)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.bench_gpu_ops times CUDA kernels and no CUDA device is available; not running.")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks.bench_gpu_ops: unset TRITON_INTERPRET (the interpreter is not what should be measured).")
        return 2
    bad = [s for s in args.only.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    env = env_info("cuda")
    torch.manual_seed(0)
    command = "python -m benchmarks.bench_gpu_ops " + " ".join(sys.argv[1:] if argv is None else argv)
    header = dict(benchmark="bench_gpu_ops", command=command, device=env["device"], date=env["date"],
                  torch=env["torch"], triton=env["triton"], env=env, backends=_backends(), copy_Bps=copy_rate(),
                  matmul_flops={"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)})  # fmt: skip
    run = Run(Path(args.out), args.stem, args.budget_s, header)
    print(f"{env['device']}: copy {header['copy_Bps'] / GB:.0f} GB/s, matmul "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in header["matmul_flops"].items()), flush=True)
    for name in args.only.split(","):
        SECTIONS[name](run, args.quick)
        run.save()
    env["loadavg_end"] = loadavg()
    run.save()
    print(f"wrote {run.json_path} and {run.md_path}")
    for op, s in run.result["auto_suggestion"].items():
        print(f"auto suggestion {op}: {' < '.join(s['order'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
