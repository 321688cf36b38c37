"""The ``adamerge-fast`` command line end to end on tiny fixtures (in-process through ``main``; one subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adamerge_fast import cli
from adamerge_fast.cli import main
from adamerge_fast.io import save_safetensors
from adamerge_fast.merging import task_vectors, ties_merge
from adamerge_fast.models.heads import ClassificationHead

ROOT = Path(__file__).resolve().parents[1]


def tiny_backbone():
    """The --model-factory used below (``test_cli:tiny_backbone``)."""
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 6))


def _perturb(sd, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    pre = tiny_backbone().state_dict()
    save_safetensors(pre, d / "pre.safetensors")
    for k in range(3):
        sd = _perturb(pre, k + 1)
        if k == 2:
            torch.save(sd, d / f"ft{k}.pt")  # a torch state-dict file works as well
        else:
            save_safetensors(sd, d / f"ft{k}.safetensors")
        w = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + k))
        ClassificationHead(w, torch.zeros(4), normalize=k == 0).save(d / f"head{k}.safetensors")
        x = torch.randn(24, 8, generator=torch.Generator().manual_seed(20 + k))
        if k == 1:
            np.save(d / f"data{k}.npy", x.numpy())
        else:
            torch.save(x, d / f"data{k}.pt")
    save_safetensors({"0.weight": torch.ones(3, 3)}, d / "other_arch.safetensors")
    torch.save(torch.zeros(0, 8), d / "empty.pt")
    (d / "empty_dir").mkdir()
    return d


def _ft(d):
    return [str(d / "ft0.safetensors"), str(d / "ft1.safetensors"), str(d / "ft2.pt")]


def _module_args(d, out, *extra):
    return ["adamerge", "--model-factory", "test_cli:tiny_backbone", "--pretrained", str(d / "pre.safetensors"),
            "--finetuned", *_ft(d), "--heads", *[str(d / f"head{k}.safetensors") for k in range(3)],
            "--data", str(d / "data0.pt"), str(d / "data1.npy"), str(d / "data2.pt"),
            "--batch-size", "8", "--no-progress", "-o", str(out), *extra]


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties", "dare"])
def test_merge_methods(fixture_dir, tmp_path, method, capsys):
    d = fixture_dir
    out = tmp_path / f"{method}.safetensors"
    extra = ["--scale", "0.4"] if method != "average" else []
    pre_ft = ["--pretrained", str(d / "pre.safetensors"), "--finetuned", *_ft(d)]
    assert main(["merge", "--method", method, *pre_ft, "-o", str(out), *extra]) == 0
    got = load_file(str(out))
    pre = load_file(str(d / "pre.safetensors"))
    fts = [load_file(str(d / "ft0.safetensors")), load_file(str(d / "ft1.safetensors")), torch.load(d / "ft2.pt")]
    assert got.keys() == pre.keys()
    for k in pre:
        taus = torch.stack([f[k] - pre[k] for f in fts])
        if method == "average":
            torch.testing.assert_close(got[k], pre[k] + taus.mean(0))
        elif method == "task-arithmetic":
            torch.testing.assert_close(got[k], pre[k] + 0.4 * taus.sum(0))
    if method == "ties":
        ref = ties_merge(pre, task_vectors(pre, fts), k=0.2, scale=0.4)
        for k in pre:
            torch.testing.assert_close(got[k], ref[k])
    if method == "dare":  # seeded: the same output twice, a different one with another seed
        out2 = tmp_path / "dare2.safetensors"
        main(["merge", "--method", "dare", *pre_ft, "-o", str(out2), *extra])
        out3 = tmp_path / "dare3.safetensors"
        main(["merge", "--method", "dare", "--seed", "5", *pre_ft, "-o", str(out3), *extra])
        a, b, c = load_file(str(out)), load_file(str(out2)), load_file(str(out3))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


# --------------------------------------------------------------------------------------------- adamerge
@pytest.mark.slow
def test_adamerge_interrupted_and_resumed(fixture_dir, tmp_path, monkeypatch, capsys):
    d = fixture_dir
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    full = tmp_path / "full"
    assert main(_module_args(d, full, "--steps", "8", "--lr", "0.01")) == 0
    for f in ("merged.safetensors", "coefficients.safetensors", "history.json", "checkpoint.pt"):
        assert (full / f).is_file(), f

    part = tmp_path / "part"

    def interrupt(step):
        if step == 4:  # steps 0..4 done; the last checkpoint (every 2) holds step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_STEP_HOOK", interrupt)
    assert main(_module_args(d, part, "--steps", "8", "--lr", "0.01", "--checkpoint-every", "2")) == 130
    assert "--resume" in capsys.readouterr().err
    assert not (part / "merged.safetensors").exists()
    monkeypatch.setattr(cli, "_STEP_HOOK", None)
    assert main(_module_args(d, part, "--steps", "8", "--lr", "0.01", "--checkpoint-every", "2", "--resume")) == 0

    a, b = load_file(str(full / "coefficients.safetensors")), load_file(str(part / "coefficients.safetensors"))
    torch.testing.assert_close(a["raw_coefficients"], b["raw_coefficients"], rtol=0, atol=0)
    ha, hb = json.loads((full / "history.json").read_text()), json.loads((part / "history.json").read_text())
    assert len(hb["loss"]) == 8
    np.testing.assert_array_equal(ha["loss"], hb["loss"])
    ma, mb = load_file(str(full / "merged.safetensors")), load_file(str(part / "merged.safetensors"))
    assert ma.keys() == set(tiny_backbone().state_dict())
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    # plot the run: two PNGs
    capsys.readouterr()
    assert main(["plot", str(full), "-o", str(tmp_path / "plots")]) == 0
    for f in ("coefficients.png", "loss.png"):
        data = (tmp_path / "plots" / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    # a checkpoint of another model (task-wise vs layer-wise) cannot be resumed: one line
    capsys.readouterr()
    assert main(_module_args(d, part, "--steps", "9", "--granularity", "task", "--resume")) == 1
    _one_error_line(capsys, "another model")


def test_adamerge_task_wise_ties_and_options(fixture_dir, tmp_path, monkeypatch):
    d = fixture_dir
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "tw"
    assert main(_module_args(d, out, "--steps", "3", "--granularity", "task", "--ties", "--task-batching", "sequential",
                             "--task-names", "a", "b", "c", "--batches-per-step", "2")) == 0
    h = json.loads((out / "history.json").read_text())
    assert h["tasks"] == ["a", "b", "c"] and h["granularity"] == "task" and h["ties"]
    assert len(h["coefficients"]) == 1 and len(h["coefficients"][0]) == 3


def test_adamerge_factory_from_file(fixture_dir, tmp_path):
    d = fixture_dir
    f = tmp_path / "factory.py"
    f.write_text("from torch import nn\n\ndef make():\n"
                 "    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 6))\n")
    args = _module_args(d, tmp_path / "o", "--steps", "2")
    args[args.index("test_cli:tiny_backbone")] = f"{f}:make"
    assert main(args) == 0


@pytest.mark.slow
def test_adamerge_open_clip(tmp_path, capsys):
    from PIL import Image

    from adamerge_fast.models import open_clip as oc

    clip = oc.small_clip(0)
    save_safetensors(clip.state_dict(), tmp_path / "pre.safetensors")
    vis = clip.visual.state_dict()
    full_clip_layout = {f"visual.{k}": v for k, v in _perturb(vis, 1, 0.02).items()}
    save_safetensors(full_clip_layout, tmp_path / "ft0.safetensors")
    save_safetensors(_perturb(vis, 2, 0.02), tmp_path / "ft1.safetensors")  # visual-only layout
    for t, classes in (("t0", "cat\ndog\n"), ("t1", "# comment\nred\ngreen\nblue\n")):
        (tmp_path / f"{t}.txt").write_text(classes)
        (tmp_path / t).mkdir()
        for i in range(6):
            arr = (np.random.default_rng(i + (10 if t == "t1" else 0)).random((40, 48, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(tmp_path / t / f"{i}.png")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nan image of the {c}\n")
    out = tmp_path / "out"
    args = ["adamerge", "--open-clip", "small", "--pretrained", str(tmp_path / "pre.safetensors"),
            "--finetuned", str(tmp_path / "ft0.safetensors"), str(tmp_path / "ft1.safetensors"),
            "--classnames", str(tmp_path / "t0.txt"), str(tmp_path / "t1.txt"),
            "--templates", str(tmp_path / "templates.txt"),
            "--data", str(tmp_path / "t0"), str(tmp_path / "t1"), "--steps", "2", "--batch-size", "3",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", str(out)]
    assert main(args) == 0
    assert load_file(str(out / "merged.safetensors")).keys() == vis.keys()
    # the full CLIP model (merged image encoder, pretrained text tower), read back by open_clip's own loader
    merged = load_file(str(out / "merged_clip.safetensors"))
    assert merged.keys() == clip.state_dict().keys()
    back = oc.small_clip(seed=1)
    oc.import_open_clip().load_checkpoint(back, str(out / "merged_clip.safetensors"))
    assert all(torch.equal(back.state_dict()[k], merged[k]) for k in merged)
    assert not torch.equal(merged["visual.proj"], clip.state_dict()["visual.proj"])
    assert torch.equal(merged["text_projection"], clip.state_dict()["text_projection"])
    assert len(list((tmp_path / "cache" / "heads").glob("*.safetensors"))) == 2
    h = json.loads((out / "history.json").read_text())
    assert h["tasks"] == ["t0", "t1"] and len(h["loss"]) == 2

    # a task with no data: one line naming the task
    (tmp_path / "t_empty").mkdir()
    capsys.readouterr()
    args[args.index(str(tmp_path / "t1"))] = str(tmp_path / "t_empty")
    args[args.index(str(out))] = str(tmp_path / "out_empty")  # `out` holds the first run's checkpoint
    assert main(args) == 1
    _one_error_line(capsys, "no images", "t_empty")


def _word_tokenizer(words):
    """A word-level fast tokenizer built offline (saved with save_pretrained, loaded back by AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from adamerge_fast.models import hf

    tf = hf.import_transformers()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"), vocab


@pytest.mark.slow
def test_adamerge_hf_clip(tmp_path):
    from PIL import Image

    from adamerge_fast.models import hf

    tf = hf.import_transformers()
    fast, _ = _word_tokenizer("a photo of the cat dog red green blue".split())
    torch.manual_seed(0)
    clip = tf.CLIPModel(hf.tiny_clip_config(text={"vocab_size": 16})).eval()
    clip.save_pretrained(tmp_path / "pre")
    fast.save_pretrained(tmp_path / "pre")
    for k in range(2):
        m = tf.CLIPModel(hf.tiny_clip_config(text={"vocab_size": 16})).eval()
        m.load_state_dict(_perturb(clip.state_dict(), k + 1, 0.02))
        m.save_pretrained(tmp_path / f"ft{k}")
        (tmp_path / f"c{k}.txt").write_text("cat\ndog\n" if k == 0 else "red\ngreen\nblue\n")
        (tmp_path / f"img{k}").mkdir()
        for i in range(4):
            arr = (np.random.default_rng(10 * k + i).random((36, 40, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(tmp_path / f"img{k}" / f"{i}.jpg")
    out = tmp_path / "out"
    assert main(["adamerge", "--hf-clip", "--pretrained", str(tmp_path / "pre"),
                 "--finetuned", str(tmp_path / "ft0"), str(tmp_path / "ft1"),
                 "--classnames", str(tmp_path / "c0.txt"), str(tmp_path / "c1.txt"),
                 "--data", str(tmp_path / "img0"), str(tmp_path / "img1"), "--steps", "2", "--batch-size", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", str(out)]) == 0
    # a CLIPModel directory like the pretrained one: its keys, config and tokenizer; the image encoder merged
    back = tf.CLIPModel.from_pretrained(str(out / "merged"), local_files_only=True)
    assert back.state_dict().keys() == clip.state_dict().keys()
    assert (out / "merged" / "tokenizer.json").is_file()
    enc = hf.CLIPImageEncoder.from_model(back).state_dict()
    assert not torch.equal(enc["visual_projection.weight"], clip.state_dict()["visual_projection.weight"])
    assert torch.equal(back.state_dict()["text_model.final_layer_norm.weight"],
                       clip.state_dict()["text_model.final_layer_norm.weight"])
    assert len(list((tmp_path / "cache" / "heads").glob("*.safetensors"))) == 2


@pytest.mark.slow
def test_adamerge_hf_causal_lm(tmp_path, capsys):
    from adamerge_fast.models import hf

    tf = hf.import_transformers()
    fast, vocab = _word_tokenizer("the a cat dog sat ran on under mat log big small".split())
    pre = hf.tiny_causal_lm("gpt2", seed=0, vocab_size=len(vocab))
    pre.save_pretrained(tmp_path / "pre")
    fast.save_pretrained(tmp_path / "pre")
    for k in range(2):
        m = hf.tiny_causal_lm("gpt2", seed=0, vocab_size=len(vocab))
        m.load_state_dict(_perturb(pre.state_dict(), k + 1, 0.05))
        m.save_pretrained(tmp_path / f"ft{k}")
        text = "the cat sat on the mat\na dog ran\nthe big log\n" if k else "small cat\nthe dog sat under a log\n"
        (tmp_path / f"text{k}.txt").write_text(text)
    out = tmp_path / "out"
    args = ["adamerge", "--hf-causal-lm", "--pretrained", str(tmp_path / "pre"),
            "--finetuned", str(tmp_path / "ft0"), str(tmp_path / "ft1"),
            "--data", str(tmp_path / "text0.txt"), str(tmp_path / "text1.txt"),
            "--max-length", "8", "--steps", "3", "--batch-size", "2", "--no-progress", "-o", str(out)]
    assert main(args) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(str(out / "merged"), local_files_only=True)
    assert type(back) is type(pre) and back.state_dict().keys() == pre.state_dict().keys()  # no wrapper prefix
    assert (out / "merged" / "tokenizer.json").is_file() and (out / "mergekit_config.yml").is_file()

    # every token's logits are a row: concatenated batches are split by task through rows_per_example, so concat
    # batching learns what sequential batching learns; the fused head + entropy too
    assert main(args + ["--positions", "all", "--task-batching", "sequential", "-o", str(tmp_path / "all")]) == 0
    ref = load_file(str(tmp_path / "all" / "coefficients.safetensors"))["raw_coefficients"]
    for extra in (["--positions", "all"], ["--positions", "all", "--fused-entropy"]):
        sub = tmp_path / "_".join(extra).replace("-", "")
        assert main(args + extra + ["-o", str(sub)]) == 0
        got = load_file(str(sub / "coefficients.safetensors"))["raw_coefficients"]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_one_line(fixture_dir, tmp_path, monkeypatch, capsys):
    d = fixture_dir
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    pre = str(d / "pre.safetensors")
    cases = [
        (["merge", "--method", "average", "--pretrained", str(d / "missing.safetensors"), "--finetuned", *_ft(d),
          "-o", str(tmp_path / "m.safetensors")],
         1, ["missing.safetensors", "not found"]),
        (["merge", "--method", "average", "--pretrained", pre, "--finetuned", str(d / "other_arch.safetensors"),
          "-o", str(tmp_path / "m.safetensors")],
         1, ["other_arch.safetensors", "architecture"]),
        (["merge", "--method", "ties", "--ties-k", "1.5", "--pretrained", pre, "--finetuned", *_ft(d),
          "-o", str(tmp_path / "m.safetensors")],
         2, ["--ties-k"]),
        (_module_args(d, tmp_path / "o", "--steps", "-1"), 2, ["--steps"]),
        (_module_args(d, tmp_path / "o", "--lr", "abc"), 2, ["--lr"]),
    ]
    for argv, code, needles in cases:
        assert main(argv) == code, argv
        _one_error_line(capsys, *needles)

    def swap(args, old, new):
        args = list(args)
        args[args.index(old)] = new
        return args

    base = _module_args(d, tmp_path / "o", "--steps", "2")
    for argv, needles in [
        (swap(base, str(d / "ft1.safetensors"), str(d / "other_arch.safetensors")),
         ["other_arch.safetensors", "another architecture"]),
        (swap(base, str(d / "ft1.safetensors"), str(d / "nope.pt")), ["nope.pt", "not found"]),
        (swap(base, str(d / "data1.npy"), str(d / "empty.pt")), ["no examples", "empty.pt"]),
        (swap(base, str(d / "data1.npy"), str(d / "empty_dir")), ["no images"]),
        (swap(base, str(d / "head1.safetensors"), str(d / "pre.safetensors")), ["pre.safetensors"]),
        (swap(base, "test_cli:tiny_backbone", "test_cli:no_such_function"), ["no_such_function"]),
        (base[:-2] + ["--data", str(d / "data0.pt")], ["--data gives 1"]),
        (base + ["--clamp", "1", "0"], ["--clamp"]),
        (base + ["--backend", "nonexistent"], ["nonexistent"]),
        (["plot", str(tmp_path / "no_run")], ["no_run"]),
    ]:
        assert main(argv) == 1, argv
        _one_error_line(capsys, *needles)


def test_debug_shows_traceback(fixture_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "merge", "--method", "average", "--pretrained", str(tmp_path / "x.pt"), "--finetuned", "y",
              "-o", str(tmp_path / "o.safetensors")])


def test_help_everywhere(capsys):
    for cmd in ([], ["merge"], ["adamerge"], ["plot"], ["demo"]):
        assert main([*cmd, "--help"]) == 0
        assert "usage:" in capsys.readouterr().out


def test_bench_subcommand_without_harness(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_checkout_root", lambda: tmp_path)  # an installation without benchmarks/
    assert main(["bench", "--quick"]) == 1
    _one_error_line(capsys, "the benchmarks live in the source checkout", "python -m benchmarks.adamerging_step")


def test_bench_subcommand_forwards_to_the_checkout(monkeypatch, tmp_path):
    pkg = tmp_path / "benchmarks" / "adamerging_step"
    pkg.mkdir(parents=True)
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("CALLS = []\n\n\ndef main(argv, prog=None):\n"
                                     "    CALLS.append((list(argv), prog))\n    return 3\n")
    monkeypatch.setattr(cli, "_checkout_root", lambda: tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    try:
        assert main(["bench", "--quick", "--steps", "2"]) == 3
        harness = sys.modules["benchmarks.adamerging_step"]
        assert Path(harness.__file__) == pkg / "__init__.py"
        assert harness.CALLS == [(["--quick", "--steps", "2"], "adamerge-fast bench")]
        assert sys.path[0] == str(tmp_path)
    finally:
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]  # the stub


def test_python_m_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "adamerge_fast", "--help"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("merge", "adamerge", "plot", "demo", "bench"):
        assert cmd in r.stdout
