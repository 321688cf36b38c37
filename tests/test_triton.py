"""The ``"triton"`` backend against float64 oracles (plain torch on ``.double()`` inputs, naive formulas).

On a machine without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest sets
``TRITON_INTERPRET=1`` before anything imports triton); shapes are kept small because the interpreter is slow.
Outputs are NaN-poisoned (conftest), so an element a kernel fails to write fails the comparison.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import adamerge_fast  # noqa: E402
from _tol import assert_close, lowest  # noqa: E402
from adamerge_fast.ops import get_backend  # noqa: E402

pytestmark = pytest.mark.triton

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.fixture(scope="module")
def be():
    return get_backend("triton")


@pytest.fixture(scope="module")
def device(be):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = be.unavailable_reason(dev)
    if reason is not None:
        pytest.skip(reason)
    return dev


@pytest.fixture(scope="module")
def kernels(be):
    from adamerge_fast.ops.triton_kernels import entropy, merge, merged_linear

    return merge, merged_linear, entropy


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=F32, device="cpu", scale=1.0, seed=0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------- oracles
def merge_oracle(base, deltas, coef):
    K = deltas.shape[0]
    return base.double() + (coef.double().reshape(K, *[1] * base.dim()) * deltas.double()).sum(0)


def dcoef_oracle(grad, deltas):
    return (grad.double().unsqueeze(0) * deltas.double()).reshape(deltas.shape[0], -1).sum(1)


def linear_oracle(x, w0, tau_w, coef_w, b0=None, tau_b=None, coef_b=None):
    y = x.double() @ merge_oracle(w0, tau_w, coef_w).t()
    if b0 is not None:
        y = y + (merge_oracle(b0, tau_b, coef_b) if tau_b is not None else b0.double())
    return y


def entropy_oracle(z):
    # float64, autograd-safe with -inf entries: the inner where keeps 0 * -inf out of the backward
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return -torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)


# ------------------------------------------------------------------------------------------- availability
def test_unavailable_reason(be):
    assert be.name == "triton"
    assert isinstance(be.unavailable_reason(torch.device("meta")), str)
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        assert be.unavailable_reason(torch.device("cpu")) is None
    if be._interpret:  # issue 12 item 9: interpreted kernels never run "on" CUDA tensors (auto moves on)
        assert "TRITON_INTERPRET" in be.unavailable_reason(torch.device("cuda"))
        assert "triton" not in [adamerge_fast.ops.resolve("auto", op, torch.device("cuda")) for op in ("merge",)]
    else:
        assert be.unavailable_reason(torch.device("cuda")) is None


# --------------------------------------------------------------------------------------------------- merge
MERGE_CASES = [
    # (shape, K, base dtype, delta dtype, coef dtype)
    ((1,), 1, F32, F32, F32),
    ((47,), 2, F32, BF16, F32),
    ((3, 133), 5, BF16, BF16, F32),
    ((7, 5, 3), 2, F16, F32, BF16),
    ((5000,), 8, F32, F16, F32),
]


@pytest.mark.parametrize("shape,K,bdt,ddt,cdt", MERGE_CASES)
def test_merge_dcoef(be, device, shape, K, bdt, ddt, cdt):
    base = _randn(*shape, dtype=bdt, device=device, seed=1)
    deltas = _randn(K, *shape, dtype=ddt, device=device, scale=0.1, seed=2)
    coef = _randn(K, dtype=cdt, device=device, seed=3)
    out = be.merge(base, deltas, coef)
    assert out.dtype == bdt and out.shape == base.shape and out.is_contiguous()
    assert_close(out, merge_oracle(base, deltas, coef), lowest(bdt, ddt, cdt), "merge")
    grad = _randn(*shape, dtype=bdt, device=device, seed=4)
    dc = be.dcoef(grad, deltas)
    assert dc.dtype == F32 and dc.shape == (K,)
    assert_close(dc, dcoef_oracle(grad, deltas), lowest(bdt, ddt), "dcoef")
    assert torch.equal(dc, be.dcoef(grad, deltas)), "dcoef must be deterministic"


def test_merge_noncontiguous(be, device):
    base = _randn(33, 20, device=device, seed=1).t()  # [20, 33] transposed view
    deltas = _randn(33, 20, 6, device=device, seed=2).permute(2, 1, 0)[::2]  # [3, 20, 33], strided
    coef = _randn(6, device=device, seed=3)[::2]
    assert not base.is_contiguous() and not deltas.is_contiguous() and not coef.is_contiguous()
    assert_close(be.merge(base, deltas, coef), merge_oracle(base, deltas, coef), F32, "merge (views)")
    assert_close(be.dcoef(base, deltas), dcoef_oracle(base, deltas), F32, "dcoef (views)")


def test_merge_fp64_delegates(be, device):
    base, deltas, coef = (_randn(*s, dtype=F64, device=device, seed=i) for i, s in enumerate([(9,), (2, 9), (2,)]))
    out = be.merge(base, deltas, coef)
    assert out.dtype == F64
    assert_close(out, merge_oracle(base, deltas, coef), F64, "merge fp64")
    assert be.dcoef(base, deltas).dtype == F64


def test_segment_sum(device, kernels):
    """The deterministic second pass of every dcoef: several chunks per segment, empty segments."""
    kmerge = kernels[0]
    partial = _randn(3000, 5, device=device, seed=1)
    bounds = [(0, 2500), (2500, 2500), (2500, 3000), (10, 11)]
    seg = torch.tensor(bounds, dtype=torch.int64, device=device)
    out = kmerge.segment_sum(partial, seg, len(bounds))
    ref = torch.stack([partial.double()[a:b].sum(0) for a, b in bounds])
    assert_close(out, ref, F32, "segment_sum")
    assert_close(kmerge.segment_sum(partial, None, 1), partial.double().sum(0, keepdim=True), F32, "segment_sum all")


class _CountLaunches:
    """Stands in for a Triton kernel object: counts ``kernel[grid](...)`` launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


MANY_SHAPES = [(5,), (7, 3), (4100,), (1,), (4, 4, 4)]


@pytest.mark.parametrize("mixed", [False, True], ids=["one-dtype", "mixed-dtypes"])
def test_merge_many_one_launch(be, device, kernels, monkeypatch, mixed):
    kmerge = kernels[0]
    K, n = 3, len(MANY_SHAPES)
    bdts = [F32, BF16, F32, F16, F32] if mixed else [F32] * n
    ddts = [BF16 if i % 2 else F32 for i in range(n)] if mixed else [F32] * n
    bases = [_randn(*s, dtype=d, device=device, seed=i) for i, (s, d) in enumerate(zip(MANY_SHAPES, bdts, strict=True))]
    deltas = [
        _randn(K, *s, dtype=d, device=device, scale=0.1, seed=10 + i)
        for i, (s, d) in enumerate(zip(MANY_SHAPES, ddts, strict=True))
    ]
    coefs = _randn(n, K, device=device, seed=99)
    count_m = _CountLaunches(kmerge._merge_many_kernel)
    count_d = _CountLaunches(kmerge._dcoef_many_partial_kernel)
    monkeypatch.setattr(kmerge, "_merge_many_kernel", count_m)
    monkeypatch.setattr(kmerge, "_dcoef_many_partial_kernel", count_d)
    monkeypatch.setattr(kmerge, "_warm_first", lambda *a: {})  # no tensor through the capture kernels
    outs = be.merge_many(bases, deltas, coefs)
    dcs = be.dcoef_many(bases, deltas)
    # one launch per (dtypes, 16-byte aligned) group: (4, 4, 4) (64 elements) is aligned, the odd sizes are not
    groups = len({(b.dtype, d.dtype, kmerge._aligned(b, d, b.numel(), d.stride(0)))
                  for b, d in zip(bases, deltas, strict=True)})  # fmt: skip
    if kmerge._one_launch_ok(device):
        assert count_m.launches == groups and count_d.launches == groups, (count_m.launches, count_d.launches)
        assert groups == (4 if mixed else 2)
    assert dcs.shape == (n, K) and dcs.dtype == F32
    for i in range(n):
        assert outs[i].dtype == bases[i].dtype and outs[i].shape == bases[i].shape
        tol = lowest(bases[i].dtype, deltas[i].dtype)
        assert_close(outs[i], merge_oracle(bases[i], deltas[i], coefs[i]), tol, f"merge_many[{i}]")
        assert_close(dcs[i], dcoef_oracle(bases[i], deltas[i]), tol, f"dcoef_many[{i}]")


def test_merge_many_public_autograd(device):
    K, n = 2, 3
    shapes = [(6, 5), (17,), (2, 3, 4)]
    bases = [_randn(*s, device=device, seed=i) for i, s in enumerate(shapes)]
    deltas = [_randn(K, *s, device=device, scale=0.1, seed=10 + i) for i, s in enumerate(shapes)]
    coefs = _randn(n, K, device=device, seed=7).requires_grad_()
    outs = adamerge_fast.merge_many(bases, deltas, coefs, backend="triton")
    gs = [_randn(*s, device=device, seed=20 + i) for i, s in enumerate(shapes)]
    torch.autograd.backward(outs, gs)
    c64 = coefs.detach().double().requires_grad_()
    ref = [merge_oracle(b, d, c64[i]) for i, (b, d) in enumerate(zip(bases, deltas, strict=True))]
    torch.autograd.backward(ref, [g.double() for g in gs])
    for o, r in zip(outs, ref, strict=True):
        assert_close(o, r, F32, "merge_many fwd")
    assert_close(coefs.grad, c64.grad, F32, "merge_many dcoefs")


# ------------------------------------------------------------------------------------------ merged_linear
def _linear_inputs(M, IN, OUT, K, xdt, wdt, tdt, device, bias=True, seed=0):
    x = _randn(M, IN, dtype=xdt, device=device, seed=seed)
    w0 = _randn(OUT, IN, dtype=wdt, device=device, scale=IN**-0.5, seed=seed + 1)
    tau_w = _randn(K, OUT, IN, dtype=tdt, device=device, scale=0.3 * IN**-0.5, seed=seed + 2)
    coef_w = _randn(K, device=device, seed=seed + 3)
    b0 = _randn(OUT, dtype=wdt, device=device, seed=seed + 4) if bias else None
    tau_b = _randn(K, OUT, dtype=tdt, device=device, scale=0.3, seed=seed + 5) if bias else None
    coef_b = _randn(K, device=device, seed=seed + 6) if bias else None
    return x, w0, tau_w, coef_w, b0, tau_b, coef_b


LINEAR_CASES = [
    # (M, in, out, K, x dtype, w0 dtype, task-vector dtype, bias)
    (1, 3, 5, 1, F32, F32, F32, True),
    (3, 47, 133, 2, F32, F32, BF16, True),
    (47, 133, 47, 5, BF16, F32, BF16, False),
    (3, 47, 3, 2, F16, F32, F16, True),
    (47, 16, 33, 2, F16, BF16, F32, True),
    (20, 40, 24, 8, F32, F32, F16, True),
    (3, 200, 600, 2, F32, F32, F32, True),  # many tiles: the grouped tile order of the dcoef_w kernel
]


@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("M,IN,OUT,K,xdt,wdt,tdt,bias", LINEAR_CASES)
def test_merged_linear_fwd_bwd(be, device, strategy, M, IN, OUT, K, xdt, wdt, tdt, bias):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(M, IN, OUT, K, xdt, wdt, tdt, device, bias)
    tol = lowest(xdt, wdt, tdt)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)
    assert y.dtype == xdt and y.shape == (M, OUT) and y.is_contiguous()
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), tol, f"fwd {strategy}")

    dy = _randn(M, OUT, dtype=xdt, device=device, seed=42)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, bias, strategy=strategy)
    assert dx.dtype == xdt and dx.shape == (M, IN) and dcw.dtype == F32 and dcw.shape == (K,)
    assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), tol, f"dx {strategy}")
    dw = dy.double().t() @ x.double()  # the oracle may allocate the [out, in] gradient
    assert_close(dcw, dcoef_oracle(dw, tau_w), tol, "dcoef_w")
    if bias:
        assert dcb.dtype == F32 and dcb.shape == (K,)
        assert_close(dcb, dcoef_oracle(dy.double().sum(0), tau_b), tol, "dcoef_b")
    else:
        assert dcb.numel() == 0


DTYPES = [F32, BF16, F16]


@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("xdt", DTYPES)
@pytest.mark.parametrize("tdt", DTYPES)
def test_merged_linear_dtypes(be, device, strategy, xdt, tdt):
    """Every x dtype against every task-vector dtype (w0 fp32), both strategies."""
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(5, 33, 18, 3, xdt, F32, tdt, device, seed=11)
    tol = lowest(xdt, tdt)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)
    assert y.dtype == xdt
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), tol, "fwd")
    dy = _randn(5, 18, dtype=xdt, device=device, seed=12)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, True, strategy=strategy)
    assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), tol, "dx")
    assert_close(dcw, dcoef_oracle(dy.double().t() @ x.double(), tau_w), tol, "dcoef_w")
    assert_close(dcb, dcoef_oracle(dy.double().sum(0), tau_b), tol, "dcoef_b")


@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("M", [1, 3, 47])
@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("IN,OUT", [(47, 133), (1, 3)])
def test_merged_linear_shapes(be, device, strategy, M, K, IN, OUT):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(M, IN, OUT, K, F32, F32, F32, device, seed=M + K)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), F32, "fwd")
    dy = _randn(M, OUT, device=device, seed=5)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, True, strategy=strategy)
    assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), F32, "dx")
    assert_close(dcw, dcoef_oracle(dy.double().t() @ x.double(), tau_w), F32, "dcoef_w")
    assert_close(dcb, dcoef_oracle(dy.double().sum(0), tau_b), F32, "dcoef_b")


def test_merged_linear_fused_never_merges(be, device, kernels, monkeypatch):
    """The fused strategy combines the weight tiles in registers: the merge kernel is never called for it."""

    def no_merge(*a, **k):
        raise AssertionError("the fused strategy must not materialize the merged weight")

    monkeypatch.setattr(kernels[1], "merge", no_merge)
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(4, 20, 12, 2, F32, F32, F32, device)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy="fused")
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), F32, "fwd")
    dy = _randn(4, 12, device=device, seed=2)
    dx, dcw, _ = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, False, strategy="fused")
    assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), F32, "dx")


@pytest.mark.parametrize("strategy", ["fused", "jit"])
def test_merged_linear_empty_batch(be, device, strategy):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(0, 9, 7, 2, F32, F32, F32, device)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)
    assert y.shape == (0, 7)
    dy = torch.zeros(0, 7, device=device)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, True, strategy=strategy)
    assert dx.shape == (0, 9)
    assert torch.equal(dcw.cpu(), torch.zeros(2)) and torch.equal(dcb.cpu(), torch.zeros(2))


def test_merged_linear_fp64_delegates(be, device):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(3, 8, 5, 2, F64, F32, F32, device)
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b)
    assert y.dtype == F64
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), F32, "fwd fp64 x")
    dy = _randn(3, 5, dtype=F64, device=device, seed=9)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, True)
    assert dcw.dtype == F64
    assert_close(dcw, dcoef_oracle(dy.t() @ x, tau_w), F32, "dcoef_w fp64")


def test_merged_linear_bwd_flags(be, device):
    x, w0, tau_w, coef_w, _, tau_b, _ = _linear_inputs(5, 17, 9, 2, F32, F32, F32, device)
    dy = _randn(5, 9, device=device, seed=3)
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, False, True, False)
    assert dx.numel() == 0 and dcb.numel() == 0 and dcw.shape == (2,)
    assert dx is not dcb  # outputs of a custom op must not alias one another
    assert_close(dcw, dcoef_oracle(dy.double().t() @ x.double(), tau_w), F32, "dcoef_w only")
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, False, False, strategy="fused")
    assert dx.shape == (5, 17) and dcw.numel() == 0
    # dy in another dtype than x: dx comes back in x's dtype (the fake kernel's contract)
    xb = x.to(BF16)
    for strategy in ("fused", "jit"):
        dx, _, _ = be.merged_linear_bwd(dy, xb, w0, tau_w, coef_w, tau_b, True, False, False, strategy=strategy)
        assert dx.dtype == BF16
        assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), BF16, f"dx bf16 x, fp32 dy ({strategy})")


@pytest.mark.parametrize("strategy", ["fused", "jit"])
def test_merged_linear_noncontiguous(be, device, strategy):
    M, IN, OUT, K = 9, 35, 21, 3
    x = _randn(IN, M, device=device, seed=1).t()  # [M, in] transposed view
    w0 = _randn(IN, OUT, device=device, scale=IN**-0.5, seed=2).t()  # [out, in] transposed view
    tau_w = _randn(IN, OUT, 2 * K, dtype=BF16, device=device, scale=0.1, seed=3).permute(2, 1, 0)[::2]  # [K, out, in]
    coef_w = _randn(2 * K, device=device, seed=4)[1::2]
    b0 = _randn(2 * OUT, device=device, seed=5)[::2]
    tau_b = _randn(OUT, K, device=device, seed=6).t()  # [K, out] transposed
    coef_b = _randn(K, device=device, seed=7)
    for t in (x, w0, tau_w, coef_w, b0, tau_b):
        assert not t.is_contiguous()
    y = be.merged_linear_fwd(x, w0, tau_w, coef_w, b0, tau_b, coef_b, strategy=strategy)
    assert_close(y, linear_oracle(x, w0, tau_w, coef_w, b0, tau_b, coef_b), BF16, "fwd (views)")
    dy = _randn(OUT, M, device=device, seed=8).t()
    dx, dcw, dcb = be.merged_linear_bwd(dy, x, w0, tau_w, coef_w, tau_b, True, True, True, strategy=strategy)
    assert_close(dx, dy.double() @ merge_oracle(w0, tau_w, coef_w), BF16, "dx (views)")
    assert_close(dcw, dcoef_oracle(dy.double().t() @ x.double(), tau_w), BF16, "dcoef_w (views)")
    assert_close(dcb, dcoef_oracle(dy.double().sum(0), tau_b), F32, "dcoef_b (views)")


def test_strategy_choice(kernels):
    ml = kernels[1]
    assert ml.choose_strategy(1) == "fused" and ml.choose_strategy(ml.FUSED_MAX_M) == "fused"
    assert ml.choose_strategy(ml.FUSED_MAX_M + 1) == "jit"
    assert ml.choose_strategy(10**6, "fused") == "fused"
    with pytest.raises(ValueError):
        ml.choose_strategy(3, "bogus")


@pytest.mark.parametrize("winner", ["fused", "jit"])
def test_strategy_measured_per_shape(device, kernels, monkeypatch, winner):
    """On a GPU the first call per (direction, M bucket, layer shape, K, dtypes) times both strategies and
    caches the faster one. Here the timer is replaced (it still runs each strategy once) and measuring is
    allowed on this device; the interpreter itself never measures."""
    ml = kernels[1]
    calls = []

    def fake_bench(fn):  # choose_strategy times the strategies in the order ("fused", "jit")
        out = fn()
        assert torch.isfinite(out).all()
        calls.append(out.shape)
        return 1.0 if (len(calls) % 2 == 1) == (winner == "fused") else 5.0

    assert ml._can_measure(device) == (ml.TUNE and not ml.INTERPRET and device.type == "cuda")
    monkeypatch.setattr(ml, "_TUNED", {})
    monkeypatch.setattr(ml, "_bench_ms", fake_bench)
    monkeypatch.setattr(ml, "_can_measure", lambda dev: True)
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(40, 19, 13, 3, F32, F32, BF16, device)
    coef_w.requires_grad_()
    x.requires_grad_()
    y = adamerge_fast.merged_linear(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend="triton")
    y.backward(_randn(40, 13, device=device, seed=9))
    assert len(calls) == 4  # fwd: both strategies, dx: both strategies
    tuned = ml.tuned_strategies()
    assert sorted(k[0] for k in tuned) == ["dx", "fwd"] and set(tuned.values()) == {winner}
    assert all(k[1] == 64 for k in tuned)  # M=40 -> bucket 64
    x64, cw64 = x.detach().double().requires_grad_(), coef_w.detach().double().requires_grad_()
    y64 = linear_oracle(x64, w0, tau_w, cw64, b0, tau_b, coef_b)
    y64.backward(_randn(40, 13, device=device, seed=9).double())
    assert_close(y, y64, BF16, f"fwd after measuring ({winner})")
    assert_close(x.grad, x64.grad, BF16, f"dx after measuring ({winner})")
    assert_close(coef_w.grad, cw64.grad, BF16, f"dcoef_w after measuring ({winner})")
    # same key and M bucket (33 -> 64): cached, nothing timed again
    adamerge_fast.merged_linear(x[:33].detach(), w0, tau_w, coef_w.detach(), b0, tau_b, coef_b, backend="triton")
    assert len(calls) == 4
    key = ("fwd", 13, 19, 3, F32, F32, BF16, False, x.device)  # another key (no bias): measured
    xs, cws = x.detach(), coef_w.detach()
    assert ml.choose_strategy(40, None, key, lambda s: ml._fwd(xs, w0, tau_w, cws, None, None, None, s)) == winner
    assert len(calls) == 6
    # M <= 16 is measured too (issue 12 item 5), once per key: M = 1..16 share the bucket 16
    assert ml.choose_strategy(16, None, key, lambda s: ml._fwd(xs[:16], w0, tau_w, cws, None, None, None, s)) == winner
    assert len(calls) == 8
    assert ml.choose_strategy(1, None, key, lambda s: pytest.fail("measured bucket 16 twice")) == winner
    assert ml.choose_strategy(10**5, None, key, lambda s: pytest.fail("measured far above")) == "jit"
    assert ml.choose_strategy(40, "jit", key, lambda s: pytest.fail("measured a forced choice")) == "jit"
    assert len(calls) == 8


@pytest.mark.parametrize("strategy", ["fused", "jit"])
def test_merged_linear_public_autograd(device, kernels, monkeypatch, strategy):
    monkeypatch.setattr(kernels[1], "STRATEGY", strategy)
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(7, 19, 13, 3, F32, F32, BF16, device)
    x = x.reshape(7, 1, 19).expand(7, 2, 19).clone().requires_grad_()  # [*, in] with leading dims
    coef_w.requires_grad_()
    coef_b.requires_grad_()
    y = adamerge_fast.merged_linear(x, w0, tau_w, coef_w, b0, tau_b, coef_b, backend="triton")
    assert y.shape == (7, 2, 13) and y.dtype == F32
    g = _randn(7, 2, 13, device=device, seed=5)
    y.backward(g)
    x64, cw64, cb64 = (t.detach().double().requires_grad_() for t in (x, coef_w, coef_b))
    y64 = linear_oracle(x64.reshape(-1, 19), w0, tau_w, cw64, b0, tau_b, cb64).reshape(7, 2, 13)
    y64.backward(g.double())
    assert_close(y, y64, BF16, "public fwd")
    assert_close(x.grad, x64.grad, BF16, "public dx")
    assert_close(coef_w.grad, cw64.grad, BF16, "public dcoef_w")
    assert_close(coef_b.grad, cb64.grad, BF16, "public dcoef_b")


def test_merged_linear_opcheck(device):
    x, w0, tau_w, coef_w, b0, tau_b, coef_b = _linear_inputs(3, 16, 16, 2, F32, F32, F32, device)
    x.requires_grad_()
    coef_w.requires_grad_()
    coef_b.requires_grad_()
    torch.library.opcheck(
        torch.ops.adamerge_fast.merged_linear.default, (x, w0, tau_w, coef_w, b0, tau_b, coef_b, "triton")
    )


# ------------------------------------------------------------------------------------------------ entropy
ENTROPY_CASES = [
    # (N, C, logit scale, dtype, block_c (None: default), -inf pattern)
    (4, 10, 1.0, F32, None, False),
    (3, 37, 1e4, F32, None, True),
    (5, 5000, 3.0, F32, 256, True),
    (2, 5000, 1e4, F32, 512, False),
    (4, 300, 2.0, BF16, 64, True),
    (3, 130, 4.0, F16, None, True),
]


@pytest.mark.parametrize("N,C,scale,dt,block_c,neg_inf", ENTROPY_CASES)
def test_entropy(be, device, kernels, N, C, scale, dt, block_c, neg_inf):
    ent = kernels[2]
    z = _randn(N, C, device=device, scale=scale, seed=C)
    if neg_inf:
        z[0, : C // 2] = -float("inf")  # half a row masked
        z[1, :] = -float("inf")  # one finite entry only: H = 0
        z[1, C // 3] = 1.5
        if N > 2:
            z[2, ::3] = -float("inf")
    z = z.to(dt)
    h = ent.entropy_fwd(z, block_c=block_c)
    assert h.dtype == F32 and h.shape == (N,)
    z64 = z.double().requires_grad_()
    h64 = entropy_oracle(z64)
    assert_close(h, h64, F32, "entropy")
    g = _randn(N, device=device, seed=1)
    h64.backward(g.double())
    assert not torch.isnan(z64.grad).any()
    dz = ent.entropy_bwd(g, z, block_c=block_c)
    assert dz.dtype == dt and dz.shape == (N, C)
    assert_close(dz, z64.grad, lowest(dt, F32), "dentropy")
    if neg_inf:
        assert (dz[z == -float("inf")] == 0).all()
    # the backend methods (default chunking) agree
    assert_close(be.entropy_fwd(z), h64, F32, "entropy (backend)")


def test_entropy_all_neg_inf_row(kernels, device):
    z = torch.full((2, 40), -float("inf"), device=device)
    z[1, 3] = 0.0
    h = kernels[2].entropy_fwd(z, block_c=16).cpu()
    assert torch.isnan(h[0]) and h[1] == 0  # only -inf: NaN, as softmax of the row (issue #11); one finite entry: 0
    dz = kernels[2].entropy_bwd(torch.ones(2, device=device), z, block_c=16).cpu()
    assert torch.isnan(dz[0]).all() and torch.equal(dz[1], torch.zeros(40))


def test_entropy_fp64_delegates(be, device):
    z = _randn(3, 11, dtype=F64, device=device, seed=2)
    h = be.entropy_fwd(z)
    assert h.dtype == F64
    assert_close(h, entropy_oracle(z), F64, "entropy fp64")


def test_entropy_public_autograd(device):
    z = _randn(2, 3, 50, device=device, scale=5.0, seed=3)
    z[0, 0, :7] = -float("inf")
    z.requires_grad_()
    h = adamerge_fast.entropy(z, backend="triton")
    assert h.shape == (2, 3)
    g = _randn(2, 3, device=device, seed=4)
    h.backward(g)
    z64 = z.detach().double().requires_grad_()
    h64 = entropy_oracle(z64)
    h64.backward(g.double())
    assert_close(h, h64, F32, "public entropy")
    assert_close(z.grad, z64.grad, F32, "public dentropy")
