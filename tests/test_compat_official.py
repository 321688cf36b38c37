"""``adamerge_fast.compat.official`` and the official step against a transcription of the official script.

``OfficialAdaMerging`` and ``official_loop`` below transcribe ``src/main_layer_wise_adamerging.py`` /
``main_task_wise_adamerging.py`` of the paper's repository: ``make_functional`` strips the model's parameters,
``paramslist`` holds the pretrained tensors and the task vectors (``requires_grad`` set, as there), every forward
merges ``sum_i lambdas[j, i] * paramslist[i][j]`` with the pretrained coefficient fixed at 1 and sets the merged
tensors on the model; every step takes a fresh (reshuffled) pass over each task's loader and its first two batches
(``if i > 0: break``), sums the batch-mean entropies over batches and tasks, and takes one Adam step (lr 1e-3,
betas (0.9, 0.999), weight decay 0).
"""

import copy

import pytest
import torch
from _fixtures import perturbed_copies
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.compat.official import OFFICIAL_STEP, AdaMerging, fresh_batches


class Encoder(nn.Module):
    """Stands in for the official ImageEncoder (a module whose forward gives features)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 8))

    def forward(self, x):
        return self.net(x)


class ModelWrapper(nn.Module):  # the script's wrapper around the image encoder
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)


def _set(obj, name, value):
    path, _, leaf = name.rpartition(".")
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    if value is None:
        delattr(obj, leaf)
    else:
        setattr(obj, leaf, value)


def make_functional(mod):
    names = []
    for name, _ in list(mod.named_parameters()):
        _set(mod, name, None)
        names.append(name)
    return names


def load_weights(mod, names, params):
    for name, p in zip(names, params, strict=True):
        _set(mod, name, p)


class OfficialAdaMerging(nn.Module):
    """Transcription of the script's AdaMerging module (layer-wise; ``granularity="task"``: one row)."""

    def __init__(self, paramslist, model, names, exam_datasets, heads, granularity="layer"):
        super().__init__()
        self.paramslist, self.model, self.names, self.granularity = paramslist, model, names, granularity
        rows = len(paramslist[0]) if granularity == "layer" else 1
        self.pretrain_lambdas = torch.ones(rows, 1)
        self.lambdas_raw = nn.Parameter(torch.ones(rows, len(paramslist) - 1) * 0.3)
        for d in exam_datasets:
            self.add_module(f"classifier_{d}", heads[d])

    def lambdas(self):
        return torch.cat((self.pretrain_lambdas, torch.clamp(self.lambdas_raw, min=0.0, max=1.0)), 1)

    def collect_trainable_params(self):
        return [self.lambdas_raw]

    def forward(self, inp, dataset_name):
        alph = self.lambdas()
        params = tuple(sum(tuple(pi * li for pi, li in zip(p, alph[j if self.granularity == "layer" else 0],
                                                           strict=True)))
                       for j, p in enumerate(zip(*self.paramslist)))
        load_weights(self.model, self.names, params)
        return getattr(self, f"classifier_{dataset_name}")(self.model(inp))


def softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def official_loop(model, exam_datasets, loaders, steps):
    """The script's loop (its evaluation parts left out); returns ``lambdas()`` after every step."""
    optimizer = torch.optim.Adam(model.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    traj = []
    for _ in range(steps):
        losses = 0.0
        for dataset_name in exam_datasets:
            for i, x in enumerate(loaders[dataset_name]):  # a new pass: a new shuffle
                outputs = model(x, dataset_name)
                losses += softmax_entropy(outputs).mean(0)
                if i > 0:
                    break
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        traj.append(model.lambdas().detach().clone())
    return traj


class ShuffledLoader:
    """A loader that reshuffles its batches on every pass (as ``get_dataloader_shuffle`` does), seeded."""

    def __init__(self, batches, seed):
        self.batches, self.g = batches, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter([self.batches[i] for i in torch.randperm(len(self.batches), generator=self.g).tolist()])


def fixture(K=3, n_batches=5, bs=4):
    pre = Encoder(0)
    fts = perturbed_copies(pre, K, 0.3)
    torch.manual_seed(100)
    datasets = [f"d{k}" for k in range(K)]
    heads = {d: nn.Linear(8, 3 + k).requires_grad_(False) for k, d in enumerate(datasets)}
    batches = {d: [torch.randn(bs, 6) for _ in range(n_batches)] for d in datasets}
    return pre, fts, datasets, heads, batches


def official_inputs(pre, fts):
    """The script's plumbing: paramslist (pretrained state dict, then task vectors) and a functional model."""
    pre_sd = pre.state_dict()
    tvs = [{k: ft.state_dict()[k] - pre_sd[k] for k in pre_sd} for ft in fts]
    paramslist = [tuple(v.detach().requires_grad_().cpu() for v in pre_sd.values())]
    paramslist += [tuple(v.detach().requires_grad_().cpu() for v in tv.values()) for tv in tvs]
    model = ModelWrapper(copy.deepcopy(pre))
    names = make_functional(model)
    return paramslist, model, names


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_official_loop_runs_on_the_compat_class(granularity):
    pre, fts, datasets, heads, batches = fixture()
    paramslist, model, names = official_inputs(pre, fts)
    theirs = OfficialAdaMerging(paramslist, copy.deepcopy(model), names, datasets, heads, granularity)
    ours = AdaMerging(paramslist, model, names, datasets, heads=heads, granularity=granularity)
    assert torch.equal(ours.lambdas(), theirs.lambdas())
    assert ours.collect_trainable_params()[0] is ours.lambdas_raw
    ref = official_loop(theirs, datasets, {d: ShuffledLoader(b, 7) for d, b in batches.items()}, steps=5)
    got = official_loop(ours, datasets, {d: ShuffledLoader(b, 7) for d, b in batches.items()}, steps=5)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b.double(), torch.float32, f"step {step}")
    assert not torch.equal(ref[-1], ref[0])
    x = batches["d1"][0]
    assert ours.get_classification_head("d1") is heads["d1"]
    enc = ours.get_image_encoder()  # a plain module with the merged weights
    assert_close(heads["d1"](enc(x)), theirs(x, "d1").double(), torch.float32, "get_image_encoder")
    assert_close(ours(x, "d1"), theirs(x, "d1").double(), torch.float32, "forward")
    assert not list(model.parameters())  # the script's functional model is left as it was


@pytest.mark.parametrize("granularity", ["layer", "task"])
@pytest.mark.parametrize("task_batching", ["concat", "sequential"])
def test_adamerge_official_step_matches_official_loop(granularity, task_batching):
    """adamerge(**OFFICIAL_STEP) on fresh_batches(loader) == the script, step by step."""
    pre, fts, datasets, heads, batches = fixture()
    paramslist, model, names = official_inputs(pre, fts)
    theirs = OfficialAdaMerging(paramslist, model, names, datasets, heads, granularity)
    ref = official_loop(theirs, datasets, {d: ShuffledLoader(b, 7) for d, b in batches.items()}, steps=5)
    merged = af.AdaMergedModel(pre, fts, granularity=granularity)
    data = {d: fresh_batches(ShuffledLoader(b, 7)) for d, b in batches.items()}
    hist = af.adamerge(merged, heads, data, steps=5, task_batching=task_batching, progress=False, **OFFICIAL_STEP)
    for step, (a, b) in enumerate(zip(hist.coefficients, ref, strict=True)):
        assert_close(a, b[:, 1:].double(), torch.float32, f"step {step}")


def test_batch_reduction():
    pre, fts, datasets, heads, batches = fixture(n_batches=2)
    losses = {}
    for red in ("mean", "sum"):
        hist = af.adamerge(af.AdaMergedModel(pre, fts), heads, batches, steps=1, batches_per_step=2,
                           batch_reduction=red, progress=False)
        losses[red] = hist.task_loss[0]
    for d in datasets:  # the same two batches: their sum is twice their mean
        assert abs(losses["sum"][d] - 2 * losses["mean"][d]) < 1e-5
    with pytest.raises(ValueError, match="batch_reduction"):
        af.adamerge(af.AdaMergedModel(pre, fts), heads, batches, steps=1, batch_reduction="max", progress=False)


def test_fresh_batches():
    loader = ShuffledLoader([torch.full((1,), float(i)) for i in range(4)], 0)
    it = fresh_batches(loader, per_step=3)
    firsts = [[float(next(it)) for _ in range(3)] for _ in range(3)]
    assert all(len(set(f)) == 3 for f in firsts)  # three distinct batches from each pass
    assert len({tuple(f) for f in firsts}) > 1  # a new shuffle per pass
    with pytest.raises(ValueError, match="gave 1 batch"):
        list(fresh_batches([torch.zeros(1)], per_step=2))
    with pytest.raises(ValueError, match="per_step"):
        next(fresh_batches(loader, per_step=0))


def test_bad_inputs():
    pre, fts, datasets, heads, _ = fixture()
    paramslist, model, names = official_inputs(pre, fts)
    with pytest.raises(ValueError, match="3 task vectors for 2 datasets"):
        AdaMerging(paramslist, model, names, datasets[:2], heads=heads)
    with pytest.raises(ValueError, match="no head for task 'd2'"):
        AdaMerging(paramslist, model, names, datasets, heads={"d0": heads["d0"], "d1": heads["d1"]})
    with pytest.raises(ValueError, match=r"paramslist\[1\] has 5 tensors for 6 names"):
        AdaMerging([paramslist[0], paramslist[1][:5]], model, names, datasets[:1], heads=heads)
    with pytest.raises(ValueError, match="named_parameters"):
        AdaMerging(paramslist, model, names[::-1], datasets, heads=heads)
