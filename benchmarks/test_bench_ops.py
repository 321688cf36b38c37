"""pytest-benchmark microbenchmarks of every op (``merge``, ``merge_many``, ``merged_linear``, ``entropy``;
forward and forward+backward) for every backend available on the device.

Run::

    pytest benchmarks --benchmark-only                 # CPU shapes, or GPU shapes when CUDA is present
    ADAMERGE_BENCH_DEVICE=cpu pytest benchmarks --benchmark-only --benchmark-group-by=group

Not part of the test suite (``testpaths = ["tests"]``). Backends that cannot run on the device are skipped
(``triton`` only on CUDA: the interpreter is not a benchmark). Each case is a benchmark group, so the table
compares backends per case; pytest-benchmark times them one block after another, so on a shared machine take
the side-by-side ratios from ``python -m benchmarks.adamerging_step`` (interleaved) instead. Every benchmark
records the bytes it must move and its matmul FLOPs in ``extra_info``; the run's environment
(:func:`benchmarks._env.env_info`) goes into pytest-benchmark's ``machine_info`` (``benchmarks/conftest.py``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from adamerge_fast import ops
from benchmarks._env import default_device, skip_reason

DEVICE = default_device(os.environ.get("ADAMERGE_BENCH_DEVICE"))
BIG = DEVICE.type == "cuda"

# (label, M tokens, in, out, K, weight dtype, task-vector dtype)
if BIG:
    LINEAR_CASES = [
        ("vitb32-fc-fp32", 8 * 16 * 50, 768, 3072, 8, torch.float32, torch.float32),
        ("vitb32-fc-bf16tv", 8 * 16 * 50, 768, 3072, 8, torch.float32, torch.bfloat16),
        ("llama-up-bf16", 3 * 2 * 256, 4096, 11008, 3, torch.bfloat16, torch.bfloat16),
    ]
    ENTROPY_CASES = [("vit-10cls", 8 * 16, 10), ("llama-vocab", 3 * 2 * 256, 32000)]
    MANY = ([(768,)] * 50 + [(3072,)] * 12 + [(768, 3, 32, 32), (50, 768), (768, 512)], 8)
else:
    LINEAR_CASES = [
        ("vitsmall-fc-fp32", 8 * 4 * 50, 384, 1536, 8, torch.float32, torch.float32),
        ("vitsmall-fc-bf16tv", 8 * 4 * 50, 384, 1536, 8, torch.float32, torch.bfloat16),
    ]
    ENTROPY_CASES = [("vit-10cls", 8 * 4, 10), ("vocab-4k", 256, 4096)]
    MANY = ([(384,)] * 26 + [(1536,)] * 6 + [(384, 3, 32, 32), (50, 384), (384, 512)], 8)


@pytest.fixture(params=ops.BACKEND_NAMES)
def backend(request):
    reason = skip_reason(request.param, DEVICE)
    if reason:
        pytest.skip(reason)
    return request.param


def _rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _run(benchmark, fn, group: str, nbytes: int, flops: int = 0):
    """Benchmark ``fn`` (synchronized on CUDA) in ``group``; record the bytes and FLOPs it must move/do."""
    if DEVICE.type == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    call()  # compile / warm up outside the timing
    benchmark.group = group
    benchmark.extra_info.update({"device": str(DEVICE), "bytes": nbytes, "flops": flops})
    benchmark(call)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_merge(benchmark, backend, case, direction):
    label, _, IN, OUT, K, wdt, tdt = case
    base, deltas = _rnd(OUT, IN, dtype=wdt), _rnd(K, OUT, IN, dtype=tdt, scale=1e-2)
    coef = torch.full((K,), 0.3, device=DEVICE, requires_grad=direction != "fwd")
    grad = _rnd(OUT, IN, dtype=wdt)
    nbytes = base.numel() * base.element_size() * 2 + deltas.numel() * deltas.element_size()
    if direction == "fwd":
        fn = lambda: ops.merge(base, deltas, coef, backend=backend)  # noqa: E731
    else:
        nbytes += grad.numel() * grad.element_size() + deltas.numel() * deltas.element_size()

        def fn():
            torch.autograd.grad(ops.merge(base, deltas, coef, backend=backend), coef, grad)

    _run(benchmark, fn, f"merge {direction} {label}", nbytes, 2 * K * base.numel() * (1 if direction == "fwd" else 2))


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_merge_many(benchmark, backend, direction):
    shapes, K = MANY
    bases = [_rnd(*s) for s in shapes]
    deltas = [_rnd(K, *s, scale=1e-2) for s in shapes]
    coefs = torch.full((len(shapes), K), 0.3, device=DEVICE, requires_grad=direction != "fwd")
    n = sum(math.prod(s) for s in shapes)
    nbytes = 4 * n * (K + 2)
    if direction == "fwd":
        fn = lambda: ops.merge_many(bases, deltas, coefs, backend=backend)  # noqa: E731
    else:
        grads = [torch.ones_like(b) for b in bases]
        nbytes += 4 * n * (K + 1)

        def fn():
            torch.autograd.grad(ops.merge_many(bases, deltas, coefs, backend=backend), coefs, grads)

    _run(benchmark, fn, f"merge_many {direction} {len(shapes)} tensors K={K}", nbytes, 2 * K * n)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_merged_linear(benchmark, backend, case, direction):
    label, M, IN, OUT, K, wdt, tdt = case
    bwd = direction != "fwd"
    x = _rnd(M, IN, dtype=wdt).requires_grad_(bwd)
    w0, tau = _rnd(OUT, IN, dtype=wdt, scale=IN**-0.5), _rnd(K, OUT, IN, dtype=tdt, scale=1e-3)
    b0, taub = _rnd(OUT, dtype=wdt), _rnd(K, OUT, dtype=tdt, scale=1e-3)
    c = torch.full((K,), 0.3, device=DEVICE, requires_grad=bwd)
    cb = torch.full((K,), 0.3, device=DEVICE, requires_grad=bwd)
    s = x.element_size()
    wbytes = w0.numel() * w0.element_size() + tau.numel() * tau.element_size()
    nbytes = M * IN * s + wbytes + M * OUT * s
    flops = 2 * M * IN * OUT
    if not bwd:
        fn = lambda: ops.merged_linear(x, w0, tau, c, b0, taub, cb, backend=backend)  # noqa: E731
    else:
        dy = _rnd(M, OUT, dtype=wdt)
        # backward: dy and x read, weights re-read for dx, task vectors read for dcoef, dx written
        nbytes += M * OUT * s + 2 * M * IN * s + wbytes + tau.numel() * tau.element_size()
        flops *= 3

        def fn():
            y = ops.merged_linear(x, w0, tau, c, b0, taub, cb, backend=backend)
            torch.autograd.grad(y, (x, c, cb), dy)

    _run(benchmark, fn, f"merged_linear {direction} {label} M={M} {IN}->{OUT} K={K}", nbytes, flops)


@pytest.mark.parametrize("case", ENTROPY_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_entropy(benchmark, backend, case, direction):
    label, N, C = case
    z = _rnd(N, C, scale=3.0).requires_grad_(direction != "fwd")
    nbytes = z.numel() * 4 + N * 4
    if direction == "fwd":
        fn = lambda: ops.entropy(z, backend=backend)  # noqa: E731
    else:
        nbytes += 2 * z.numel() * 4

        def fn():
            torch.autograd.grad(ops.entropy(z, backend=backend).mean(), z)

    try:
        ops.entropy(z[:1], backend=backend)
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    _run(benchmark, fn, f"entropy {direction} {label} [{N}, {C}]", nbytes)
