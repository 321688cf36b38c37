"""GPU-only checks of issue 12 (section 3 and the GPU halves of section 2), on the ``cuda`` and ``triton`` backends.

Skipped without CUDA; ``make gpu-check`` (``scripts/gpu_check.sh``) runs every test marked ``gpu``. Oracles are
float64 (computed on the GPU, in row chunks for the large shapes); tolerances from ``tests/_tol.py``.

* large shapes: K = 8 task vectors of an 8192 x 28672 bf16 layer (``merge``, ``dcoef``: 1.9e9 task-vector elements),
  entropy of 16384 x 128256 logits, forward and backward, contiguous and transposed;
* unaligned slices (``w0[1:]`` in bf16) through every vector path;
* tensors on a non-current device (when there are two GPUs);
* CUDA-graph capture and replay of the multi-tensor ops and of a whole ``AdaMergedModel`` forward + backward, against
  eager; ``torch.compile(mode="reduce-overhead")`` on ``AdaMergedModel``;
* the strategy timing (L2 flushed, median), the tuned table round trip, the split-K fused kernel at M <= 16, and the
  extension's chunked multi-tensor launches (more than 40 tensors).
"""

from __future__ import annotations

import pytest
import torch

import adamerge_fast as af
from _tol import TOL
from adamerge_fast.ops import get_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
GPU_BACKENDS = ["cuda", "triton"]


def _backend(name):
    try:
        be = get_backend(name)
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        pytest.skip(f"backend {name}: {e}")
    reason = be.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")
    return be


def _randn(*shape, dtype=F32, scale=1.0, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def _close(actual, expected, dtype, msg, scale=None):
    """``actual`` against the float64 ``expected`` on the GPU, at ``dtype``'s tolerance (atol scaled by ``scale``,
    default the oracle's magnitude); NaN never passes."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    assert not torch.isnan(a).any(), f"{msg}: NaN in output"
    t = TOL[dtype]
    s = scale if scale is not None else max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(a, expected, rtol=t["rtol"], atol=t["atol"] * s, msg=lambda m: f"{msg}: {m}")


def _merge64(base, deltas, coef):
    return base.double() + torch.tensordot(coef.double(), deltas.double(), dims=1)


# ----------------------------------------------------------------------------------------- large shapes
OUT, IN, K8 = 8192, 28672, 8


@pytest.fixture(scope="module")
def large_layer():
    """K = 8 bf16 task vectors of an 8192 x 28672 layer (3.8 GB), its bf16 base and a bf16 gradient."""
    torch.cuda.empty_cache()
    base = _randn(OUT, IN, dtype=BF16, scale=0.02, seed=1)
    deltas = _randn(K8, OUT, IN, dtype=BF16, scale=0.002, seed=2)
    grad = _randn(OUT, IN, dtype=BF16, seed=3)
    coef = torch.rand(K8, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    yield base, deltas, grad, coef
    del base, deltas, grad
    torch.cuda.empty_cache()


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_large_merge(large_layer, name):
    be = _backend(name)
    base, deltas, _, coef = large_layer
    out = be.merge(base, deltas, coef)
    assert out.dtype == BF16 and out.shape == base.shape
    for r0 in range(0, OUT, 1024):  # float64 oracle, 1024 rows at a time
        rows = slice(r0, r0 + 1024)
        _close(out[rows], _merge64(base[rows], deltas[:, rows], coef), BF16, f"{name} merge rows {r0}+")


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_large_dcoef(large_layer, name):
    """``dcoef`` over 2.35e8 elements per task vector: the partial sums are reduced in two levels on both backends.
    The tolerance is relative to ``sum |grad * tau_k|`` (what fp32 partial sums can resolve), not to the result."""
    be = _backend(name)
    base, deltas, grad, _ = large_layer
    dc = be.dcoef(grad, deltas)
    assert dc.shape == (K8,)
    ref, mag = torch.zeros(K8, dtype=F64, device="cuda"), torch.zeros(K8, dtype=F64, device="cuda")
    for r0 in range(0, OUT, 1024):
        prod = deltas[:, r0 : r0 + 1024].double() * grad[r0 : r0 + 1024].double()
        ref += prod.sum((1, 2))
        mag += prod.abs().sum((1, 2))
    err = (dc.double() - ref).abs()
    assert torch.isfinite(dc).all() and bool((err <= 1e-6 * mag + 1e-6).all()), (err, mag)
    assert torch.equal(dc, be.dcoef(grad, deltas)), "dcoef must be deterministic"


def _entropy64(z):
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    return h, p, logp


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_large_entropy(name, layout):
    """Entropy of 16384 x 128256 bf16 logits (a Llama-3 vocabulary), forward and backward; the transposed view has
    column offsets past 2^31 elements (64-bit index products)."""
    be = _backend(name)
    N, C = 16384, 128256
    torch.cuda.empty_cache()
    if layout == "contiguous":
        z = _randn(N, C, dtype=BF16, scale=3.0, seed=5)
    else:
        z = _randn(C, N, dtype=BF16, scale=3.0, seed=5).t()
        assert z.stride() == (1, N)
    g = torch.rand(N, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    h = be.entropy_fwd(z)
    dz = be.entropy_bwd(g, z)
    assert h.shape == (N,) and dz.shape == (N, C) and dz.dtype == BF16
    for r0 in range(0, N, 512):
        rows = slice(r0, r0 + 512)
        h64, p, logp = _entropy64(z[rows])
        _close(h[rows], h64, F32, f"{name} entropy rows {r0}+ ({layout})")
        d64 = -p * (logp + h64[:, None]) * g[rows].double()[:, None]
        _close(dz[rows], d64, BF16, f"{name} dentropy rows {r0}+ ({layout})")
    del z, dz
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- unaligned slices
def _unaligned(*shape, dtype=BF16, scale=1.0, seed=0):
    """A tensor of ``shape`` starting one element into its storage (``w0[1:]``-like: not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    flat = _randn(n + 1, dtype=dtype, scale=scale, seed=seed)
    t = flat[1:].view(*shape)
    assert t.data_ptr() % 16 != 0
    return t


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_unaligned_slices_every_vector_path(name):
    """bf16 views one element into their storage through merge, dcoef, merge_many, dcoef_many (mixed with aligned
    tensors, so both multi-tensor variants run), merged_linear forward and backward, entropy."""
    be = _backend(name)
    K = 3
    base, grad = _unaligned(1000, seed=1), _unaligned(1000, seed=2)
    deltas = _randn(K, 1001, dtype=BF16, scale=0.1, seed=3)[:, 1:]  # unaligned slices, stride 1001
    coef = torch.rand(K, device="cuda")
    _close(be.merge(base, deltas, coef), _merge64(base, deltas, coef), BF16, f"{name} merge")
    dc64 = (deltas.double() * grad.double()).sum(1)
    _close(be.dcoef(grad, deltas), dc64, BF16, f"{name} dcoef")
    bases = [base, _randn(64, dtype=BF16, seed=4), _unaligned(7, 3, seed=5), _randn(4096, dtype=BF16, seed=6)]
    dl = [deltas, _randn(K, 64, dtype=BF16, seed=7), _randn(K, 22, dtype=BF16, seed=8)[:, 1:].reshape(K, 7, 3),
          _randn(K, 4096, dtype=BF16, seed=9)]  # fmt: skip
    coefs = torch.rand(len(bases), K, device="cuda")
    outs = be.merge_many(bases, dl, coefs)
    dcs = be.dcoef_many(bases, dl)
    for i, (b, d) in enumerate(zip(bases, dl, strict=True)):
        _close(outs[i], _merge64(b, d, coefs[i]), BF16, f"{name} merge_many[{i}]")
        _close(dcs[i], (d.double() * b.double().unsqueeze(0)).reshape(K, -1).sum(1), BF16, f"{name} dcoef_many[{i}]")
    M, I_, O_ = 9, 40, 24
    x = _unaligned(M, I_, seed=10).requires_grad_()
    w0, tau = _unaligned(O_, I_, scale=0.1, seed=11), _unaligned(K, O_, I_, scale=0.01, seed=12)
    cw = torch.rand(K, device="cuda", requires_grad=True)
    y = af.merged_linear(x, w0, tau, cw, backend=name)
    dy = _randn(M, O_, dtype=BF16, seed=13)
    y.backward(dy)
    x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
    y64 = x64 @ (w0.double() + torch.tensordot(cw64, tau.double(), dims=1)).t()
    y64.backward(dy.double())
    _close(y, y64, BF16, f"{name} merged_linear")
    _close(x.grad, x64.grad, BF16, f"{name} merged_linear dx")
    _close(cw.grad, cw64.grad, BF16, f"{name} merged_linear dcoef_w")
    z = _unaligned(5, 333, scale=3.0, seed=14)
    _close(be.entropy_fwd(z), _entropy64(z)[0], F32, f"{name} entropy")


# ------------------------------------------------------------------------------------ non-current device
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_tensors_on_a_non_current_device(name):
    """Issue 12 item 3: tensors on cuda:1 while cuda:0 is current run on cuda:1 (and leave cuda:0 current)."""
    be = _backend(name)
    torch.cuda.set_device(0)
    dev = "cuda:1"
    K = 3
    base, deltas = _randn(5000, device=dev, seed=1), _randn(K, 5000, device=dev, seed=2)
    coef = torch.rand(K, device=dev)
    _close(be.merge(base, deltas, coef), _merge64(base, deltas, coef), F32, f"{name} merge on cuda:1")
    outs = be.merge_many([base, base[:77]], [deltas, deltas[:, :77]], torch.rand(2, K, device=dev))
    assert outs[0].device == torch.device(dev)
    x = _randn(40, 33, device=dev, seed=3).requires_grad_()
    w0, tau = _randn(20, 33, device=dev, seed=4), _randn(K, 20, 33, scale=0.1, device=dev, seed=5)
    cw = torch.rand(K, device=dev, requires_grad=True)
    y = af.merged_linear(x, w0, tau, cw, backend=name)
    y.sum().backward()
    y64 = x.double() @ _merge64(w0, tau, cw).t()
    _close(y, y64, F32, f"{name} merged_linear on cuda:1")
    assert x.grad.device == torch.device(dev) and torch.isfinite(cw.grad).all()
    h = af.entropy(_randn(4, 50, device=dev, seed=6), backend=name)
    assert h.device == torch.device(dev) and torch.isfinite(h).all()
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_capture_merge_many_and_dcoef_many(name):
    """Issue 12 item 4: merge_many / dcoef_many captured into a CUDA graph replay correctly after their inputs
    change in place (no host table is read again at replay). The eager warm-up comes first, as torch requires."""
    be = _backend(name)
    K = 4
    shapes = [(768,), (2304,), (7, 3), (768, 3, 32, 32), (50, 768), (1,)] + [(33,)] * 45  # > 40: chunked launches
    bases = [_randn(*s, seed=i) for i, s in enumerate(shapes)]
    deltas = [_randn(K, *s, dtype=BF16, scale=0.1, seed=100 + i) for i, s in enumerate(shapes)]
    coefs = torch.rand(len(shapes), K, device="cuda")
    grads = [_randn(*s, seed=200 + i) for i, s in enumerate(shapes)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            be.merge_many(bases, deltas, coefs)
            be.dcoef_many(grads, deltas)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = be.merge_many(bases, deltas, coefs)
        dcs = be.dcoef_many(grads, deltas)
    for step in range(2):
        with torch.no_grad():
            coefs.copy_(torch.rand(len(shapes), K, device="cuda"))
            for b, gr in zip(bases, grads, strict=True):
                b.copy_(torch.randn_like(b))
                gr.copy_(torch.randn_like(gr))
        graph.replay()
        torch.cuda.synchronize()
        eager_outs, eager_dcs = be.merge_many(bases, deltas, coefs), be.dcoef_many(grads, deltas)
        for i in range(len(shapes)):
            _close(outs[i], _merge64(bases[i], deltas[i], coefs[i]), BF16, f"{name} replay {step} merge_many[{i}]")
            _close(outs[i], eager_outs[i].double(), F32, f"{name} replay {step} vs eager merge_many[{i}]")
        _close(dcs, eager_dcs.double(), F32, f"{name} replay {step} vs eager dcoef_many")


def _tiny_vit(seed):
    from benchmarks.adamerging_step import vit

    torch.manual_seed(seed)
    return vit.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                 output_dim=32).cuda()  # fmt: skip


def _model_and_tvs(backend, K=3):
    pre = _tiny_vit(0)
    g = torch.Generator("cuda").manual_seed(1)
    tv = {n: torch.randn((K, *p.shape), device="cuda", generator=g) * 0.01 for n, p in pre.named_parameters()}
    return af.AdaMergedModel(pre, task_vectors=tv, granularity="layer", backend=backend)


def _loss(model, x, head):
    return af.entropy(model(x) @ head).mean()


@pytest.mark.parametrize("name", ["auto", "cuda", "triton", "reference"])
def test_cuda_graph_adamerged_forward_backward(name):
    """Issue 12 section 3: a whole AdaMergedModel forward + backward (merged_linear, merged attention, merge_many of
    the other parameters, entropy) captured into a CUDA graph and replayed with new coefficients and inputs equals
    eager."""
    if name != "auto":
        _backend(name)
    model = _model_and_tvs(name)
    head = _randn(32, 10, seed=2)
    x = _randn(6, 3, 32, 32, seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compiles and loads every kernel, measures the Triton strategies
            model.raw_coefficients.grad = None
            _loss(model, x, head).backward()
    torch.cuda.current_stream().wait_stream(side)
    model.raw_coefficients.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _loss(model, x, head)
        static_loss.backward()
    static_grad = model.raw_coefficients.grad
    for step in range(3):
        with torch.no_grad():
            model.raw_coefficients.copy_(torch.rand_like(model.raw_coefficients))
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        loss, grad = static_loss.detach().clone(), static_grad.detach().clone()
        model.raw_coefficients.grad = None
        eager = _loss(model, x, head)
        eager.backward()
        _close(loss, eager.detach().double(), F32, f"{name} replay {step}: loss")
        _close(grad, model.raw_coefficients.grad.double(), F32, f"{name} replay {step}: coefficient gradient")
        model.raw_coefficients.grad = static_grad  # the graph writes into this tensor


def test_torch_compile_reduce_overhead():
    """``torch.compile(mode="reduce-overhead")`` (cudagraph trees) on AdaMergedModel: the same loss and coefficient
    gradients as eager over several steps with changing coefficients."""
    model = _model_and_tvs("auto")
    head = _randn(32, 10, seed=2)
    compiled = torch.compile(model, mode="reduce-overhead")
    for step in range(4):
        x = _randn(6, 3, 32, 32, seed=10 + step)
        with torch.no_grad():
            model.raw_coefficients.copy_(torch.rand_like(model.raw_coefficients))
        model.raw_coefficients.grad = None
        loss = af.entropy(compiled(x) @ head).mean()
        loss.backward()
        got_loss, got_grad = loss.detach().clone(), model.raw_coefficients.grad.clone()
        model.raw_coefficients.grad = None
        ref = _loss(model, x, head)
        ref.backward()
        _close(got_loss, ref.detach().double(), F32, f"compiled step {step}: loss")
        _close(got_grad, model.raw_coefficients.grad.double(), F32, f"compiled step {step}: gradient")


# --------------------------------------------------------------------------- strategy timing and tuning
def test_strategy_timing_and_tuned_table(tmp_path, monkeypatch):
    """Issue 12 item 5 on a GPU: the timer (L2 flushed, median) returns a positive time; choices are recorded per key
    and bucket, saved and reloaded as a fixed table; with the table fixed two runs give the same bits."""
    _backend("triton")
    from adamerge_fast.ops.triton_kernels import merged_linear as ml

    monkeypatch.setattr(ml, "_TUNED", {})
    monkeypatch.setattr(ml, "_FIXED", False)
    monkeypatch.setattr(ml, "_TABLE_LOADED_FROM_ENV", True)
    monkeypatch.setattr(ml, "TUNE", True)
    x, w0 = _randn(40, 768, seed=1), _randn(3072, 768, scale=0.03, seed=2)
    tau, cw = _randn(8, 3072, 768, dtype=BF16, scale=0.003, seed=3), torch.rand(8, device="cuda")
    t = ml._bench_ms(lambda: ml._fwd(x, w0, tau, cw, None, None, None, "fused"))
    assert t > 0
    y1 = ml.merged_linear_fwd(x, w0, tau, cw)
    tuned = ml.tuned_strategies()
    (key,) = tuned
    assert key[:2] == ("fwd", 64) and key[-1] == torch.cuda.get_device_name()
    path = ml.save_tuned(tmp_path / "tuned.json")
    ml.reset_tuned()
    ml.load_tuned(path)
    y2 = ml.merged_linear_fwd(x, w0, tau, cw)
    assert torch.equal(y1, y2)
    y16 = ml.merged_linear_fwd(x[:16], w0, tau, cw)  # a key the fixed table lacks: the rule, no timing
    assert len(ml.tuned_strategies()) == 1
    _close(y16, x[:16].double() @ _merge64(w0, tau, cw).t(), BF16, "fused at M = 16")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("M", [1, 16])
def test_split_k_small_batch(dtype, M):
    """Issue 12 item 10: at M <= 16 a 768-wide layer has too few output tiles for the GPU: the fused kernel splits the
    reduction (checked through the split count) and stays exact, forward and dx."""
    _backend("triton")
    from adamerge_fast.ops.triton_kernels import merged_linear as ml

    K = 8
    x = _randn(M, 768, dtype=dtype, seed=1)
    assert ml._split_r(M, 768, 768, ml._matmul_config(M, 768, 768, ml.dot_dtype(dtype)), x.device) > 1
    w0, tau = _randn(768, 768, dtype=dtype, scale=0.03, seed=2), _randn(K, 768, 768, dtype=dtype, scale=0.003, seed=3)
    b0, tau_b = _randn(768, dtype=dtype, seed=4), _randn(K, 768, dtype=dtype, scale=0.01, seed=5)
    cw, cb = torch.rand(K, device="cuda"), torch.rand(K, device="cuda")
    y = ml.merged_linear_fwd(x, w0, tau, cw, b0, tau_b, cb, strategy="fused")
    ref = x.double() @ _merge64(w0, tau, cw).t() + _merge64(b0, tau_b, cb)
    _close(y, ref, BF16 if dtype == BF16 else F32, f"split-K forward M={M} {dtype}")
    dy = _randn(M, 768, dtype=dtype, seed=6)
    dx = ml.merged_linear_dx(dy, w0, tau, cw, dtype, strategy="fused")
    _close(dx, dy.double() @ _merge64(w0, tau, cw), BF16 if dtype == BF16 else F32, f"split-K dx M={M} {dtype}")


def test_auto_order_on_cuda():
    """Issue 12 item 2: ``auto`` on CUDA picks the extension's merges and Triton's merged_linear and entropy."""
    from adamerge_fast import ops

    dev = torch.device("cuda")
    status = ops.backend_status(dev)
    if status.get("triton") == "available":
        assert ops.resolve("auto", "merged_linear", dev) == "triton" == ops.resolve("auto", "entropy", dev)
    if status.get("cuda") == "available":
        assert ops.resolve("auto", "merge", dev) == "cuda" == ops.resolve("auto", "merge_many", dev)


def test_extension_built_with_cuda():
    """``make gpu-check`` builds the extension with ADAMERGE_REQUIRE_EXT=1 for sm_90: its CUDA kernels must be there."""
    from adamerge_fast.ops.cpp_backend import extension_info

    info = extension_info()
    assert info["with_cuda"], info
    assert bool(torch.ops.adamerge_fast.k_has_cuda())


# ------------------------------------------------------------------------------- the model and the optimizer
@pytest.mark.parametrize("name", ["auto", "cuda", "triton"])
def test_adamerged_model_on_cuda_matches_naive(name):
    """AdaMergedModel on CUDA (merged linear layers and attention, merge_many for the rest) against functional_call
    on the naively merged float64 state dict: output and coefficient gradients."""
    if name != "auto":
        _backend(name)
    K = 3
    pre = _tiny_vit(0)
    g = torch.Generator("cuda").manual_seed(1)
    tv = {n: torch.randn((K, *p.shape), device="cuda", generator=g) * 0.01 for n, p in pre.named_parameters()}
    model = af.AdaMergedModel(pre, task_vectors=tv, granularity="layer", backend=name)
    with torch.no_grad():
        model.raw_coefficients.copy_(torch.rand(model.raw_coefficients.shape, device="cuda", generator=g) * 1.2 - 0.1)
    x = _randn(5, 3, 32, 32, seed=2)
    out = model(x)
    w = _randn(*out.shape, seed=3)
    (out * w).sum().backward()
    raw64 = model.raw_coefficients.detach().double().requires_grad_()
    lam = raw64.clamp(0, 1)
    merged = {n: p.detach().double() + torch.tensordot(lam[i], tv[n].double(), dims=1)
              for i, (n, p) in enumerate(pre.named_parameters())}  # fmt: skip
    ref = torch.func.functional_call(_tiny_vit(0).double(), merged, (x.double(),))
    (ref * w.double()).sum().backward()
    _close(out, ref.detach(), F32, f"{name}: forward")
    _close(model.raw_coefficients.grad, raw64.grad, F32, f"{name}: coefficient gradients")


@pytest.mark.parametrize("task_batching", ["concat", "sequential"])
def test_adamerge_on_cuda_matches_official(task_batching):
    """``adamerge`` with the model, heads and batches on CUDA (``auto`` backends) follows the official algorithm's
    coefficient trajectory (computed on the CPU) step by step."""
    import copy

    from test_optim import official, setup

    pre, fts, heads, data = setup()
    ref = official(pre, fts, heads, data, steps=6)
    model = af.AdaMergedModel(copy.deepcopy(pre).cuda(), [copy.deepcopy(f).cuda() for f in fts]).cuda()
    heads_c = {t: copy.deepcopy(h).cuda() for t, h in heads.items()}
    data_c = {t: [b.cuda() for b in bs] for t, bs in data.items()}
    hist = af.adamerge(model, heads_c, data_c, steps=6, task_batching=task_batching, progress=False)
    for step, (a, b) in enumerate(zip(hist.coefficients, ref, strict=True)):
        _close(a.to("cuda"), b.double().to("cuda"), F32, f"step {step}")
