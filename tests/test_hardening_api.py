"""The Python API under bad values (issue #11): the optimizer stops on non-finite values, every argument is checked
by the call that receives it, static merges check finiteness after the storage cast and on every output, resume
refuses a changed algorithm and an altered checkpoint, and fast-forwards the data without decoding it."""

import copy
import math

import pytest
import torch
from _fixtures import perturbed_copies
from torch import nn

import adamerge_fast as af
from adamerge_fast.io import CheckpointError, NonFiniteError, save_safetensors
from adamerge_fast.optim import save_checkpoint

NAN, INF = float("nan"), float("inf")


def _models(K=2, seed=0):
    torch.manual_seed(seed)
    pre = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 8))
    return pre, perturbed_copies(pre, K, 0.3)


def _problem(K=2, n_batches=3, bs=4):
    pre, fts = _models(K)
    torch.manual_seed(100)
    heads = {f"t{k}": nn.Linear(8, 3 + k).requires_grad_(False) for k in range(K)}
    data = {t: [torch.randn(bs, 6) for _ in range(n_batches)] for t in heads}
    return pre, fts, heads, data


def _run(model, heads, data, **kw):
    kw.setdefault("steps", 3)
    return af.adamerge(model, heads, data, progress=False, **kw)


# ------------------------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("task_batching", ["concat", "sequential"])
def test_nan_in_data_stops_naming_task_and_step_and_keeps_the_checkpoint(tmp_path, task_batching):
    pre, fts, heads, data = _problem(n_batches=4)
    data["t1"][2][1, 3] = NAN  # the third batch of t1: step 2
    model = af.AdaMergedModel(pre, fts)
    ck = tmp_path / "ck.pt"
    with pytest.raises(NonFiniteError, match=r"task 't1'.* step 2\b") as ei:
        _run(model, heads, data, steps=6, checkpoint=ck, checkpoint_every=1, task_batching=task_batching)
    assert "checkpoint" in str(ei.value) and "step 2" in str(ei.value)
    assert torch.isfinite(model.raw_coefficients).all()  # stopped before the update
    ck_data = torch.load(ck, weights_only=True)
    assert ck_data["step"] == 2 and torch.isfinite(ck_data["raw_coefficients"]).all()
    assert not list(tmp_path.glob(".ck.pt*"))
    # the last good checkpoint resumes (with the bad batch replaced)
    data["t1"][2][1, 3] = 0.0
    h = _run(af.AdaMergedModel(pre, fts), heads, data, steps=4, resume=ck, task_batching=task_batching)
    assert len(h.loss) == 4 and all(math.isfinite(v) for v in h.loss)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_head_logits_stop(bad):
    pre, fts, heads, data = _problem()

    class Bad(nn.Module):
        def forward(self, x):
            out = heads["t0"](x).clone()
            out[:, 0] = bad  # -inf in one column is a valid mask; NaN/+inf, or -inf everywhere, are not
            if bad == -INF:
                out[:] = bad
            return out

    with pytest.raises(NonFiniteError, match=r"task 't0'.* step 0\b"):
        _run(af.AdaMergedModel(pre, fts), {**heads, "t0": Bad()}, data)


def test_non_finite_coefficient_gradient_stops():
    pre, fts, heads, data = _problem()
    model = af.AdaMergedModel(pre, fts)
    before = model.raw_coefficients.detach().clone()
    model.raw_coefficients.register_hook(lambda g: g * INF)
    with pytest.raises(NonFiniteError, match=r"coefficient gradient.* step 0\b"):
        _run(model, heads, data)
    assert torch.equal(model.raw_coefficients.detach(), before)


def test_save_merged_refuses_non_finite_weights(tmp_path):
    pre, fts = _models()
    model = af.AdaMergedModel(pre, fts, clamp=None)
    with torch.no_grad():
        model.raw_coefficients[1, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"merged tensor '0.bias'"):
        model.save_merged(tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kw,exc,match", [
    (dict(clamp=(1.0, 0.0)), ValueError, r"clamp.*lo <= hi"),
    (dict(clamp=(NAN, NAN)), ValueError, r"clamp.*NaN"),
    (dict(clamp=(0.0,)), ValueError, r"clamp.*\(lo, hi\)"),
    (dict(init=NAN), ValueError, r"init.*finite"),
    (dict(init=INF), ValueError, r"init.*finite"),
    (dict(init=torch.full((8, 2), NAN)), ValueError, r"init.*finite"),
    (dict(ties={"k": 0.0}), ValueError, r"ties.*k.*\(0, 1\]"),
    (dict(ties={"k": 1.5}), ValueError, r"ties.*k.*\(0, 1\]"),
    (dict(ties={"k": NAN}), ValueError, r"ties.*k.*\(0, 1\]"),
    (dict(ties={"kk": 0.2}), ValueError, r"ties.*'kk'"),
    (dict(ties={"scope": "layer"}), ValueError, r"scope"),
    (dict(task_vector_dtype=torch.int32), TypeError, r"task_vector_dtype.*floating"),
    (dict(task_vector_dtype="fp16"), TypeError, r"task_vector_dtype"),
    (dict(backend="nonexistent"), ValueError, r"backend.*nonexistent"),
])
def test_adamerged_model_checks_its_arguments(kw, exc, match):
    pre, fts = _models()
    with pytest.raises(exc, match=match):
        af.AdaMergedModel(pre, fts, **kw)


def test_ties_split_checks_k():
    tv = {"w": torch.randn(2, 5)}
    for k in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"k.*\(0, 1\]"):
            af.ties_split(tv, k=k)


def test_adamerge_checks_its_arguments(tmp_path):
    pre, fts, heads, data = _problem()
    model = af.AdaMergedModel(pre, fts)
    ck = tmp_path / "ck.pt"
    for kw, exc, match in [
        (dict(checkpoint=ck, checkpoint_every=0), ValueError, r"checkpoint_every.*>= 1"),
        (dict(checkpoint=ck, checkpoint_every=-2), ValueError, r"checkpoint_every.*>= 1"),
        (dict(checkpoint_every=2), ValueError, r"checkpoint_every.*without checkpoint"),
        (dict(lr=NAN), ValueError, r"lr.*finite"),
        (dict(lr=0.0), ValueError, r"lr.*> 0"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas"),
        (dict(steps=2.5), TypeError, r"steps.*integer"),
        (dict(batches_per_step=0), ValueError, r"batches_per_step"),
    ]:
        with pytest.raises(exc, match=match):
            _run(model, heads, data, **kw)
    assert not ck.exists()


def test_heads_must_return_a_row_per_example():
    pre, fts, heads, data = _problem()
    for bad_head, match in [(lambda f: heads["t1"](f)[:, 0], r"task 't1'.*head.*\[4\].*\[B, C\]"),
                            (lambda f: heads["t1"](f)[:2], r"task 't1'.*head.*2 rows.*batch of 4")]:
        for tb in ("concat", "sequential"):
            with pytest.raises(ValueError, match=match):
                _run(af.AdaMergedModel(pre, fts), {**heads, "t1": bad_head}, data, task_batching=tb)


def test_one_shot_generator_that_runs_out():
    pre, fts, heads, data = _problem()

    def gen(t):
        yield from data[t][:2]

    with pytest.raises(ValueError, match=r"task 't0'.*ran out after 2 batches.*re-iterable"):
        _run(af.AdaMergedModel(pre, fts), heads, {t: gen(t) for t in heads}, steps=5)
    # an endless one-shot iterator is fine
    import itertools

    h = _run(af.AdaMergedModel(pre, fts), heads, {t: itertools.cycle(data[t]) for t in heads}, steps=5)
    assert len(h.loss) == 5


@pytest.mark.parametrize("batch", ["a string", 3, (), [None], {"x": "not a tensor"}])
def test_unsupported_batch_types(batch):
    pre, fts, heads, data = _problem()
    with pytest.raises(TypeError, match=r"task 't1'.*batch"):
        _run(af.AdaMergedModel(pre, fts), heads, {**data, "t1": [batch]})


# -------------------------------------------------------------------------------------- static merges
def test_static_merges_check_their_values():
    pre, fts = _models()
    base = {k: v.detach() for k, v in pre.state_dict().items()}
    tv = af.task_vectors(base, [m.state_dict() for m in fts])
    for bad in (NAN, INF):
        with pytest.raises(ValueError, match="scale.*finite"):
            af.task_arithmetic(base, tv, bad)
        with pytest.raises(ValueError, match="scale.*finite"):
            af.ties_merge(base, tv, scale=bad)
    with pytest.raises(ValueError, match=r"k.*\(0, 1\]"):
        af.ties_merge(base, tv, k=1.5)


def test_task_vectors_overflowing_fp16_name_key_and_dtype():
    pre, fts = _models()
    base = {k: v.detach() for k, v in pre.state_dict().items()}
    big = {k: v + 1e5 for k, v in base.items()}
    with pytest.raises(NonFiniteError, match=r"task vector 0: key '0.weight' overflows float16.*bfloat16 or float32"):
        af.task_vectors(base, [big], dtype=torch.float16)
    tv = af.task_vectors(base, [big], dtype=torch.bfloat16)  # bf16 holds it
    assert torch.isfinite(tv["0.weight"]).all()


def test_nan_in_the_pretrained_checkpoint_names_its_file_and_key(tmp_path):
    pre, fts = _models()
    sd = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    sd["3.bias"][2] = NAN
    save_safetensors(sd, tmp_path / "pre.safetensors")
    save_safetensors(fts[0].state_dict(), tmp_path / "ft0.safetensors")
    with pytest.raises(NonFiniteError, match=r"pre.safetensors: key '3.bias' has NaN or inf values \(1 NaN") as ei:
        af.task_vectors(tmp_path / "pre.safetensors", [tmp_path / "ft0.safetensors"])
    assert "task vector" not in str(ei.value)
    ft = {k: v.detach().clone() for k, v in fts[0].state_dict().items()}
    ft["0.weight"][0, 0] = INF
    save_safetensors(ft, tmp_path / "ft_bad.safetensors")
    with pytest.raises(CheckpointError, match=r"ft_bad.safetensors: key '0.weight' has NaN or inf values \(0 NaN, 1"):
        af.task_vectors(pre.state_dict(), [tmp_path / "ft0.safetensors", tmp_path / "ft_bad.safetensors"])


# --------------------------------------------------------------------------------------------- resume
def test_resume_refuses_changed_settings(tmp_path):
    pre, fts, heads, data = _problem()
    ck = tmp_path / "ck.pt"
    _run(af.AdaMergedModel(pre, fts), heads, data, steps=2, lr=0.01, checkpoint=ck, settings={"seed": 0})
    for model_kw, run_kw, match in [
        ({}, dict(lr=0.02), r"lr.*0\.01.*0\.02"),
        ({}, dict(betas=(0.8, 0.999)), r"betas"),
        ({}, dict(batches_per_step=2), r"batches_per_step.*1.*2"),
        ({}, dict(settings={"seed": 1}), r"seed.*0.*1"),
        (dict(ties={"k": 0.5}), {}, r"ties"),
        (dict(clamp=(0.0, 2.0)), {}, r"clamp"),
        (dict(init=0.5), {}, r"init.*0\.3.*0\.5"),
        (dict(task_vector_dtype=torch.bfloat16), {}, r"task_vector_dtype"),
    ]:
        run_kw = {"lr": 0.01, "settings": {"seed": 0}, **run_kw}
        with pytest.raises(CheckpointError, match=match):
            _run(af.AdaMergedModel(pre, fts, **model_kw), heads, data, steps=4, resume=ck, **run_kw)
    with pytest.raises(ValueError, match=r"steps.*1.*below the checkpoint's step 2"):
        _run(af.AdaMergedModel(pre, fts), heads, data, steps=1, lr=0.01, resume=ck, settings={"seed": 0})
    h = _run(af.AdaMergedModel(pre, fts), heads, data, steps=3, lr=0.01, resume=ck, settings={"seed": 0},
             task_batching="sequential")  # not an algorithm setting
    assert len(h.loss) == 3


def test_resume_verifies_the_payload_digest(tmp_path):
    pre, fts, heads, data = _problem()
    ck = tmp_path / "ck.pt"
    _run(af.AdaMergedModel(pre, fts), heads, data, steps=2, checkpoint=ck)
    obj = torch.load(ck, weights_only=True)
    assert isinstance(obj["digest"], str) and len(obj["digest"]) == 64
    obj["raw_coefficients"][0, 0] += 0.25
    torch.save(obj, ck)
    with pytest.raises(CheckpointError, match=r"ck.pt: .*digest"):
        _run(af.AdaMergedModel(pre, fts), heads, data, steps=4, resume=ck)
    obj["raw_coefficients"][0, 0] -= 0.25
    obj["history"]["loss"][0] = 0.0
    torch.save(obj, ck)
    with pytest.raises(CheckpointError, match=r"digest"):
        _run(af.AdaMergedModel(pre, fts), heads, data, steps=4, resume=ck)


def test_save_checkpoint_refuses_non_finite_coefficients(tmp_path):
    pre, fts = _models()
    model = af.AdaMergedModel(pre, fts)
    opt = torch.optim.Adam([model.raw_coefficients])
    with torch.no_grad():
        model.raw_coefficients[0, 0] = NAN
    with pytest.raises(NonFiniteError, match="raw_coefficients"):
        save_checkpoint(tmp_path / "ck.pt", model, opt, af.History(), 1)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ fast-forward on resume
class _Indexed(torch.utils.data.Dataset):
    """Item i is the tensor [i]; counts the items read (in this process)."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.tensor([float(i)])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("n", [0, 2, 4, 9, 13])
def test_loader_skip_batches_equals_drawing_them(n, workers):
    from adamerge_fast.data import loader

    def batches(dl, k):
        out, it = [], iter(dl)
        while len(out) < k:
            try:
                out.append(next(it).flatten().tolist())
            except StopIteration:
                it = iter(dl)
        return out

    ref = batches(loader(_Indexed(10), 3, seed=5, workers=workers), n + 8)  # 4 batches per epoch
    ds = _Indexed(10)
    dl = loader(ds, 3, seed=5, workers=workers)
    dl.skip_batches(n)
    assert ds.reads == 0
    assert batches(dl, 8) == ref[n:], "the batches after the skipped ones are those of an uninterrupted run"


def test_resume_fast_forwards_an_image_folder_without_decoding(tmp_path):
    from PIL import Image

    from adamerge_fast.data import ImageTransform, load_task_data

    for i in range(10):
        Image.new("RGB", (9 + i, 8), (20 * i, 5, 7)).save(tmp_path / f"{i}.png")
    decoded = []

    class Counting(ImageTransform):
        def __call__(self, img):
            decoded.append(1)
            return super().__call__(img)

    torch.manual_seed(0)
    pre = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    fts = [copy.deepcopy(pre) for _ in range(2)]
    for i, m in enumerate(fts):
        with torch.no_grad():
            m[1].weight.add_(0.05 * torch.randn(m[1].weight.shape, generator=torch.Generator().manual_seed(i)))
    heads = {t: nn.Linear(8, 3).requires_grad_(False) for t in ("a", "b")}

    def data():
        return {t: load_task_data(tmp_path, batch_size=3, transform=Counting(8), seed=s) for s, t in enumerate(heads)}

    full = _run(af.AdaMergedModel(pre, fts), heads, data(), steps=11, lr=0.05)
    ck = tmp_path / "ck.pt"
    _run(af.AdaMergedModel(pre, fts), heads, data(), steps=9, lr=0.05, checkpoint=ck)  # 9 steps: past 2 epochs
    decoded.clear()
    model = af.AdaMergedModel(pre, fts)
    resumed = _run(model, heads, data(), steps=11, lr=0.05, resume=ck)
    # steps 9 and 10 read batches 9, 10 of each task: the 2nd and 3rd batch of the third epoch (3 images each)
    assert len(decoded) == 2 * (3 + 3)
    assert resumed.loss == full.loss
    assert torch.equal(model.coefficients.detach(), full.coefficients[-1])


def test_unreadable_data_is_reported_as_permission_denied(tmp_path, monkeypatch):
    import errno
    import os

    from adamerge_fast.data import load_task_data

    f = tmp_path / "x.pt"
    torch.save(torch.randn(4, 6), f)
    real_stat = os.stat

    def no_search(p, *a, **k):
        if str(p) == str(f):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", no_search)
    with pytest.raises(PermissionError, match=r"x.pt: data for task 't0': permission denied"):
        load_task_data(f, batch_size=2, task="t0")
    with pytest.raises(FileNotFoundError, match=r"y.pt: data for task 't0' not found"):
        load_task_data(tmp_path / "y.pt", batch_size=2, task="t0")
