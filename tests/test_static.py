"""Static merges: small hand-computed cases, and TIES against the official code's flattened algorithm."""

import pytest
import torch

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.merging import static


def _tv(*rows):
    """One key 'w' with K task vectors given as lists."""
    return {"w": torch.tensor(rows, dtype=torch.float32)}


BASE = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}


def test_weight_average_and_task_arithmetic_by_hand():
    tv = _tv([1.0, 0.0, -2.0, 4.0], [3.0, 2.0, 2.0, 0.0])
    assert torch.equal(af.weight_average(BASE, tv)["w"], torch.tensor([3.0, 3.0, 3.0, 6.0]))
    assert torch.allclose(af.task_arithmetic(BASE, tv, scale=0.5)["w"], torch.tensor([3.0, 3.0, 3.0, 6.0]))
    assert torch.allclose(af.task_arithmetic(BASE, tv)["w"], torch.tensor([2.2, 2.6, 3.0, 5.2]))


def test_ties_by_hand():
    # official trim: keep magnitudes >= the (d - int(d*k))-th smallest; d=4, k=0.25 -> the 2 largest
    tv = _tv([4.0, -1.0, -3.0, 0.5], [-2.0, 0.1, 1.0, 5.0], [1.0, 0.0, -6.0, 2.0])
    # trimmed: t0 = [4, 0, -3, 0], t1 = [-2, 0, 0, 5], t2 = [0, 0, -6, 2]
    # elected sign of sums [2, 0, -9, 7] -> [+, majority, -, +]; majority = sign(1 + 0 - 1 + 1) = +
    split = af.ties_split(tv, k=0.25)["w"]
    expect = torch.tensor([[4.0, 0, -3, 0], [0, 0, 0, 5], [0, 0, -6, 2]])
    assert torch.equal(split, expect)
    merged = af.ties_merge(BASE, tv, k=0.25, scale=1.0, merge="mean")["w"]
    assert torch.allclose(merged, BASE["w"] + torch.tensor([4.0, 0.0, -4.5, 3.5]))
    summed = af.ties_merge(BASE, tv, k=0.25, scale=0.3, merge="sum")["w"]
    assert torch.allclose(summed, BASE["w"] + 0.3 * torch.tensor([4.0, 0.0, -9.0, 7.0]))


def test_ties_tensor_scope_differs_from_global():
    tv = {"a": torch.tensor([[10.0, 9.0]]), "b": torch.tensor([[0.2, 0.1]])}
    g = af.ties_split(tv, k=0.25, scope="global")  # d=4: keeps the 2 largest overall
    t = af.ties_split(tv, k=0.25, scope="tensor")  # d=2 per tensor: keeps each tensor's largest
    assert torch.equal(g["b"], torch.zeros(1, 2))  # globally, b's entries are below the top half
    assert torch.equal(t["b"], torch.tensor([[0.2, 0.0]]))  # per tensor, b keeps its own top half
    assert torch.equal(t["a"], torch.tensor([[10.0, 0.0]]))


def _official_ties_split(flat: torch.Tensor, K: float):
    """The official AdaMerging++ code path (ties_merging_utils), on [n_tasks, d] flat vectors."""
    n, d = flat.shape
    k = d - int(d * K)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    mean = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    return sel, mean


@pytest.mark.parametrize("seed", range(4))
def test_ties_global_matches_official_flattened(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 3)}
    K = 4
    tv = {n: torch.randn((K, *s), generator=g) for n, s in shapes.items()}
    flat = torch.cat([t.reshape(K, -1) for t in tv.values()], 1)
    sel, mean = _official_ties_split(flat, 0.2)
    ours = af.ties_split(tv, k=0.2)
    assert torch.equal(torch.cat([t.reshape(K, -1) for t in ours.values()], 1), sel)
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    merged = af.ties_merge(base, tv, k=0.2, scale=1.0)
    assert_close(torch.cat([t.reshape(-1) for t in merged.values()]), mean.double(), torch.float32, "ties mean")


def test_dare_seeded_rescaled():
    tv = {"w": torch.ones(2, 10000)}
    a, b = af.dare(tv, p=0.3, seed=7)["w"], af.dare(tv, p=0.3, seed=7)["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, af.dare(tv, p=0.3, seed=8)["w"])
    kept = a[a != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.7))
    assert abs((a == 0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(af.dare(tv, p=0.0)["w"], tv["w"])
    with pytest.raises(ValueError, match="drop rate"):
        af.dare(tv, p=1.0)


def test_static_bad_options():
    tv = _tv([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="0 < k <= 1"):
        af.ties_split(tv, k=0.0)
    with pytest.raises(ValueError, match="scope"):
        af.ties_split(tv, k=0.5, scope="layer")
    with pytest.raises(ValueError, match="merge must be"):
        af.ties_merge(BASE, tv, merge="max")
    assert torch.equal(static.ties_split(tv, k=1.0)["w"], tv["w"])


# ------------------------------------------------------------------------------ precision: one rounding
def _checkpoints(dtype, K=3, seed=0, shapes=(("a", (48, 33)), ("b", (65,)), ("c", (3, 5, 7)))):
    """A base and K fine-tuned state dicts of ``dtype`` (fine-tuning moves weights by about 20%)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: (0.02 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for n, s in shapes}
    fts = [{n: (v.double() + 0.004 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
            for n, v in base.items()} for _ in range(K)]
    return base, fts


def _ref_task_arithmetic(base, fts, coefs):
    """float64 reference, rounded once to the checkpoints' dtype."""
    return {n: (b.double() + sum(c * (f[n].double() - b.double()) for c, f in zip(coefs, fts))).to(b.dtype)
            for n, b in base.items()}


def _assert_rounded_once(got, ref, exact_equal: bool, what: str):
    for n in ref:
        assert got[n].dtype == ref[n].dtype, (what, n)
        if exact_equal:
            assert torch.equal(got[n], ref[n]), (what, n)
        else:  # float32 output, non-dyadic coefficients: float64 rounding may tip a near-midpoint by one ulp
            up = torch.nextafter(ref[n], torch.full_like(ref[n], float("inf")))
            dn = torch.nextafter(ref[n], torch.full_like(ref[n], float("-inf")))
            assert ((got[n] == ref[n]) | (got[n] == up) | (got[n] == dn)).all(), (what, n)
            assert (got[n] == ref[n]).float().mean() > 0.95, (what, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_task_arithmetic_rounds_once(dtype, backend):
    """Exact task vectors (float32 for bf16/fp16 checkpoints, float64 for fp32 ones), combined in float64 and
    rounded once: bf16/fp16 results equal the float64 reference rounded once in every element (float32
    accumulation misses about 5 in 10^4 bf16 elements), and so do fp32 ones with dyadic coefficients."""
    base, fts = _checkpoints(dtype)
    tv = af.task_vectors(base, fts, dtype=torch.float64 if dtype == torch.float32 else torch.float32)
    cases = [  # (what, result, coefficients, dyadic)
        ("scale 0.3", af.task_arithmetic(base, tv, 0.3, backend=backend), [0.3] * 3, False),
        ("weights", af.task_arithmetic(base, tv, 0.7, weights=[1.0, 0.5, 2.0], backend=backend),
         [0.7, 0.35, 1.4], False),
        ("scale 0.25", af.task_arithmetic(base, tv, 0.25, backend=backend), [0.25] * 3, True),
        ("normalized", af.task_arithmetic(base, tv, 1.0, weights=[1.0, 2.0, 1.0], normalize=True, backend=backend),
         [0.25, 0.5, 0.25], True),
        ("average", af.weight_average(base, tv, backend=backend), [1 / 3] * 3, False),
    ]
    for what, got, coefs, dyadic in cases:
        _assert_rounded_once(got, _ref_task_arithmetic(base, fts, coefs), dyadic or dtype != torch.float32, what)
    f32 = {n: (b.float() + sum(0.3 * (f[n].float() - b.float()) for f in fts)).to(dtype) for n, b in base.items()}
    ref = _ref_task_arithmetic(base, fts, [0.3] * 3)
    if dtype == torch.bfloat16:  # what float32 accumulation would give: not the float64 reference everywhere
        assert any(not torch.equal(f32[n], ref[n]) for n in base)


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
def test_task_vectors_rounded_once(store):
    """Low-precision task vectors are the float32 difference rounded once (not a bf16 subtraction)."""
    base, fts = _checkpoints(torch.bfloat16)
    tv = af.task_vectors(base, fts, dtype=store)
    for n, b in base.items():
        ref = torch.stack([(f[n].double() - b.double()).to(store) for f in fts])
        assert torch.equal(tv[n], ref), n
    naive = torch.stack([(f["a"] - base["a"]).to(store) for f in fts])  # the subtraction in bf16 rounds first
    assert not torch.equal(naive, tv["a"]) or store == torch.bfloat16


def test_ties_merge_rounds_once():
    base, fts = _checkpoints(torch.bfloat16)
    tv = af.task_vectors(base, fts, dtype=torch.float32)
    sel = af.ties_split(tv, k=0.3)
    got = af.ties_merge(base, tv, k=0.3, scale=0.4)
    for n, b in base.items():
        s = sel[n].double()
        mean = s.sum(0) / (s != 0).sum(0).clamp(min=1)
        assert torch.equal(got[n], (b.double() + 0.4 * mean).to(b.dtype)), n


# ------------------------------------------------------------------------------------ TIES keep rules
def _tied_tv(K=3, shapes=((40, 25), (64,), (3, 7))):
    """Task vectors with heavy magnitude ties (entries from {0, +-1, +-2, +-3})."""
    g = torch.Generator().manual_seed(5)
    return {f"t{i}": torch.randint(-3, 4, (K, *s), generator=g).float() for i, s in enumerate(shapes)}


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("k", [0.2, 0.37, 0.001])
def test_ties_exact_keeps_exactly_k(scope, k):
    tv = _tied_tv()
    plan = static.TiesPlan(k=k, scope=scope, keep="exact")
    plan_ties = static.TiesPlan(k=k, scope=scope, keep="ties")
    if scope == "global":
        static.global_thresholds(tv, plan)
        static.global_thresholds(tv, plan_ties)
    units = [(n, t) for n, t in tv.items()] if scope == "tensor" else [("all", None)]
    for name, t in units:
        parts = [t] if t is not None else list(tv.values())
        n = sum(p[0].numel() for p in parts)
        exact = sum((static.trim(p, plan) != 0).reshape(3, -1).sum(1) for p in parts)
        ties = sum((static.trim(p, plan_ties) != 0).reshape(3, -1).sum(1) for p in parts)
        assert exact.tolist() == [max(1, int(n * k))] * 3, name
        assert (ties > exact).any(), name  # the official rule keeps every tie: more than asked for here


def test_ties_exact_tie_order_is_flat_index():
    tv = {"w": torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0]])}
    plan = static.TiesPlan(k=0.5, scope="tensor", keep="exact")  # 3 of 6: the 2.0-ties at positions 1, 2, 4
    assert torch.equal(static.trim(tv["w"], plan), torch.tensor([[0.0, -2.0, 2.0, 0.0, -2.0, 0.0]]))
    # global: the tie budget runs over the tensors in order
    tv2 = {"a": torch.tensor([[2.0, 1.0]]), "b": torch.tensor([[2.0, 2.0]])}
    split = af.ties_split(tv2, k=0.5, keep="exact")  # 2 of 4: a's 2.0 and b's first 2.0
    assert torch.equal(split["a"], torch.tensor([[2.0, 0.0]])) and torch.equal(split["b"], torch.tensor([[2.0, 0.0]]))


def test_sign_tie_rules():
    # entry 1 sums to zero; the majority sign over the vector is negative
    tv = {"w": torch.tensor([[-1.0, 2.0, -3.0, -1.0], [-1.0, -2.0, -3.0, 1.0]])}
    maj = af.ties_split(tv, k=1.0, sign_tie="majority")["w"]
    pos = af.ties_split(tv, k=1.0, sign_tie="positive")["w"]
    assert torch.equal(maj[:, 1], torch.tensor([0.0, -2.0]))
    assert torch.equal(pos[:, 1], torch.tensor([2.0, 0.0]))
    assert torch.equal(maj[:, 3], torch.tensor([-1.0, 0.0]))  # also zero: the majority -1 keeps the -1
    assert torch.equal(pos[:, 3], torch.tensor([0.0, 1.0]))  # +1 keeps the +1


def test_ties_weights_by_hand():
    """mergekit's weighted TIES: the election on w_k * tau_k, the weighted disjoint mean (or sum)."""
    tv = {"w": torch.tensor([[1.0, -4.0, 2.0], [-3.0, 1.0, 2.0]])}
    base = {"w": torch.zeros(3)}
    w = [2.0, 1.0]
    # weighted sums [-1, -7, 6] -> signs [-, -, +]; kept: [[0, -4, 2], [-3, 0, 2]]
    mean = af.ties_merge(base, tv, k=1.0, scale=1.0, weights=w, sign_tie="positive")["w"]
    assert torch.allclose(mean, torch.tensor([-3.0, -4.0, (2 * 2 + 2) / 3]))
    summed = af.ties_merge(base, tv, k=1.0, scale=0.5, merge="sum", weights=w)["w"]
    assert torch.allclose(summed, 0.5 * torch.tensor([-3.0, -8.0, 6.0]))
    # equal weights: the weighted mean is the unweighted one, whatever the weight
    assert torch.equal(af.ties_merge(base, tv, k=1.0, weights=[3.0, 3.0])["w"], af.ties_merge(base, tv, k=1.0)["w"])


def test_dare_l1_rescale_keeps_norm():
    tv = {"w": torch.randn(2, 500, generator=torch.Generator().manual_seed(3))}
    out = af.dare(tv, p=0.6, seed=1, rescale="l1")["w"]
    torch.testing.assert_close(out.abs().sum(1), tv["w"].abs().sum(1))
    none = af.dare(tv, p=0.6, seed=1, rescale="none")["w"]
    inv = af.dare(tv, p=0.6, seed=1)["w"]
    assert torch.equal((none != 0), (inv != 0)) and torch.allclose(inv, none / 0.4)
    with pytest.raises(ValueError, match="rescale"):
        af.dare(tv, p=0.5, rescale="l2")


def test_ties_bad_new_options():
    tv = _tv([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="keep"):
        af.ties_split(tv, keep="some")
    with pytest.raises(ValueError, match="sign_tie"):
        af.ties_split(tv, sign_tie="negative")
    with pytest.raises(ValueError, match="one weight per task"):
        af.ties_split(tv, weights=[1.0, 2.0])
