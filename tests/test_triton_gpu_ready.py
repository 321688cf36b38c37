"""Regression tests of the GPU-readiness defects of issue 12 (section 2) that the CPU can check: the Triton kernels
through the interpreter (``TRITON_INTERPRET=1``, conftest), the launchers' decisions with the GPU-only inputs (device,
capture state, timings) replaced, and the build flags. ``tests/test_gpu.py`` checks the rest on a GPU.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import adamerge_fast  # noqa: E402
from _tol import assert_close  # noqa: E402
from adamerge_fast.ops import get_backend  # noqa: E402

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module")
def be():
    b = get_backend("triton")
    if b.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton kernels run on the CPU only through the interpreter (TRITON_INTERPRET=1)")
    return b


@pytest.fixture(scope="module")
def km():
    from adamerge_fast.ops.triton_kernels import merge

    return merge


@pytest.fixture(scope="module")
def ml():
    from adamerge_fast.ops.triton_kernels import merged_linear

    return merged_linear


def _randn(*shape, dtype=F32, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _merge64(base, deltas, coef):
    return base.double() + (coef.double().reshape(-1, *[1] * base.dim()) * deltas.double()).sum(0)


def _dcoef64(grad, deltas):
    return (grad.double().unsqueeze(0) * deltas.double()).reshape(deltas.shape[0], -1).sum(1)


class _Count:
    """Stands in for a Triton kernel: counts launches, records the arguments, forwards them."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.kwargs = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(args)
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


# ------------------------------------------------------------------------------- item 1: fp32 matmul precision
@pytest.fixture
def restore_precision():
    """Put torch's matmul precision back as it was (new API first, then check the legacy getter works again)."""
    cuda_mm = torch.backends.cuda.matmul
    saved = (getattr(torch.backends, "fp32_precision", None), getattr(cuda_mm, "fp32_precision", None))
    yield
    if saved[0] is not None:
        torch.backends.fp32_precision = saved[0]
    if saved[1] is not None:
        cuda_mm.fp32_precision = saved[1]
    torch.get_float32_matmul_precision()  # raises if the test left a mixed legacy/new state behind


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new API")
def test_fp32_precision_new_api_and_mixed_state(be, restore_precision):
    """Issue 12 item 1: after ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` the legacy getter raises; the
    kernels read the setting without raising and honour it (and the legacy setter too)."""
    from adamerge_fast.ops.triton_kernels._common import fp32_dot_precision

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()  # the mixed state that made the old helper raise
    assert fp32_dot_precision() == "tf32"
    x, w0 = _randn(5, 33, seed=1), _randn(7, 33, scale=0.2, seed=2)
    tau, cw = _randn(2, 7, 33, scale=0.05, seed=3), _randn(2, seed=4)
    y = adamerge_fast.merged_linear(x, w0, tau, cw, backend="triton")  # raised before the fix
    ref = x.double() @ _merge64(w0, tau, cw).t()
    assert_close(y, ref, torch.float16, "fp32 merged_linear with tf32 dots")  # tf32: a 10-bit mantissa, like fp16
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert fp32_dot_precision() == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    torch.set_float32_matmul_precision("high")  # the legacy setter alone
    assert fp32_dot_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert fp32_dot_precision() == "ieee"


def test_fp32_precision_legacy_api_only(monkeypatch):
    """A torch without the new attribute: the legacy getter decides; when it raises, true fp32 ("ieee")."""
    from adamerge_fast.ops.triton_kernels import _common

    class NoNewApi:
        pass

    monkeypatch.setattr(_common.torch.backends.cuda, "matmul", NoNewApi())
    monkeypatch.setattr(_common.torch, "get_float32_matmul_precision", lambda: "medium")
    assert _common.fp32_dot_precision() == "tf32"
    monkeypatch.setattr(_common.torch, "get_float32_matmul_precision", lambda: "highest")
    assert _common.fp32_dot_precision() == "ieee"

    def mixed():
        raise RuntimeError("mix of the legacy and new APIs")

    monkeypatch.setattr(_common.torch, "get_float32_matmul_precision", mixed)
    assert _common.fp32_dot_precision() == "ieee"


# ------------------------------------------------------------------------------------- item 3: device guard
def test_every_kernel_method_runs_under_the_device_guard(be, monkeypatch):
    """Issue 12 item 3: Triton launches on the current device, so every kernel method enters a guard for the device
    of its tensors. The guard's choice of device is checked with torch.cuda's functions replaced."""
    from adamerge_fast.ops import triton_backend as tb
    from adamerge_fast.ops.triton_kernels import _common

    for name in tb.KERNEL_METHODS:
        assert getattr(getattr(tb.TritonBackend, name), "device_guarded", False), name
    entered = []

    class FakeDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_common.torch.cuda, "device", FakeDevice)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    with _common.device_guard(torch.device("cuda", 0)):  # already current: no switch
        pass
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [1]
    # the wrapper: a call whose first tensor is on cuda:1 runs inside device_guard(cuda:1)
    monkeypatch.setattr(tb, "_first_device", lambda args: torch.device("cuda", 1))
    base, deltas, coef = _randn(9), _randn(2, 9, seed=1), _randn(2, seed=2)
    out = be.merge(base, deltas, coef)
    assert entered == [1, 1]
    assert_close(out, _merge64(base, deltas, coef), F32, "merge under the guard")


# ----------------------------------------------------------------------- item 4: CUDA-graph capture of *_many
def test_many_ops_launch_per_tensor_while_capturing(be, km, monkeypatch):
    """Issue 12 item 4: while a CUDA graph is being captured the pointer table (a host-to-device copy that a replay
    would read again) is not built: every tensor goes through the capture kernels, whose arguments are kernel
    parameters. The capture state is simulated; results equal the oracle."""
    shapes = [(5,), (7, 3), (4100,), (1,), (4, 4, 4)]
    K = 3
    bases = [_randn(*s, seed=i) for i, s in enumerate(shapes)]
    deltas = [_randn(K, *s, dtype=BF16, scale=0.1, seed=10 + i) for i, s in enumerate(shapes)]
    coefs = _randn(len(shapes), K, seed=99)
    names = ("_merge_many_kernel", "_dcoef_many_partial_kernel", "_merge_one_kernel", "_dcoef_one_kernel")
    counts = {n: _Count(getattr(km, n)) for n in names}
    for n, c in counts.items():
        monkeypatch.setattr(km, n, c)
    monkeypatch.setattr(km, "capturing", lambda device: True)
    tables = []
    monkeypatch.setattr(km, "int64_table", lambda rows, device: tables.append(rows))  # must not be called
    outs = be.merge_many(bases, deltas, coefs)
    dcs = be.dcoef_many(bases, deltas)
    assert not counts["_merge_many_kernel"].calls and not counts["_dcoef_many_partial_kernel"].calls
    assert len(counts["_merge_one_kernel"].calls) == len(shapes) == len(counts["_dcoef_one_kernel"].calls)
    assert tables == []
    for i in range(len(shapes)):
        assert_close(outs[i], _merge64(bases[i], deltas[i], coefs[i]), BF16, f"merge_many[{i}] (capture path)")
        assert_close(dcs[i], _dcoef64(bases[i], deltas[i]), BF16, f"dcoef_many[{i}] (capture path)")


def test_eager_path_warms_the_capture_kernels(be, km, monkeypatch):
    """No kernel may be compiled or loaded during capture (cuModuleLoadData is refused then): the first eager call
    per (dtypes, alignment) group launches one tensor through the capture kernels, later calls do not."""
    monkeypatch.setattr(km, "_WARM", set())
    counts = {n: _Count(getattr(km, n)) for n in ("_merge_one_kernel", "_dcoef_one_kernel", "_merge_many_kernel")}
    for n, c in counts.items():
        monkeypatch.setattr(km, n, c)
    shapes = [(5,), (64,), (7, 3), (32,)]  # two unaligned, two aligned (16-element multiples)
    bases = [_randn(*s, seed=i) for i, s in enumerate(shapes)]
    deltas = [_randn(2, *s, scale=0.1, seed=10 + i) for i, s in enumerate(shapes)]
    coefs = _randn(len(shapes), 2, seed=9)
    for call in range(2):
        outs = be.merge_many(bases, deltas, coefs)
        dcs = be.dcoef_many(bases, deltas)
        expected = 2 if call == 0 else 0  # one per group, first call only
        assert len(counts["_merge_one_kernel"].calls) == expected == len(counts["_dcoef_one_kernel"].calls)
        assert len(counts["_merge_many_kernel"].calls) == 2  # one launch per group for the other tensors
        for c in counts.values():
            c.calls.clear()
        for i in range(len(shapes)):
            assert_close(outs[i], _merge64(bases[i], deltas[i], coefs[i]), F32, f"merge_many[{i}] call {call}")
            assert_close(dcs[i], _dcoef64(bases[i], deltas[i]), F32, f"dcoef_many[{i}] call {call}")


# ---------------------------------------------------------------------------- item 5: strategy tuning
@pytest.fixture
def clean_tuning(ml, monkeypatch):
    monkeypatch.setattr(ml, "_TUNED", {})
    monkeypatch.setattr(ml, "_FIXED", False)
    monkeypatch.setattr(ml, "_TABLE_LOADED_FROM_ENV", True)  # no ADAMERGE_TRITON_TUNE_TABLE from the environment
    return ml


def _key(M_unused=None, device="cpu"):
    return ("fwd", 13, 19, 3, F32, F32, BF16, True, torch.device(device))


def test_tuned_table_save_load_fixed(clean_tuning, tmp_path, monkeypatch):
    """Issue 12 item 5: a tuned table can be saved and loaded; a fixed table is never measured again and keys it
    lacks take the FUSED_MAX_M rule, so every process that loads it makes the same choices."""
    ml = clean_tuning
    timed = []
    monkeypatch.setattr(ml, "_can_measure", lambda device: True)
    monkeypatch.setattr(ml, "_bench_ms", lambda fn: timed.append(1) or (1.0 if len(timed) % 2 == 0 else 9.0))
    assert ml.choose_strategy(40, None, _key(), lambda s: None) == "jit"  # jit timed faster (1.0 vs 9.0)
    assert len(timed) == 2
    path = ml.save_tuned(tmp_path / "tuned.json")
    saved = ml.tuned_strategies()
    assert list(saved.values()) == ["jit"] and next(iter(saved))[:2] == ("fwd", 64)
    ml.reset_tuned()
    assert ml.tuned_strategies() == {}
    assert ml.load_tuned(path) == 1 and ml.tuned_strategies() == saved
    assert ml.choose_strategy(40, None, _key(), lambda s: pytest.fail("a fixed table is not measured")) == "jit"
    # a key the fixed table lacks: the FUSED_MAX_M rule, never a measurement
    other = ("fwd", 13, 19, 4, F32, F32, BF16, True, torch.device("cpu"))
    assert ml.choose_strategy(40, None, other, lambda s: pytest.fail("measured")) == "fused"
    assert ml.choose_strategy(ml.FUSED_MAX_M + 1, None, other, lambda s: pytest.fail("measured")) == "jit"
    assert len(timed) == 2
    # not fixed: stored entries are reused, missing keys measured
    ml.load_tuned(path, fixed=False)
    assert ml.choose_strategy(40, None, other, lambda s: None) == "jit" and len(timed) == 4


def test_tuned_table_from_environment_and_bad_files(clean_tuning, tmp_path, monkeypatch):
    ml = clean_tuning
    ml._TUNED[ml._table_key(_key(), 40)] = "jit"
    path = ml.save_tuned(tmp_path / "t.json")
    ml.reset_tuned()
    monkeypatch.setattr(ml, "_TABLE_LOADED_FROM_ENV", False)
    monkeypatch.setenv(ml.TUNE_TABLE_ENV, str(path))
    assert ml.choose_strategy(40, None, _key(), lambda s: pytest.fail("fixed table from the environment")) == "jit"
    assert ml._FIXED
    bad = tmp_path / "bad.json"
    bad.write_text('{"entries": [{"key": ["fwd", 64], "strategy": "fastest"}]}')
    with pytest.raises(ValueError, match="bad.json: not a tuned-strategy table"):
        ml.load_tuned(bad)
    with pytest.raises(ValueError, match="missing.json"):
        ml.load_tuned(tmp_path / "missing.json")


def test_near_tie_keeps_the_rule_and_capture_reuses_the_choice(clean_tuning, monkeypatch):
    """A measured difference within TIE_MARGIN does not override the FUSED_MAX_M rule (no flip-flopping between
    processes); once a key is measured, calls that cannot measure (CUDA-graph capture) reuse the measured choice
    instead of falling back to the rule (a captured graph runs what the warm-up ran)."""
    ml = clean_tuning
    monkeypatch.setattr(ml, "_can_measure", lambda device: True)
    times = iter([1.00, 0.99, 5.0, 1.0])  # (fused, jit) per key: a 1% tie, then jit 5x faster
    monkeypatch.setattr(ml, "_bench_ms", lambda fn: next(times))
    assert ml.choose_strategy(40, None, _key(), lambda s: None) == "fused"  # jit 1% faster: a tie, the rule wins
    k2 = ("fwd", 13, 19, 5, F32, F32, BF16, True, torch.device("cpu"))
    assert ml.choose_strategy(100, None, k2, lambda s: None) == "jit"
    monkeypatch.setattr(ml, "_can_measure", lambda device: False)  # e.g. capturing
    assert ml.choose_strategy(100, None, k2, lambda s: pytest.fail("measured")) == "jit"  # rule would say fused


def test_can_measure_conditions(clean_tuning, monkeypatch):
    ml = clean_tuning
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ml, "INTERPRET", False)
    monkeypatch.setattr(ml, "capturing", lambda device: False)
    assert ml._can_measure(cuda) == ml.TUNE
    assert not ml._can_measure(torch.device("cpu"))
    monkeypatch.setattr(ml, "capturing", lambda device: True)
    assert not ml._can_measure(cuda)
    monkeypatch.setattr(ml, "capturing", lambda device: False)
    monkeypatch.setattr(ml, "TUNE", False)  # ADAMERGE_TRITON_TUNE=0
    assert not ml._can_measure(cuda)
    monkeypatch.setattr(ml, "TUNE", True)
    monkeypatch.setattr(ml, "_FIXED", True)
    assert not ml._can_measure(cuda)


def test_fixed_choices_are_bitwise_reproducible(be, clean_tuning, monkeypatch):
    """With the choices fixed, two runs give the same bits (every Triton reduction has a fixed order)."""
    ml = clean_tuning
    monkeypatch.setattr(ml, "TUNE", False)
    x, w0 = _randn(40, 19, seed=1), _randn(13, 19, scale=0.2, seed=2)
    tau, cw = _randn(3, 13, 19, dtype=BF16, scale=0.05, seed=3), _randn(3, seed=4)
    dy = _randn(40, 13, seed=5)

    def run():
        y = be.merged_linear_fwd(x, w0, tau, cw, None, None, None)
        return (y, *be.merged_linear_bwd(dy, x, w0, tau, cw, None, True, True, False)[:2])

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- item 6: aligned / unaligned groups
def test_many_groups_by_alignment(be, km, monkeypatch):
    """Issue 12 item 6: the multi-tensor kernels launch once per (dtypes, 16-byte aligned) group; unaligned views
    (``w0[1:]`` in bf16) go to the unaligned variant, everything else to the vectorized one; both exact."""
    K = 2
    big = _randn(3, 64, dtype=BF16, seed=1)
    bases = [big[1:].reshape(-1)[1:], _randn(64, dtype=BF16, seed=2), _randn(48, dtype=BF16, seed=3), big[0]]
    dstack = _randn(K, 200, dtype=BF16, scale=0.1, seed=4)
    deltas = [dstack[:, 1 : 1 + bases[0].numel()], _randn(K, 64, dtype=BF16, seed=5),
              _randn(K, 48, dtype=BF16, seed=6), _randn(K, 64, dtype=BF16, seed=7)]  # fmt: skip
    flags = [km._aligned(b, *km.slices(d), b.numel()) for b, d in zip(bases, deltas, strict=True)]
    assert flags == [False, True, True, True]
    count = _Count(km._merge_many_kernel)
    monkeypatch.setattr(km, "_merge_many_kernel", count)
    monkeypatch.setattr(km, "_warm_first", lambda *a: {})  # every tensor through the table (no capture warm-up)
    coefs = _randn(4, K, seed=8)
    outs = be.merge_many(bases, deltas, coefs)
    assert sorted(kw["ALIGNED"] for kw in count.kwargs) == [False, True]  # one launch per group
    for i in range(4):
        assert_close(outs[i], _merge64(bases[i], deltas[i], coefs[i]), BF16, f"merge_many[{i}]")
    dcs = be.dcoef_many(bases, deltas)
    for i in range(4):
        assert_close(dcs[i], _dcoef64(bases[i], deltas[i]), BF16, f"dcoef_many[{i}]")


# ----------------------------------------------------------------------------- item 7: strided slices
def test_stack_slices_are_read_in_place(be, km, monkeypatch):
    """Issue 12 item 7: ``tau[:, lo:hi]`` (each slice contiguous, slices 3E apart) reaches the kernels as it is:
    no ``.contiguous()`` copy of K x E x in elements per call."""
    K, E, IN = 3, 8, 10
    tau = _randn(K, 3 * E, IN, dtype=BF16, scale=0.1, seed=1)
    sl = tau[:, E : 2 * E]
    assert not sl.is_contiguous()
    d, kstride = km.slices(sl)
    assert d is sl and kstride == 3 * E * IN
    count = _Count(km._merge_kernel)
    monkeypatch.setattr(km, "_merge_kernel", count)
    base, coef = _randn(E, IN, seed=2), _randn(K, seed=3)
    out = be.merge(base, sl, coef)
    (args,) = count.calls
    assert args[1].data_ptr() == sl.data_ptr() and args[6] == 3 * E * IN  # deltas pointer and slice stride
    assert_close(out, _merge64(base, sl, coef), BF16, "merge of a row slice")
    assert_close(be.dcoef(base, sl), _dcoef64(base, sl), BF16, "dcoef of a row slice")
    # a stack whose slices are not contiguous is still copied (and correct)
    tr = _randn(K, IN, E, seed=4).transpose(1, 2)
    d2, k2 = km.slices(tr)
    assert d2 is not tr and d2.is_contiguous() and k2 == E * IN
    assert_close(be.merge(base, tr, coef), _merge64(base, tr, coef), F32, "merge of a transposed stack")


# ---------------------------------------------------------------------------------- item 8: 64-bit offsets
_OVERFLOW_SCRIPT = textwrap.dedent(
    """
    import os, sys, resource
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from adamerge_fast.ops.triton_kernels import entropy as EN, merged_linear as ML

    S = (1 << 29) + 8  # element stride: 4 * S > 2^31, so int32 index products wrap
    buf = torch.empty(6 * S + 4096, dtype=torch.bfloat16)  # virtual memory; only the touched pages are used

    def view(offset, shape, strides, seed):
        v = buf.as_strided(shape, strides, offset)
        v.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        return v

    def close(a, b, what, tol=3e-2):
        err = (a.double() - b.double()).abs().max().item()
        scale = max(1.0, b.double().abs().max().item())
        assert err <= tol * scale, f"{what}: max error {err}"

    # entropy of a transposed [N, C] view: cols * stride_c passes 2^31
    z = view(0, (3, 6), (1, S), 1)
    z64 = z.double().requires_grad_()
    h64 = -(torch.softmax(z64, -1) * torch.log_softmax(z64, -1)).sum(-1)
    g = torch.rand(3)
    h64.backward(g.double())
    close(EN.entropy_fwd(z), h64, "entropy fwd")
    close(EN.entropy_bwd(g, z), z64.grad, "entropy bwd")
    # merged_linear: rows of x S apart (rm * stride_am), a column-major dy (rr * stride_ar in dx, ro * stride_dyo in
    # dcoef_w), task-vector rows S apart (ro * stride_to)
    M, IN, OUT, K = 6, 5, 6, 2
    x = view(100, (M, IN), (S, 1), 2)
    dy = view(200, (M, OUT), (1, S), 3)
    tau = view(300, (K, OUT, IN), (IN, S, 1), 4)
    w0 = torch.randn(OUT, IN).to(torch.bfloat16)
    cw = torch.rand(K)
    w64 = w0.double() + (cw.double()[:, None, None] * tau.double()).sum(0)
    for strategy in ("fused", "jit"):
        close(ML.merged_linear_fwd(x, w0, tau, cw, strategy=strategy), x.double() @ w64.t(), f"fwd {strategy}")
        close(ML.merged_linear_dx(dy, w0, tau, cw, torch.bfloat16, strategy=strategy), dy.double() @ w64,
              f"dx {strategy}")
    dw = dy.double().t() @ x.double()
    close(ML.merged_linear_dcoef_w(dy, x, tau), (dw[None] * tau.double()).sum((1, 2)), "dcoef_w")
    print("maxrss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def test_index_products_past_2_31_elements(tmp_path):
    """Issue 12 item 8: views whose index products pass 2^31 elements (a transposed logits view, a column-major
    ``dy``, strided rows of x and of the task vectors) give correct results. Run in a fresh interpreter: before
    the fix the wrapped int32 offsets read unmapped memory and crashed the process."""
    script = tmp_path / "overflow.py"
    script.write_text(_OVERFLOW_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rss = int(r.stdout.split("maxrss_mib")[1])
    assert rss < 4096, f"the views should touch only a few pages, used {rss} MiB"


# ---------------------------------------------------- item 10: two-level reduction, split-K, split-M, flags
def test_segment_sum_two_levels(km, monkeypatch):
    """Issue 12 item 10: long ranges of partial sums are reduced in two levels (fixed chunks, then the chunk
    sums), with and without a segment table; deterministic."""
    count = _Count(km._segment_sum_kernel)
    monkeypatch.setattr(km, "_segment_sum_kernel", count)
    P = 5 * km.CHUNK_ROWS + 7
    partial = _randn(P, 3, seed=1)
    out = km.segment_sum(partial, None, 1)
    assert len(count.calls) == 2
    assert_close(out, partial.double().sum(0, keepdim=True), F32, "two-level, one segment")
    assert torch.equal(out, km.segment_sum(partial, None, 1))
    bounds = [(0, 3), (3, 3), (3, 2 * km.CHUNK_ROWS + 1), (2 * km.CHUNK_ROWS + 1, P), (5, 9)]
    out = km.segment_sum(partial, bounds, len(bounds))
    ref = torch.stack([partial.double()[a:b].sum(0) for a, b in bounds])
    assert_close(out, ref, F32, "two-level, segments")
    g = _randn(3 * km.CHUNK_ROWS * km.DCOEF_BLOCK + 5, seed=2)
    d = _randn(2, g.numel(), dtype=BF16, seed=3)
    assert_close(km.dcoef(g, d), _dcoef64(g, d), BF16, "dcoef through two levels")


@pytest.mark.parametrize("bias", ["none", "plain", "merged"])
def test_split_k_fused_matches(be, ml, monkeypatch, bias):
    """Issue 12 item 10: the fused kernel with the reduction split over programs (fp32 partial products, then
    an ordered sum that adds the bias) equals the oracle, forward and dx."""
    monkeypatch.setattr(ml, "SPLIT_R", 3)
    count = _Count(ml._split_sum_kernel)
    monkeypatch.setattr(ml, "_split_sum_kernel", count)
    M, IN, OUT, K = 5, 150, 130, 2  # R = 150 (fwd) and 130 (dx): 3 BLOCK_R steps under the interpreter
    x, w0 = _randn(M, IN, seed=1), _randn(OUT, IN, scale=0.1, seed=2)
    tau, cw = _randn(K, OUT, IN, dtype=BF16, scale=0.02, seed=3), _randn(K, seed=4)
    b0 = None if bias == "none" else _randn(OUT, seed=5)
    tau_b, cb = (_randn(K, OUT, scale=0.1, seed=6), _randn(K, seed=7)) if bias == "merged" else (None, None)
    y = be.merged_linear_fwd(x, w0, tau, cw, b0, tau_b, cb, strategy="fused")
    ref = x.double() @ _merge64(w0, tau, cw).t()
    if b0 is not None:
        ref = ref + (_merge64(b0, tau_b, cb) if tau_b is not None else b0.double())
    assert_close(y, ref, BF16, "split-K forward")
    dy = _randn(M, OUT, seed=8)
    dx, _, _ = be.merged_linear_bwd(dy, x, w0, tau, cw, None, True, False, False, strategy="fused")
    assert_close(dx, dy.double() @ _merge64(w0, tau, cw), BF16, "split-K dx")
    assert len(count.calls) == 2


def test_split_m_dcoef_w_matches(ml, monkeypatch):
    monkeypatch.setattr(ml, "SPLIT_M", 3)
    M, IN, OUT, K = 150, 20, 24, 3
    dy, x = _randn(M, OUT, seed=1), _randn(M, IN, seed=2)
    tau = _randn(K, OUT, IN, dtype=BF16, seed=3)
    dc = ml.merged_linear_dcoef_w(dy, x, tau)
    dw = dy.double().t() @ x.double()
    assert_close(dc, (dw[None] * tau.double()).sum((1, 2)), BF16, "split-M dcoef_w")


def test_split_heuristics(ml):
    """The split counts the launchers pick on a GPU (132 SMs): a 768-wide layer at M <= 16 has 24 output tiles, so
    the fused kernel splits R; a grid that fills the GPU does not split."""
    assert ml.split_k_count(tiles=24, steps=24, sms=132, out_bytes=4 * 16 * 768) == 11  # ceil(264 / 24)
    assert ml.split_k_count(tiles=24, steps=4, sms=132, out_bytes=4 * 16 * 768) == 4  # at most one per R step
    assert ml.split_k_count(tiles=200, steps=24, sms=132, out_bytes=1) == 1
    assert ml.split_m_count(tiles=144, steps=512, sms=132) == 4  # 768x768 at M = 16384: 144 tiles
    assert ml.split_m_count(tiles=144, steps=8, sms=132) == 1  # short M: every split would re-read tau
    assert ml.split_m_count(tiles=300, steps=512, sms=132) == 1


def _setup_function(name):
    """The function ``name`` of setup.py (with ``_cuda_arch_flags``), without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in (name, "_cuda_arch_flags")]
    ns = {"os": os}
    exec(compile(ast.Module(body=fns, type_ignores=[]), "setup.py", "exec"), ns)
    return ns[name]


def test_cuda_fast_math_is_opt_in(monkeypatch):
    """Issue 12 item 10: ``--use_fast_math`` (approximate exp/log in the CUDA entropy) only with
    ADAMERGE_CUDA_FAST_MATH=1, until a GPU run shows the tolerance tests pass with it."""
    flags = _setup_function("_nvcc_flags")
    monkeypatch.delenv("ADAMERGE_CUDA_FAST_MATH", raising=False)
    monkeypatch.setenv("ADAMERGE_CUDA_ARCHS", "90")
    assert "--use_fast_math" not in flags() and "arch=compute_90,code=sm_90" in flags()
    monkeypatch.setenv("ADAMERGE_CUDA_FAST_MATH", "1")
    assert "--use_fast_math" in flags()
