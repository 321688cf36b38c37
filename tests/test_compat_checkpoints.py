"""Official AdaMerging checkpoints (pickled ``src.modeling`` modules) read without running their code.

The fixture writes a ``src/modeling.py`` like the official one into a temporary package, pickles an
``ImageEncoder`` around a tiny open_clip CLIP (text transformer deleted, torchvision preprocessing attached) and
``ClassificationHead``\\ s with ``torch.save``, then removes the package: the loader must not need it.
"""

import copy
import os
import shutil
import sys

import pytest
import torch

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.cli import main
from adamerge_fast.io import CheckpointError, load_state_dict
from adamerge_fast.safe_pickle import RefusedPickle, load_inert, load_official

open_clip = pytest.importorskip("open_clip")  # conftest applied the torchvision workaround
from adamerge_fast.compat.official import AdaMerging  # noqa: E402
from adamerge_fast.models import open_clip as oc  # noqa: E402
from adamerge_fast.models.heads import load_head  # noqa: E402

MODELING = '''
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, model, train_preprocess, val_preprocess, keep_lang=False):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
        self.cache_dir = None
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(torch.zeros_like(self.bias) if biases is None else biases.clone())

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)
'''


def _forget_src():
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """zeroshot.pt, ft1.pt, ft2.pt (ImageEncoder pickles), head1.pt, head2.pt, and what they hold."""
    d = tmp_path_factory.mktemp("official")
    pkg = d / "pkg"
    (pkg / "src").mkdir(parents=True)
    (pkg / "src" / "__init__.py").write_text("")
    (pkg / "src" / "modeling.py").write_text(MODELING)
    sys.path.insert(0, str(pkg))
    try:
        import src.modeling as modeling

        clip = oc.small_clip(0)
        pre = [open_clip.image_transform(32, is_train=True), open_clip.image_transform(32, is_train=False)]
        enc = modeling.ImageEncoder(copy.deepcopy(clip), *pre)
        torch.save(enc, d / "zeroshot.pt")
        ref = {"zeroshot": {k: v.clone() for k, v in enc.state_dict().items()}, "visual": [clip.visual]}
        for k in (1, 2):
            ft = copy.deepcopy(clip)
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in ft.visual.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
            torch.save(modeling.ImageEncoder(ft, *pre), d / f"ft{k}.pt")
            ref["visual"].append(ft.visual)
            head = modeling.ClassificationHead(True, torch.randn(2 + k, 32, generator=g))
            torch.save(head, d / f"head{k}.pt")
            ref[f"head{k}"] = head.weight.detach().clone()
    finally:
        sys.path.remove(str(pkg))
        _forget_src()
        shutil.rmtree(pkg)
    return d, ref


def test_image_encoder_and_head_read_without_src(official):
    d, ref = official
    ck = load_official(d / "zeroshot.pt")
    assert ck.type_name == "src.modeling.ImageEncoder"
    assert list(ck.state_dict) == list(ref["zeroshot"])  # the keys of ImageEncoder.state_dict(), in order
    assert not any(k.startswith("model.transformer.") for k in ck.state_dict)  # the text tower was deleted
    for k, v in ref["zeroshot"].items():
        assert torch.equal(ck.state_dict[k], v), k
    assert sorted(load_state_dict(d / "ft1.pt")) == sorted(ref["zeroshot"])  # no trust_pickle needed
    head = load_official(d / "head1.pt")
    assert head.type_name == "src.modeling.ClassificationHead" and head.attributes["normalize"] is True
    h = load_head(d / "head2.pt")
    assert h.normalize and torch.equal(h.weight, ref["head2"]) and torch.equal(h.bias, torch.zeros(4))
    assert "src" not in sys.modules


def test_importable_src_is_never_imported(official, tmp_path, monkeypatch):
    """Even with a ``src.modeling`` on the path (one whose import would leave a marker), nothing imports it."""
    d, _ = official
    marker = tmp_path / "imported"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "src" / "modeling.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_official(d / "zeroshot.pt")
        load_head(d / "head1.pt")
        assert not marker.exists() and "src" not in sys.modules
    finally:
        _forget_src()


def test_create_clip_and_from_checkpoints(official):
    d, ref = official
    clip = oc.create_clip("small", d / "zeroshot.pt")  # no trust_pickle
    assert clip.transformer is None  # the checkpoint has no text tower
    for (n, a), b in zip(clip.visual.state_dict().items(), ref["visual"][0].state_dict().values(), strict=True):
        assert torch.equal(a, b), n

    ada = AdaMerging.from_checkpoints(d / "zeroshot.pt", [d / "ft1.pt", d / "ft2.pt"], [d / "head1.pt", d / "head2.pt"],
                                      exam_datasets=["a", "b"])
    assert ada.lambdas().shape == (len(list(clip.visual.parameters())), 3)
    # the merged image tower at the prior: theta_0 + 0.3 * sum_k tau_k
    base, fts = ref["visual"][0], ref["visual"][1:]
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in expected.named_parameters():
            p.add_(sum(0.3 * (f.get_parameter(n) - base.get_parameter(n)) for f in fts))
    x = torch.randn(2, 3, 32, 32)
    head = load_head(d / "head2.pt")
    assert_close(ada(x, "b"), head(expected(x)).double(), torch.float32, "from_checkpoints forward")
    hist = af.adamerge(ada.merged, {t: ada.get_classification_head(t) for t in ("a", "b")},
                       {"a": [x], "b": [x.flip(0)]}, steps=2, progress=False)
    assert len(hist.loss) == 2
    assert_close(ada.get_image_encoder()(x), ada.merged(x).double(), torch.float32, "get_image_encoder")


def test_from_checkpoints_options(official, tmp_path):
    d, ref = official
    fts, heads = [d / "ft1.pt", d / "ft2.pt"], {"a": d / "head1.pt", "b": d / "head2.pt"}
    ada = AdaMerging.from_checkpoints(d / "zeroshot.pt", fts, heads, granularity="task", ties={"k": 0.5},
                                      model="small")
    assert ada.exam_datasets == ["a", "b"] and ada.lambdas().shape == (1, 3)
    native = af.AdaMergedModel(oc.image_encoder(oc.create_clip("small", d / "zeroshot.pt")),
                               [oc.visual_state_dict(f) for f in fts], granularity="task", ties={"k": 0.5})
    x = torch.randn(2, 3, 32, 32)
    assert_close(ada.merged(x), native(x).double(), torch.float32, "AdaMerging++ from checkpoints")
    af.save_safetensors({"visual.conv1.weight": torch.zeros(40, 3, 5, 5)}, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="width 40 and patch 5.*pass model="):
        AdaMerging.from_checkpoints(tmp_path / "odd.safetensors", fts, heads)
    with pytest.raises(ValueError, match="2 fine-tuned checkpoints for 3 datasets"):
        AdaMerging.from_checkpoints(d / "zeroshot.pt", fts, heads, exam_datasets=["a", "b", "c"])


def test_cli_open_clip_with_official_checkpoints(official, tmp_path, capsys):
    d, ref = official
    for k in (1, 2):
        torch.save(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(k)), tmp_path / f"data{k}.pt")
    out = tmp_path / "out"
    args = ["adamerge", "--open-clip", "small", "--pretrained", str(d / "zeroshot.pt"),
            "--finetuned", str(d / "ft1.pt"), str(d / "ft2.pt"), "--heads", str(d / "head1.pt"), str(d / "head2.pt"),
            "--data", str(tmp_path / "data1.pt"), str(tmp_path / "data2.pt"), "--steps", "2", "--batch-size", "3",
            "--batches-per-step", "2", "--batch-reduction", "sum", "--no-progress", "-o", str(out)]
    assert main(args) == 0  # no --trust-pickle
    merged = load_state_dict(out / "merged.safetensors")
    assert sorted(merged) == sorted(ref["visual"][0].state_dict())

    capsys.readouterr()
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    i = args.index("--heads")
    no_heads = args[:i] + ["--classnames", str(tmp_path / "c.txt"), str(tmp_path / "c.txt")] + args[i + 3:]
    no_heads += ["-o", str(tmp_path / "out_no_heads")]  # `out` holds the first run's checkpoint
    assert main(no_heads) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "without the text tower" in err and "--heads" in err, err


class RunsCode:
    """Unpickling this calls os.system (the classic code-running pickle)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    name = f"{os.system.__module__}.system"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as e:
        load_state_dict(tmp_path / "evil.pt")
    assert "trust_pickle=True" in str(e.value)
    with pytest.raises(RefusedPickle, match=f"refers to the global '{name}'"):
        load_inert(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_head(tmp_path / "evil.pt")
    assert not marker.exists()


def test_code_inside_an_official_module_is_refused(tmp_path, monkeypatch):
    """An official-looking ImageEncoder carrying a code-running attribute is refused whole."""
    pkg = tmp_path / "pkg"
    (pkg / "src").mkdir(parents=True)
    (pkg / "src" / "__init__.py").write_text("")
    (pkg / "src" / "modeling.py").write_text(MODELING)
    monkeypatch.syspath_prepend(str(pkg))
    marker = tmp_path / "ran"
    try:
        import src.modeling as modeling

        enc = modeling.ImageEncoder(oc.small_clip(0), None, None)
        enc.payload = RunsCode(marker)
        torch.save(enc, tmp_path / "zeroshot.pt")
    finally:
        _forget_src()
    shutil.rmtree(pkg)
    with pytest.raises(CheckpointError, match=r"refers to the global '\w+\.system'"):
        oc.create_clip("small", tmp_path / "zeroshot.pt")
    assert not marker.exists()


def test_other_pickles_still_need_trust(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq.pt")
    with pytest.raises(RefusedPickle, match="not an official AdaMerging checkpoint"):
        load_official(tmp_path / "seq.pt")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_state_dict(tmp_path / "seq.pt")
    assert sorted(load_state_dict(tmp_path / "seq.pt", trust_pickle=True)) == ["0.bias", "0.weight"]
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(RefusedPickle, match="not a torch.save zip archive"):
        load_inert(tmp_path / "junk.pt")
