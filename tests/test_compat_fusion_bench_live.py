"""FusionBench's own AdaMerging algorithms with our wrappers swapped in (``make test-compat``; skipped without
``fusion_bench``, which ``make test``'s environment does not have).

``LayerWiseAdaMergingAlgorithm.run()`` / ``TaskWiseAdaMergingAlgorithm.run()`` of fusion_bench 0.2.33 run
unchanged on a tiny open_clip image tower (2 fine-tuned copies, 2 tasks of random images, our zero-shot-style
heads) — once with FusionBench's ``LayerWiseMergedModel`` / ``TaskWiseMergedModel`` and once with
``adamerge_fast.compat.fusion_bench``'s, put in their place in the algorithm's module. The ``merge_weight``
trajectories (recorded at every ``merge_weights()`` call, i.e. after every optimizer step) and the merged models
must agree to fp32 rounding.
"""

import copy
import itertools

import pytest
import torch
from torch import nn

from _tol import assert_close

fusion_bench = pytest.importorskip("fusion_bench")
open_clip = pytest.importorskip("open_clip")

import lightning as L  # noqa: E402
from fusion_bench.method.adamerging import layer_wise_adamerging as fb_layer  # noqa: E402
from fusion_bench.method.adamerging import task_wise_adamerging as fb_task  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from adamerge_fast.compat import fusion_bench as ours  # noqa: E402
from adamerge_fast.models import open_clip as oc  # noqa: E402
from adamerge_fast.models.heads import ClassificationHead  # noqa: E402

TASKS = ["t0", "t1"]
STEPS = 8


class Pool:
    """The two things FusionBench's algorithms ask of a model pool; fresh copies every time (its wrappers turn the
    fine-tuned models into task vectors in place)."""

    def __init__(self, pretrained, finetuned):
        self.models = {"_pretrained_": pretrained, **dict(zip(TASKS, finetuned, strict=True))}
        self.model_names = list(TASKS)

    def load_model(self, name):
        return copy.deepcopy(self.models[name])


def _fixture():
    clip = oc.small_clip(0)
    pre = clip.visual.eval()
    pre.positional_embedding.requires_grad_(False)  # a frozen parameter: no row, stays pretrained
    fts = []
    for k in range(2):
        ft = copy.deepcopy(pre)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        fts.append(ft)
    g = torch.Generator().manual_seed(10)
    heads = {t: ClassificationHead(torch.randn(3 + k, 32, generator=g) * 10, normalize=True)
             for k, t in enumerate(TASKS)}
    images = {t: torch.randn(8, 3, 32, 32, generator=g) for t in TASKS}
    return Pool(pre, fts), heads, images


def _recording(cls, traj):
    class Recording(cls):
        def merge_weights(self, *args, **kwargs):
            out = super().merge_weights(*args, **kwargs)
            traj.append(self.merge_weight.detach().clone())
            return out

    return Recording


def _algorithm(base, config, heads, images, tmp_path, batch_first):
    class Tiny(base):
        """The two hooks a FusionBench AdaMerging algorithm leaves to its subclasses, on tiny random images."""

        def __init__(self):
            super().__init__(DictConfig(config))
            loaders = {t: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[t]), batch_size=4)
                       for t in TASKS}
            self.iters = {t: itertools.cycle(loaders[t]) for t in TASKS}

        def get_shuffled_test_loader_iter(self, task):
            return self.iters[task]

        def compute_logits(self, module, batch, task):
            return heads[task](module(batch if batch_first else batch[0]))

    algo = Tiny()
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=L.fabric.loggers.TensorBoardLogger(str(tmp_path)))
    if base is fb_layer.LayerWiseAdaMergingAlgorithm:
        algo.fabric = fabric
    else:
        algo._fabric = fabric  # the task-wise algorithm makes a Fabric only when CUDA is there
    return algo


def _run(module, name, base, config, tmp_path, monkeypatch, batch_first):
    pool, heads, images = _fixture()
    traj = []
    monkeypatch.setattr(module, name, _recording(getattr(module, name), traj))
    merged = _algorithm(base, config, heads, images, tmp_path, batch_first).run(pool)
    monkeypatch.undo()
    return traj, merged


CASES = {
    "layer": (fb_layer, "LayerWiseMergedModel", fb_layer.LayerWiseAdaMergingAlgorithm, ours.LayerWiseMergedModel,
              True),
    "task": (fb_task, "TaskWiseMergedModel", fb_task.TaskWiseAdaMergingAlgorithm, ours.TaskWiseMergedModel, False),
}


@pytest.mark.parametrize("clamp_weights", [True, False])
@pytest.mark.parametrize("kind", ["layer", "task"])
def test_fusion_bench_algorithm_with_our_wrapper(kind, clamp_weights, tmp_path, monkeypatch):
    module, name, base, our_cls, batch_first = CASES[kind]
    config = {"weights": None, "init_values": 0.3, "clamp_weights": clamp_weights, "tie_weights": False,
              "strict": True, "optimizer": "adam", "lr": 2e-2, "max_steps": STEPS, "save_merging_weights": False,
              "fast_dev_run": False}
    ref, ref_model = _run(module, name, base, config, tmp_path / "theirs", monkeypatch, batch_first)
    monkeypatch.setattr(module, name, our_cls)
    got, got_model = _run(module, name, base, config, tmp_path / "ours", monkeypatch, batch_first)
    assert isinstance(got_model, nn.Module) and not isinstance(got_model, our_cls)
    # before the loop and after every step (FusionBench's merge_and_unload() merges once more; ours needs not)
    assert len(got) == STEPS + 1 and len(ref) == STEPS + 2
    assert got[0].shape == ref[0].shape == ((2,) if kind == "task" else (2, len(ref[0][0])))
    for step, (a, b) in enumerate(zip(got, ref[: STEPS + 1], strict=True)):
        assert_close(a, b.double(), torch.float32, f"merge_weight after step {step}")
    assert not torch.allclose(ref[-1], ref[0])  # the weights moved
    a, b = got_model.state_dict(), ref_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k].double(), torch.float32, f"merged {k}")
