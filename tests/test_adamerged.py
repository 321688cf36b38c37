"""AdaMergedModel against the naive merge: forward equal to ``functional_call`` on the naively merged
state dict, coefficient gradients equal to float64 autograd through the naive merge."""

import copy

import pytest
import torch
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.io import CheckpointError


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 3, bias=False), nn.Tanh(), nn.Linear(3, 4)
    )


def perturbed(model, seed, scale=0.1):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def small_vit(seed):
    open_clip = pytest.importorskip("open_clip")  # conftest applied the torchvision workaround
    torch.manual_seed(seed)
    return open_clip.transformer.VisionTransformer(
        image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=8
    )


class Tied(nn.Module):
    """An embedding tied to the output projection (GPT-2 style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


def naive_check(pretrained, fts, inputs, granularity="layer", ties=None, atol_dtype=torch.float32, **kw):
    """Compare AdaMergedModel's output and coefficient gradients with the naive merge in float64."""
    model = af.AdaMergedModel(pretrained, fts, granularity=granularity, ties=ties, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init so clamping and per-row values matter
        model.raw_coefficients.copy_(torch.rand(model.raw_coefficients.shape, generator=g) * 1.2 - 0.1)
    out = model(*inputs)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()

    names = [n for n, _ in pretrained.named_parameters()]
    base = {n: p.detach().double() for n, p in pretrained.named_parameters()}
    tv = af.task_vectors(pretrained, fts)
    if ties:
        tv = af.ties_split(tv, **({} if ties is True else ties))
    raw64 = model.raw_coefficients.detach().double().requires_grad_()
    lam = raw64.clamp(0, 1)
    merged = {}
    for i, n in enumerate(names):
        row = lam[i if granularity == "layer" else 0]
        merged[n] = base[n] + (row.reshape(-1, *[1] * base[n].dim()) * tv[n].double()).sum(0)
    ref_model = copy.deepcopy(pretrained).double()
    inputs64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    ref = torch.func.functional_call(ref_model, merged, inputs64)
    (ref * w.double()).sum().backward()
    assert_close(out, ref, atol_dtype, "forward")
    assert_close(model.raw_coefficients.grad, raw64.grad, atol_dtype, "coefficient gradients")
    return model


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_mlp_matches_naive(granularity):
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in range(1, 4)]
    model = naive_check(pre, fts, (torch.randn(9, 5),), granularity)
    assert model.raw_coefficients.shape == ((len(list(pre.parameters())) if granularity == "layer" else 1), 3)
    assert sorted(model._rewritten) == ["0", "3", "5"]  # every nn.Linear goes through merged_linear
    assert model._generic_names == ["1.weight", "1.bias"]  # LayerNorm through merge_many


def test_mlp_adamerging_pp_matches_naive():
    pre = mlp(0)
    naive_check(pre, [perturbed(pre, s) for s in range(1, 6)], (torch.randn(4, 5),), ties={"k": 0.3})


def test_open_clip_vit_matches_naive():
    pre = small_vit(0)
    fts = [perturbed(pre, s, 0.05) for s in range(1, 4)]
    model = naive_check(pre, fts, (torch.randn(2, 3, 16, 16),))
    kinds = {type(model.skeleton.get_submodule(p)).__name__ for p in model._rewritten}
    assert kinds == {"MergedMultiheadAttention", "MergedLinear"}
    # coefficient rows follow pretrained.named_parameters() order
    assert model.param_names == [n for n, _ in pre.named_parameters()]


def test_tied_weights_match_naive():
    pre = Tied()
    fts = []
    for s in (1, 2):
        ft = Tied()
        ft.load_state_dict(perturbed(pre, s).state_dict())
        fts.append(ft)
    model = naive_check(pre, fts, (torch.randint(0, 11, (3, 4)),))
    sd = model.merged_state_dict()
    assert torch.equal(sd["emb.weight"], sd["out.weight"])
    plain = model.to_module()
    assert plain.out.weight is plain.emb.weight  # the tie survives materialization


def test_mha_not_batch_first_with_masks_matches_torch():
    torch.manual_seed(0)
    pre = nn.MultiheadAttention(8, 2)
    fts = [perturbed(pre, s) for s in (1, 2)]
    model = af.AdaMergedModel(pre, fts)
    plain = model.to_module()
    q, k = torch.randn(5, 3, 8), torch.randn(4, 3, 8)
    am = torch.rand(5, 4) > 0.7
    am[:, 0] = False
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[1, 3] = True
    for args, kw in [((q, q, q), {}), ((q, k, k), {"attn_mask": am, "key_padding_mask": kpm}),
                     ((q, k, k), {"need_weights": False, "attn_mask": am.float() * -1e9})]:
        o, w = model(*args, **kw)
        o2, w2 = plain(*args, **kw)
        assert_close(o, o2.double(), torch.float32, "mha out")
        if w2 is not None:
            assert_close(w, w2.double(), torch.float32, "mha weights")


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_projects_self_attention_once(monkeypatch, batch_first):
    """Issue 12 item 7: ``query is key is value`` is detected before the ``batch_first=False`` transpose (which makes
    new tensor objects): self-attention is one merged_linear call with the packed in-projection, cross-attention
    (``key is value``) two, three distinct inputs three (plus the out-projection each time)."""
    from adamerge_fast.merging import adamerged

    torch.manual_seed(0)
    pre = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    model = af.AdaMergedModel(pre, [perturbed(pre, s) for s in (1, 2)])
    plain = model.to_module()
    calls = []
    real = adamerged.ops.merged_linear
    monkeypatch.setattr(adamerged.ops, "merged_linear", lambda x, w0, *a, **k: calls.append(w0.shape[0]) or
                        real(x, w0, *a, **k))  # fmt: skip
    q, k, v = torch.randn(5, 3, 8), torch.randn(4, 3, 8), torch.randn(4, 3, 8)  # [L | S, N, E]
    if batch_first:
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    for args, expected in [((q, q, q), [24, 8]), ((q, k, k), [8, 16, 8]), ((q, k, v), [8, 8, 8, 8])]:
        calls.clear()
        o, _ = model(*args)
        assert calls == expected, calls  # output rows of each merged_linear call
        assert_close(o, plain(*args)[0].double(), torch.float32, "mha out")


def test_low_precision_task_vectors():
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    model = af.AdaMergedModel(pre, fts, task_vector_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in model.skeleton.get_submodule("0").buffers() if t.dim() == 3)
    x = torch.randn(4, 5)
    model(x).sum().backward()
    assert torch.isfinite(model.raw_coefficients.grad).all()


def test_to_module_and_saving(tmp_path):
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2, 3)]
    model = af.AdaMergedModel(pre, fts)
    with torch.no_grad():
        model.raw_coefficients.uniform_(0, 1)
    x = torch.randn(6, 5)
    plain = model.to_module()
    assert isinstance(plain, nn.Sequential)
    assert_close(plain(x), model(x).double(), torch.float32, "to_module")
    model.save_merged(tmp_path / "m.safetensors")
    sd = af.load_state_dict(tmp_path / "m.safetensors")
    fresh = mlp(5)
    fresh.load_state_dict(dict(sd))
    assert_close(fresh(x), model(x).double(), torch.float32, "saved merged model")

    model.save_coefficients(tmp_path / "c.safetensors")
    other = af.AdaMergedModel(pre, fts)
    other.load_coefficients(tmp_path / "c.safetensors")
    assert torch.equal(other.raw_coefficients, model.raw_coefficients)
    wrong = af.AdaMergedModel(pre, fts, granularity="task")
    with pytest.raises(CheckpointError, match="another model"):
        wrong.load_coefficients(tmp_path / "c.safetensors")
    assert "0.weight" in model.format_coefficients()


def test_pretrained_is_not_modified():
    pre = mlp(0)
    before = {k: v.clone() for k, v in pre.state_dict().items()}
    model = af.AdaMergedModel(pre, [perturbed(pre, 1)])
    model(torch.randn(2, 5)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in pre.state_dict().items())
    assert isinstance(pre[0], nn.Linear) and pre[0].weight.grad is None
    assert [n for n, _ in model.named_parameters()] == ["raw_coefficients"]


def test_task_vectors_argument_and_init_table():
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    tv = af.task_vectors(pre, fts)
    init = torch.rand(len(tv), 2)
    a = af.AdaMergedModel(pre, task_vectors=tv, init=init)
    b = af.AdaMergedModel(pre, fts, init=init)
    x = torch.randn(3, 5)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.coefficients, init.clamp(0, 1))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda pre: af.AdaMergedModel(pre, []), ValueError, "zero tasks"),
        (lambda pre: af.AdaMergedModel(pre, [nn.Sequential(nn.Linear(5, 7))]), CheckpointError,
         "missing key '1.weight'"),
        (lambda pre: af.AdaMergedModel(pre, [{**mlp(1).state_dict(), "0.weight": torch.zeros(7, 4)}]), CheckpointError,
         r"key '0.weight' has shape \[7, 4\]"),
        (lambda pre: af.AdaMergedModel(pre, [mlp(1).double()]), CheckpointError,
         "key '0.weight' has dtype torch.float64"),
        (lambda pre: af.AdaMergedModel(pre, [{**mlp(1).state_dict(), "1.bias": torch.full((7,), float("nan"))}]),
         CheckpointError, "key '1.bias' has NaN"),
        (lambda pre: af.AdaMergedModel(pre, [mlp(1)], init=torch.zeros(3, 1)), ValueError,
         r"init must have shape \[7, 1\]"),
        (lambda pre: af.AdaMergedModel(pre, [mlp(1)], granularity="block"), ValueError, "granularity"),
        (lambda pre: af.AdaMergedModel(pre, [mlp(1)], task_vectors={}), ValueError, "exactly one"),
        (lambda pre: af.AdaMergedModel(pre, task_vectors={"0.weight": torch.zeros(1, 7, 5)}), CheckpointError,
         "missing key '0.bias'"),
    ],
)
def test_bad_inputs(make, exc, match):
    with pytest.raises(exc, match=match):
        make(mlp(0))
