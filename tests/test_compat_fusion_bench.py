"""``adamerge_fast.compat.fusion_bench`` against a transcription of FusionBench 0.2.33's wrappers and loop.

``FusionBenchWrapper`` below transcribes ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel``
and ``task_wise_fusion.TaskWiseMergedModel`` (task vectors made in place from the fine-tuned models for the
parameters that require grad, frozen ones deleted; ``merge_weights()`` clamps, optionally normalizes with a softmax
over the models, adds ``param * w`` task by task to the pretrained state dict and caches it; the forward is
``functional_call`` on that cache), and ``fusion_bench_loop`` transcribes
``LayerWiseAdaMergingAlgorithm.test_time_adaptation`` (Adam on ``merge_weight``; per step and task one batch,
FusionBench's ``entropy_loss`` with eps 1e-8, ``backward(retain_graph=True)``; then step, zero_grad,
``merge_weights()``). No FusionBench import: ``make test-compat`` runs the real one.
"""

import copy

import pytest
import torch
from _fixtures import perturbed_copies
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.compat import fusion_bench as fb


def backbone(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 8))
    m[1].weight.requires_grad_(False)  # frozen: no row, stays pretrained
    m[3].bias.requires_grad_(False)  # a frozen bias of a merged linear layer
    return m


def finetuned(pre, K, scale=0.3):
    return perturbed_copies(pre, K, scale)


def heads_and_data(K, features=8, n_batches=3, bs=5, in_shape=(6,)):
    torch.manual_seed(100)
    heads = {f"t{k}": nn.Linear(features, 3 + k).requires_grad_(False) for k in range(K)}
    data = {t: [torch.randn(bs, *in_shape) for _ in range(n_batches)] for t in heads}
    return heads, data


def _get(obj, name):
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _delete(obj, name):
    path, _, leaf = name.rpartition(".")
    delattr(_get(obj, path) if path else obj, leaf)


class FusionBenchWrapper(nn.Module):
    """Transcription of FusionBench 0.2.33's LayerWiseMergedModel (``task_wise=False``) / TaskWiseMergedModel."""

    def __init__(self, weight, pretrained, finetuned_models, clamp_weights=True, normalized=False,
                 sparsity_ratio=None, task_wise=False):
        super().__init__()
        self.clamp_weights, self.normalized, self.task_wise = clamp_weights, normalized, task_wise
        self.merge_weight = nn.Parameter(weight, requires_grad=True)
        for name, param in pretrained.named_parameters():
            for m in finetuned_models:
                if not param.requires_grad:
                    _delete(m, name)
                else:
                    _get(m, name).data = _get(m, name) - param
        self.pretrained_model = pretrained.requires_grad_(False)
        for m in finetuned_models:
            m.requires_grad_(False)
        self.task_vectors = nn.ModuleList(finetuned_models)
        if sparsity_ratio is not None:  # unstructured_magnitude_prune_ on every 2-D task vector (kept dense here)
            for _, param in self.task_vectors.named_parameters():
                if param.dim() == 2:
                    n = int(param.shape[1] * sparsity_ratio)
                    order = torch.sort(param.data.abs(), dim=-1, stable=True)[1][:, :n]
                    mask = torch.zeros_like(param.data, dtype=torch.bool).scatter_(1, order, True)
                    param.data.masked_fill_(mask, 0)
        self._merged = None

    def merge_weights(self, task_vector_mask=None):
        w = self.merge_weight.clamp(0, 1) if self.clamp_weights else self.merge_weight
        if self.normalized:
            w = w.softmax(dim=0)
        sd = self.pretrained_model.state_dict(keep_vars=True)
        for weight, tv in zip(w, self.task_vectors, strict=True):
            for i, (name, param) in enumerate(tv.named_parameters()):
                wi = weight if self.task_wise else weight[i]
                if task_vector_mask is not None:
                    wi = wi * task_vector_mask[name]
                sd[name] = sd[name] + param * wi
        self._merged = sd
        return sd

    def forward(self, x):
        if self._merged is None:
            self.merge_weights()
        return torch.func.functional_call(self.pretrained_model, self._merged, (x,), tie_weights=False, strict=True)

    def merge_and_unload(self, task_vector_mask=None):
        self.merge_weights(task_vector_mask)
        self.pretrained_model.load_state_dict(self._merged)
        return self.pretrained_model


def fb_entropy(logits, eps=1e-8):
    p = torch.softmax(logits, dim=-1)
    return -torch.sum(p * torch.log(p + eps), dim=-1).mean()


def fusion_bench_loop(module, heads, data, steps, lr=1e-3):
    """Transcription of LayerWiseAdaMergingAlgorithm.test_time_adaptation (and the task-wise one)."""
    opt = torch.optim.Adam([module.merge_weight], lr=lr)
    module.train()
    module.merge_weights()
    its = {t: iter(data[t] * 100) for t in heads}
    traj = []
    for _ in range(steps):
        for t, head in heads.items():
            loss = fb_entropy(head(module(next(its[t]))))
            loss.backward(retain_graph=True)
        opt.step()
        opt.zero_grad()
        module.merge_weights()
        traj.append(module.merge_weight.detach().clone())
    return traj


def _rows(pre):
    return len([p for p in pre.parameters() if p.requires_grad])


def _initial(task_wise, K, L, spread):
    w = fb.get_task_wise_weights(K, 0.3) if task_wise else fb.get_layer_wise_weights(K, L, 0.3)
    if spread:  # some entries outside [0, 1]: clamping matters
        w = torch.rand(w.shape, generator=torch.Generator().manual_seed(7)) * 1.4 - 0.2
    return w


def _pair(task_wise, K=3, clamp_weights=True, spread=True, **kw):
    """(FusionBench transcription, ours) on the same models and initial weights; ours gets its own copies."""
    pre = backbone()
    fts = finetuned(pre, K)
    w = _initial(task_wise, K, _rows(pre), spread)
    ours_cls = fb.TaskWiseMergedModel if task_wise else fb.LayerWiseMergedModel
    ours = ours_cls(w.clone(), pre, fts, clamp_weights, **kw)
    theirs = FusionBenchWrapper(w.clone(), copy.deepcopy(pre), copy.deepcopy(fts), clamp_weights,
                                normalized=kw.get("normalized_merging_weights", False),
                                sparsity_ratio=kw.get("sparsity_ratio"), task_wise=task_wise)
    return theirs, ours, pre, fts


def _check_state_dicts(a, b, msg):
    assert a.keys() == b.keys(), msg
    for k in a:
        assert_close(a[k], b[k].detach().double(), torch.float32, f"{msg}: {k}")


@pytest.mark.parametrize("clamp_weights", [True, False])
@pytest.mark.parametrize("task_wise", [False, True])
def test_fusion_bench_loop_matches_transcription(task_wise, clamp_weights):
    theirs, ours, pre, _ = _pair(task_wise, clamp_weights=clamp_weights)
    heads, data = heads_and_data(3)
    assert ours.merge_weight.shape == theirs.merge_weight.shape == ((3,) if task_wise else (3, _rows(pre)))
    ref = fusion_bench_loop(theirs, heads, data, steps=6, lr=1e-2)
    got = fusion_bench_loop(ours, heads, data, steps=6, lr=1e-2)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b.double(), torch.float32, f"step {step}")
    assert not torch.equal(ref[-1], ref[0])  # the weights moved
    _check_state_dicts(ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict(), "merged")


@pytest.mark.parametrize("kw", [{"normalized_merging_weights": True}, {"sparsity_ratio": 0.4},
                                {"clamp_weights": False, "normalized_merging_weights": True}])
def test_layer_wise_options_match_transcription(kw):
    kw = dict(kw)
    theirs, ours, _, _ = _pair(False, clamp_weights=kw.pop("clamp_weights", True), **kw)
    heads, data = heads_and_data(3)
    x = data["t0"][0]
    assert_close(ours(x), theirs(x).double(), torch.float32, "forward")
    ref = fusion_bench_loop(theirs, heads, data, steps=4, lr=1e-2)
    got = fusion_bench_loop(ours, heads, data, steps=4, lr=1e-2)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b.double(), torch.float32, f"step {step}")
    if "sparsity_ratio" in kw:
        tv = ours.task_vectors[1]["0.weight"]  # [10, 6]: int(6 * 0.4) = 2 zeros per row
        assert ((tv == 0).sum(1) == 2).all()


@pytest.mark.parametrize("granularity", ["layer", "task"])
@pytest.mark.parametrize("clamp_weights", [True, False])
def test_same_trajectory_as_native_api_in_both_orientations(granularity, clamp_weights):
    """The compat class driven by adamerge() == AdaMergedModel with FusionBench's row rule, in both layouts."""
    task_wise = granularity == "task"
    _, ours, pre, fts = _pair(task_wise, clamp_weights=clamp_weights, spread=False)
    heads, data = heads_and_data(3)
    clamp = (0.0, 1.0) if clamp_weights else None
    natives = [af.AdaMergedModel(pre, fts, granularity=granularity, clamp=clamp, parameter_filter="requires_grad",
                                 coefficient_layout=layout) for layout in ("rows_tasks", "tasks_rows")]
    hists = [af.adamerge(m, heads, data, steps=5, lr=1e-2, progress=False) for m in [ours, *natives]]
    for h in hists[1:]:
        for step, (a, b) in enumerate(zip(hists[0].coefficients, h.coefficients, strict=True)):
            assert_close(a, b.double(), torch.float32, f"step {step}")
    rows_tasks, tasks_rows = (m.raw_coefficients.detach() for m in natives)
    assert tasks_rows.shape == rows_tasks.t().shape
    assert_close(tasks_rows, rows_tasks.t().double(), torch.float32, "tasks x rows layout")
    assert_close(ours.merge_weight.reshape(tasks_rows.shape), tasks_rows.double(), torch.float32, "merge_weight")
    assert ours.param_names == [n for n, p in pre.named_parameters() if p.requires_grad]
    _check_state_dicts(ours.merged_state_dict(), natives[0].merged_state_dict(), "merged")


def test_open_clip_vit_with_frozen_parts_matches_transcription():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    pre = open_clip.transformer.VisionTransformer(image_size=16, patch_size=8, width=16, layers=2, heads=2,
                                                  mlp_ratio=2.0, output_dim=8)
    for name in ("positional_embedding", "transformer.resblocks.0.attn.in_proj_bias",
                 "transformer.resblocks.1.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.bias"):
        pre.get_parameter(name).requires_grad_(False)
    fts = finetuned(pre, 2, 0.05)
    w = fb.get_layer_wise_weights(2, _rows(pre), 0.3)
    ours = fb.LayerWiseMergedModel(w.clone(), pre, fts)
    theirs = FusionBenchWrapper(w.clone(), copy.deepcopy(pre), copy.deepcopy(fts))
    kinds = {type(ours.skeleton.get_submodule(p)).__name__ for p in ours._rewritten}
    assert kinds == {"MergedMultiheadAttention", "MergedLinear"}  # block 1's attention stays generic
    heads, data = heads_and_data(2, n_batches=2, bs=2, in_shape=(3, 16, 16))
    ref = fusion_bench_loop(theirs, heads, data, steps=3, lr=1e-2)
    got = fusion_bench_loop(ours, heads, data, steps=3, lr=1e-2)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b.double(), torch.float32, f"step {step}")
    merged = ours.merge_and_unload().state_dict()
    _check_state_dicts(merged, theirs.merge_and_unload().state_dict(), "merged")
    assert torch.equal(merged["positional_embedding"], pre.positional_embedding.detach())  # frozen: pretrained


@pytest.mark.parametrize("task_wise", [False, True])
def test_task_vector_mask_matches_transcription(task_wise):
    theirs, ours, pre, _ = _pair(task_wise)
    g = torch.Generator().manual_seed(3)
    names = [n for n, p in pre.named_parameters() if p.requires_grad]
    mask = {n: torch.rand(pre.get_parameter(n).shape, generator=g).requires_grad_() for n in names}
    mask2 = {n: m.detach().clone().requires_grad_() for n, m in mask.items()}
    x = torch.randn(4, 6)
    assert ours.merge_weights(task_vector_mask=mask) is not None
    theirs.merge_weights(task_vector_mask=mask2)
    y, y_ref = ours(x), theirs(x)
    assert_close(y, y_ref.double(), torch.float32, "masked forward")
    gy = torch.randn(y.shape, generator=g)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    assert_close(ours.merge_weight.grad, theirs.merge_weight.grad.double(), torch.float32, "merge_weight grad")
    for n in names:
        assert_close(mask[n].grad, mask2[n].grad.double(), torch.float32, f"mask grad {n}")
    theirs.merge_weights()
    unmasked = theirs(x).detach()
    with torch.no_grad():  # (FusionBench's merge_and_unload writes into its pretrained model: done last)
        _check_state_dicts(ours.merge_and_unload(mask).state_dict(), theirs.merge_and_unload(mask2).state_dict(),
                           "masked merge_and_unload")
    assert ours.merge_weights() is None  # back to the fused path
    assert_close(ours(x), unmasked.double(), torch.float32, "unmasked forward")
    with pytest.raises(KeyError, match="no entry for parameter"):
        ours.merge_weights(task_vector_mask={})


def test_attributes_helpers_and_no_side_effects():
    pre = backbone()
    fts = finetuned(pre, 2)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (pre, *fts)]
    flags = [p.requires_grad for p in pre.parameters()]
    L = _rows(pre)
    w = fb.get_layer_wise_weights(2, L)
    assert w.shape == (2, L) and torch.equal(w, torch.full((2, L), 0.5))
    assert torch.equal(fb.get_task_wise_weights(4), torch.full((4,), 0.25))
    model = fb.LayerWiseMergedModel(w, pre, fts)
    assert isinstance(model.merge_weight, nn.Parameter) and model.merge_weight.is_leaf
    assert model.merge_weight is model.raw_coefficients
    assert model.pretrained_model is pre
    x = torch.randn(3, 6)
    assert torch.equal(model.forward_model(args=(x,), kwargs={}), model(x))
    tvs = model.task_vectors
    assert len(tvs) == 2 and list(tvs[0]) == model.param_names
    torch.testing.assert_close(tvs[1]["3.weight"], fts[1][3].weight.detach() - pre[3].weight.detach())
    out = model.merge_and_unload(copy=True)
    assert isinstance(out, nn.Sequential) and out is not pre
    for m, b in zip((pre, *fts), before, strict=True):  # nothing written into the inputs
        assert all(torch.equal(b[k], v) for k, v in m.state_dict().items())
    assert [p.requires_grad for p in pre.parameters()] == flags

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = fb.TaskWiseMergedModel(fb.get_task_wise_weights(2), pre, fts)
            self.head = nn.Linear(8, 2)

    outer = fb.fix_other_parts(Outer())
    assert [n for n, p in outer.named_parameters() if p.requires_grad] == ["enc.raw_coefficients"]
    fb.merge_weights(outer)
    expected = outer.enc(x)
    unloaded = fb.merge_and_unload(outer)
    assert unloaded is outer and isinstance(outer.enc, nn.Sequential)
    assert_close(outer.enc(x), expected.double(), torch.float32, "merge_and_unload(module)")


def test_tied_weights_are_merged_under_every_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.out = nn.Linear(6, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    pre = Tied()
    fts = finetuned(pre, 2)
    model = fb.LayerWiseMergedModel(fb.get_layer_wise_weights(2, 1, 0.3), pre, fts)
    sd = model.merge_and_unload().state_dict()
    assert torch.equal(sd["emb.weight"], sd["out.weight"])  # FusionBench feeds the pretrained tensor to "out"
    expected = pre.emb.weight + 0.3 * sum(f.emb.weight - pre.emb.weight for f in fts)
    assert_close(sd["out.weight"], expected.double(), torch.float32, "tied")


def test_resume_refuses_another_layout(tmp_path):
    pre = backbone()
    fts = finetuned(pre, 2)
    heads, data = heads_and_data(2)
    model = fb.LayerWiseMergedModel(fb.get_layer_wise_weights(2, _rows(pre), 0.3), pre, fts)
    af.adamerge(model, heads, data, steps=2, checkpoint=tmp_path / "ck.pt", progress=False)
    again = fb.LayerWiseMergedModel(fb.get_layer_wise_weights(2, _rows(pre), 0.3), pre, fts)
    hist = af.adamerge(again, heads, data, steps=3, resume=tmp_path / "ck.pt", progress=False)
    assert len(hist.loss) == 3
    native = af.AdaMergedModel(pre, fts, parameter_filter="requires_grad")
    with pytest.raises(af.CheckpointError, match="another model"):
        af.adamerge(native, heads, data, steps=3, resume=tmp_path / "ck.pt", progress=False)


def test_bad_inputs():
    pre = backbone()
    fts = finetuned(pre, 2)
    with pytest.raises(ValueError, match=r"init must have shape \[2, 6\]"):
        fb.LayerWiseMergedModel(torch.zeros(8, 2), pre, fts)
    with pytest.raises(ValueError, match=r"init must have shape \[2\]"):
        fb.TaskWiseMergedModel(torch.zeros(1, 2), pre, fts)
    with pytest.raises(TypeError, match="must be a tensor"):
        fb.TaskWiseMergedModel([0.3, 0.3], pre, fts)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        fb.TaskWiseMergedModel(torch.zeros(2), copy.deepcopy(pre).requires_grad_(False), fts)
    with pytest.raises(af.CheckpointError, match="missing key"):
        fb.TaskWiseMergedModel(torch.zeros(2), pre, [nn.Linear(6, 10), fts[1]])
    with pytest.raises(ValueError, match="num_models"):
        fb.get_layer_wise_weights(0, 3)
    with pytest.raises(ValueError, match="sparsity_ratio"):
        fb.LayerWiseMergedModel(torch.zeros(2, 6), pre, fts, sparsity_ratio=1.5)
    with pytest.raises(ValueError, match="coefficient_layout"):
        af.AdaMergedModel(pre, fts, coefficient_layout="tasks")
    with pytest.raises(ValueError, match="normalize"):
        af.AdaMergedModel(pre, fts, normalize="l1")
    with pytest.raises(ValueError, match="parameter_filter"):
        af.AdaMergedModel(pre, fts, parameter_filter="frozen")
