"""Property tests (hypothesis): ``merge``, ``merge_many``, ``merged_linear`` and ``entropy`` on every backend
available here, on drawn shapes (1 and primes among them), K, dtypes, layouts (contiguous, transposed, strided,
offset into a larger buffer) and coefficient values, against a float64 oracle at the tolerance of ``tests/_tol.py``.

Marked ``props``. ``make test`` runs a small derandomized profile (a few cases per op and backend); ``make
test-props`` runs the full one (``ADAMERGE_PROPS=full``: at least 1000 cases per backend, random seeds) and, with
``ADAMERGE_PROPS_REPORT=FILE``, writes the number of cases each backend ran to FILE (JSON). Triton runs through the
interpreter on the CPU (small shapes), compiled on a GPU.
"""

import json
import os
from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
from _fixtures import backend_params  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import adamerge_fast as af  # noqa: E402
from _tol import assert_close, lowest  # noqa: E402

pytestmark = pytest.mark.props

FULL = os.environ.get("ADAMERGE_PROPS", "") == "full"
OPS = ("merge", "merge_many", "merged_linear", "entropy")
PER_BACKEND = 1000  # full profile: at least this many cases per backend, split over the ops
N_EXAMPLES = -(-PER_BACKEND // len(OPS)) if FULL else 6
PROFILE = settings(
    max_examples=N_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not FULL,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
SIZES = [1, 2, 3, 5, 7, 8, 13, 16, 31, 47, 64, 97, 131]  # 1, powers of two, primes
LAYOUTS = ["contiguous", "transposed", "strided", "offset"]
CASES: Counter = Counter()  # (backend, op) -> cases run


BACKENDS = backend_params()


def _interpreted(be) -> bool:
    return be[0] == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("ADAMERGE_PROPS_REPORT")
    if path:
        per_backend: dict = {}
        for (be, op), n in sorted(CASES.items()):
            per_backend.setdefault(be, {})[op] = n
        for ops_ in per_backend.values():
            ops_["total"] = sum(ops_.values())
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"profile": "full" if FULL else "small", "cases": per_backend}, f, indent=1)


# ------------------------------------------------------------------------------------------- drawing
def _tensor(shape, dtype, layout, gen, device, scale=1.0) -> torch.Tensor:
    """A tensor of ``shape`` whose memory layout is ``layout`` (values: standard normal times ``scale``)."""
    shape = tuple(shape)

    def randn(*s):
        return (torch.randn(*s, generator=gen, dtype=F64) * scale).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        t = randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    elif layout == "strided" and len(shape) >= 1:
        t = randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "offset":
        n = 1
        for s in shape:
            n *= s
        t = randn(n + 3)[3:].view(shape)  # a storage offset: pointers not aligned to 16 bytes
    else:
        t = randn(*shape)
    return t.to(device)


@st.composite
def _shape(draw, max_dims=3, max_numel=20000):
    dims = draw(st.integers(1, max_dims))
    shape = []
    for _ in range(dims):
        shape.append(draw(st.sampled_from(SIZES)))
    while len(shape) > 1 and _numel(shape) > max_numel:
        shape.pop()
    return tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _coefs(K):
    special = st.sampled_from([0.0, 1.0, -1.0, 0.3])
    return st.lists(st.one_of(special, st.floats(-2.0, 2.0, allow_nan=False, width=32)), min_size=K, max_size=K)


MERGE_DTYPES = [(F32, F32), (F32, BF16), (F32, F16), (F16, F16), (BF16, BF16), (F64, F64)]


def _merge_oracle(base, deltas, coef64):
    K = deltas.shape[0]
    return base.double() + (coef64.reshape(K, *[1] * base.dim()) * deltas.double()).sum(0)


# ----------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("be", BACKENDS)
def test_merge_property(be):
    name, dev = be
    small = _interpreted(be)

    @PROFILE
    @given(data=st.data())
    def check(data):
        shape = data.draw(_shape(max_numel=2048 if small else 20000), "shape")
        K = data.draw(st.integers(1, 5 if small else 9), "K")
        bdt, ddt = data.draw(st.sampled_from(MERGE_DTYPES), "dtypes")
        lb, ld = data.draw(st.sampled_from(LAYOUTS), "base layout"), data.draw(st.sampled_from(LAYOUTS), "layout")
        coef_v = data.draw(_coefs(K), "coef")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
        base = _tensor(shape, bdt, lb, gen, dev).requires_grad_()
        deltas = _tensor((K, *shape), ddt, ld, gen, dev, 0.1).requires_grad_()
        coef = torch.tensor(coef_v, dtype=F32, device=dev, requires_grad=True)
        out = af.merge(base, deltas, coef, backend=name)
        assert out.dtype == bdt and out.shape == shape
        g = _tensor(shape, bdt, "contiguous", gen, dev)
        (out.double() * g.double()).sum().backward()
        b64, d64, c64 = (t.detach().double().requires_grad_() for t in (base, deltas, coef))
        ref = _merge_oracle(b64, d64, c64)
        (ref * g.double()).sum().backward()
        assert_close(out, ref, bdt, f"merge {shape} K={K} {bdt}/{ddt} {lb}/{ld}")
        assert_close(coef.grad, c64.grad, lowest(bdt, ddt, F32), "merge dcoef")
        assert_close(base.grad, b64.grad, bdt, "merge dbase")
        assert_close(deltas.grad, d64.grad, lowest(bdt, ddt), "merge ddeltas")
        CASES[(f"{name}-{dev}", "merge")] += 1

    check()


@pytest.mark.parametrize("be", BACKENDS)
def test_merge_many_property(be):
    name, dev = be
    small = _interpreted(be)

    @PROFILE
    @given(data=st.data())
    def check(data):
        n = data.draw(st.integers(1, 5), "n")
        K = data.draw(st.integers(1, 4 if small else 9), "K")
        ddt = data.draw(st.sampled_from([F32, BF16, F16]), "delta dtype")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
        shapes = [data.draw(_shape(max_numel=1024 if small else 8192), f"shape{i}") for i in range(n)]
        layouts = [data.draw(st.sampled_from(LAYOUTS), f"layout{i}") for i in range(n)]
        bases = [_tensor(s, F32, lay, gen, dev) for s, lay in zip(shapes, layouts, strict=True)]
        deltas = [_tensor((K, *s), ddt, lay, gen, dev, 0.1) for s, lay in zip(shapes, layouts, strict=True)]
        coef_v = [data.draw(_coefs(K), f"coefs{i}") for i in range(n)]
        coefs = torch.tensor(coef_v, dtype=F32, device=dev, requires_grad=True)
        outs = af.merge_many(bases, deltas, coefs, backend=name)
        grads = [_tensor(s, F32, "contiguous", gen, dev) for s in shapes]
        sum((o.double() * g.double()).sum() for o, g in zip(outs, grads, strict=True)).backward()
        c64 = coefs.detach().double().requires_grad_()
        refs = [_merge_oracle(b, d, c64[i]) for i, (b, d) in enumerate(zip(bases, deltas, strict=True))]
        sum((r * g.double()).sum() for r, g in zip(refs, grads, strict=True)).backward()
        for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
            assert o.shape == shapes[i]
            assert_close(o, r, F32, f"merge_many[{i}] {shapes[i]} K={K} {ddt} {layouts[i]}")
        assert_close(coefs.grad, c64.grad, F32, "merge_many dcoefs")
        CASES[(f"{name}-{dev}", "merge_many")] += 1

    check()


# --------------------------------------------------------------------------------------- merged_linear
ML_DTYPES = [(F32, F32), (F32, BF16), (BF16, F32), (F16, F16), (F32, F16), (BF16, BF16)]


@pytest.mark.parametrize("be", BACKENDS)
def test_merged_linear_property(be):
    name, dev = be
    small = _interpreted(be)
    sizes = [s for s in SIZES if s <= (47 if small else 131)]

    @PROFILE
    @given(data=st.data())
    def check(data):
        lead = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=1, max_size=2), "lead"))
        fin, fout = data.draw(st.sampled_from(sizes), "in"), data.draw(st.sampled_from(sizes), "out")
        K = data.draw(st.integers(1, 4 if small else 9), "K")
        xdt, tdt = data.draw(st.sampled_from(ML_DTYPES), "dtypes")
        bias = data.draw(st.sampled_from(["none", "fixed", "merged"]), "bias")
        lx, lw, lt = (data.draw(st.sampled_from(LAYOUTS), w) for w in ("x layout", "w0 layout", "tau layout"))
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
        x = _tensor((*lead, fin), xdt, lx, gen, dev).requires_grad_()
        w0 = _tensor((fout, fin), F32, lw, gen, dev, 0.2)
        tau = _tensor((K, fout, fin), tdt, lt, gen, dev, 0.05)
        cw = torch.tensor(data.draw(_coefs(K), "coef_w"), dtype=F32, device=dev, requires_grad=True)
        b0 = _tensor((fout,), F32, "contiguous", gen, dev) if bias != "none" else None
        tb = _tensor((K, fout), tdt, lt, gen, dev, 0.05) if bias == "merged" else None
        cb = (torch.tensor(data.draw(_coefs(K), "coef_b"), dtype=F32, device=dev, requires_grad=True)
              if bias == "merged" else None)
        y = af.merged_linear(x, w0, tau, cw, b0, tb, cb, backend=name)
        assert y.dtype == xdt and y.shape == (*lead, fout)
        dy = _tensor(y.shape, xdt, "contiguous", gen, dev)
        (y.double() * dy.double()).sum().backward()
        x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
        y64 = x64 @ _merge_oracle(w0, tau, cw64).t()
        cb64 = None
        if bias == "merged":
            cb64 = cb.detach().double().requires_grad_()
            y64 = y64 + _merge_oracle(b0, tb, cb64)
        elif bias == "fixed":
            y64 = y64 + b0.double()
        (y64 * dy.double()).sum().backward()
        tol = lowest(xdt, tdt if xdt != F32 else F32)
        what = f"merged_linear x{(*lead, fin)} out={fout} K={K} {xdt}/{tdt} {bias} {lx}/{lw}/{lt}"
        assert_close(y, y64, tol, what)
        assert_close(x.grad, x64.grad, tol, f"{what}: dx")
        assert_close(cw.grad, cw64.grad, tol, f"{what}: dcoef_w")
        if cb is not None:
            assert_close(cb.grad, cb64.grad, tol, f"{what}: dcoef_b")
        CASES[(f"{name}-{dev}", "merged_linear")] += 1

    check()


# --------------------------------------------------------------------------------------------- entropy
def _entropy_oracle(z64):
    logp = torch.log_softmax(z64, -1)
    p = logp.exp()
    return -torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)


@pytest.mark.parametrize("be", BACKENDS)
def test_entropy_property(be):
    name, dev = be
    small = _interpreted(be)

    @PROFILE
    @given(data=st.data())
    def check(data):
        N = data.draw(st.sampled_from([s for s in SIZES if s <= (13 if small else 131)]), "N")
        C = data.draw(st.sampled_from(SIZES + ([] if small else [257, 1031, 5003])), "C")
        lead = (N,) if data.draw(st.booleans(), "2d") else (2, N)
        dt = data.draw(st.sampled_from([F32, BF16, F16, F64]), "dtype")
        layout = data.draw(st.sampled_from(LAYOUTS), "layout")
        scale = data.draw(st.sampled_from([1e-3, 0.3, 1.0, 5.0, 30.0]), "scale")
        masked = data.draw(st.sampled_from([0.0, 0.3, 0.9]), "-inf fraction")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
        z = _tensor((*lead, C), dt, layout, gen, "cpu", scale)
        if masked and C > 1:  # partial -inf rows: every row keeps its first entry finite
            m = torch.rand(z.shape, generator=gen) < masked
            m[..., 0] = False
            z = z.masked_fill(m, float("-inf"))
        z = z.to(dev).requires_grad_()
        h = af.entropy(z, backend=name)
        assert h.shape == lead and h.dtype == (F64 if dt == F64 else F32)
        g = _tensor(lead, F32, "contiguous", gen, dev)
        (h.double() * g.double()).sum().backward()
        z64 = z.detach().double().requires_grad_()
        h64 = _entropy_oracle(z64)
        (h64 * g.double()).sum().backward()
        what = f"entropy {(*lead, C)} {dt} {layout} scale={scale} masked={masked}"
        assert_close(h, h64, dt, what)
        assert_close(z.grad, z64.grad, dt, f"{what}: dz")
        CASES[(f"{name}-{dev}", "entropy")] += 1

    check()
