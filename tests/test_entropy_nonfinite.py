"""``ops.entropy`` on non-finite logits, on every backend available here (issue #11).

The semantics are those of the softmax-entropy formula in plain torch, with one exception kept on purpose:

- a row holding a NaN or a ``+inf``, or a row of only ``-inf``, gives ``H = NaN`` and a NaN gradient in every
  entry of the row (plain torch: ``softmax`` of such a row is NaN);
- a row with *some* ``-inf`` entries and at least one finite entry is exact: the ``-inf`` entries contribute 0
  (``p log p -> 0``, where plain torch's ``0 * -inf`` would give NaN) and get a zero gradient.

Backends: ``reference`` and ``cpu`` always, ``triton`` through the interpreter (marked ``triton``), ``cuda`` and
Triton on a GPU when one is present (marked ``gpu``; run by ``make gpu-check``).
"""

import pytest
import torch
from _fixtures import backend_params

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast import ops

INF, NAN = float("inf"), float("nan")

# the Triton interpreter computes with numpy, which warns on the NaN/inf arithmetic these tests are about
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def _bad_rows(z: torch.Tensor) -> torch.Tensor:
    """The rows whose entropy is NaN: a NaN or a +inf, or every entry -inf."""
    return torch.isnan(z).any(-1) | (z == INF).any(-1) | (z == -INF).all(-1)


def _rows(C: int) -> torch.Tensor:
    """Logits ``[N, C]`` (fp64) exercising every case (see :func:`_bad_rows` for those that must be NaN). Special
    entries sit in the first and in the last columns, so that a chunked kernel meets them in
    different chunks than the row's maximum."""
    g = torch.Generator().manual_seed(C)
    z = torch.randn(14, C, generator=g, dtype=torch.float64) * 3
    z[0] = NAN  # all NaN
    z[1, C - 1] = NAN  # one NaN, last column
    z[2, 0] = NAN  # one NaN, first column
    z[3] = INF  # all +inf ([inf, inf])
    z[4, C - 1] = INF  # one +inf among finite entries
    z[5] = -INF  # all -inf
    z[6] = -INF
    z[6, C - 1] = NAN  # -inf and a NaN
    z[7] = -INF
    z[7, C // 2] = INF  # -inf and a +inf
    z[8, : C // 2] = -INF  # partial -inf: exact
    z[9] = -INF
    z[9, C - 1] = 2.0  # one finite entry, last column: H = 0
    z[10, ::3] = -INF  # scattered -inf
    z[11] *= 1e4  # large, finite
    z[12, 1:] = -INF  # one finite entry, first column
    # row 13: ordinary finite logits
    return z


def _exact_oracle(z64: torch.Tensor) -> torch.Tensor:
    """float64 entropy of rows with at least one finite entry and no NaN/+inf; ``-inf`` entries contribute 0."""
    logp = torch.log_softmax(z64, -1)
    p = logp.exp()
    return -torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)


@pytest.mark.parametrize("be", backend_params())
@pytest.mark.parametrize("C", [1, 2, 7, 40])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_entropy_non_finite_rows(be, C, dt):
    name, dev = be
    z = _rows(C).to(dt).to(dev).requires_grad_()
    zq = z.detach().cpu().double()  # the values the op sees (fp16 overflows the large row to inf)
    bad_t = _bad_rows(zq)
    assert bad_t.any() and not bad_t.all()
    h = af.entropy(z, backend=name)
    g = torch.rand(14, dtype=torch.float64) + 0.5
    h.backward(g.to(h.dtype).to(dev))
    h, dz = h.detach().cpu(), z.grad.cpu()

    # the NaN rows are those of the plain-torch formula
    plain = -(torch.softmax(zq, -1) * torch.log_softmax(zq, -1)).sum(-1)
    assert torch.isnan(plain[bad_t]).all()
    assert torch.equal(torch.isnan(h), bad_t), f"NaN rows {torch.isnan(h).tolist()} != expected {bad_t.tolist()}"
    assert torch.isnan(dz[bad_t]).all(), "every entry of a NaN row has a NaN gradient"
    # every other row is exact, with finite gradients and 0 at the -inf entries
    ok = ~bad_t
    ref = zq[ok].clone().requires_grad_()
    h64 = _exact_oracle(ref)
    h64.backward(g[ok])
    assert_close(h[ok], h64, dt, f"H on finite rows ({name}, {dt})")
    assert torch.isfinite(dz[ok]).all()
    assert_close(dz[ok], ref.grad, dt, f"dH/dz ({name}, {dt})")
    assert (dz[ok][zq[ok] == -INF] == 0).all()


@pytest.mark.parametrize("be", backend_params())
def test_entropy_nan_survives_leading_dims_and_mean(be):
    """The batch-mean loss AdaMerging minimises is NaN as soon as one row is: the optimizer sees it."""
    name, dev = be
    z = torch.randn(2, 3, 5, device=dev)
    z[1, 2, 4] = NAN
    h = af.entropy(z, backend=name)
    assert h.shape == (2, 3)
    assert torch.isnan(h[1, 2]) and torch.isfinite(h.flatten()[:-1]).all()
    assert torch.isnan(h.mean())


@pytest.mark.triton
@pytest.mark.parametrize("block_c", [16, 64])
def test_triton_kernel_chunks_non_finite(block_c):
    """The chunked online update of the Triton kernel: a NaN/+inf in a later chunk than the row's maximum, an
    all -inf first chunk followed by a finite entry (exact), and all -inf over several chunks (NaN)."""
    pytest.importorskip("triton")
    from adamerge_fast.ops.triton_kernels import entropy as ent

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    C = 150
    z = torch.randn(6, C, device=dev) * 2
    z[0, 0] = 50.0
    z[0, C - 1] = NAN  # NaN after the maximum's chunk
    z[1, 0] = 50.0
    z[1, C - 1] = INF  # +inf after the maximum's chunk
    z[2] = -INF  # all -inf over several chunks
    z[3, : C - 1] = -INF  # -inf chunks, then one finite entry: H = 0
    z[4, : block_c] = -INF  # first chunk all -inf, the rest finite: exact
    z[5, 0] = INF  # +inf in the first chunk, finite after it
    h = ent.entropy_fwd(z, block_c=block_c).cpu()
    assert torch.isnan(h[[0, 1, 2, 5]]).all()
    assert h[3] == 0
    assert_close(h[4:5], _exact_oracle(z[4:5].double().cpu()), torch.float32, "exact row after a -inf chunk")
    dz = ent.entropy_bwd(torch.ones(6, device=dev), z, block_c=block_c).cpu()
    assert torch.isnan(dz[[0, 1, 2, 5]]).all()
    assert torch.equal(dz[3], torch.zeros(C))
    assert torch.isfinite(dz[4]).all() and (dz[4, :block_c] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_entropy_non_finite_on_gpu(name):
    """The CUDA kernel (csrc/cuda/kernels.cu) and the compiled Triton kernel on a GPU: same NaN rows and
    gradients as the reference backend on the same logits."""
    try:
        be = ops.get_backend(name)
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    if not be.available(torch.device("cuda")):
        pytest.skip(be.unavailable_reason(torch.device("cuda")))
    for C in (2, 40, 5000):
        z64 = _rows(C)
        for dt in (torch.float32, torch.bfloat16):
            bad = _bad_rows(z64.to(dt).double())
            z = z64.to(dt).cuda().requires_grad_()
            h = af.entropy(z, backend=name)
            h.sum().backward()
            zr = z64.to(dt).requires_grad_()
            hr = af.entropy(zr, backend="reference")
            hr.sum().backward()
            assert torch.equal(torch.isnan(h.detach().cpu()), bad), (C, dt)
            assert torch.equal(torch.isnan(z.grad.cpu()), torch.isnan(zr.grad)), (C, dt)
            ok = ~bad
            assert_close(h.detach().cpu()[ok], hr.detach()[ok].double(), dt, f"{name} H C={C}")
