"""Where the time goes: per-op throughput of every backend on workload-shaped inputs (:func:`kernel_bench`) and a
``torch.profiler`` breakdown of one step of ours (:func:`profile_ours`)."""

from __future__ import annotations

import math
import statistics
import time
from functools import partial

import torch

from adamerge_fast import ops
from adamerge_fast.merging import AdaMergedModel

from .._env import measured_backends
from .runners import CLAMP, INIT, share_module
from .workloads import Workload, sync


def kernel_bench(device: torch.device, matmul_rates: dict[str, float], copy_bw: float, reps: int = 20,
                 small: bool = False) -> list[dict]:
    """Per-op throughput of every available backend on workload-shaped inputs: achieved GB/s against the
    measured copy bandwidth and TFLOP/s against the measured matmul rate (GPU; ``small`` for tests)."""
    backends = measured_backends(device)
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
        sync(device)
        ts = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for label, M, IN, OUT, K, wdt, tdt in cases:
        x, w0, b0 = rnd(M, IN, dtype=wdt), rnd(OUT, IN, dtype=wdt), rnd(OUT, dtype=wdt)
        tau, taub = rnd(K, OUT, IN, dtype=tdt) * 1e-2, rnd(K, OUT, dtype=tdt) * 1e-2
        c = torch.full((K,), 0.3, device=device)
        cg = c.clone().requires_grad_(True)
        s_w, s_t, s_x = w0.element_size(), tau.element_size(), x.element_size()
        rate = matmul_rates["bf16" if wdt == torch.bfloat16 else "fp32"]
        wbytes = OUT * IN * (s_w + K * s_t)
        for be in backends:
            row = {"case": label, "backend": be, "M": M, "in": IN, "out": OUT, "K": K, "rate": rate}
            t = timeit(partial(ops.merge, w0, tau, c, backend=be))
            out.append(dict(row, op="merge", seconds=t, bytes=wbytes + OUT * IN * s_w, flops=2 * K * OUT * IN))
            t = timeit(partial(ops.merged_linear, x, w0, tau, c, b0, taub, c, backend=be))
            out.append(dict(row, op="merged_linear fwd", seconds=t, bytes=M * IN * s_x + wbytes + M * OUT * s_x,
                            flops=2 * M * IN * OUT))
            xg = x.clone().requires_grad_(True)
            dy = rnd(M, OUT, dtype=wdt)
            t = timeit(partial(_linear_fwd_bwd, xg, w0, tau, cg, b0, taub, dy, be))
            # necessary traffic: forward (x, weights, y) + backward (dy, x, weights for dx, task vectors for dcoef, dx)
            nb = ((M * IN * s_x + wbytes + M * OUT * s_x)
                  + (M * OUT * s_x + M * IN * s_x + wbytes + K * OUT * IN * s_t + M * IN * s_x))
            out.append(dict(row, op="merged_linear fwd+bwd", seconds=t, bytes=nb, flops=3 * 2 * M * IN * OUT))
    # merge_many on a ViT-B/32-like list of the "other" parameters (LayerNorms, biases, embeddings, conv)
    if small:
        shapes = [(32,)] * 4 + [(16, 8)]
    else:
        shapes = [(768,)] * 50 + [(3072,)] * 12 + [(768, 3, 32, 32), (50, 768), (768, 512)]
    K = 8 if not small else 4
    bases = [rnd(*s) for s in shapes]
    deltas = [rnd(K, *s) * 1e-2 for s in shapes]
    coefs = torch.full((len(shapes), K), 0.3, device=device)
    n_el = sum(math.prod(s) for s in shapes)
    ent_x = rnd(*ent)
    for be in backends:
        t = timeit(partial(ops.merge_many, bases, deltas, coefs, backend=be))
        out.append({"case": f"{len(shapes)} small tensors, K={K}", "backend": be, "op": "merge_many", "seconds": t,
                    "bytes": n_el * 4 * (K + 2), "flops": 2 * K * n_el, "rate": matmul_rates["fp32"]})
    for be in backends:
        try:
            t = timeit(partial(ops.entropy, ent_x, backend=be))
        except Exception as e:  # reported, and the other rows are kept
            print(f"    entropy {list(ent)} on {be} failed, not timed: {e!r}", flush=True)
            continue
        out.append({"case": f"entropy [{ent[0]}, {ent[1]}]", "backend": be, "op": "entropy", "seconds": t,
                    "bytes": ent_x.numel() * 4 + ent[0] * 4, "flops": 0, "rate": matmul_rates["fp32"]})
    for r in out:
        r["GB/s"] = r["bytes"] / r["seconds"] / 1e9
        r["bw_fraction"] = r["bytes"] / r["seconds"] / copy_bw
        r["TFLOP/s"] = r["flops"] / r["seconds"] / 1e12
        r["flop_fraction"] = r["flops"] / r["seconds"] / r.pop("rate")
    return out


def _linear_fwd_bwd(x, w0, tau, c, b0, taub, dy, backend):
    """``merged_linear`` forward and backward to ``x`` and ``c`` (the weight and bias coefficients)."""
    y = ops.merged_linear(x, w0, tau, c, b0, taub, c, backend=backend)
    torch.autograd.grad(y, (x, c), dy)


def profile_ours(wl: Workload, backend: str, top: int = 12) -> list[dict]:
    """One concat step of AdaMergedModel (forward + backward, no optimizer) under torch.profiler: the top ops by
    self time, to say where the step goes."""
    model = AdaMergedModel(share_module(wl.model), task_vectors=wl.task_vectors, granularity="layer", init=INIT,
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
    acts = [torch.profiler.ProfilerActivity.CPU]
    if wl.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        once()
        sync(wl.device)
    avgs = prof.key_averages()
    key = "self_cpu_time_total"
    if wl.device.type == "cuda":
        has_device = avgs and hasattr(avgs[0], "self_device_time_total")
        key = "self_device_time_total" if has_device else "self_cuda_time_total"
    evs = sorted(avgs, key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    total = sum(getattr(e, key, 0) or 0 for e in avgs)
    return [{"op": e.key, "self_ms": (getattr(e, key, 0) or 0) / 1e3, "calls": e.count,
             "share": (getattr(e, key, 0) or 0) / total if total else 0.0} for e in evs[:top]]
