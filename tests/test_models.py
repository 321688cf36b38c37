"""Model adapters on small random-init configurations: open_clip's visual tower, HF CLIP vision, GPT-2/Llama;
zero-shot heads; checkpoint key layouts; pickled checkpoints; the data loaders."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tol import assert_close
from adamerge_fast import AdaMergedModel
from adamerge_fast.io import CheckpointError, load_state_dict, save_safetensors
from adamerge_fast.models.heads import ClassificationHead, cached_head, head_key, load_head, zero_shot_weights


def _perturbed(module, seeds, scale=0.05):
    """Copies of ``module`` with every floating parameter moved by seeded noise (fake fine-tuned models)."""
    out = []
    for s in seeds:
        m = copy.deepcopy(module)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                if p.is_floating_point():
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        out.append(m)
    return out


def _check_against_naive(pre, fts, call, out_of=lambda o: o, granularity="layer"):
    """AdaMergedModel(pre, fts): forward == functional_call(pre) on the naively merged parameters, and the
    coefficient gradients == autograd through the naive merge."""
    names = [n for n, p in pre.named_parameters() if p.is_floating_point()]
    K = len(fts)
    rows = len(names) if granularity == "layer" else 1
    init = torch.rand(rows, K, generator=torch.Generator().manual_seed(7)) * 0.8 + 0.1  # inside the clamp
    merged = AdaMergedModel(pre, fts, granularity=granularity, init=init)

    c = init.clone().double().requires_grad_(True)
    base = dict(pre.named_parameters())
    ft_sd = [dict(f.named_parameters()) for f in fts]
    params = {}
    for i, n in enumerate(names):
        r = i if granularity == "layer" else 0
        w = base[n].detach().double()
        for k in range(K):
            w = w + c[r, k] * (ft_sd[k][n].detach().double() - base[n].detach().double())
        params[n] = w.float()
    ref = out_of(call(lambda *a, **kw: torch.func.functional_call(pre, params, a, kw)))
    got = out_of(call(merged))
    assert_close(got, ref.detach(), torch.float32, "forward")
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref.double() * w).sum().backward()
    (got.double() * w).sum().backward()
    assert_close(merged.raw_coefficients.grad, c.grad, torch.float32, "coefficient gradient")
    return merged


# ---------------------------------------------------------------------------------------------- open_clip
@pytest.fixture(scope="module")
def small_clip():
    from adamerge_fast.models import open_clip as oc

    return oc.small_clip(0)


def test_open_clip_visual_matches_naive_merge(small_clip):
    from adamerge_fast.models.open_clip import image_encoder

    vis = image_encoder(small_clip)
    fts = _perturbed(vis, [1, 2, 3])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    merged = _check_against_naive(vis, fts, lambda m: m(x))
    # the attention and MLP linears run as merged layers
    kinds = {type(m).__name__ for m in merged.skeleton.modules()}
    assert {"MergedMultiheadAttention", "MergedLinear"} <= kinds
    _check_against_naive(vis, fts, lambda m: m(x), granularity="task")


def test_open_clip_zero_shot_head_matches_open_clip(small_clip):
    import open_clip

    from adamerge_fast.models import open_clip as oc

    tok = oc.tokenizer_for("small")
    classes, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
    head = oc.zero_shot_head(small_clip, tok, classes, templates)
    ref = open_clip.build_zero_shot_classifier(small_clip, tok, classes, templates, num_classes_per_batch=None)
    # ref: [D, C]
    assert_close(head.weight, ref.T * small_clip.logit_scale.exp().detach(), torch.float32, "zero-shot weights")
    assert head.normalize
    feats = torch.randn(4, head.weight.shape[1])
    assert_close(head(feats), F.normalize(feats, dim=-1) @ head.weight.T, torch.float32, "head forward")


def test_zero_shot_head_hand_computed():
    # two classes, two templates; the "text encoder" maps each prompt to a fixed vector
    table = {
        "a A": torch.tensor([3.0, 4.0]),  # normalized: (0.6, 0.8)
        "the A": torch.tensor([0.0, 2.0]),  # (0, 1)
        "a B": torch.tensor([-1.0, 0.0]),  # (-1, 0)
        "the B": torch.tensor([-5.0, 0.0]),  # (-1, 0)
    }
    w = zero_shot_weights(lambda texts: torch.stack([table[t] for t in texts]), ["A", "B"], ["a {}", "the {}"],
                          logit_scale=torch.tensor(2.0).log())
    a = torch.tensor([0.3, 0.9])
    a = a / a.norm()
    expected = torch.stack([a, torch.tensor([-1.0, 0.0])]) * 2.0
    assert_close(w, expected, torch.float32, "hand-computed zero-shot weights")
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_weights(lambda t: torch.ones(len(t), 2), ["A"], ["no placeholder"])


def test_head_cache(tmp_path, small_clip):
    from adamerge_fast.models import open_clip as oc

    tok = oc.tokenizer_for("small")
    calls = []
    real = oc.zero_shot_head

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    oc.zero_shot_head = counting
    try:
        kw = dict(weights_id="w1", cache_dir=tmp_path)
        h1 = oc.cached_zero_shot_head("small", small_clip, tok, ["a", "b"], ["x {}"], **kw)
        h2 = oc.cached_zero_shot_head("small", small_clip, tok, ["a", "b"], ["x {}"], **kw)
        oc.cached_zero_shot_head("small", small_clip, tok, ["a", "b", "c"], ["x {}"], **kw)
    finally:
        oc.zero_shot_head = real
    assert len(calls) == 2  # the second call was served from the cache
    torch.testing.assert_close(h1.weight, h2.weight)
    assert h2.normalize
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 2
    assert head_key("a", ["x"]) != head_key("a", ["y"])
    # a corrupt cache file is rebuilt
    f = next((tmp_path / "heads").glob("*.safetensors"))
    f.write_bytes(b"garbage")
    h3 = cached_head(f.stem, lambda: ClassificationHead(torch.ones(2, 3)), tmp_path)
    assert h3.weight.shape == (2, 3)


def test_open_clip_checkpoints(tmp_path, small_clip):
    from adamerge_fast.models import open_clip as oc

    full = tmp_path / "clip.safetensors"
    save_safetensors(small_clip.state_dict(), full)
    m = oc.create_clip("small", full, seed=123)
    for (n, a), b in zip(small_clip.state_dict().items(), m.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    vis_keys = set(dict(small_clip.visual.named_parameters()))
    # full CLIP, task_vectors ImageEncoder ("model.visual.") and visual-only layouts give the same keys
    sd_full = oc.visual_state_dict(full)
    sd_enc = oc.visual_state_dict({f"model.{k}": v for k, v in small_clip.state_dict().items()})
    sd_vis = oc.visual_state_dict(dict(small_clip.visual.state_dict()))
    for sd in (sd_full, sd_enc, sd_vis):
        assert vis_keys <= set(sd.keys())
    # a checkpoint of another architecture: one clear error
    other = tmp_path / "other.safetensors"
    save_safetensors({"layer.weight": torch.ones(2, 2)}, other)
    with pytest.raises(CheckpointError, match="another architecture"):
        oc.create_clip("small", other)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        oc.canonical_name("ViT-Z/99")
    assert oc.canonical_name("ViT-B/32") == "ViT-B-32"


def test_pickled_checkpoint_needs_opt_in(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "whole_module.pt"
    torch.save(module, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_state_dict(path)
    sd = load_state_dict(path, trust_pickle=True)
    for (n, a), b in zip(module.state_dict().items(), sd.values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    # a pickled head module: weight/bias read only with the opt-in
    head = torch.nn.Linear(4, 3)
    torch.save(head, tmp_path / "head.pt")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_head(tmp_path / "head.pt")
    h = load_head(tmp_path / "head.pt", trust_pickle=True)
    torch.testing.assert_close(h.weight, head.weight.detach())
    torch.testing.assert_close(h.bias, head.bias.detach())


def test_head_file_roundtrip(tmp_path):
    h = ClassificationHead(torch.randn(5, 8), torch.randn(5), normalize=True)
    h.save(tmp_path / "h.safetensors")
    g = load_head(tmp_path / "h.safetensors")
    assert g.normalize and g.num_classes == 5
    x = torch.randn(2, 8)
    torch.testing.assert_close(g(x), h(x))
    save_safetensors({"weight": torch.randn(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not a classification head"):
        load_head(tmp_path / "bad.safetensors")


def test_open_clip_adapter_from_python(tmp_path, small_clip):
    from adamerge_fast.models import open_clip as oc

    save_safetensors(small_clip.state_dict(), tmp_path / "clip.safetensors")
    vis = small_clip.visual.state_dict()
    fts = [{f"visual.{k}": v + 0.01 for k, v in vis.items()}, {k: v - 0.01 for k, v in vis.items()}]  # two layouts
    spec = oc.build("small", tmp_path / "clip.safetensors", fts, ["pets", "colors"],
                    classnames=[["cat", "dog"], ["red", "green", "blue"]], templates=["a {}"], cache_dir=False)
    assert spec.tasks == ["pets", "colors"] and spec.metadata == {"model": "open_clip:small", "component": "visual"}
    assert [h.num_classes for h in spec.heads.values()] == [2, 3] and spec.head_files == {}
    assert set(spec.finetuned[0]) >= set(dict(spec.backbone.named_parameters()))
    torch.testing.assert_close(spec.finetuned[0]["conv1.weight"], vis["conv1.weight"] + 0.01)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(spec.backbone(x), small_clip.visual(x))
    with pytest.raises(ValueError, match=r"classnames \(or heads\) gives 1 for 2 tasks"):
        oc.build("small", tmp_path / "clip.safetensors", fts, ["pets", "colors"], classnames=[["cat"]])


def test_factory_adapter_from_python(tmp_path):
    from torch.utils.data import DataLoader

    from adamerge_fast.models import factory

    def make():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 6))

    torch.manual_seed(0)
    pre = make()
    save_safetensors(pre.state_dict(), tmp_path / "pre.safetensors")
    fts = [{k: v + 0.1 * (i + 1) for k, v in pre.state_dict().items()} for i in range(2)]
    ClassificationHead(torch.randn(3, 6), normalize=True).save(tmp_path / "head.safetensors")
    heads = [ClassificationHead(torch.randn(4, 6), normalize=False), tmp_path / "head.safetensors"]
    spec = factory.build(make, tmp_path / "pre.safetensors", fts, ["a", "b"], heads=heads)
    assert spec.tasks == ["a", "b"] and spec.metadata["model"].endswith("make")
    assert spec.head_files == {"b": str(tmp_path / "head.safetensors")} and spec.heads["b"].normalize  # as stored
    assert spec.rows_per_example and spec.tokenizer is None and spec.finetuned == fts
    for k, v in pre.state_dict().items():
        assert torch.equal(spec.backbone.state_dict()[k], v), k

    spec.check_data({"a": DataLoader(torch.randn(5, 8)), "b": DataLoader(torch.randn(3, 8))})
    with pytest.raises(ValueError, match=r"task 'a': the model cannot run on its data \(one example has shape \[7\]\)"):
        spec.check_data({"a": DataLoader(torch.randn(5, 7))})
    spec.heads["b"] = ClassificationHead(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"task 'b': its head \(.*head.safetensors\) expects 5 features, the model "
                       r"outputs shape \[6\]"):
        spec.check_data({"b": DataLoader(torch.randn(3, 8))})

    with pytest.raises(ValueError, match="heads gives 1 for 2 tasks"):
        factory.build(make, tmp_path / "pre.safetensors", fts, ["a", "b"], heads=heads[:1])
    with pytest.raises(CheckpointError, match="fine-tuned state dict 1: key '0.weight' has dtype torch.float64"):
        factory.build(make, tmp_path / "pre.safetensors", [fts[0], {k: v.double() for k, v in fts[1].items()}],
                      ["a", "b"], heads=heads)
    with pytest.raises(FileNotFoundError, match="nope.pt: fine-tuned checkpoint not found"):
        factory.build(make, tmp_path / "pre.safetensors", [fts[0], tmp_path / "nope.pt"], ["a", "b"], heads=heads)
    with pytest.raises(ValueError, match="not an nn.Module"):
        factory.build(lambda: "x", tmp_path / "pre.safetensors", fts, ["a", "b"], heads=heads)
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        factory.load_factory("no_colon")


# --------------------------------------------------------------------------------------------- HF models
def test_hf_clip_vision_matches_naive_merge():
    from adamerge_fast.models import hf

    pre = hf.CLIPImageEncoder.from_config(hf.tiny_clip_vision_config(), seed=0)
    fts = _perturbed(pre, [1, 2])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    merged = _check_against_naive(pre, fts, lambda m: m(x))
    assert sum(type(m).__name__ == "MergedLinear" for m in merged.skeleton.modules()) >= 8
    assert merged.merged_state_dict().keys() == pre.state_dict().keys()


def test_hf_clip_zero_shot_head():
    from adamerge_fast.models import hf

    tf = hf.import_transformers()
    torch.manual_seed(0)
    clip = tf.CLIPModel(hf.tiny_clip_config()).eval()

    def tok(texts, padding=True, return_tensors="pt"):
        ids = [[0] + [2 + (ord(ch) % 90) for ch in t][:12] + [1] for t in texts]
        L = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [1] * (L - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])}

    head = hf.clip_zero_shot_head(clip, tok, ["ab", "c"], ["x {}", "{} y"])
    rows = []
    with torch.no_grad():
        for c in ["ab", "c"]:
            e = clip.text_projection(clip.text_model(**tok([f"x {c}", f"{c} y"])).pooler_output)
            e = F.normalize(e, dim=-1).mean(0)
            rows.append(e / e.norm())
    assert_close(head.weight, torch.stack(rows) * clip.logit_scale.exp(), torch.float32, "HF zero-shot weights")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_matches_naive_merge(kind):
    from adamerge_fast.models import hf

    pre = hf.CausalLMForEntropy(hf.tiny_causal_lm(kind, seed=0))
    fts = _perturbed(pre, [1, 2])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    _check_against_naive(pre, fts, lambda m: m(input_ids=ids, attention_mask=mask))


def test_causal_lm_padding_does_not_count():
    from adamerge_fast.models import hf

    lm = hf.tiny_causal_lm("gpt2", seed=0)
    last, every = hf.CausalLMForEntropy(lm, "last"), hf.CausalLMForEntropy(lm, "all")
    seq = torch.tensor([[5, 9, 3, 7]])
    with torch.no_grad():
        ref_last = last(seq)
        ref_all = every(seq)
        right = torch.tensor([[5, 9, 3, 7, 0, 0]])
        rmask = torch.tensor([[1, 1, 1, 1, 0, 0]])
        left = torch.tensor([[0, 0, 5, 9, 3, 7]])
        lmask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        for ids, m in ((right, rmask), (left, lmask)):
            assert_close(last(ids, m), ref_last, torch.float32, "last-token logits with padding")
            out = every(ids, m)
            assert out.shape == (4, lm.config.vocab_size)  # only the real tokens
            assert_close(out, ref_all, torch.float32, "all-token logits with padding")
    with pytest.raises(ValueError, match="positions"):
        hf.CausalLMForEntropy(lm, "first")


# ------------------------------------------------------------------------------------------------- data
def test_data_loaders(tmp_path):
    from PIL import Image

    from adamerge_fast.data import ImageTransform, load_task_data, load_tensor

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        arr = (np.random.default_rng(i).random((20 + i, 30, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    dl = load_task_data(tmp_path / "imgs", batch_size=2, transform=ImageTransform(16), task="t")
    batches = list(dl)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert batches[0].shape[1:] == (3, 16, 16)
    again = list(load_task_data(tmp_path / "imgs", batch_size=2, transform=ImageTransform(16)))
    assert torch.equal(torch.cat(batches), torch.cat(again))  # seeded shuffling: the same order

    x = torch.randn(7, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    torch.save({"inputs": x, "labels": torch.zeros(7)}, tmp_path / "x.pt")
    for f in ("x.npy", "x.pt"):
        torch.testing.assert_close(load_tensor(tmp_path / f), x)
        got = list(load_task_data(tmp_path / f, batch_size=3, shuffle=False))
        assert [b.shape[0] for b in got] == [3, 3, 1]
        torch.testing.assert_close(torch.cat(got), x)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_task_data(tmp_path / "empty", batch_size=2, task="t")
    with pytest.raises(FileNotFoundError):
        load_task_data(tmp_path / "missing", batch_size=2)
    torch.save(torch.zeros(0, 3), tmp_path / "none.pt")
    with pytest.raises(ValueError, match="no examples"):
        load_task_data(tmp_path / "none.pt", batch_size=2)
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="no tokenizer"):
        load_task_data(tmp_path / "t.txt", batch_size=2)


def test_text_lines():
    from adamerge_fast.data import TextLines

    def tok(lines, padding, truncation, max_length, return_tensors):
        ids = [[1 + (ord(c) % 50) for c in ln][:max_length] for ln in lines]
        return {"input_ids": torch.tensor([i + [0] * (max_length - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (max_length - len(i)) for i in ids])}

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.txt"
        p.write_text("ab\n\n  cde  \n" + "z" * 20 + "\n")
        ds = TextLines(p, tok, max_length=8)
        assert len(ds) == 3
        assert ds[0]["input_ids"].shape == (8,) and int(ds[0]["attention_mask"].sum()) == 2
        assert int(ds[2]["attention_mask"].sum()) == 8
