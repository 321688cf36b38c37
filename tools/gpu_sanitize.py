"""A small run of every GPU op, for ``compute-sanitizer --tool memcheck`` (phase 3 of ``make gpu-check``).

Each op of the ``cuda`` (extension) and ``triton`` backends runs once on small, odd, partly unaligned shapes that
reach every kernel path: single and multi-tensor merges and coefficient gradients (more than the extension's 40 items
per launch, aligned and unaligned tensors, a gradient long enough for the two-level reduction), the merged linear
layer at M = 1, 5 (fused, split-K), 40 and 300 (jit / cuBLAS) forward and backward, and the entropy of contiguous,
transposed and ``-inf``-holding logits. Every result is compared with a float64 oracle; the exit status is 1 on a
mismatch, 2 when CUDA or a backend is missing. Under the sanitizer run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``
(every tensor its own allocation, so an out-of-bounds access past a tensor is an access past an allocation)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/gpu_sanitize.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _rand(*shape, dtype=torch.float32, scale=1.0, offset=0, seed=0):
    """A CUDA tensor of ``shape``, starting ``offset`` elements into its own allocation (offset 1: unaligned)."""
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator(device="cuda").manual_seed(seed)
    flat = (torch.randn(n + offset, generator=g, device="cuda") * scale).to(dtype)
    return flat[offset:].view(*shape)


class Checker:
    def __init__(self):
        self.failures, self.count = [], 0

    def close(self, what, actual, expected, rtol, atol):
        self.count += 1
        a, e = actual.detach().double(), expected.detach().double()
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        bad = a.shape != e.shape or bool(torch.isnan(a).any()) or not torch.allclose(a, e, rtol=rtol, atol=atol * scale)
        if bad:
            err = float((a - e).abs().max()) if a.shape == e.shape and a.numel() else float("nan")
            self.failures.append(f"{what}: max error {err:.3g} (shape {tuple(a.shape)} vs {tuple(e.shape)})")


def _tol(dtype):
    return (4e-2, 1.6e-2) if dtype == torch.bfloat16 else (2e-4, 2e-5)


def run(backend: str, chk: Checker) -> None:
    import adamerge_fast as af
    from adamerge_fast.ops import get_backend

    be = get_backend(backend)
    K = 3
    for dt in (torch.float32, torch.bfloat16):
        rt, at = _tol(dt)
        for n, off in ((1, 0), (1000, 1), (4097, 0)):
            base, grad = _rand(n, dtype=dt, offset=off, seed=1), _rand(n, dtype=dt, offset=off, seed=2)
            deltas = _rand(K, n + off, dtype=dt, scale=0.1, seed=3)[:, off:]
            coef = torch.rand(K, device="cuda")
            ref = base.double() + torch.tensordot(coef.double(), deltas.double(), dims=1)
            chk.close(f"{backend} merge {dt} n={n}", be.merge(base, deltas, coef), ref, rt, at)
            chk.close(f"{backend} dcoef {dt} n={n}", be.dcoef(grad, deltas), deltas.double() @ grad.double(), rt, at)
        shapes = [(33,), (768,), (7, 3), (64, 16), (1,)] * 9  # 45 tensors: two extension launches
        bases = [_rand(*s, dtype=dt, offset=i % 2, seed=10 + i) for i, s in enumerate(shapes)]
        deltas = [_rand(K, *s, dtype=dt, scale=0.1, seed=100 + i) for i, s in enumerate(shapes)]
        coefs = torch.rand(len(shapes), K, device="cuda")
        outs = be.merge_many(bases, deltas, coefs)
        dcs = be.dcoef_many(bases, deltas)
        for i, (b, d) in enumerate(zip(bases, deltas, strict=True)):
            ref = b.double() + torch.tensordot(coefs[i].double(), d.double(), dims=1)
            chk.close(f"{backend} merge_many[{i}] {dt}", outs[i], ref, rt, at)
            chk.close(f"{backend} dcoef_many[{i}] {dt}", dcs[i], d.double().reshape(K, -1) @ b.double().reshape(-1),
                      rt, at)  # fmt: skip
    n = 2048 * 8192 + 5  # past the extension's AMF_REDUCE_CHUNK tiles and Triton's CHUNK_ROWS rows: two levels
    g, d = _rand(n, seed=4), _rand(2, n, scale=0.1, seed=5)
    ref = d.double() @ g.double()
    dc = be.dcoef(g, d)
    chk.close(f"{backend} dcoef n={n}", dc, ref, 1e-4, 1e-6 * float((d.double().abs() @ g.double().abs()).max()))
    del g, d
    for dt in (torch.float32, torch.bfloat16):
        rt, at = _tol(dt)
        for M in (1, 5, 40, 300):
            IN, OUT = 70, 33
            x = _rand(M, IN, dtype=dt, offset=1, seed=6).requires_grad_()
            w0, tau = _rand(OUT, IN, dtype=dt, scale=0.1, seed=7), _rand(K, OUT, IN, dtype=dt, scale=0.01, seed=8)
            b0, tau_b = _rand(OUT, dtype=dt, seed=9), _rand(K, OUT, dtype=dt, scale=0.1, seed=10)
            cw = torch.rand(K, device="cuda", requires_grad=True)
            cb = torch.rand(K, device="cuda", requires_grad=True)
            y = af.merged_linear(x, w0, tau, cw, b0, tau_b, cb, backend=backend)
            dy = _rand(M, OUT, dtype=dt, seed=11)
            y.backward(dy)
            x64, cw64, cb64 = (t.detach().double().requires_grad_() for t in (x, cw, cb))
            y64 = x64 @ (w0.double() + torch.tensordot(cw64, tau.double(), dims=1)).t()
            y64 = y64 + b0.double() + torch.tensordot(cb64, tau_b.double(), dims=1)
            y64.backward(dy.double())
            for what, a, e in (("y", y, y64), ("dx", x.grad, x64.grad), ("dcoef_w", cw.grad, cw64.grad),
                               ("dcoef_b", cb.grad, cb64.grad)):  # fmt: skip
                chk.close(f"{backend} merged_linear {what} M={M} {dt}", a, e, rt, at)
    for dt in (torch.float32, torch.bfloat16):
        rt, at = _tol(dt)
        for z in (_rand(5, 1000, dtype=dt, scale=3.0, offset=1, seed=12),
                  _rand(1000, 5, dtype=dt, scale=3.0, seed=13).t()):  # fmt: skip
            z = z.clone() if z.is_contiguous() else z
            if z.is_contiguous():
                z[0, :500] = -float("inf")
            z = z.requires_grad_()
            h = af.entropy(z, backend=backend)
            gh = torch.rand(5, device="cuda")
            h.backward(gh)
            z64 = z.detach().double().requires_grad_()
            logp = torch.log_softmax(z64, -1)
            p = logp.exp()
            h64 = -torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)
            h64.backward(gh.double())
            chk.close(f"{backend} entropy {dt} {tuple(z.stride())}", h, h64, 2e-4, 2e-5)
            chk.close(f"{backend} dentropy {dt} {tuple(z.stride())}", z.grad, z64.grad, rt, at)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda,triton", help="comma-separated (default cuda,triton)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device", file=sys.stderr)
        return 2
    from adamerge_fast import ops

    chk = Checker()
    t0 = time.perf_counter()
    for name in args.backends.split(","):
        reason = ops.backend_status("cuda").get(name, "unknown backend")
        if reason != "available":
            print(f"gpu_sanitize: backend {name} unavailable: {reason}", file=sys.stderr)
            return 2
        run(name, chk)
        torch.cuda.synchronize()
    for f in chk.failures:
        print("MISMATCH " + f)
    print(f"gpu_sanitize: {chk.count} checks, {len(chk.failures)} mismatches, backends {args.backends}, "
          f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
