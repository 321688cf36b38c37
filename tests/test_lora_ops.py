"""``ops.merged_lora_linear`` on every backend available here, against float64 autograd through the materialized
dense merge ``W = w0 + sum_k c_k s_k B_k A_k``; the custom-op machinery (opcheck, compile, fast path); and the
promise that nothing ``[out, in]``-sized besides ``w0`` is allocated."""

import pytest
import torch
from _fixtures import backend_params
from test_ops_contract import _rand, _small
from torch.utils._python_dispatch import TorchDispatchMode

import adamerge_fast as af
from _tol import assert_close, lowest
from adamerge_fast.ops import _library
from adamerge_fast.ops import lora as lora_mod

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = backend_params()


def _dense(w0, a, b, ranks, coef, scale):
    """float64 ``w0 + sum_k coef[k] scale[k] B_k A_k`` (differentiable in every argument)."""
    w = w0.double()
    o = 0
    for k, r in enumerate(ranks):
        w = w + coef[k] * scale[k].double() * (b[:, o : o + r].double() @ a[o : o + r].double())
        o += r
    return w


def _adapters(ranks, fin, fout, dtype, dev, noncontig=False):
    R = sum(ranks)
    if noncontig:  # stored transposed: lora_a [R, in] as a view of [in, R], lora_b [out, R] of [R, out]
        return _rand((fin, R), dtype, dev, 0.3).t(), _rand((R, fout), dtype, dev, 0.3).t()
    return _rand((R, fin), dtype, dev, 0.3), _rand((fout, R), dtype, dev, 0.3)


LORA_CASES = [  # (lead shape of x, in, out, ranks, bias mode)
    ((1,), 1, 3, [1], "merged"),
    ((3,), 47, 1, [2, 0, 5], "merged"),
    ((47,), 33, 47, [4, 1, 3], "fixed"),
    ((2, 3), 47, 21, [3, 1, 4, 1, 5, 9, 2, 6], "none"),
    ((5,), 16, 32, [16, 16, 16, 16, 16, 16, 16, 16], "merged"),
    ((70,), 19, 23, [7], "none"),
]
LORA_DTYPES = [  # (x, w0 and b0, adapters and bias task vectors)
    (f32, f32, f32),
    (f32, f32, bf16),
    (bf16, f32, f32),
    (bf16, bf16, bf16),
    (f16, f16, f16),
    (f16, f32, f16),
]


def _lora_case(be, case, xdt, wdt, adt, noncontig=False, seed=0):
    name, dev = be
    lead, fin, fout, ranks, bias = case
    K = len(ranks)
    acc = f64 if xdt == f64 else f32  # the coefficients' (and the loss's) dtype
    torch.manual_seed(fin * 31 + fout + seed)
    x = _rand((*lead, 2 * fin), xdt, dev)[..., ::2] if noncontig else _rand((*lead, fin), xdt, dev)
    x.requires_grad_()
    w0 = _rand((fin, fout), wdt, dev, 0.2).t() if noncontig else _rand((fout, fin), wdt, dev, 0.2)
    a, b = _adapters(ranks, fin, fout, adt, dev, noncontig)
    cw = torch.rand(K, device=dev, dtype=acc, requires_grad=True)
    scale = (torch.rand(K, dtype=f64) + 0.5).to(acc).to(dev)
    b0 = _rand((fout,), wdt, dev) if bias != "none" else None
    Kb = max(1, K - 1)
    tb = _rand((Kb, fout), adt, dev, 0.05) if bias == "merged" else None
    cb = torch.rand(Kb, device=dev, dtype=acc, requires_grad=True) if bias == "merged" else None
    y = af.merged_lora_linear(x, w0, a, b, ranks, cw, scale, b0, tb, cb, backend=name)
    assert y.dtype == xdt and y.shape == (*lead, fout)
    dy = _rand(y.shape, xdt, dev)
    (y.to(acc) * dy.to(acc)).sum().backward()

    x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
    y64 = x64 @ _dense(w0, a, b, ranks, cw64, scale).t()
    cb64 = None
    if bias != "none":
        cb64 = cb.detach().double().requires_grad_() if bias == "merged" else None
        y64 = y64 + (b0.double() + ((cb64[:, None] * tb.double()).sum(0) if bias == "merged" else 0))
    (y64 * dy.double()).sum().backward()
    tol = lowest(xdt, wdt)
    assert_close(y, y64, tol, "y")
    assert_close(x.grad, x64.grad, tol, "dx")
    assert_close(cw.grad, cw64.grad, tol, "dcoef_w")
    if bias == "merged":
        assert_close(cb.grad, cb64.grad, tol, "dcoef_b")


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"x{c[0]}-{c[1]}x{c[2]}-r{sum(c[3])}K{len(c[3])}-{c[4]}")
@pytest.mark.parametrize("xdt,wdt,adt", LORA_DTYPES)
def test_merged_lora_linear_matches_float64(be, case, xdt, wdt, adt):
    if _small(be) and (case[0][0] > 47 or (xdt, wdt, adt) in LORA_DTYPES[3:5]):
        pytest.skip("interpreter: subset")
    _lora_case(be, case, xdt, wdt, adt)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", LORA_CASES[1:4], ids=lambda c: f"{c[1]}x{c[2]}-K{len(c[3])}")
@pytest.mark.parametrize("xdt,wdt,adt", [(f32, f32, f32), (bf16, f32, bf16)])
def test_merged_lora_linear_noncontiguous(be, case, xdt, wdt, adt):
    """x a strided slice, w0 the transpose of an ``[in, out]`` weight (GPT-2's ``Conv1D``), adapters stored
    transposed."""
    _lora_case(be, case, xdt, wdt, adt, noncontig=True, seed=1)


@pytest.mark.parametrize("be", BACKENDS)
def test_merged_lora_linear_float64(be):
    _lora_case(be, LORA_CASES[2], f64, f64, f64)


@pytest.mark.parametrize("be", BACKENDS)
def test_merged_lora_linear_all_gradients(be):
    """Gradients of w0, the adapters, the scales, b0 and the bias task vectors too (plain torch formulas)."""
    name, dev = be
    torch.manual_seed(3)
    ranks, fin, fout = [2, 0, 3], 9, 7
    x = _rand((4, fin), f32, dev).requires_grad_()
    w0 = _rand((fout, fin), f32, dev).requires_grad_()
    a, b = (t.requires_grad_() for t in _adapters(ranks, fin, fout, f32, dev))
    cw = torch.rand(3, device=dev, requires_grad=True)
    scale = torch.rand(3, device=dev).add_(0.5).requires_grad_()
    b0, tb = _rand((fout,), f32, dev).requires_grad_(), _rand((2, fout), f32, dev).requires_grad_()
    cb = torch.rand(2, device=dev, requires_grad=True)
    leaves = (x, w0, a, b, cw, scale, b0, tb, cb)
    y = af.merged_lora_linear(x, w0, a, b, ranks, cw, scale, b0, tb, cb, backend=name)
    dy = _rand(y.shape, f32, dev)
    (y * dy).sum().backward()
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, a64, b64, cw64, s64, b064, tb64, cb64 = l64
    y64 = x64 @ _dense(w64, a64, b64, ranks, cw64, s64).t() + b064 + (cb64[:, None] * tb64).sum(0)
    (y64 * dy.double()).sum().backward()
    for i, (t, r) in enumerate(zip(leaves, l64, strict=True)):
        assert_close(t.grad, r.grad, f32, f"grad of input {i}")


@pytest.mark.parametrize("be", BACKENDS)
def test_merged_lora_linear_edge_shapes(be):
    """No rows, every rank 0 (only the base), one task of rank 1."""
    name, dev = be
    w0, cw = _rand((5, 4), f32, dev), torch.rand(2, device=dev, requires_grad=True)
    x0 = _rand((0, 4), f32, dev).requires_grad_()
    y = af.merged_lora_linear(x0, w0, _rand((3, 4), f32, dev), _rand((5, 3), f32, dev), [1, 2], cw, [1.0, 2.0],
                              backend=name)  # fmt: skip
    y.sum().backward()
    assert y.shape == (0, 5) and torch.equal(cw.grad, torch.zeros(2, device=dev))
    x = _rand((3, 4), f32, dev)
    y = af.merged_lora_linear(x, w0, _rand((0, 4), f32, dev), _rand((5, 0), f32, dev), [0, 0], cw, [1.0, 1.0],
                              backend=name)  # fmt: skip
    assert_close(y, x.double() @ w0.double().t(), f32, "rank 0")


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("split", [None, 3])
def test_triton_lora_strategies_and_split(strategy, split, monkeypatch):
    """Both fwd/dx strategies, and the shrink with its reduction split over programs (the coefficient gradient
    then comes from the whole ``g``), against float64."""
    from adamerge_fast.ops.triton_kernels import lora as tl_lora
    from adamerge_fast.ops.triton_kernels import merged_linear as tl_ml

    be = next((p.values[0] for p in BACKENDS if p.values[0][0] == "triton"), None)
    if be is None:
        pytest.skip("triton backend unavailable")
    monkeypatch.setattr(tl_ml, "STRATEGY", strategy)
    monkeypatch.setattr(tl_lora, "SPLIT_D", split)
    _lora_case(be, ((6,), 70, 21, [3, 1, 4], "merged"), f32, f32, f32)
    _lora_case(be, ((6,), 70, 21, [3, 1, 4], "none"), bf16, f32, bf16)


# ---------------------------------------------------------------------------------- library machinery
def _lora_args(bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    ranks = [2, 3]
    x, w0, a, b = r(6, 5, grad=True), r(7, 5), r(5, 5), r(7, 5)
    cw, scale = r(2, grad=True), torch.tensor([0.5, 2.0])
    if not bias:
        return x, w0, a, b, ranks, cw, scale, None, None, None
    return x, w0, a, b, ranks, cw, scale, r(7), r(3, 7), r(3, grad=True)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_merged_lora_linear(bias):
    torch.library.opcheck(torch.ops.adamerge_fast.merged_lora_linear.default, (*_lora_args(bias), "reference"))


def test_opcheck_merged_lora_linear_backward():
    x, w0, a, b, ranks, cw, scale, _, tb, _ = _lora_args()
    u = (x @ a.t()).detach()
    args = (torch.randn(6, 7), x.detach(), w0, a, b, ranks, cw.detach(), scale, u, tb, True, True, True, "reference")
    torch.library.opcheck(torch.ops.adamerge_fast.merged_lora_linear_backward.default, args)


def test_torch_compile_fullgraph_matches_eager():
    x, w0, a, b, ranks, cw, scale, b0, tb, _ = _lora_args()
    x = x.detach()

    def f(c):
        h = af.merged_lora_linear(x, w0, a, b, ranks, c[0, :2], scale, b0, tb, c[1], backend="reference")
        return af.entropy(h, backend="reference").mean()

    c1 = torch.rand(2, 3, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_()
    eager = f(c1)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(c2)
    compiled.backward()
    assert_close(compiled, eager.double(), f32, "compiled loss")
    assert_close(c2.grad, c1.grad.double(), f32, "compiled grad")


def _step(name, dev):
    x, w0, a, b, ranks, cw, scale, b0, tb, cb = (t.to(dev).detach().requires_grad_(t.requires_grad)
                                                 if isinstance(t, torch.Tensor) else t for t in _lora_args())
    y = af.merged_lora_linear(x, w0, a, b, ranks, cw, scale, b0, tb, cb, backend=name)
    node = type(y.grad_fn.next_functions[0][0] if type(y.grad_fn).__name__.startswith("View") else y.grad_fn).__name__
    (y * y).sum().backward()
    return [y, x.grad, cw.grad, cb.grad], node


@pytest.mark.parametrize("be", BACKENDS)
def test_eager_fast_path_equals_custom_op(be, monkeypatch):
    name, dev = be
    fast, fast_node = _step(name, dev)
    monkeypatch.setattr(_library, "EAGER_FAST_PATH", False)
    slow, slow_node = _step(name, dev)
    assert "_MergedLoRALinearFn" in fast_node and "Fn" not in slow_node, (fast_node, slow_node)
    for i, (p, q) in enumerate(zip(fast, slow, strict=True)):
        assert torch.equal(p, q), f"result {i} differs between the fast path and the custom op"


def test_functorch_grad():
    x, w0, a, b, ranks, cw, scale, *_ = _lora_args(bias=False)
    x, cw = x.detach(), cw.detach()

    def loss(c):
        return af.merged_lora_linear(x, w0, a, b, ranks, c, scale, backend="reference").pow(2).sum()

    c64 = cw.double().requires_grad_()
    (x.double() @ _dense(w0, a, b, ranks, c64, scale).t()).pow(2).sum().backward()
    assert_close(torch.func.grad(loss)(cw), c64.grad, f32, "torch.func.grad of merged_lora_linear")


# ------------------------------------------------------------------------------------------ allocation
class _AllocationLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns in new memory."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and (not t.numel() or t.untyped_storage().data_ptr() not in seen):
                self.sizes.append((str(func), tuple(t.shape)))  # new memory (views of an input are skipped)
        return out


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("xdt", [f32, bf16])
def test_nothing_out_by_in_is_allocated(be, strategy, xdt, monkeypatch):
    """Forward and backward (dx, coefficient gradients) of a 48x64 layer with 3 adapters: no aten op inside
    returns a tensor with as many elements as the weight (the op's Function runs under the recording mode, so every
    allocation of the backend and of the autograd formula is seen)."""
    name, dev = be
    if name == "triton":
        from adamerge_fast.ops.triton_kernels import merged_linear as tl_ml

        monkeypatch.setattr(tl_ml, "STRATEGY", strategy)
    elif strategy == "jit":
        pytest.skip("one strategy only")
    monkeypatch.setattr(lora_mod, "use_fast_path", lambda *ts: True)
    fout, fin, ranks = 48, 64, [4, 2, 8]
    x = _rand((4, fin), xdt, dev).requires_grad_()
    w0, (a, b) = _rand((fout, fin), f32, dev), _adapters(ranks, fin, fout, f32, dev)
    cw = torch.rand(3, device=dev, requires_grad=True)
    b0, tb, cb = _rand((fout,), f32, dev), _rand((2, fout), f32, dev), torch.rand(2, device=dev, requires_grad=True)
    log = _AllocationLog()
    with log:
        y = af.merged_lora_linear(x, w0, a, b, ranks, cw, [1.0, 0.5, 2.0], b0, tb, cb, backend=name)
        y.float().pow(2).sum().backward()
    assert cw.grad is not None and x.grad is not None and cb.grad is not None
    assert any("mm" in f or "addmm" in f for f, _ in log.sizes) or name == "triton", "the mode saw no matmul"
    big = [(f, s) for f, s in log.sizes if torch.Size(s).numel() >= fout * fin]
    assert not big, f"[out, in]-sized allocations: {big}"


# ------------------------------------------------------------------------------------------------ errors
_z = torch.zeros


@pytest.mark.parametrize(
    "args,match",
    [
        ((_z(2, 4), _z(3, 5), _z(2, 5), _z(3, 2), [2], _z(1), [1.0]), r"x must be \[\*, in=5\]"),
        ((_z(2, 5), _z(3, 5), _z(3, 5), _z(3, 2), [2], _z(1), [1.0]), r"lora_a must be \[R=sum\(ranks\)=2, in=5\]"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(4, 2), [2], _z(1), [1.0]), r"lora_b must be \[out=3, R=sum\(ranks\)=2\]"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2), [1, 1], _z(1), [1.0, 1.0]), r"coef_w must be \[K=2\]"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2), [1, 1], _z(2), [1.0]), r"scale must be \[K=2\]"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2), [3, -1], _z(2), [1.0, 1.0]), "non-negative"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2), [2], _z(1), [1.0], None, _z(1, 3), _z(1)), "tau_b given without b0"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2), [2], _z(1), [1.0], _z(3), _z(1, 3), None), "given together"),
        ((_z(2, 5), _z(3, 5), _z(2, 5, dtype=torch.long), _z(3, 2), [2], _z(1), [1.0]), "lora_a: expected a floating"),
        ((_z(2, 5), _z(3, 5), _z(2, 5), _z(3, 2, device="meta"), [2], _z(1), [1.0]), "lora_b is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        af.merged_lora_linear(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [16, 4096])
def test_cuda_peak_memory_below_weight(M):
    """On a GPU: forward + backward of a 4096x4096 bf16 layer with 8 rank-16 adapters never holds more than the
    inputs, activations-sized buffers and a few MiB on top: an [out, in] temporary (32 MiB) would show."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w0 = torch.randn(4096, 4096, device=dev, dtype=bf16)
    a, b = torch.randn(128, 4096, device=dev, dtype=bf16), torch.randn(4096, 128, device=dev, dtype=bf16)
    x = torch.randn(M, 4096, device=dev, dtype=bf16, requires_grad=True)
    cw = torch.rand(8, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = af.merged_lora_linear(x, w0, a, b, [16] * 8, cw, [2.0] * 8, backend="triton")
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    activations = 6 * M * 4096 * 4  # y, its fp32 square and gradient, dx, dy in fp32 at most
    assert extra < activations + (8 << 20), f"peak {extra / 2**20:.1f} MiB above the inputs"
