"""The entropy optimizer against a step-by-step transcription of the official algorithm."""

import pytest
import torch
from _fixtures import perturbed_copies
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.io import CheckpointError
from adamerge_fast.optim import HISTORY_FORMAT, load_history, save_history


def backbone(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 8))


def setup(K=3, granularity="layer", n_batches=3, bs=4):
    pre = backbone(0)
    fts = perturbed_copies(pre, K, 0.3)
    torch.manual_seed(100)
    heads = {f"t{k}": nn.Linear(8, 3 + k).requires_grad_(False) for k in range(K)}
    data = {t: [torch.randn(bs, 6) for _ in range(n_batches)] for t in heads}
    return pre, fts, heads, data


def official(pre, fts, heads, data, steps, granularity="layer", lr=1e-3):
    """The official AdaMerging loop: per task batch, merge every parameter (clamped lambdas, pretrained
    coefficient 1), forward, batch-mean softmax entropy; sum over tasks; Adam step."""
    names = [n for n, _ in pre.named_parameters()]
    base = {n: p.detach() for n, p in pre.named_parameters()}
    tvs = [{n: dict(ft.named_parameters())[n].detach() - base[n] for n in names} for ft in fts]
    rows = len(names) if granularity == "layer" else 1
    raw = torch.full((rows, len(fts)), 0.3, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))
    its = {t: iter(data[t] * 100) for t in heads}
    traj = []
    for _ in range(steps):
        losses = 0.0
        for t, head in heads.items():
            x = next(its[t])
            lam = torch.clamp(raw, 0.0, 1.0)
            params = {
                n: base[n] + sum(lam[i if rows > 1 else 0, k] * tvs[k][n] for k in range(len(fts)))
                for i, n in enumerate(names)
            }
            out = head(torch.func.functional_call(pre, params, (x,)))
            p = out.softmax(1)
            losses = losses + (-(p * out.log_softmax(1)).sum(1)).mean(0)
        opt.zero_grad()
        losses.backward()
        opt.step()
        traj.append(torch.clamp(raw, 0, 1).detach().clone())
    return traj


@pytest.mark.parametrize("granularity", ["layer", "task"])
@pytest.mark.parametrize("task_batching", ["concat", "sequential"])
def test_matches_official_algorithm(granularity, task_batching):
    pre, fts, heads, data = setup()
    ref = official(pre, fts, heads, data, steps=6, granularity=granularity)
    model = af.AdaMergedModel(pre, fts, granularity=granularity)
    hist = af.adamerge(model, heads, data, steps=6, task_batching=task_batching, progress=False)
    assert len(hist.loss) == 6 and len(hist.coefficients) == 6
    for step, (a, b) in enumerate(zip(hist.coefficients, ref, strict=True)):
        assert_close(a, b.double(), torch.float32, f"step {step}")
    assert set(hist.task_loss[0]) == set(heads)
    assert abs(hist.loss[0] - sum(hist.task_loss[0].values())) < 1e-5


def test_entropy_decreases_on_fixed_batches():
    pre, fts, heads, data = setup(n_batches=1)
    hist = af.adamerge(af.AdaMergedModel(pre, fts), heads, data, steps=15, lr=0.05, progress=False)
    assert hist.loss[-1] < hist.loss[0] - 1e-3


def test_batches_per_step_and_labelled_batches():
    pre, fts, heads, data = setup(n_batches=4)
    labelled = {t: [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs] for t, xs in data.items()}
    a = af.adamerge(af.AdaMergedModel(pre, fts), heads, labelled, steps=3, batches_per_step=2, progress=False)
    # two batches per step of equal size == one concatenated batch per step
    cat = {t: [torch.cat(xs[i : i + 2]) for i in range(0, 4, 2)] for t, xs in data.items()}
    b = af.adamerge(af.AdaMergedModel(pre, fts), heads, cat, steps=3, progress=False)
    for x, y in zip(a.coefficients, b.coefficients, strict=True):
        assert_close(x, y.double(), torch.float32, "batches_per_step")


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    pre, fts, heads, data = setup()
    full = af.adamerge(af.AdaMergedModel(pre, fts), heads, data, steps=7, progress=False)
    ck = tmp_path / "ck.pt"
    part = af.AdaMergedModel(pre, fts)
    af.adamerge(part, heads, data, steps=4, checkpoint=ck, checkpoint_every=2, progress=False)
    resumed_model = af.AdaMergedModel(pre, fts)
    resumed = af.adamerge(resumed_model, heads, data, steps=7, resume=ck, progress=False)
    assert len(resumed.loss) == 7
    assert torch.equal(resumed.coefficients[-1], full.coefficients[-1])
    assert torch.equal(resumed_model.coefficients.detach(), full.coefficients[-1])
    assert not list(tmp_path.glob(".ck.pt.*"))  # no temp files left behind

    other = af.AdaMergedModel(pre, fts, granularity="task")
    with pytest.raises(CheckpointError, match="another model"):
        af.adamerge(other, heads, data, steps=7, resume=ck, progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        af.adamerge(other, heads, data, steps=7, resume=tmp_path / "missing.pt", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not an adamerge_fast checkpoint"):
        af.adamerge(other, heads, data, steps=7, resume=tmp_path / "junk.pt", progress=False)


def test_bad_inputs():
    pre, fts, heads, data = setup()
    model = af.AdaMergedModel(pre, fts)
    with pytest.raises(ValueError, match="task 't1' has no data"):
        af.adamerge(model, heads, {**data, "t1": []}, steps=1, progress=False)
    with pytest.raises(ValueError, match="task 't2' has a head but no data"):
        af.adamerge(model, heads, {"t0": data["t0"], "t1": data["t1"]}, steps=1, progress=False)
    with pytest.raises(ValueError, match="no tasks"):
        af.adamerge(model, {}, data, steps=1, progress=False)
    with pytest.raises(ValueError, match="task_batching"):
        af.adamerge(model, heads, data, steps=1, task_batching="parallel", progress=False)
    ragged = {**data, "t0": [torch.randn(4, 7)]}
    with pytest.raises(ValueError, match="sequential"):
        af.adamerge(model, heads, ragged, steps=1, progress=False)


def test_history_file_round_trip(tmp_path):
    pre, fts, heads, data = setup()
    model = af.AdaMergedModel(pre, fts, task_names=list(heads))
    hist = af.adamerge(model, heads, data, steps=3, progress=False)
    path = save_history(tmp_path / "run" / "history.json", hist, model, {"steps": 3, "model": {"model": "mlp"}})
    h = load_history(path)
    assert h["format"] == HISTORY_FORMAT and h["tasks"] == list(heads) and h["granularity"] == "layer"
    assert h["loss"] == hist.loss and h["task_loss"] == hist.task_loss
    assert h["coefficient_rows"] == [r for r, _ in model.coefficient_table()]
    assert h["coefficients"] == [v for _, v in model.coefficient_table()]
    assert h["trajectory_stride"] == 1
    assert h["mean_coefficient_trajectory"] == [c.float().mean(0).tolist() for c in hist.coefficients]
    assert h["steps"] == 3 and h["model"] == {"model": "mlp"}
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]  # no temporary file left

    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not a JSON file"):
        load_history(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something/1", "loss": []}')
    with pytest.raises(ValueError, match="other.json: not an adamerge history file"):
        load_history(tmp_path / "other.json")
    (tmp_path / "partial.json").write_text(f'{{"format": "{HISTORY_FORMAT}", "tasks": ["a"], "granularity": "task"}}')
    with pytest.raises(ValueError, match="partial.json: adamerge history file without 'loss'"):
        load_history(tmp_path / "partial.json")
