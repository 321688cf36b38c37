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
