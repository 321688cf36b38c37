"""Quantized task vectors (``ops/quant.py``): the container and its error bounds, and every op that reads them
(``merge``, ``merge_many``, ``merged_linear`` forward and backward, the ``dcoef`` kernels) on every backend here,
against float64 autograd through an explicit dequantization: the coefficient gradient is the one of the
dequantized task vectors the forward merged. Outputs are NaN-poisoned (conftest); tolerances from ``_tol``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ops_contract import BACKENDS, _op_node, _rand, _small

import adamerge_fast as af
from _tol import assert_close, lowest
from adamerge_fast import ops
from adamerge_fast.ops import _library
from adamerge_fast.ops.quant import (
    QuantizedTensor,
    check_quantized,
    component_shapes,
    empty,
    max_error,
    quantize,
    quantize_into,
    rows_cols,
)

ROOT = Path(__file__).resolve().parents[1]
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FMTS = ["int8", "int4"]
COLS = [1, 2, 127, 128, 129, 255, 257]  # int4 group boundaries (group 128) and odd widths


def _qt(K, shape, fmt, seed, scale=0.05, group_size=128):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn((K, *shape), generator=g, dtype=torch.float64) * scale).float()
    return quantize(dense, fmt, group_size=group_size)


def _deq_by_hand(qt: QuantizedTensor) -> torch.Tensor:
    """The module docstring's formula, element by element (an oracle independent of the vectorized dequantize)."""
    K = qt.num_tasks
    R, C = rows_cols(qt.shape[1:])
    out = torch.empty(K, R, C, dtype=F64)
    for k in range(K):
        for r in range(R):
            for c in range(C):
                if qt.bits == 8:  # an fp32 scale times an integer: one fp32 rounding, as the definition
                    out[k, r, c] = float(qt.scales[k, r] * int(qt.qdata[k, r, c]))
                else:
                    byte = int(qt.qdata[k, r, c // 2])
                    nib = byte & 15 if c % 2 == 0 else byte >> 4
                    g = c // qt.group_size
                    out[k, r, c] = float(qt.scales[k, r, g] * (nib - int(qt.zeros[k, r, g])))
    return out.reshape(qt.shape)


# ------------------------------------------------------------------------------------------- container
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("cols", COLS)
def test_quantize_error_bound_and_layout(fmt, cols):
    K, R = 3, 4
    torch.manual_seed(cols)
    x = torch.randn(K, R, cols) * 0.02
    x[0, 1] = 0.0  # an all-zero row
    x[1, 2, ::3] = 0.0  # scattered exact zeros (TIES-trimmed entries)
    x[2, 3] = x[2, 3].abs() + 0.01  # a row of one sign: the range still holds 0
    qt = quantize(x, fmt)
    check_quantized("test", qt, (R, cols))
    want = component_shapes(qt.shape, qt.bits, qt.group_size)
    assert {k: tuple(getattr(qt, k).shape) for k in want} == want
    assert qt.nbytes == sum(getattr(qt, k).numel() * getattr(qt, k).element_size() for k in want)
    d = qt.dequantize()
    assert d.dtype == F32 and d.shape == x.shape
    bound = max_error(qt)
    assert ((d - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
    assert (d[x == 0] == 0).all()  # exact zeros stay exactly zero
    assert torch.equal(d.double(), _deq_by_hand(qt))
    if fmt == "int8":
        assert qt.qdata.abs().max() <= 127
        assert torch.allclose(qt.scales, x.abs().amax(-1) / 127)
    else:
        assert int(qt.zeros.max()) <= 15


@pytest.mark.parametrize("group_size", [2, 6, 64, 4096])
@pytest.mark.parametrize("shape", [(5,), (), (3, 2, 7), (2, 129)])
def test_int4_group_sizes_and_shapes(group_size, shape):
    torch.manual_seed(len(shape) + group_size)
    x = torch.randn(2, *shape)
    qt = quantize(x, "int4", group_size=group_size)
    d = qt.dequantize(F64)
    assert d.dtype == F64 and d.shape == x.shape
    assert ((d - x.double()).abs() <= max_error(qt).double() * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(qt.dequantize().double(), _deq_by_hand(qt))


def test_quantize_one_task_at_a_time_and_rows():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 10, dtype=F64)
    qt = empty(x.shape, "int4", group_size=4)
    for k in range(3):
        quantize_into(qt, k, x[k])  # fp64 input: quantized in fp32
    ref = quantize(x.float(), "int4", group_size=4)
    for a, b in zip(qt.components(), ref.components(), strict=True):
        assert torch.equal(a, b)
    sub = qt.rows(slice(1, 4))
    assert sub.shape == (3, 3, 10) and not sub.qdata.is_contiguous()
    assert torch.equal(sub.dequantize(), qt.dequantize()[:, 1:4])
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_into(qt, 0, torch.full((6, 10), float("nan")))
    with pytest.raises(ValueError, match=r"must have shape \[6, 10\]"):
        quantize_into(qt, 0, torch.zeros(6, 9))
    with pytest.raises(ValueError, match="group_size must be an even integer"):
        empty((1, 3), "int4", group_size=3)
    with pytest.raises(ValueError, match="format must be one of"):
        empty((1, 3), "int2")


def test_bytes_against_dense():
    """int8: 1 byte per value + an fp32 scale per row; int4: half a byte + (fp32 scale + uint8 zero) per 128."""
    qt8, qt4 = _qt(8, (768, 3072), "int8", 0), _qt(8, (768, 3072), "int4", 0)
    fp32 = 8 * 768 * 3072 * 4
    assert qt8.nbytes / fp32 == pytest.approx(0.25 + 4 / 3072 / 4)
    assert qt4.nbytes / fp32 == pytest.approx(0.125 + 5 / 128 / 4)


def test_check_quantized_errors():
    qt = _qt(2, (3, 5), "int4", 0)
    with pytest.raises(ValueError, match=r"zeros must have shape \[2, 3, 1\]"):
        check_quantized("t", qt._replace(zeros=qt.zeros[:, :2]))
    with pytest.raises(TypeError, match="qdata must be torch.uint8 for int4"):
        check_quantized("t", qt._replace(qdata=qt.qdata.to(torch.int8)))
    with pytest.raises(ValueError, match=r"must have shape \[K, 3, 4\]"):
        check_quantized("t", qt, (3, 4))
    q8 = _qt(2, (3, 5), "int8", 0)
    with pytest.raises(ValueError, match="no zero points"):
        check_quantized("t", q8._replace(zeros=qt.zeros))
    with pytest.raises(TypeError, match="scales must be torch.float32"):
        check_quantized("t", q8._replace(scales=q8.scales.double()))


# ----------------------------------------------------------------------------------------------- merge
def _oracle_merge(base, qt, coef, g):
    """float64 autograd of ``base + sum_k coef_k deq_k`` against the upstream gradient ``g``: (out, dcoef)."""
    c64 = coef.detach().double().requires_grad_()
    d = qt.dequantize(F64)
    ref = base.detach().double() + (c64.reshape(-1, *[1] * base.dim()) * d).sum(0)
    (ref * g.double()).sum().backward()
    return ref, c64.grad


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("shape", [(3, 127), (2, 128), (3, 129), (2, 255), (1, 257), (47,), (2, 3, 43)])
def test_merge_q_matches_float64(be, fmt, K, shape):
    name, dev = be
    if _small(be) and (K == 8 or shape[-1] in (128, 255) or len(shape) == 3):
        pytest.skip("interpreter: subset")
    torch.manual_seed(K * 1000 + shape[-1])
    qt = _qt(K, shape, fmt, shape[-1]).to(dev)
    for bdt in (F32, BF16, F16, F64):
        base = _rand(shape, bdt, dev)
        coef = torch.rand(K, device=dev, requires_grad=True)
        out = af.merge(base, qt, coef, backend=name)
        assert out.dtype == bdt and out.shape == base.shape
        g = _rand(shape, bdt, dev)
        (out.double() * g.double()).sum().backward()
        ref, dc = _oracle_merge(base, qt, coef, g)
        assert_close(out, ref, bdt, f"merge_q {fmt} {bdt}")
        assert_close(coef.grad, dc, lowest(bdt, F32), f"merge_q dcoef {fmt} {bdt}")


@pytest.mark.parametrize("be", BACKENDS)
def test_merge_q_noncontiguous(be):
    """A transposed base, a row slice of a stack and every other task of a stack (strided dim 0), grads of base
    and coef."""
    name, dev = be
    for fmt in FMTS:
        big = _qt(6, (9, 129), fmt, 1).to(dev)
        qts = [big.rows(slice(2, 7)), big._replace(qdata=big.qdata[::2], scales=big.scales[::2],
                                                   zeros=None if big.zeros is None else big.zeros[::2],
                                                   shape=torch.Size((3, 9, 129)))]
        for qt in qts:
            K, R = qt.shape[0], qt.shape[1]
            base = _rand((129, R), F32, dev).t().requires_grad_()
            coef = torch.rand(K, device=dev, requires_grad=True)
            out = af.merge(base, qt, coef, backend=name)
            g = _rand((R, 129), F32, dev)
            (out * g).sum().backward()
            ref, dc = _oracle_merge(base, qt, coef, g)
            assert_close(out, ref, F32, f"merge_q non-contiguous {fmt}")
            assert_close(coef.grad, dc, F32, "dcoef")
            assert_close(base.grad, g.double(), F32, "dbase")


@pytest.mark.parametrize("be", BACKENDS)
def test_merge_many_mixed_storage(be):
    """Dense, int8 and int4 (two group sizes) task vectors in one merge_many call."""
    name, dev = be
    torch.manual_seed(3)
    K = 3
    shapes = [(7,), (3, 129), (2, 127), (5, 3, 4), (257,), (4, 33)]
    deltas = [_rand((K, *shapes[0]), BF16, dev, 0.1), _qt(K, shapes[1], "int8", 1).to(dev),
              _qt(K, shapes[2], "int4", 2).to(dev), _rand((K, *shapes[3]), F32, dev, 0.1),
              _qt(K, shapes[4], "int4", 3, group_size=64).to(dev), _qt(K, shapes[5], "int8", 4).to(dev)]
    bases = [_rand(s, F32, dev) for s in shapes]
    coefs = torch.rand(len(shapes), K, device=dev, requires_grad=True)
    outs = af.merge_many(bases, deltas, coefs, backend=name)
    grads = [_rand(s, F32, dev) for s in shapes]
    sum((o * g).sum() for o, g in zip(outs, grads, strict=True)).backward()
    c64 = coefs.detach().double().requires_grad_()
    dense = [d.dequantize(F64) if isinstance(d, QuantizedTensor) else d.double() for d in deltas]
    refs = [b.double() + (c64[i].reshape(-1, *[1] * b.dim()) * d).sum(0)
            for i, (b, d) in enumerate(zip(bases, dense, strict=True))]
    sum((r * g.double()).sum() for r, g in zip(refs, grads, strict=True)).backward()
    for o, r in zip(outs, refs, strict=True):
        assert_close(o, r, F32, "merge_many mixed")
    assert_close(coefs.grad, c64.grad, F32, "merge_many mixed dcoef")
    # all quantized, one format: the single-call path
    q_only = [d for d in deltas if isinstance(d, QuantizedTensor) and d.bits == 8]
    b_only = [bases[1], bases[5]]
    outs = af.merge_many(b_only, q_only, coefs[[1, 5]].detach(), backend=name)
    for o, b, d, c in zip(outs, b_only, q_only, coefs[[1, 5]].detach(), strict=True):
        assert_close(o, b.double() + torch.tensordot(c.double(), d.dequantize(F64), 1), F32, "merge_many int8")


# ---------------------------------------------------------------------------------------- merged_linear
QL_CASES = [  # (lead shape of x, in, out, K, bias mode)
    ((3,), 129, 5, 3, "merged"),
    ((1,), 127, 16, 1, "fixed"),
    ((5,), 257, 33, 3, "none"),
    ((2, 3), 128, 47, 8, "merged"),
    ((4,), 255, 7, 3, "merged"),
]


def _oracle_linear(x, w0, qt, cw, b0, tb, cb, dy):
    x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
    w = w0.double() + (cw64[:, None, None] * qt.dequantize(F64)).sum(0)
    y64 = x64 @ w.t()
    cb64 = None
    if b0 is not None:
        y64 = y64 + b0.double()
        if tb is not None:
            cb64 = cb.detach().double().requires_grad_()
            y64 = y64 + (cb64[:, None] * tb.double()).sum(0)
    (y64 * dy.double()).sum().backward()
    return y64, x64.grad, cw64.grad, None if cb64 is None else cb64.grad


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", QL_CASES, ids=lambda c: f"x{c[0]}-{c[1]}x{c[2]}-K{c[3]}-{c[4]}")
@pytest.mark.parametrize("xdt", [F32, BF16])
def test_merged_linear_q_matches_float64(be, fmt, case, xdt):
    name, dev = be
    lead, fin, fout, K, bias = case
    if _small(be) and (K == 8 or fin in (128, 255)):
        pytest.skip("interpreter: subset")
    torch.manual_seed(fin * 31 + fout)
    x = _rand((*lead, fin), xdt, dev).requires_grad_()
    w0, qt = _rand((fout, fin), F32, dev, 0.2), _qt(K, (fout, fin), fmt, fin).to(dev)
    cw = torch.rand(K, device=dev, requires_grad=True)
    b0 = _rand((fout,), F32, dev) if bias != "none" else None
    tb = _rand((K, fout), F32, dev, 0.05) if bias == "merged" else None
    cb = torch.rand(K, device=dev, requires_grad=True) if bias == "merged" else None
    y = af.merged_linear(x, w0, qt, cw, b0, tb, cb, backend=name)
    assert y.dtype == xdt and y.shape == (*lead, fout)
    dy = _rand(y.shape, xdt, dev)
    (y.float() * dy.float()).sum().backward()
    y64, dx64, dcw64, dcb64 = _oracle_linear(x, w0, qt, cw, b0, tb, cb, dy)
    assert_close(y, y64, xdt, "y")
    assert_close(x.grad, dx64, xdt, "dx")
    assert_close(cw.grad, dcw64, xdt, "dcoef_w")
    if bias == "merged":
        assert_close(cb.grad, dcb64, xdt, "dcoef_b")


@pytest.mark.parametrize("be", BACKENDS)
def test_merged_linear_q_noncontiguous_rows_and_w0_grad(be):
    """x non-contiguous, a row slice of the stack (attention's q/k/v thirds), gradients of w0 and b0 too."""
    name, dev = be
    for fmt in FMTS:
        torch.manual_seed(5)
        qt = _qt(3, (12, 129), fmt, 7).to(dev).rows(slice(4, 8))
        x = _rand((129, 5), F32, dev).t().requires_grad_()
        w0 = _rand((4, 129), F32, dev).requires_grad_()
        b0 = _rand((4,), F32, dev).requires_grad_()
        cw = torch.rand(3, device=dev, requires_grad=True)
        y = af.merged_linear(x, w0, qt, cw, b0, backend=name)
        dy = _rand(y.shape, F32, dev)
        (y * dy).sum().backward()
        x64, w64, b64, c64 = (t.detach().double().requires_grad_() for t in (x, w0, b0, cw))
        y64 = x64 @ (w64 + (c64[:, None, None] * qt.dequantize(F64)).sum(0)).t() + b64
        (y64 * dy.double()).sum().backward()
        assert_close(y, y64, F32, "y")
        for t, r, what in ((x, x64, "dx"), (w0, w64, "dw0"), (b0, b64, "db0"), (cw, c64, "dcoef_w")):
            assert_close(t.grad, r.grad, F32, what)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("group_size", [6, 48])
def test_merged_linear_q_groups_across_tiles(be, group_size):
    """int4 groups that do not divide the kernels' tiles (a tile spans several groups: per-element scales)."""
    name, dev = be
    torch.manual_seed(group_size)
    x = _rand((5, 129), F32, dev).requires_grad_()
    w0, qt = _rand((33, 129), F32, dev, 0.2), _qt(3, (33, 129), "int4", 9, group_size=group_size).to(dev)
    cw = torch.rand(3, device=dev, requires_grad=True)
    y = af.merged_linear(x, w0, qt, cw, backend=name)
    dy = _rand(y.shape, F32, dev)
    (y * dy).sum().backward()
    y64, dx64, dcw64, _ = _oracle_linear(x, w0, qt, cw, None, None, None, dy)
    assert_close(y, y64, F32, "y")
    assert_close(x.grad, dx64, F32, "dx")
    assert_close(cw.grad, dcw64, F32, "dcoef_w")


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "jit"])
@pytest.mark.parametrize("fmt", FMTS)
def test_triton_strategies(strategy, fmt, monkeypatch):
    """Both fwd/dx strategies of the Triton backend (fused prologue dequantization; jit scratch merge)."""
    pytest.importorskip("triton")
    if not ops.get_backend("triton").available(torch.device("cpu")):
        pytest.skip("triton backend unavailable here")
    from adamerge_fast.ops.triton_kernels import merged_linear as ML

    monkeypatch.setattr(ML, "STRATEGY", strategy)
    test_merged_linear_q_matches_float64(("triton", "cpu"), fmt, ((3,), 129, 5, 3, "merged"), F32)


# ---------------------------------------------------------------------------------- library machinery
def _all_q_ops(name, dev, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g, dtype=F64).float().to(dev).requires_grad_(grad)

    K = 3
    q8, q4 = _qt(K, (5, 129), "int8", seed).to(dev), _qt(K, (7, 129), "int4", seed + 1).to(dev)
    base, coef = r(5, 129, grad=True), r(K, grad=True)
    bases, cm = [r(7, 129, grad=True), r(5, 129)], r(2, K, grad=True)
    x, w0, cw, b0, tb, cb = r(6, 129, grad=True), r(7, 129), r(K, grad=True), r(7), r(K, 7), r(K, grad=True)
    m = af.merge(base, q8, coef, backend=name)
    mm = af.merge_many(bases, [q4, q8], cm, backend=name)
    y = af.merged_linear(x * m[0, 0], w0, q4, cw, b0, tb, cb, backend=name)
    loss = y.square().sum() + mm[0].sum() * mm[1].mean()
    nodes = [_op_node(t) for t in (m, y)]
    loss.backward()
    return [m, *mm, y, *(t.grad for t in (base, coef, bases[0], cm, x, cw, cb))], nodes


@pytest.mark.parametrize("be", BACKENDS)
def test_fast_path_equals_custom_ops(be, monkeypatch):
    name, dev = be
    fast, fast_nodes = _all_q_ops(name, dev)
    monkeypatch.setattr(_library, "EAGER_FAST_PATH", False)
    slow, slow_nodes = _all_q_ops(name, dev)
    assert fast_nodes == ["_MergeQFnBackward", "_MergedLinearQFnBackward"]
    assert not any("Fn" in n for n in slow_nodes), slow_nodes
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a is not None and torch.equal(a, b), f"result {i} differs between the fast path and the custom ops"


def _opcheck_cases():
    torch.manual_seed(0)
    K = 3
    lib = torch.ops.adamerge_fast
    q8, q4 = _qt(K, (4, 9), "int8", 0), _qt(K, (4, 9), "int4", 1, group_size=4)
    b, c = torch.randn(4, 9), torch.rand(K, requires_grad=True)
    x, w0, b0, tb = torch.randn(6, 9, requires_grad=True), torch.randn(4, 9), torch.randn(4), torch.randn(K, 4)
    cb, cm = torch.rand(K, requires_grad=True), torch.rand(2, K, requires_grad=True)
    return [
        (lib.merge_q.default, (b, *q8.components(), c, 8, 0, "reference")),
        (lib.merge_q.default, (b, *q4.components(), c, 4, 4, "reference")),
        (lib.merge_q_dcoef.default, (b, *q4.components(), 4, 4, "reference")),
        (lib.merge_many_q.default, ([b, b[1:]], [q4.qdata, q4.qdata[:, 1:]], [q4.scales, q4.scales[:, 1:]],
                                    [q4.zeros, q4.zeros[:, 1:]], cm, 4, 4, "reference")),
        (lib.merge_many_q.default, ([b], [q8.qdata], [q8.scales], [], cm[:1], 8, 0, "reference")),
        (lib.merge_many_q_dcoef.default, ([b], [q8.qdata], [q8.scales], [], 8, 0, "reference")),
        (lib.merged_linear_q.default, (x, w0, *q4.components(), c, b0, tb, cb, 4, 4, "reference")),
        (lib.merged_linear_q.default, (x, w0, *q8.components(), c, None, None, None, 8, 0, "reference")),
        (lib.merged_linear_q_backward.default, (torch.randn(6, 4), x.detach(), w0, *q8.components(), c.detach(), tb,
                                                True, True, True, 8, 0, "reference")),
    ]


@pytest.mark.parametrize("i", range(9))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    K = 3
    w0, q = torch.randn(8, 6), _qt(K, (8, 6), "int4", 0, group_size=4)
    ln0, qln = torch.randn(2, 8), _qt(K, (2, 8), "int8", 1)

    def f(x, c):
        (g,) = af.merge_many([ln0], [qln], c[1:2], backend="reference")
        h = af.merged_linear(x, w0, q, c[0], backend="reference") * g[0]
        return af.entropy(h, backend="reference").mean()

    x = torch.randn(5, 6)
    c1 = torch.rand(2, K, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_()
    eager = f(x, c1)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, c2)
    compiled.backward()
    assert_close(compiled, eager.double(), F32, "compiled loss")
    assert_close(c2.grad, c1.grad.double(), F32, "compiled grad")


_q = _qt(2, (3, 5), "int8", 0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: af.merge(torch.zeros(3, 4), _q, torch.zeros(2)), r"merge: deltas: .*shape \[K, 3, 4\]"),
        (lambda: af.merge(torch.zeros(3, 5), _q, torch.zeros(3)), r"coef must have shape \[K\]=\[2\]"),
        (lambda: af.merge(torch.zeros(3, 5), _q._replace(scales=_q.scales[:, :2]), torch.zeros(2)),
         r"scales must have shape \[2, 3\]"),
        (lambda: af.merged_linear(torch.zeros(1, 5), torch.zeros(3, 5), _q, torch.zeros(2), torch.zeros(3),
                                  _q, torch.zeros(2)), "tau_b must be a dense tensor"),
        (lambda: af.merge_many([torch.zeros(3, 5), torch.zeros(3)], [_q, torch.zeros(3, 3)], torch.zeros(2, 2)),
         r"merge_many\[1\]: coefs\[i\] must have shape \[K\]=\[3\], got \[2\]"),
        (lambda: af.merge_many([torch.zeros(3, 4)], [_q], torch.zeros(1, 2)), r"merge_many\[0\]: deltas"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------------------------- C++ extension
try:
    import adamerge_fast._C  # noqa: F401

    HAVE_EXT = True
except ImportError:  # pragma: no cover - depends on the build
    HAVE_EXT = False


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("K", [1, 5, 8, 11])
@pytest.mark.parametrize("shape", [(1, 70_001), (3, 33_000), (2_000, 129), (100_003,)])
@pytest.mark.ext
def test_cpu_kernels_large(fmt, K, shape):
    """Rows longer than a work unit (split columns), many short rows per unit, K > 8 (blocked merge, dots in groups
    of 8): k_merge_q, k_dcoef_q and the one-pass k_merge_dcoef_q against the dequantized float64 formula; the
    one-pass merge is bitwise the k_merge_q merge."""
    if not HAVE_EXT:
        pytest.skip("adamerge_fast._C is not built")
    lib = torch.ops.adamerge_fast
    qt = _qt(K, shape, fmt, K)
    base, grad, coef = _rand(shape, BF16, "cpu"), _rand(shape, F32, "cpu"), torch.rand(K)
    parts = (*qt.components(), qt.bits, qt.group_size)
    d64 = qt.dequantize(F64)
    out = lib.k_merge_q(base, qt.qdata, qt.scales, qt.zeros, coef, *parts[3:])
    assert_close(out, base.double() + torch.tensordot(coef.double(), d64, 1), BF16, "k_merge_q")
    dc = lib.k_dcoef_q(grad, *parts)
    assert_close(dc, torch.tensordot(d64, grad.double(), grad.dim()), F32, "k_dcoef_q")
    w, dc2 = lib.k_merge_dcoef_q(base, qt.qdata, qt.scales, qt.zeros, coef, grad, *parts[3:])
    assert torch.equal(w, out)
    assert_close(dc2, dc.double(), F32, "k_merge_dcoef_q")


@pytest.mark.ext
def test_cpu_deterministic_across_threads():
    if not HAVE_EXT:
        pytest.skip("adamerge_fast._C is not built")
    lib = torch.ops.adamerge_fast
    qt = _qt(8, (300, 4099), "int4", 0)
    grad, coef = _rand((300, 4099), F32, "cpu"), torch.rand(8)
    old = torch.get_num_threads()
    try:
        runs = []
        for nt in (old, 1, old):
            torch.set_num_threads(nt)
            runs.append((lib.k_dcoef_q(grad, *qt.components(), 4, 128),
                         lib.k_merge_q(grad, *qt.components(), coef, 4, 128)))
    finally:
        torch.set_num_threads(old)
    for dc, mg in runs[1:]:
        assert torch.equal(dc, runs[0][0]) and torch.equal(mg, runs[0][1])


_ISA_SCRIPT = """
import sys, torch
import adamerge_fast._C  # noqa: F401
ops = torch.ops.adamerge_fast
inp = torch.load(sys.argv[1])
res = {"isa": ops.k_cpu_isa(), "merge": [ops.k_merge_q(b, *p, c, bits, gs) for b, p, c, bits, gs in inp],
       "dcoef": [ops.k_dcoef_q(b.float().nan_to_num(0, 0, 0).clamp(-1e3, 1e3), *p, bits, gs)
                 for b, p, c, bits, gs in inp]}
torch.save(res, sys.argv[2])
"""


@pytest.mark.ext
def test_cpu_isa_copies_agree(tmp_path):
    """The quantized loops are compiled twice too (baseline, AVX2): merges bitwise equal (bf16 rounding, NaN, +-inf
    and overflow of the last two cases included: the AVX2 loops round bf16 with integer SIMD), dots to rounding."""
    if not HAVE_EXT:
        pytest.skip("adamerge_fast._C is not built")
    inp = []
    for i, (bd, fmt, K, shape) in enumerate([(F32, "int8", 8, (7, 1001)), (BF16, "int4", 3, (5, 257)),
                                             (F16, "int4", 11, (3, 129)), (F32, "int8", 11, (2, 33)),
                                             (BF16, "int8", 8, (3, 300)), (BF16, "int4", 8, (3, 300))]):
        qt = _qt(K, shape, fmt, i)
        base, coef = _rand(shape, bd, "cpu"), torch.rand(K)
        if i >= 4:  # specials, values that round up to inf in bf16, and huge coefficients
            flat = base.view(-1)
            flat[::7], flat[1::11], flat[2::13], flat[3::5] = float("nan"), float("inf"), -float("inf"), 3.3895e38
            coef = coef * 1e38
        inp.append((base, qt.components(), coef, qt.bits, qt.group_size))
    torch.save(inp, tmp_path / "in.pt")
    runs = {}
    for isa in ("base", "auto"):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("ADAMERGE_CPU_ISA", None)
        if isa == "base":
            env["ADAMERGE_CPU_ISA"] = "base"
        r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / f"{isa}.pt")],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[isa] = torch.load(tmp_path / f"{isa}.pt")
    assert runs["base"]["isa"] == "base"
    for a, b in zip(runs["base"]["merge"], runs["auto"]["merge"], strict=True):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32), b.view(
            torch.int16 if b.element_size() == 2 else torch.int32))
    for a, b in zip(runs["base"]["dcoef"], runs["auto"]["dcoef"], strict=True):
        assert_close(a, b.double(), F32, "dcoef isa")


@pytest.mark.ext
def test_cpu_schemas_and_checks():
    if not HAVE_EXT:
        pytest.skip("adamerge_fast._C is not built")
    lib = torch.ops.adamerge_fast
    q8, q4 = _qt(3, (4, 9), "int8", 0), _qt(3, (4, 9), "int4", 1, group_size=4)
    b, c = torch.randn(4, 9), torch.rand(3)
    for fn, args in [
        (lib.k_merge_q.default, (b, *q4.components(), c, 4, 4)),
        (lib.k_merge_q.default, (b, *q8.components(), c, 8, 0, torch.empty(4, 9))),
        (lib.k_dcoef_q.default, (b, *q4.components(), 4, 4)),
        (lib.k_merge_many_q.default, ([b, b[:2]], [q8.qdata, q8.qdata[:, :2]], [q8.scales, q8.scales[:, :2]], [],
                                      torch.rand(2, 3), 8, 0)),
        (lib.k_dcoef_many_q.default, ([b], [q4.qdata], [q4.scales], [q4.zeros], 4, 4)),
        (lib.k_merge_dcoef_q.default, (b, *q8.components(), c, b, 8, 0)),
    ]:
        torch.library.opcheck(fn, args, test_utils=("test_schema",))
    bad = [
        (lambda: lib.k_merge_q(b, *q8.components(), c, 4, 4), "qdata must be uint8 for bits=4"),
        (lambda: lib.k_merge_q(b, *q4.components(), c, 4, 3), "group_size must be even"),
        (lambda: lib.k_merge_q(b[:, :8], *q8.components(), c, 8, 0), r"qdata must have shape \[3, 4, 8\]"),
        (lambda: lib.k_merge_q(b, *q8.components(), c[:2], 8, 0), r"coef must have shape \[K\]=\[3\]"),
        (lambda: lib.k_merge_q(b.double(), *q8.components(), c, 8, 0), "float64 runs on the reference backend"),
        (lambda: lib.k_merge_q(b, q4.qdata, q4.scales, None, c, 4, 4), "need zero points"),
        (lambda: lib.k_dcoef_q(b, q8.qdata, q8.scales.double(), None, 8, 0), "scales must be float32"),
        (lambda: lib.k_merge_many_q([b], [q8.qdata], [q8.scales], [], torch.rand(1, 2), 8, 0),
         "holds K=3 task vectors but coefs has K=2"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.ext
def test_cpu_backend_routes_fp64_to_reference():
    if not HAVE_EXT:
        pytest.skip("adamerge_fast._C is not built")
    qt = _qt(2, (3, 129), "int4", 0)
    base, coef = _rand((3, 129), F64, "cpu"), torch.rand(2, dtype=F64)
    out = ops.get_backend("cpu").merge_q(base, qt, coef)
    assert out.dtype == F64
    assert_close(out, base + torch.tensordot(coef, qt.dequantize(F64), 1), F64, "fp64 merge_q")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("M", [16, 4096])
def test_cuda_triton_quantized_linear_peak_memory(fmt, M):
    """On a GPU: forward + backward of a 4096x4096 bf16 layer over 8 quantized task vectors (triton) holds no dense
    ``[K, out, in]`` task vectors and no fp32 ``[out, in]`` weight gradient: above the inputs, the activations plus
    (large M, just-in-time strategy) one bf16 ``[out, in]`` scratch of this layer."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w0 = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    qt = quantize(torch.randn(8, 4096, 4096, device=dev) * 0.01, fmt)
    x = torch.randn(M, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cw = torch.rand(8, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = af.merged_linear(x, w0, qt, cw, backend="triton")
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    activations = 6 * M * 4096 * 4  # y, its fp32 square and gradient, dx, dy in fp32 at most
    scratch = 0 if M <= 16 else 4096 * 4096 * 2
    assert extra < activations + scratch + (8 << 20), f"peak {extra / 2**20:.1f} MiB above the inputs"
    assert torch.isfinite(cw.grad).all() and torch.isfinite(x.grad).all()
