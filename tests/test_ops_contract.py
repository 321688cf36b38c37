"""The op contract, on every backend available here, against float64 autograd of the naive formula.

Backends: ``reference`` always; ``cpu`` when the C++ extension is built; ``triton`` through the interpreter
(marked ``triton``, small shapes); ``cuda`` when a GPU is present.
"""

import ast
import os
import re
from pathlib import Path

import pytest
import torch
from _fixtures import backend_params
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import adamerge_fast as af
from _tol import assert_close, lowest
from adamerge_fast import ops
from adamerge_fast.ops import _library

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = backend_params()


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def _small(be):
    """Triton under the interpreter is slow: fewer and smaller cases there."""
    return be[0] == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (3,), (47,), (133,), (3, 47), (5, 1, 7)])
@pytest.mark.parametrize("K", [1, 2, 5, 8])
def test_merge_matches_float64(be, shape, K):
    name, dev = be
    if _small(be) and (K == 8 or len(shape) > 2):
        pytest.skip("interpreter: subset")
    torch.manual_seed(hash((shape, K)) % 2**31)
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    for bdt, ddt in [(f32, f32), (f32, bf16), (f16, f16), (bf16, bf16), (f32, f16), (f64, f64)]:
        base, deltas = _rand(shape, bdt, dev), _rand((K, *shape), ddt, dev, 0.1)
        coef = torch.rand(K, device=dev, requires_grad=True)
        out = af.merge(base, deltas, coef, backend=name)
        assert out.dtype == bdt and out.shape == base.shape
        g = _rand(shape, bdt, dev)
        (out.float() * g.float()).sum().backward()
        c64 = coef.detach().double().requires_grad_()
        ref = base.double() + (c64.reshape(-1, *[1] * len(shape)) * deltas.double()).sum(0)
        (ref * g.double()).sum().backward()
        assert_close(out, ref, bdt, f"merge {bdt}/{ddt}")
        assert_close(coef.grad, c64.grad, lowest(bdt, torch.float32), f"merge dcoef {bdt}/{ddt}")


@pytest.mark.parametrize("be", BACKENDS)
def test_merge_noncontiguous_and_all_grads(be):
    name, dev = be
    torch.manual_seed(1)
    base = _rand((47, 3), torch.float32, dev).t().requires_grad_()  # [3, 47], non-contiguous
    deltas = _rand((5, 47, 3), torch.float32, dev).transpose(1, 2).requires_grad_()  # [5, 3, 47]
    coef = torch.rand(5, device=dev, requires_grad=True)
    out = af.merge(base, deltas, coef, backend=name)
    out.sum().backward()
    b64, d64, c64 = (t.detach().double().requires_grad_() for t in (base, deltas, coef))
    (b64 + (c64[:, None, None] * d64).sum(0)).sum().backward()
    for t, r in ((base, b64), (deltas, d64), (coef, c64)):
        assert_close(t.grad, r.grad, torch.float32, "merge grads")


@pytest.mark.parametrize("be", BACKENDS)
def test_merge_many_matches_float64(be):
    name, dev = be
    torch.manual_seed(2)
    shapes = [(1,), (3,), (47,), (133,), (7, 3), (2, 3, 5)] * (1 if _small(be) else 5)
    K = 3
    for ddt in FLOATS:
        bases = [_rand(s, torch.float32, dev) for s in shapes]
        deltas = [_rand((K, *s), ddt, dev, 0.1) for s in shapes]
        coefs = torch.rand(len(shapes), K, device=dev, requires_grad=True)
        outs = af.merge_many(bases, deltas, coefs, backend=name)
        grads = [_rand(s, torch.float32, dev) for s in shapes]
        sum((o * g).sum() for o, g in zip(outs, grads, strict=True)).backward()
        c64 = coefs.detach().double().requires_grad_()
        refs = [
            b.double() + (c64[i].reshape(-1, *[1] * b.dim()) * d.double()).sum(0)
            for i, (b, d) in enumerate(zip(bases, deltas, strict=True))
        ]
        sum((r * g.double()).sum() for r, g in zip(refs, grads, strict=True)).backward()
        for o, r in zip(outs, refs, strict=True):
            assert_close(o, r, torch.float32, f"merge_many {ddt}")
        assert_close(coefs.grad, c64.grad, torch.float32, f"merge_many dcoef {ddt}")


# ---------------------------------------------------------------------------------------- merged_linear
ML_CASES = [  # (lead shape of x, in, out, K, bias mode)
    ((1,), 1, 3, 1, "merged"),
    ((3,), 47, 1, 2, "merged"),
    ((47,), 133, 47, 5, "fixed"),
    ((2, 3), 47, 133, 8, "none"),
    ((5,), 16, 32, 3, "merged"),
]


ML_DTYPES = [  # (x dtype, task-vector dtype)
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", ML_CASES, ids=lambda c: f"x{c[0]}-{c[1]}x{c[2]}-K{c[3]}-{c[4]}")
@pytest.mark.parametrize("xdt,tdt", ML_DTYPES)
def test_merged_linear_matches_float64(be, case, xdt, tdt):
    name, dev = be
    lead, fin, fout, K, bias = case
    if _small(be) and (K == 8 or fin * fout > 47 * 47):
        pytest.skip("interpreter: subset")
    torch.manual_seed(fin * 31 + fout)
    x = _rand((*lead, fin), xdt, dev).requires_grad_()
    w0, tau = _rand((fout, fin), torch.float32, dev, 0.2), _rand((K, fout, fin), tdt, dev, 0.05)
    cw = torch.rand(K, device=dev, requires_grad=True)
    b0 = _rand((fout,), torch.float32, dev) if bias != "none" else None
    tb = _rand((K, fout), tdt, dev, 0.05) if bias == "merged" else None
    cb = torch.rand(K, device=dev, requires_grad=True) if bias == "merged" else None
    y = af.merged_linear(x, w0, tau, cw, b0, tb, cb, backend=name)
    assert y.dtype == xdt and y.shape == (*lead, fout)
    dy = _rand(y.shape, xdt, dev)
    (y.float() * dy.float()).sum().backward()

    x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
    w = w0.double() + (cw64[:, None, None] * tau.double()).sum(0)
    y64 = x64 @ w.t()
    if bias != "none":
        cb64 = cb.detach().double().requires_grad_() if bias == "merged" else None
        y64 = y64 + (b0.double() + ((cb64[:, None] * tb.double()).sum(0) if bias == "merged" else 0))
    (y64 * dy.double()).sum().backward()
    tol = lowest(xdt, tdt if xdt != torch.float32 else torch.float32)
    assert_close(y, y64, tol, "y")
    assert_close(x.grad, x64.grad, tol, "dx")
    assert_close(cw.grad, cw64.grad, tol, "dcoef_w")
    if bias == "merged":
        assert_close(cb.grad, cb64.grad, tol, "dcoef_b")


# --------------------------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("N,C", [(1, 1), (3, 47), (47, 133), (5, 2000)])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_entropy_matches_float64(be, N, C, dt):
    name, dev = be
    if _small(be) and N * C > 5000:
        pytest.skip("interpreter: subset")
    torch.manual_seed(N + C)
    z = _rand((N, C), dt, dev, 3.0).requires_grad_()
    h = af.entropy(z, backend=name)
    assert h.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    g = torch.rand(N, dtype=torch.float64)
    (h * g.to(h.dtype).to(dev)).sum().backward()
    z64 = z.detach().double().requires_grad_()
    p = torch.softmax(z64, -1)
    h64 = -(p * torch.log_softmax(z64, -1)).sum(-1)
    (h64 * g).sum().backward()
    assert_close(h, h64, dt, "H")
    assert_close(z.grad, z64.grad, dt, "dH/dz")


@pytest.mark.parametrize("be", BACKENDS)
def test_entropy_stable_large_and_neg_inf(be):
    name, dev = be
    inf = float("inf")
    z = torch.tensor(
        [[1e4, -1e4, 0.0, 5e3], [0.0, -inf, 1.0, -inf], [-inf, 3.0, -inf, -inf]], device=dev, requires_grad=True
    )
    h = af.entropy(z, backend=name)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(z.grad).all()
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)
    assert_close(h, torch.tensor([0.0, float(-(p * p.log()).sum()), 0.0], dtype=torch.float64), torch.float32, "H")
    assert (z.grad[1, [1, 3]] == 0).all()


# ---------------------------------------------------------------------------------- library machinery
def _opcheck_cases():
    torch.manual_seed(0)
    K = 3
    b, d, c = torch.randn(4, 5), torch.randn(K, 4, 5), torch.rand(K, requires_grad=True)
    x = torch.randn(6, 5, requires_grad=True)
    lib = torch.ops.adamerge_fast
    cm, cb = torch.rand(2, K, requires_grad=True), torch.rand(K, requires_grad=True)
    w0, tau_w, b0, tau_b = torch.randn(7, 5), torch.randn(K, 7, 5), torch.randn(7), torch.randn(K, 7)
    return [
        (lib.merge.default, (b, d, c, "reference")),
        (lib.merge_many.default, ([b, torch.randn(3)], [d, torch.randn(K, 3)], cm, "reference")),
        (lib.merged_linear.default, (x, w0, tau_w, c, b0, tau_b, cb, "reference")),
        (lib.merged_linear.default, (x, w0, tau_w, c, None, None, None, "reference")),
        (lib.entropy.default, (torch.randn(6, 9, requires_grad=True), "reference")),
        (lib.merge_dcoef.default, (b, d, "reference")),
        (lib.entropy_backward.default, (torch.randn(6), torch.randn(6, 9), "reference")),
    ]


@pytest.mark.parametrize("i", range(7))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    K = 3
    w0, tau = torch.randn(8, 6), torch.randn(K, 8, 6) * 0.1
    ln0, ln_tau = torch.randn(8), torch.randn(K, 8) * 0.1

    def f(x, c):
        (g,) = af.merge_many([ln0], [ln_tau], c[1:2], backend="reference")
        h = af.merged_linear(x, w0, tau, c[0], backend="reference") * g
        return af.entropy(h, backend="reference").mean()

    x = torch.randn(5, 6)
    c1 = torch.rand(2, K, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_()
    eager = f(x, c1)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, c2)
    compiled.backward()
    assert_close(compiled, eager.double(), torch.float32, "compiled loss")
    assert_close(c2.grad, c1.grad.double(), torch.float32, "compiled grad")


# ------------------------------------------------------------------------------------ eager fast path
def _op_node(t):
    """Name of the autograd node of the op that produced t (under the reshape of the public wrapper)."""
    fn = t.grad_fn
    while type(fn).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def _all_ops_step(name, dev, seed=0):
    """Every public op forward + backward, gradients of every differentiable input; returns everything."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g, dtype=torch.float64).float().to(dev).requires_grad_(grad)

    K = 3
    base, deltas, coef = r(5, 3, grad=True), r(K, 5, 3, grad=True), r(K, grad=True)
    bases, dl, cm = [r(4, grad=True), r(2, 3)], [r(K, 4), r(K, 2, 3, grad=True)], r(2, K, grad=True)
    x, w0, tw, cw = r(6, 3, grad=True), r(7, 3), r(K, 7, 3), r(K, grad=True)
    b0, tb, cb = r(7), r(K, 7), r(K, grad=True)
    m = af.merge(base, deltas, coef, backend=name)
    mm = af.merge_many(bases, dl, cm, backend=name)
    y = af.merged_linear(x * m[0], w0, tw, cw, b0, tb, cb, backend=name)
    h = af.entropy(y + mm[0][:1] + mm[1].sum(), backend=name)
    fns = [_op_node(t) for t in (m, mm[0], y, h)]
    h.sum().backward()
    leaves = (base, deltas, coef, *bases[:1], dl[1], cm, x, cw, cb)
    return [m, *mm, y, h, *(t.grad for t in leaves)], fns


@pytest.mark.parametrize("be", BACKENDS)
def test_eager_fast_path_equals_custom_ops(be, monkeypatch):
    """Plain eager calls take autograd.Functions over the backend, everything else the custom ops: the same
    backend calls and backward formulas, so outputs and every gradient are bitwise equal."""
    name, dev = be
    fast, fast_fns = _all_ops_step(name, dev)
    monkeypatch.setattr(_library, "EAGER_FAST_PATH", False)
    slow, slow_fns = _all_ops_step(name, dev)
    assert fast_fns == ["_MergeFnBackward", "_MergeManyFnBackward", "_MergedLinearFnBackward", "_EntropyFnBackward"]
    assert not any("Fn" in f for f in slow_fns), slow_fns
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a is not None and torch.equal(a, b), f"result {i} differs between the fast path and the custom ops"


def test_fast_path_only_in_plain_eager():
    use_fast_path = _library.use_fast_path
    t = torch.zeros(2)
    assert use_fast_path(t, None, torch.nn.Parameter(torch.zeros(1)))
    assert not use_fast_path(t, torch.zeros(2, device="meta"))

    class Sub(torch.Tensor):
        pass

    assert not use_fast_path(t.as_subclass(Sub))

    class FMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with FMode():
        assert not use_fast_path(t)
    with DMode():
        assert not use_fast_path(t)


def test_functorch_grad():
    """torch.func.grad differentiates the ops (through the fast path's autograd.Functions)."""
    torch.manual_seed(0)
    base, deltas = torch.randn(4), torch.randn(3, 4)
    c = torch.rand(3)
    c64 = c.double().requires_grad_()
    (base.double() + (c64[:, None] * deltas.double()).sum(0)).pow(2).sum().backward()
    g = torch.func.grad(lambda c: af.merge(base, deltas, c, backend="reference").pow(2).sum())(c)
    assert_close(g, c64.grad, torch.float32, "torch.func.grad of merge")
    x, w0, tw = torch.randn(5, 4), torch.randn(6, 4), torch.randn(3, 6, 4)

    def loss(cw):
        return af.entropy(af.merged_linear(x, w0, tw, cw, backend="reference"), backend="reference").mean()

    cw64 = c.double().requires_grad_()
    logits = x.double() @ (w0.double() + (cw64[:, None, None] * tw.double()).sum(0)).T
    (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)).mean().backward()
    assert_close(torch.func.grad(loss)(c), cw64.grad, torch.float32, "torch.func.grad of merged_linear + entropy")


# ------------------------------------------------------------------------------------ dispatch & errors
def test_backend_selection(monkeypatch):
    dev = torch.device("cpu")
    assert ops.resolve("reference", "merge", dev) == "reference"
    assert ops.resolve("auto", "entropy", dev) == "reference"
    monkeypatch.setenv("ADAMERGE_BACKEND", "reference")
    assert ops.resolve(None, "merge", dev) == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.resolve("nope", "merge", dev)
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.resolve("cuda", "merge", dev)  # never runs on CPU tensors
    status = ops.backend_status("cpu")
    assert status["reference"] == "available" and set(status) == set(ops.BACKEND_NAMES)


def test_builtin_auto_order():
    """The order ``auto`` tries the built-in backends in, per device type and op (declared in ops/__init__.py)."""
    # on CUDA per op (issue 12 item 2): the extension's merges first; Triton's tensor-core merged_linear
    # (fused kernel, dcoef_w) and one-pass entropy first, the extension as their fallback
    for op, order in {"merge": ("cuda", "triton", "reference"), "merge_many": ("cuda", "triton", "reference"),
                      "merged_linear": ("triton", "cuda", "reference"),
                      "entropy": ("triton", "cuda", "reference")}.items():  # fmt: skip
        assert ops.auto_order("cuda", op) == order, op
    for op in ops.OPS:
        # no kernel of the extension (merged_lora_linear; linear_entropy's tile): Triton first on CUDA, no cuda
        if op in ("merged_lora_linear", "linear_entropy"):
            assert ops.auto_order("cuda", op) == ("triton", "reference")
        assert ops.AUTO_ORDER["cuda"][op] == ops.auto_order("cuda", op)
        assert ops.auto_order("mps", op) == ("reference",)  # a device type no backend names: the fallback only
    for op in ("merge", "merge_many", "merged_linear"):
        assert ops.auto_order("cpu", op) == ("cpu", "reference")
    assert ops.auto_order("cpu", "entropy") == ops.AUTO_ORDER["cpu"]["entropy"] == ("reference",)
    for op in ("merged_lora_linear", "linear_entropy"):
        assert ops.auto_order("cuda", op) == ("triton", "reference")
        assert ops.auto_order("cpu", op) == ("reference",)
    assert set(ops.AUTO_ORDER) == {"cpu", "cuda"}
    assert ops.BACKEND_NAMES == ops.backend_names() == ("reference", "cpu", "triton", "cuda")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        ops.auto_order("cpu", "nope")


class _MinimalBackend(ops.Backend):
    """Only the two primitives, in naive torch: every other kernel comes from the Backend base class."""

    name = "minimal"

    def unavailable_reason(self, device):
        return None if torch.device(device).type == "cpu" else "the minimal test backend runs on cpu tensors only"

    @staticmethod
    def _acc(*ts):
        return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32

    def merge(self, base, deltas, coef):
        acc = self._acc(base, deltas, coef)
        return (base.to(acc) + torch.tensordot(coef.to(acc), deltas.to(acc), dims=1)).to(base.dtype)

    def dcoef(self, grad, deltas):
        acc = self._acc(grad, deltas)
        return deltas.to(acc).reshape(deltas.shape[0], -1) @ grad.to(acc).reshape(-1)


@pytest.fixture
def minimal_backend():
    """``test-minimal`` registered for the duration of one test: auto picks it first for merge and merged_linear
    on the CPU. Unregistered afterwards, leaving the built-in registry as it was."""
    name = "test-minimal"
    before = (ops.backend_names(), {dt: dict(ops.AUTO_ORDER[dt]) for dt in ops.AUTO_ORDER})
    ops.register_backend(name, _MinimalBackend, auto={"cpu": ("merge", "merged_linear")}, priority=1000)
    yield name
    if name in ops.backend_names():
        ops.unregister_backend(name)
    assert (ops.backend_names(), {dt: dict(ops.AUTO_ORDER[dt]) for dt in ops.AUTO_ORDER}) == before


def test_registered_backend_is_listed_resolved_and_placed(minimal_backend):
    name, cpu = minimal_backend, torch.device("cpu")
    assert name in ops.BACKEND_NAMES and ops.BACKEND_NAMES[-1] == name
    assert ops.BACKEND_NAMES == ops.backend_names() and len(ops.BACKEND_NAMES) == len(ops.backend_names())
    assert ops.backend_status("cpu")[name] == "available"
    assert "cpu tensors only" in ops.backend_status("meta")[name]
    assert ops.resolve(name, "entropy", cpu) == name  # explicitly: every op
    with pytest.raises(ops.BackendUnavailableError, match="cpu tensors only"):
        ops.resolve(name, "merge", torch.device("meta"))
    # auto: first where declared (priority 1000 beats the built-ins), nowhere else
    for op in ("merge", "merged_linear"):
        assert ops.auto_order("cpu", op)[0] == name and ops.AUTO_ORDER["cpu"][op][0] == name
        assert ops.resolve("auto", op, cpu) == name
    assert name not in ops.auto_order("cpu", "merge_many") and name not in ops.auto_order("cpu", "entropy")
    assert all(name not in order for order in ops.AUTO_ORDER["cuda"].values())
    with pytest.raises(ValueError, match=f"unknown backend 'nope'; expected one of .*'{name}'"):
        ops.resolve("nope", "merge", cpu)
    ops.unregister_backend(name)
    assert name not in ops.BACKEND_NAMES and ops.resolve("auto", "merge", cpu) != name
    with pytest.raises(ValueError, match=f"unknown backend '{name}'"):
        ops.get_backend(name)


def test_registered_backend_meets_the_contract(minimal_backend, monkeypatch):
    """A backend with only merge/dcoef passes the merge, merge_many and merged_linear contract through the base
    class composites, on the fast path and through the custom ops."""
    be = (minimal_backend, "cpu")
    for shape in [(1,), (47,), (3, 47), (5, 1, 7)]:
        for K in (1, 5):
            test_merge_matches_float64(be, shape, K)
    test_merge_noncontiguous_and_all_grads(be)
    test_merge_many_matches_float64(be)
    for case in ML_CASES:
        for xdt, tdt in ML_DTYPES:
            test_merged_linear_matches_float64(be, case, xdt, tdt)
    test_eager_fast_path_equals_custom_ops(be, monkeypatch)


def test_per_op_priority(minimal_backend):
    """``priority`` may be a mapping ``{op: int, "*": default}``: the backend's place in ``auto`` differs per op."""
    name = "test-per-op"
    ops.register_backend(name, _MinimalBackend, auto={"cpu": ("merge", "merged_linear")},
                         priority={"*": 50, "merged_linear": 2000})  # fmt: skip
    try:
        assert ops.auto_order("cpu", "merge") == ("test-minimal", "cpu", name, "reference")  # 1000 > 100 > 50 > 0
        assert ops.auto_order("cpu", "merged_linear")[:2] == (name, "test-minimal")  # 2000 first
        assert ops.resolve("auto", "merged_linear", torch.device("cpu")) == name
    finally:
        ops.unregister_backend(name)
    for bad in ({"matmul": 1}, {"*": "high"}, {"*": True}):
        with pytest.raises(ValueError, match="priority must be an int or map ops"):
            ops.register_backend("test-bad", _MinimalBackend, priority=bad)
    assert "test-bad" not in ops.BACKEND_NAMES


def test_register_backend_rejects_bad_declarations():
    with pytest.raises(ValueError, match="other than 'auto'"):
        ops.register_backend("auto", _MinimalBackend)
    with pytest.raises(ValueError, match="auto must map device types to ops from"):
        ops.register_backend("test-bad", _MinimalBackend, auto={"cpu": ("merge", "matmul")})
    with pytest.raises(TypeError, match="factory must be callable"):
        ops.register_backend("test-bad", None)
    with pytest.raises(ValueError, match="unknown backend 'test-bad'"):
        ops.unregister_backend("test-bad")
    assert "test-bad" not in ops.BACKEND_NAMES


# Imports of ops/ at module level (edges inside the package), from the docstring of ops/__init__.py
_GRAPH_LINE = re.compile(r"^ {4}(\S+) +-> (.*)$")
_OPS_DIR = Path(ops.__file__).parent
_OPTIONAL = ("triton", "adamerge_fast._C", "adamerge_fast.ops.triton_kernels")


def _ops_imports():
    """``({module: module-level imports inside ops}, {module: function-level imports})`` of every ops/ module,
    module names relative to ``adamerge_fast.ops`` ("__init__" for the package)."""
    top, local = {}, {}
    for path in sorted(_OPS_DIR.rglob("*.py")):
        rel = path.relative_to(_OPS_DIR).with_suffix("").parts  # e.g. ("triton_kernels", "merge")
        pkg = ["adamerge_fast", "ops", *rel[:-1]]  # the package that relative imports start from
        name = ".".join(rel[:-1] if rel[-1] == "__init__" and len(rel) > 1 else rel)
        tree = ast.parse(path.read_text())
        body_ids = {id(n) for n in tree.body}
        top[name], local[name] = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if id(node) not in body_ids:
                    local[name].add(t)
                elif t.startswith("adamerge_fast.ops."):
                    top[name].add(t.removeprefix("adamerge_fast.ops."))
    return top, local


# the modules that define torch.library custom ops (they carry a backend name, so they reach the registry)
_CUSTOM_OP_MODULES = ("_library", "lora", "_linear_entropy")


def test_ops_import_graph_is_layered():
    top, local = _ops_imports()
    # no cycle (depth-first search over module-level imports)
    state: dict[str, int] = {}

    def visit(mod, path):
        assert state.get(mod) != 1, f"import cycle: {' -> '.join(path + [mod])}"
        if state.get(mod) is None:
            state[mod] = 1
            for dep in top.get(mod, ()):
                visit(dep, path + [mod])
            state[mod] = 2

    for mod in top:
        visit(mod, [])
    # kernels and backends never reach the registry or the dispatcher; the shared helpers import nothing from ops
    assert top["_common"] == set() and top["reference"] == {"_common"}
    for mod in top:
        reach, todo = set(), [mod]
        while todo:
            for dep in top[todo.pop()] - reach:
                reach.add(dep)
                todo.append(dep)
        if mod not in ("__init__",) + _CUSTOM_OP_MODULES:  # the op modules (custom ops carry a backend name)
            assert not {"_registry", "__init__", *_CUSTOM_OP_MODULES} & reach, (mod, reach)
    # function-level imports only for optional dependencies
    for mod, targets in local.items():
        assert all(t.startswith(_OPTIONAL) for t in targets), (mod, targets)
    # the documented graph is the real one
    documented = {}
    for line in ops.__doc__.splitlines():
        m = _GRAPH_LINE.match(line)
        if m:
            deps = re.sub(r"\(.*?\)", "", m.group(2).split(";")[0]).split(",")  # "(...)": a remark, no module
            documented[m.group(1)] = {d.strip() for d in deps if d.strip()}
    assert documented == top


def test_triton_unavailable_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        af.merge(torch.zeros(3), torch.zeros(1, 3), torch.zeros(1), backend="triton")


_z = torch.zeros


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: af.merge(_z(3), _z(2, 4), _z(2)), r"deltas must have shape .*\[K, 3\], got \[2, 4\]"),
        (lambda: af.merge(_z(3), _z(0, 3), _z(0)), "at least one task vector"),
        (lambda: af.merge(_z(3), _z(2, 3), _z(3)), r"coef must have shape \[K\]=\[2\]"),
        (lambda: af.merge(_z(3, dtype=torch.long), _z(2, 3), _z(2)), "base: expected a floating dtype"),
        (lambda: af.merged_linear(_z(2, 4), _z(3, 5), _z(1, 3, 5), _z(1)), r"x must be \[\*, in=5\]"),
        (lambda: af.merged_linear(_z(2, 5), _z(3, 5), _z(1, 3, 5), _z(1), _z(3), _z(1, 3), None), "tau_b and coef_b"),
        (lambda: af.merge_many([_z(3)], [_z(1, 3)], _z(2, 1)), r"coefs must have shape \[n=1, K\]"),
        (
            lambda: af.merge_many([_z(3), _z(2)], [_z(1, 3), _z(1, 3)], _z(2, 1)),
            r"merge_many\[1\]: deltas must have shape .*\[K, 2\], got \[1, 3\]",
        ),
        (
            lambda: af.merge_many([_z(3), _z(3)], [_z(1, 3), _z(2, 3)], _z(2, 1)),
            r"merge_many\[1\]: coefs\[i\] must have shape \[K\]=\[2\], got \[1\]",
        ),
        (
            lambda: af.merge_many([_z(3), _z(3, dtype=torch.int32)], [_z(1, 3)] * 2, _z(2, 1)),
            r"merge_many\[1\]: base: expected a floating dtype",
        ),
        (
            lambda: af.merge_many([_z(3), _z(3)], [_z(1, 3), [0.0, 1.0]], _z(2, 1)),
            r"merge_many\[1\]: deltas: expected a tensor, got list",
        ),
        (
            lambda: af.merge_many([_z(3)], [_z(1, 3, device="meta")], _z(1, 1)),
            r"merge_many\[0\]: deltas is on meta but base is on cpu",
        ),
        (
            lambda: af.merge_many([_z(3)], [_z(1, 3)], _z(1, 1, device="meta")),
            r"merge_many\[0\]: coefs\[i\] is on meta but base is on cpu",
        ),
        (lambda: af.entropy(_z(3, 0)), "C >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
