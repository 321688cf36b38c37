"""GPU benchmark of the Triton backend. Needs a CUDA device; refuses to run without one.

1. ``merge_many`` / ``dcoef_many``: effective bandwidth (bytes the op must move / time) next to the measured
   device-to-device copy bandwidth (``dst.copy_(src)``, 2 x bytes / time), and the torch reference backend.
2. ``merged_linear`` forward + backward (dx, dcoef_w, dcoef_b through autograd) against materialize-then-matmul,
   for M in {16, 256, 4096, 16384} and the layer shapes below, with K=8 fp32 task vectors (x, w0 fp32) and
   K=3 bf16 task vectors (x, w0 bf16): time and peak extra memory. The Triton rows are the fused strategy,
   the just-in-time strategy and the automatic choice (measured per layer shape and M bucket on first use,
   see ``merged_linear.choose_strategy``; the choices it made are written to the JSON as ``tuned``). The
   crossover between the first two is the evidence for the fallback ``FUSED_MAX_M`` used where nothing can
   be measured.
3. ``merged_lora_linear`` forward + backward with 8 rank-16 adapters (bf16 x, w0 and adapters) against
   materializing ``W0 + sum_k c_k s_k B_k A_k`` in autograd and the plain-torch reference op, for the same M and
   7B-LLM layer shapes: time and peak extra memory; Triton rows fused, jit and auto as above.

Usage::

    python -m benchmarks.bench_triton_ops                    # everything, JSON to benchmarks/results/
    python -m benchmarks.bench_triton_ops --only merge --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

import adamerge_fast
from adamerge_fast.io import write_text_atomic
from adamerge_fast.ops import get_backend

from ._env import env_info, loadavg

SHAPES = [(768, 768), (2304, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096)]  # (out, in)
MS = [16, 256, 4096, 16384]
CONFIGS = [  # (label, K, x/w0 dtype, task-vector dtype)
    ("K8-fp32", 8, torch.float32, torch.float32),
    ("K3-bf16", 3, torch.bfloat16, torch.bfloat16),
]


def _bench_ms(fn, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _peak_extra_bytes(fn):
    """Peak memory allocated during ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_merge(quick: bool):
    rows = []
    # a ViT-B/32-like parameter list (12 blocks) or a 4-layer LLaMA-7B-like slice
    vit = [(2304, 768), (2304,), (768, 768), (768,), (3072, 768), (3072,), (768, 3072), (768,), (768,), (768,)] * 12
    llama = [(4096, 4096)] * 4 * (1 if quick else 4) + [(11008, 4096)] * 3 * (1 if quick else 4)
    for set_name, shapes in (("vit-b32", vit), ("llama-slice", llama)):
        for label, K, bdt, ddt in CONFIGS:
            bases = [torch.randn(s, device="cuda").to(bdt) for s in shapes]
            deltas = [torch.randn(K, *s, device="cuda").to(ddt) for s in shapes]
            coefs = torch.randn(len(shapes), K, device="cuda")
            n_el = sum(b.numel() for b in bases)
            merge_bytes = n_el * (2 * bdt.itemsize + K * ddt.itemsize)  # read base + K deltas, write out
            dcoef_bytes = n_el * (bdt.itemsize + K * ddt.itemsize)  # read grad + K deltas
            for backend in ("triton", "reference"):
                be = get_backend(backend)
                t_m = _bench_ms(partial(be.merge_many, bases, deltas, coefs))
                t_d = _bench_ms(partial(be.dcoef_many, bases, deltas))
                mem = _peak_extra_bytes(partial(adamerge_fast.merge_many, bases, deltas, coefs, backend=backend))
                rows.append(dict(op="merge_many", set=set_name, config=label, backend=backend, tensors=len(shapes),
                                 elements=n_el, ms=t_m, GBps=merge_bytes / (t_m * 1e-3) / 1e9,
                                 peak_extra_MiB=mem / 2**20))  # fmt: skip
                rows.append(dict(op="dcoef_many", set=set_name, config=label, backend=backend, tensors=len(shapes),
                                 elements=n_el, ms=t_d, GBps=dcoef_bytes / (t_d * 1e-3) / 1e9))  # fmt: skip
                print(f"{set_name:12s} {label:8s} {backend:9s} merge_many {rows[-2]['GBps']:7.1f} GB/s "
                      f"dcoef_many {rows[-1]['GBps']:7.1f} GB/s", flush=True)  # fmt: skip
            bases = deltas = None  # free before the next configuration
            torch.cuda.empty_cache()
    return rows


def _naive_linear(x, w0, tau_w, coef_w, b0, tau_b, coef_b):
    # materialize-then-matmul in plain torch autograd: the merged weight (and its gradient) exist in full
    w = w0 + torch.einsum("k,koi->oi", coef_w.to(tau_w.dtype), tau_w)
    b = b0 + torch.einsum("k,ko->o", coef_b.to(tau_b.dtype), tau_b)
    return torch.nn.functional.linear(x, w.to(x.dtype), b.to(x.dtype))


def _fwd_bwd(fwd, dy):
    fwd().backward(dy)


def _triton_variants(tml, triton_fwd, M: int, max_fused_m: int) -> dict:
    """The Triton rows: the fused strategy (up to ``max_fused_m`` rows), the just-in-time one, and the choice."""
    return {f"triton-{s or 'auto'}": partial(_with_strategy, tml, s, triton_fwd)
            for s in ("fused", "jit", None) if not (s == "fused" and M > max_fused_m)}  # fmt: skip


def _time_variants(variants: dict, dy, leaves):
    """``(name, (fwd ms, fwd+bwd ms, peak extra bytes))`` per variant (NaN when it runs out of memory); the
    gradients of ``leaves`` are cleared after each."""
    for name, fwd in variants.items():
        step = partial(_fwd_bwd, fwd, dy)
        try:
            res = (_bench_ms(fwd, rep=50), _bench_ms(step, rep=50), _peak_extra_bytes(step))
        except torch.cuda.OutOfMemoryError:
            res = (float("nan"),) * 3
            torch.cuda.empty_cache()
        for t in leaves:
            t.grad = None
        yield name, res


def bench_linear(quick: bool, max_fused_m: int):
    from adamerge_fast.ops.triton_kernels import merged_linear as tml

    rows = []
    shapes = SHAPES[:2] + SHAPES[4:5] if quick else SHAPES
    for label, K, dt, tdt in CONFIGS:
        for out_f, in_f in shapes:
            w0 = (torch.randn(out_f, in_f, device="cuda") * in_f**-0.5).to(dt)
            tau_w = (torch.randn(K, out_f, in_f, device="cuda") * 0.1 * in_f**-0.5).to(tdt)
            b0 = torch.randn(out_f, device="cuda").to(dt)
            tau_b = (torch.randn(K, out_f, device="cuda") * 0.1).to(tdt)
            for M in MS:
                x = torch.randn(M, in_f, device="cuda").to(dt).requires_grad_()
                cw = torch.full((K,), 0.3, device="cuda", requires_grad=True)
                cb = torch.full((K,), 0.3, device="cuda", requires_grad=True)
                dy = torch.randn(M, out_f, device="cuda").to(dt)
                args = (x, w0, tau_w, cw, b0, tau_b, cb)
                variants = {
                    "naive-autograd": partial(_naive_linear, *args),
                    "reference": partial(adamerge_fast.merged_linear, *args, backend="reference"),
                }
                triton_fwd = partial(adamerge_fast.merged_linear, *args, backend="triton")
                variants.update(_triton_variants(tml, triton_fwd, M, max_fused_m))
                for name, (t_f, t_fb, mem) in _time_variants(variants, dy, (x, cw, cb)):
                    rows.append(dict(op="merged_linear", config=label, out=out_f, inp=in_f, M=M, variant=name,
                                     fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_extra_MiB=mem / 2**20))  # fmt: skip
                    print(f"{label:8s} {out_f:5d}x{in_f:<5d} M={M:<6d} {name:15s} fwd {t_f:8.3f} ms  "
                          f"fwd+bwd {t_fb:8.3f} ms  peak +{mem / 2**20:8.1f} MiB", flush=True)  # fmt: skip
            w0 = tau_w = None
            torch.cuda.empty_cache()
    return rows


LORA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): 7B attention, MLP up, MLP down


def _naive_lora_linear(x, w0, a, b, ranks, coef, scale):
    # materialize-then-matmul in plain torch autograd: W0 + sum_k c_k s_k B_k A_k and its gradient exist in full
    cs = torch.repeat_interleave(coef * scale, torch.tensor(ranks, device=x.device), output_size=a.shape[0])
    w = torch.addmm(w0.float(), b.float() * cs, a.float())
    return torch.nn.functional.linear(x, w.to(x.dtype))


def bench_lora_linear(quick: bool, max_fused_m: int, K: int = 8, r: int = 16):
    from adamerge_fast.ops.triton_kernels import merged_linear as tml

    rows, dt = [], torch.bfloat16
    ranks = [r] * K
    for out_f, in_f in LORA_SHAPES[:1] if quick else LORA_SHAPES:
        w0 = (torch.randn(out_f, in_f, device="cuda") * in_f**-0.5).to(dt)
        a = (torch.randn(K * r, in_f, device="cuda") * in_f**-0.5).to(dt)
        b = (torch.randn(out_f, K * r, device="cuda") * 0.01).to(dt)
        scale = torch.full((K,), 2.0, device="cuda")
        for M in MS:
            x = torch.randn(M, in_f, device="cuda").to(dt).requires_grad_()
            cw = torch.full((K,), 0.3, device="cuda", requires_grad=True)
            dy = torch.randn(M, out_f, device="cuda").to(dt)
            args = (x, w0, a, b, ranks, cw, scale)
            variants = {"naive-autograd": partial(_naive_lora_linear, *args),
                        "reference": partial(adamerge_fast.merged_lora_linear, *args, backend="reference")}
            triton_fwd = partial(adamerge_fast.merged_lora_linear, *args, backend="triton")
            variants.update(_triton_variants(tml, triton_fwd, M, max_fused_m))
            for name, (t_f, t_fb, mem) in _time_variants(variants, dy, (x, cw)):
                rows.append(dict(op="merged_lora_linear", config=f"K{K}-r{r}-bf16", out=out_f, inp=in_f, M=M,
                                 variant=name, fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_extra_MiB=mem / 2**20))  # fmt: skip
                print(f"lora K{K} r{r} {out_f:5d}x{in_f:<5d} M={M:<6d} {name:15s} fwd {t_f:8.3f} ms  "
                      f"fwd+bwd {t_fb:8.3f} ms  peak +{mem / 2**20:8.1f} MiB", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return rows


def _with_strategy(tml, strategy, fn):
    old = tml.STRATEGY
    tml.STRATEGY = strategy
    try:
        return fn()
    finally:
        tml.STRATEGY = old


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_triton_ops", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["merge", "linear", "lora"], default=None)
    p.add_argument("--quick", action="store_true", help="fewer shapes / tensors")
    p.add_argument("--max-fused-m", type=int, default=4096, help="skip the fused strategy above this M")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_triton_ops.json"))
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("benchmarks.bench_triton_ops measures Triton kernels on a CUDA GPU and none is available here; "
                 "not running.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks.bench_triton_ops: unset TRITON_INTERPRET (the interpreter is not what should be "
                 "measured).")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks.bench_triton_ops needs the 'triton' package.")

    torch.manual_seed(0)
    env = env_info("cuda")
    result = dict(device=env["device"], torch=env["torch"], triton=env["triton"], time=env["date"], env=env,
                  copy_GBps=copy_bandwidth(), rows=[])  # fmt: skip
    print(f"{result['device']}: device-to-device copy {result['copy_GBps']:.1f} GB/s", flush=True)
    if args.only in (None, "merge"):
        result["rows"] += bench_merge(args.quick)
    if args.only in (None, "linear"):
        result["rows"] += bench_linear(args.quick, args.max_fused_m)
    if args.only in (None, "lora"):
        result["rows"] += bench_lora_linear(args.quick, args.max_fused_m)
    from adamerge_fast.ops.triton_kernels import merged_linear as tml

    result["tuned"] = [dict(key=[str(p) for p in k], strategy=v) for k, v in tml.tuned_strategies().items()]
    env["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
