"""``ops.linear_entropy`` (a linear head, optionally merged, fused with the softmax entropy) on every backend
against float64 autograd of the unfused formula ``entropy(h @ W.T + b)``; the Triton tile kernel against the
plain-torch tile; opcheck, torch.compile, fast path = custom ops, clear errors."""

import pytest
import torch
from test_ops_contract import BACKENDS, _rand, _small

from _tol import assert_close, lowest
from adamerge_fast import ops
from adamerge_fast.ops import _library, reference
from adamerge_fast.ops import _linear_entropy as LE

F64 = torch.float64


def _unfused64(h, w, b, tw, cw, tb, cb):
    """The oracle: float64 autograd leaves and ``H = entropy(h @ W.T + b)`` per row."""
    leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b, cw, cb)]
    h64, w64, b64, cw64, cb64 = leaves
    W = w64 if tw is None else w64 + (cw64[:, None, None] * tw.double()).sum(0)
    B = None if b64 is None else (b64 if tb is None else b64 + (cb64[:, None] * tb.double()).sum(0))
    z = h64 @ W.t() + (0 if B is None else B)
    return leaves, -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


CASES = [  # (N, D, V, K or None (plain head), bias: None | "plain" | "merged", chunk)
    (1, 1, 1, None, None, None),
    (7, 5, 37, 3, "merged", 3),
    (7, 5, 37, None, "plain", 1),
    (33, 9, 130, 2, None, 8),
    (33, 9, 130, 1, "merged", 100),  # one tile holds every row
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (F64, F64), (torch.bfloat16, torch.float32)]  # (h, head); task vectors in the head's dtype


def _inputs(N, D, V, K, bias, hdt, wdt, dev, grads=True):
    h = _rand((N, D), hdt, dev).requires_grad_(grads)
    w = _rand((V, D), wdt, dev, 0.5).requires_grad_(grads)
    b = None if bias is None else _rand((V,), wdt, dev).requires_grad_(grads)
    tw = cw = tb = cb = None
    cdt = F64 if F64 in (hdt, wdt) else torch.float32  # coefficients
    if K is not None:
        tw, cw = _rand((K, V, D), wdt, dev, 0.2), torch.rand(K, device=dev, dtype=cdt).requires_grad_(grads)
        if bias == "merged":
            tb, cb = _rand((K, V), wdt, dev, 0.2), torch.rand(K, device=dev, dtype=cdt).requires_grad_(grads)
    return h, w, b, tw, cw, tb, cb


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-D{c[1]}-V{c[2]}-K{c[3]}-{c[4]}-c{c[5]}")
@pytest.mark.parametrize("hdt,wdt", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_unfused_float64(be, case, hdt, wdt, reduction):
    name, dev = be
    N, D, V, K, bias, chunk = case
    if _small(be) and (N > 7 or hdt != wdt or reduction == "sum"):
        pytest.skip("interpreter: subset")
    torch.manual_seed(N * 1000 + V)
    h, w, b, tw, cw, tb, cb = _inputs(N, D, V, K, bias, hdt, wdt, dev)
    out = ops.linear_entropy(h, w, b, tau_w=tw, coef_w=cw, tau_b=tb, coef_b=cb, reduction=reduction, chunk=chunk,
                             backend=name)
    leaves, H64 = _unfused64(h, w, b, tw, cw, tb, cb)
    ref = H64 if reduction == "none" else (H64.mean() if reduction == "mean" else H64.sum())
    assert out.dtype == (F64 if F64 in (hdt, wdt) else torch.float32) and out.shape == ref.shape
    g = torch.randn(out.shape, dtype=F64)
    (out * g.to(out.dtype).to(dev)).sum().backward()
    (ref * g).sum().backward()
    dt = lowest(hdt, wdt)
    assert_close(out, ref, dt, f"{reduction} value")
    for t, r, what in zip((h, w, b, cw, cb), leaves, ("dh", "dw", "db", "dcoef_w", "dcoef_b"), strict=True):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, what
            assert_close(t.grad, r.grad, dt, f"{reduction} {what}")


@pytest.mark.parametrize("be", BACKENDS)
def test_noncontiguous_leading_dims_and_no_grad(be):
    name, dev = be
    torch.manual_seed(3)
    h = _rand((2, 9, 6), torch.float32, dev).transpose(0, 1)[::2].requires_grad_()  # [5, 2, 6], strided
    w = _rand((6, 23), torch.float32, dev).t()  # [23, 6], non-contiguous
    tw = _rand((3, 6, 23), torch.float32, dev, 0.2).transpose(1, 2)  # [3, 23, 6]
    cw = torch.rand(3, device=dev, requires_grad=True)
    out = ops.linear_entropy(h, w, tau_w=tw, coef_w=cw, chunk=4, backend=name)
    assert out.shape == (5, 2)
    leaves, H64 = _unfused64(h.reshape(-1, 6), w, None, tw, cw, None, None)
    out.sum().backward()
    H64.sum().backward()
    assert_close(out.reshape(-1), H64, torch.float32, "strided value")
    assert_close(h.grad.reshape(-1, 6), leaves[0].grad, torch.float32, "strided dh")
    assert_close(cw.grad, leaves[3].grad, torch.float32, "strided dcoef_w")
    with torch.no_grad():
        assert_close(ops.linear_entropy(h, w, tau_w=tw, coef_w=cw, reduction="mean", backend=name), H64.mean(),
                     torch.float32, "no-grad mean")


@pytest.mark.parametrize("be", BACKENDS)
def test_large_logits_stay_finite(be):
    name, dev = be
    h = torch.tensor([[300.0, -2.0], [0.0, 0.0]], device=dev)
    w = torch.tensor([[1.0, 0.0], [0.99, 0.0], [0.0, 1.0]], device=dev, requires_grad=True)
    out = ops.linear_entropy(h, w, reduction="mean", backend=name)
    out.backward()
    _, H64 = _unfused64(h, w, None, None, None, None, None)
    assert_close(out, H64.mean(), torch.float32, "large logits")
    assert torch.isfinite(w.grad).all()


@pytest.mark.triton
@pytest.mark.parametrize("C,block", [(1, None), (37, 16), (130, 32), (300, None)])
@pytest.mark.parametrize("with_g", [False, True])
def test_triton_tile_matches_reference_tile(C, block, with_g):
    pytest.importorskip("triton")
    try:
        be = ops.get_backend("triton")
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    if not be.available(torch.device("cpu")):
        pytest.skip("triton backend unavailable on cpu")
    from adamerge_fast.ops.triton_kernels import linear_entropy as TK

    torch.manual_seed(C)
    z = torch.randn(5, C) * 3
    z[1, : C // 2] = float("-inf")  # -inf logits contribute 0
    g = torch.randn(5) if with_g else None
    for write in (False, True):
        a, b = z.clone(), z.double()
        h_tri = TK.entropy_tile_(a, g, write, block_c=block)
        h_ref = reference.entropy_tile_(b, None if g is None else g.double(), write)
        assert_close(h_tri, h_ref, torch.float32, "tile entropy")
        if write:
            assert_close(a, b, torch.float32, "tile gradient")
    with pytest.raises(ValueError, match="float32 tile"):
        TK.entropy_tile_(z.double(), None, True)


@pytest.mark.parametrize("be", BACKENDS)
def test_eager_fast_path_equals_custom_ops(be, monkeypatch):
    name, dev = be
    torch.manual_seed(4)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(_library, "EAGER_FAST_PATH", fast)
        torch.manual_seed(4)
        h, w, b, tw, cw, tb, cb = _inputs(6, 5, 19, 2, "merged", torch.float32, torch.float32, dev)
        vals = []
        for red in ("none", "mean"):
            out = ops.linear_entropy(h, w, b, tau_w=tw, coef_w=cw, tau_b=tb, coef_b=cb, reduction=red, chunk=4,
                                     backend=name)
            out.sum().backward()
            vals += [out.detach().clone()] + [t.grad.clone() for t in (h, w, b, cw, cb)]
            for t in (h, w, b, cw, cb):
                t.grad = None
        results.append(vals)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _opcheck_args():
    torch.manual_seed(5)
    h, w, b, tw, cw, tb, cb = _inputs(5, 4, 11, 2, "merged", torch.float32, torch.float32, "cpu")
    plain = (h, w, b, tw, cw, tb, cb)
    return [
        (LE.linear_entropy_op, (*plain, 2, "reference")),
        (LE.linear_entropy_op, (h, w.detach().requires_grad_(), None, None, None, None, None, 3, "reference")),
        (LE.linear_entropy_backward_op, (torch.randn(5), *[t.detach() for t in plain[:5]], tb, cb.detach(),
                                         True, True, True, True, True, 2, "reference")),
        (LE.linear_entropy_reduced_op, (*plain, 0.2, True, True, True, True, True, 2, "reference")),
        (LE.linear_entropy_reduced_op, (*plain, 1.0, False, False, False, True, False, 3, "reference")),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    op, args = _opcheck_args()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(6)
    h, w, b, tw, cw, tb, cb = _inputs(9, 5, 21, 3, "merged", torch.float32, torch.float32, "cpu")

    def f(h, cw, cb):
        H = ops.linear_entropy(h, w.detach(), b.detach(), tau_w=tw, coef_w=cw, tau_b=tb, coef_b=cb, chunk=4)
        return H.pow(2).sum() + ops.linear_entropy(h, w.detach(), tau_w=tw, coef_w=cw, reduction="mean", chunk=5)

    eager = f(h, cw, cb)
    g_eager = torch.autograd.grad(eager, (h, cw, cb))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(h, cw, cb)
    g_comp = torch.autograd.grad(compiled, (h, cw, cb))
    assert_close(compiled, eager.double(), torch.float32, "compiled value")
    for a, e in zip(g_comp, g_eager, strict=True):
        assert_close(a, e.double(), torch.float32, "compiled grad")


def test_default_chunk_bounds_the_tile():
    assert LE.default_chunk(128256) * 128256 * 4 <= LE.TILE_BYTES
    assert LE.default_chunk(10) == LE.TILE_BYTES // 40 and LE.default_chunk(10**12) == 1


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 3)), ValueError, r"h must be \[\*, D=3\]"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), bias=torch.randn(4)), ValueError, r"bias must be \[V=5\]"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), tau_w=torch.randn(2, 5, 4)), ValueError,
         "given together"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), tau_w=torch.randn(2, 5, 3), coef_w=torch.rand(2)),
         ValueError, r"deltas must have shape \[K, \*base.shape\]"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), tau_b=torch.randn(2, 5), coef_b=torch.rand(2)),
         ValueError, "tau_b given without a bias"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), reduction="max"), ValueError, "reduction must be"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), chunk=0), ValueError, "chunk must be a positive int"),
        (dict(h=torch.zeros(0, 4), weight=torch.randn(5, 4), reduction="mean"), ValueError, "over zero rows"),
        (dict(h=torch.randn(3, 4).int(), weight=torch.randn(5, 4)), TypeError, "h: expected a floating dtype"),
        (dict(h=torch.randn(3, 4), weight=torch.randn(5, 4), tau_w=torch.randn(1, 5, 4, requires_grad=True),
              coef_w=torch.rand(1), reduction="mean"), RuntimeError, "task vectors tau_w / tau_b are not computed"),
    ],
)
def test_bad_inputs_raise_clear_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.linear_entropy(**kw)
