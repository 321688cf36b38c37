"""Streamed static merges (merging.stream): equal to the in-memory merges, exact global TIES thresholds, Hugging
Face directory output loadable by transformers, atomic and non-destructive writing, the command line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adamerge_fast as af
from adamerge_fast.cli import main
from adamerge_fast.io import CheckpointError, StreamingStateDict, load_state_dict, streaming
from adamerge_fast.merging import static, stream
from adamerge_fast.models import hf

K = 3


def _perturbed(sd, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny bf16 Llama base and 3 fine-tunes as sharded Hugging Face directories (with a tokenizer)."""
    from test_cli import _word_tokenizer

    d = tmp_path_factory.mktemp("stream")
    tok, vocab = _word_tokenizer("the a cat dog sat on mat".split())
    base = hf.tiny_causal_lm("llama", seed=0, vocab_size=len(vocab)).to(torch.bfloat16)
    base.save_pretrained(d / "pre", max_shard_size="40KB")
    tok.save_pretrained(d / "pre")
    sd = base.state_dict()
    for k in range(K):
        m = hf.tiny_causal_lm("llama", seed=0, vocab_size=len(vocab)).to(torch.bfloat16)
        m.load_state_dict(_perturbed(sd, k + 1))
        m.save_pretrained(d / f"ft{k}", max_shard_size="40KB")
    return d


def _paths(d):
    return d / "pre", [d / f"ft{k}" for k in range(K)]


def _in_memory(d):
    pre, fts = _paths(d)
    base = load_state_dict(pre)
    base = {k: base[k] for k in base}
    fsd = [load_state_dict(f) for f in fts]
    tv = af.task_vectors(base, fsd, dtype=torch.float32)
    return base, fsd, tv


CASES = [
    ("average", {}, lambda b, tv: af.weight_average(b, tv)),
    ("task_arithmetic", {"scale": 0.4, "weights": [1.0, 0.5, 2.0]},
     lambda b, tv: af.task_arithmetic(b, tv, 0.4, weights=[1.0, 0.5, 2.0])),
    ("ties", {}, lambda b, tv: af.ties_merge(b, tv)),
    ("ties", {"ties_keep": "exact", "sign_tie": "positive"},
     lambda b, tv: af.ties_merge(b, tv, keep="exact", sign_tie="positive")),
    ("ties", {"ties_scope": "tensor", "ties_k": 0.3, "ties_merge": "sum", "weights": [2.0, 1.0, 1.0]},
     lambda b, tv: af.ties_merge(b, tv, k=0.3, merge="sum", scope="tensor", weights=[2.0, 1.0, 1.0])),
    ("dare", {"dare_p": 0.3, "seed": 4}, lambda b, tv: af.task_arithmetic(b, af.dare(tv, 0.3, seed=4))),
    ("dare", {"dare_then": "ties", "ties_k": 0.5, "seed": 1, "dare_rescale": "l1"},
     lambda b, tv: af.ties_merge(b, af.dare(tv, 0.5, seed=1, rescale="l1"), k=0.5)),
]


@pytest.mark.parametrize("method,kw,ref", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_equals_in_memory(llama_dirs, method, kw, ref):
    base, _, tv = _in_memory(llama_dirs)
    pre, fts = _paths(llama_dirs)
    got = stream.merge_checkpoints(pre, fts, method, **kw)
    want = ref(base, tv)
    assert got.keys() == base.keys()
    for k in base:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("keep", ["ties", "exact"])
def test_global_threshold_equals_in_memory(dtype, keep, monkeypatch):
    """The streamed radix select gives the in-memory kthvalue threshold (and tie budget) exactly: on heavy ties,
    with the candidates gathered after one pass, and with 16 bits resolved per pass all the way down."""
    g = torch.Generator().manual_seed(2)
    shapes = [(37, 11), (64,), (5, 3, 9)]
    tv = {f"t{i}": (torch.randint(-40, 41, (K, *s), generator=g) / 8).to(dtype) for i, s in enumerate(shapes[:2])}
    tv["t2"] = torch.randn((K, *shapes[2]), generator=g).to(dtype)
    for k in (0.2, 0.05, 0.9):
        want = static.TiesPlan(k=k, keep=keep)
        static.global_thresholds(tv, want)
        n = sum(t[0].numel() for t in tv.values())
        for gather_max in (1 << 24, 0):
            monkeypatch.setattr(stream, "_GATHER_MAX", gather_max)
            got = static.TiesPlan(k=k, keep=keep)
            passes = stream.global_thresholds(lambda: iter(tv.values()), n, K, got,
                                              dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            assert torch.equal(got.thresholds.double(), want.thresholds.double()), (k, gather_max)
            assert got.budgets == want.budgets
            assert passes <= (2 if gather_max else (4 if dtype == torch.float64 else 2))


def test_hf_directory_output(llama_dirs, tmp_path):
    tf = hf.import_transformers()
    pre, fts = _paths(llama_dirs)
    out = tmp_path / "merged"
    got = stream.merge_checkpoints(pre, fts, "task_arithmetic", out, scale=0.3, max_shard_size="30KB")
    assert got == out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert all((out / f).is_file() for f in ("config.json", "generation_config.json", "tokenizer.json",
                                             "tokenizer_config.json"))
    assert not list(tmp_path.glob(".*"))  # the temporary directory was renamed into place
    model = tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.bfloat16
    want = stream.merge_checkpoints(pre, fts, "task_arithmetic", scale=0.3)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_single_file_output_and_overwrite(llama_dirs, tmp_path):
    pre, fts = _paths(llama_dirs)
    out = tmp_path / "m.safetensors"
    stream.merge_checkpoints(pre, fts, "average", out)
    first = load_file(str(out))
    assert first.keys() == set(load_state_dict(pre).keys())
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        stream.merge_checkpoints(pre, fts, "task_arithmetic", out)
    assert torch.equal(load_file(str(out))["lm_head.weight"], first["lm_head.weight"])  # untouched
    stream.merge_checkpoints(pre, fts, "task_arithmetic", out, overwrite=True)
    assert not torch.equal(load_file(str(out))["lm_head.weight"], first["lm_head.weight"])
    for bad in (pre, fts[1], pre.parent):  # an input, or a directory holding inputs: never replaced
        with pytest.raises(CheckpointError, match="would replace the input"):
            stream.merge_checkpoints(pre, fts, "average", bad, overwrite=True)
    assert (pre / "config.json").is_file() and len(load_state_dict(fts[1])) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_failure_leaves_nothing(llama_dirs, tmp_path, monkeypatch):
    pre, fts = _paths(llama_dirs)
    bad = tmp_path / "bad"
    sd = load_state_dict(fts[0])
    sd = {k: sd[k].clone() for k in sd}
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=f"fine-tuned checkpoint 0: key '{key}'.*NaN"):
        stream.merge_checkpoints(pre, [sd, *fts[1:]], "ties", bad)
    with pytest.raises(CheckpointError, match=f"fine-tuned checkpoint 0: key '{key}'.*NaN"):
        stream.merge_checkpoints(pre, [sd, *fts[1:]], "task_arithmetic", bad)
    nan_file = tmp_path / "nan" / "ft.safetensors"  # named by its path, also in global TIES's threshold passes
    nan_file.parent.mkdir()
    af.io.save_safetensors(sd, nan_file)
    for kw in ({}, {"ties_scope": "tensor"}):
        with pytest.raises(CheckpointError, match=f"{nan_file}: key '{key}'.*NaN"):
            stream.merge_checkpoints(pre, [nan_file, *fts[1:]], "ties", bad, **kw)
    shutil.rmtree(nan_file.parent)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    real = stream.merge_tensor
    monkeypatch.setattr(stream, "merge_tensor", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        stream.merge_checkpoints(pre, fts, "task_arithmetic", bad, max_shard_size="30KB")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_streaming_reads_keep_no_file_mapped(llama_dirs):
    pre, _ = _paths(llama_dirs)
    sd = streaming(load_state_dict(pre))
    assert isinstance(sd, StreamingStateDict)
    for k in sd:
        sd[k]
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    mapped = [f for f in sd.files if str(f) in maps]
    # only the headers' mappings of the files opened for shapes; the data reads opened, copied and closed
    lazy = load_state_dict(pre)
    for k in lazy:
        lazy[k]
    assert isinstance(lazy, af.io.LazyStateDict) and len(mapped) <= len(sd.files)


def test_like_mergekit_semantics(llama_dirs):
    """The mergekit preset: weighted task arithmetic in float32 order (within one ulp of ours), TIES trimming
    each tensor to exactly int(density * n) entries with the +1 sign rule."""
    base, fsd, tv = _in_memory(llama_dirs)
    pre, fts = _paths(llama_dirs)
    mk = stream.merge_checkpoints(pre, fts, "task_arithmetic", like="mergekit", weights=[0.5, 0.3, 0.2])
    ours = af.task_arithmetic(base, tv, 1.0, weights=[0.5, 0.3, 0.2])
    for k in base:
        f32 = (base[k].float() + sum(w * (f[k].float() - base[k].float()) for w, f in zip([0.5, 0.3, 0.2], fsd)))
        assert (mk[k].float() - f32).abs().max() <= f32.abs().max() * 2**-7, k
        diff = mk[k] != ours[k]
        assert diff.float().mean() < 0.01, k  # float32 vs float64 accumulation: a few elements one ulp apart
    ties = stream.merge_checkpoints(pre, fts, "ties", like="mergekit", ties_k=0.4, normalize=False)
    ref = af.ties_merge(base, tv, k=0.4, scale=1.0, merge="sum", scope="tensor", keep="exact", sign_tie="positive")
    close = sum(int((ties[k] == ref[k]).sum()) for k in base) / sum(base[k].numel() for k in base)
    assert close > 0.99
    with pytest.raises(ValueError, match="ties_scope must be 'tensor'"):
        stream.merge_checkpoints(pre, fts, "ties", like="mergekit", ties_scope="global")


def test_options_resolved():
    o = stream.MergeOptions(method="ties", like="mergekit").resolved()
    assert (o.scale, o.ties_scope, o.ties_keep, o.sign_tie, o.ties_merge) == (1.0, "tensor", "exact", "positive",
                                                                              "mean")
    o = stream.MergeOptions(method="dare", like="mergekit").resolved()
    assert (o.dare_then, o.ties_k, o.ties_merge, o.dare_rescale) == ("ties", 1.0, "sum", "l1")
    o = stream.MergeOptions(method="task-arithmetic").resolved()
    assert (o.method, o.scale, o.normalize) == ("task_arithmetic", 0.3, False)
    with pytest.raises(ValueError, match="contradicts"):
        stream.MergeOptions(method="ties", ties_merge="sum", normalize=True).resolved()
    with pytest.raises(ValueError, match="method must be"):
        stream.MergeOptions(method="slerp").resolved()


def test_cli_merge_directory(llama_dirs, tmp_path, capsys):
    pre, fts = _paths(llama_dirs)
    out = tmp_path / "cli_out"
    argv = ["merge", "--method", "ties", "--pretrained", str(pre), "--finetuned", *map(str, fts), "-o", str(out),
            "--ties-keep", "exact", "--sign-tie", "positive", "--weights", "1", "2", "1", "--max-shard-size",
            "30KB", "--no-progress"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("adamerge-fast merge: wrote") and "peak RSS" in last and "GiB" in last
    want = stream.merge_checkpoints(pre, fts, "ties", ties_keep="exact", sign_tie="positive", weights=[1, 2, 1])
    got = load_state_dict(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main(argv) == 1  # exists: refused, one line
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--like", "mergekit"]) == 0
    assert main(["merge", "--method", "average", "--pretrained", str(pre), "--finetuned", *map(str, fts), "-o",
                 str(tmp_path / "x"), "--max-shard-size", "lots"]) == 1
    assert "size 'lots'" in capsys.readouterr().err


def test_chunked_equals_whole(llama_dirs, monkeypatch):
    """Task vectors formed and merged in chunks of a tensor (97 elements here) give the same result, including
    TIES's tie budgets consumed in flat order across chunks and per-tensor TIES's majority sign."""
    pre, fts = _paths(llama_dirs)
    kws = [("task_arithmetic", {}), ("average", {}), ("ties", {"ties_keep": "exact"}), ("ties", {}),
           ("ties", {"ties_scope": "tensor"}), ("ties", {"ties_scope": "tensor", "ties_keep": "exact"})]
    whole = [stream.merge_checkpoints(pre, fts, m, **kw) for m, kw in kws]
    monkeypatch.setattr(stream, "CHUNK", 97)
    for (m, kw), w in zip(kws, whole):
        got = stream.merge_checkpoints(pre, fts, m, **kw)
        assert all(torch.equal(got[k], w[k]) for k in w), (m, kw)



@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 97])
def test_mergekit_magnitude_masks_follow_argsort(dt, chunk, monkeypatch):
    """mergekit's magnitude trimming keeps the first int(density * n) positions of torch.argsort(|tau|,
    descending=True): on heavily tied magnitudes (a few distinct values) the masks, found in threads or not and
    through the selection shortcut where the kept set has no tie, keep exactly those positions."""
    if chunk:
        monkeypatch.setattr(stream, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    n = 3001
    base = (torch.randint(-3, 4, (n,), generator=g) * 0.25).to(dt)
    rows = [base + (torch.randint(-4, 5, (n,), generator=g) * 0.125).to(dt) for _ in range(3)]
    rows.append(base + torch.randn(n, generator=g).to(dt))  # few ties
    for density in (0.01, 0.2, 0.55):
        m = max(1, int(density * n))
        masks = stream._magnitude_masks("w", base, rows, density, None)
        for f, mask in zip(rows, masks):
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.argsort((f.float() - base.float()).abs(), descending=True)[:m]] = True
            assert mask.dtype == torch.bool and int(mask.sum()) == m and torch.equal(mask, want), density


def test_like_mergekit_chunked_equals_whole_and_names_nonfinite(llama_dirs, monkeypatch, tmp_path):
    """The mergekit preset's arithmetic over chunks of a tensor (97 elements) and its threaded TIES masks give the
    whole-tensor result; a NaN in an input is an error naming the file (or the pretrained one) and the key."""
    pre, fts = _paths(llama_dirs)
    kws = [("task_arithmetic", {"weights": [0.5, 0.3, 0.2], "normalize": True}), ("ties", {"ties_k": 0.3}),
           ("dare", {"dare_p": 0.4, "seed": 1})]
    whole = [stream.merge_checkpoints(pre, fts, m, like="mergekit", **kw) for m, kw in kws]
    monkeypatch.setattr(stream, "CHUNK", 97)
    for (m, kw), w in zip(kws, whole):
        got = stream.merge_checkpoints(pre, fts, m, like="mergekit", **kw)
        assert all(torch.equal(got[k], w[k]) for k in w), m
    key = "model.layers.1.mlp.up_proj.weight"
    for i, name in ((0, "pretrained"), (2, "ft2")):
        src = pre if i == 0 else fts[1]
        sd = load_state_dict(src)
        sd = {k: sd[k].clone() for k in sd}
        sd[key][1, 2] = float("nan")
        bad = tmp_path / name / "model.safetensors"
        bad.parent.mkdir()
        af.io.save_safetensors(sd, bad)
        args = (bad, fts) if i == 0 else (pre, [fts[0], bad, fts[2]])
        for m in ("task_arithmetic", "ties", "dare"):
            with pytest.raises(CheckpointError, match=f"{bad}: key '{key}'.*NaN"):
                stream.merge_checkpoints(*args, m, like="mergekit")

# ------------------------------------------------------------------------------ rounding, LoRA adapter sources
def _tie_inputs(dt, n=1 << 12, seed=1):
    """fp32 pretrained / fine-tuned tensors whose differences over many binades include ones that a float32
    subtraction rounds onto a tie of ``dt`` (then rounded to ``dt`` a second time: off by one ulp)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 2.0 ** torch.randint(-20, 4, (n,), generator=g).float()
    ft = base + torch.randn(n, generator=g) * 2.0 ** torch.randint(-20, 0, (n,), generator=g).float()
    lo = torch.randn(256, generator=g).to(dt)
    t = (lo.float() + torch.nextafter(lo, torch.tensor(float("inf"), dtype=dt)).float()) / 2
    ft[:256], base[:256] = t, -(t.abs() * 2.0**-30)
    return base.reshape(64, -1), ft.reshape(64, -1)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 97])
def test_streamed_task_vectors_are_rounded_difference(dt, chunk, monkeypatch):
    """One implementation of "fine-tuned minus pretrained, rounded once to the storage dtype": the streamed merge's
    task vectors (``task_vector_dtype``), ``task_vectors(dtype=...)`` and the model-outer builder all equal
    ``rounded_difference_`` bit for bit, where a float32 difference cast to the storage dtype does not; the
    streamed task arithmetic on them equals the in-memory one."""
    from adamerge_fast.merging.build import DenseRows, build_task_vectors
    from adamerge_fast.merging.task_vectors import rounded_difference_

    if chunk:
        monkeypatch.setattr(stream, "CHUNK", chunk)
    base, ft = _tie_inputs(dt)
    want = rounded_difference_(torch.empty(base.shape, dtype=dt), ft, base, "t")
    assert not torch.equal(want, (ft - base).to(dt))  # the double rounding this guards against
    opts = stream.MergeOptions(task_vector_dtype=dt).resolved()
    got = torch.cat([tau[0] for _, tau in stream.task_vector_chunks("w", base, [ft], opts, None)])
    assert got.dtype == torch.float64
    assert torch.equal(got.to(dt).view(torch.int16), want.reshape(-1).view(torch.int16))
    assert torch.equal(af.task_vectors({"w": base}, [{"w": ft}], dtype=dt)["w"][0].view(torch.int16),
                       want.view(torch.int16))
    built = build_task_vectors({"w": base}, [{"w": ft}], storage=DenseRows(dt))["w"][0]
    assert torch.equal(built.view(torch.int16), want.view(torch.int16))
    merged = stream.merge_checkpoints({"w": base}, [{"w": ft}], "task_arithmetic", scale=0.5, task_vector_dtype=dt)
    tv = af.task_vectors({"w": base}, [{"w": ft}], dtype=dt)
    assert torch.equal(merged["w"], af.task_arithmetic({"w": base}, tv, 0.5)["w"])


def _lora_inputs(dtype, dyadic: bool, seed=0):
    """A pretrained state dict and two adapters ``{name: (A, B, scale)}`` on different tensors. ``dyadic``: small
    multiples of 1/4 and 1/2, so that ``W0 + s B A`` is exact in ``dtype`` and the adapters' fine-tuned checkpoints
    can be written out densely without rounding."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randint(-2, 3, shape, generator=g) / 2 if dyadic else 0.3 * torch.randn(shape, generator=g)

    base = {"a.weight": rnd(12, 10) / 2, "a.bias": rnd(12), "b.weight": rnd(6, 12) / 2, "n.weight": rnd(6)}
    base = {k: v.to(dtype) for k, v in base.items()}
    ads = [{"a.weight": (rnd(2, 10), rnd(12, 2), 0.5), "b.weight": (rnd(3, 12), rnd(6, 3), 1.0)},
           {"b.weight": (rnd(1, 12), rnd(6, 1), 0.25)}]
    return base, ads


def _dense(base, ad):
    return {k: (base[k].double() + (ad[k][2] * ad[k][1].double() @ ad[k][0].double() if k in ad else 0)).to(
        base[k].dtype) for k in base}  # fmt: skip


METHODS_LORA = [("task_arithmetic", {"scale": 0.7, "weights": [1.0, 0.5]}), ("ties", {}),
                ("ties", {"ties_scope": "tensor", "ties_keep": "exact", "ties_k": 0.3}),
                ("dare", {"dare_p": 0.3, "seed": 2}), ("task_arithmetic", {"like": "mergekit"})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_adapter_sources_equal_the_dense_checkpoints(dtype):
    """LoRA adapters as fine-tuned sources of the streamed merge: the same result, bit for bit, as the dense
    fine-tuned checkpoints ``W0 + s B A`` they stand for (built exactly here), for every method."""
    base, ads = _lora_inputs(dtype, dyadic=True)
    dense = [_dense(base, ad) for ad in ads]
    for ad, d in zip(ads, dense):
        for k, (a, b, s) in ad.items():  # the dense checkpoints are exact
            assert torch.equal(d[k].double() - base[k].double(), s * b.double() @ a.double()), k
    for method, kw in METHODS_LORA:
        got = stream.merge_checkpoints(base, ads, method, **kw)
        want = stream.merge_checkpoints(base, dense, method, **kw)
        for k in base:
            assert got[k].dtype == dtype and torch.equal(got[k], want[k]), (method, kw, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_adapter_sources_take_the_exact_difference(dtype, monkeypatch):
    """On random adapters (``W0 + s B A`` not representable), the streamed merge takes each adapter's exact task
    vector ``s B A`` (not the rounded view minus ``W0``), as the in-memory merges do: equal bit for bit, also
    chunked and with bf16 task vectors."""
    from adamerge_fast.adapters import AdapterCheckpoint, as_adapter

    base, ads = _lora_inputs(dtype, dyadic=False)
    views = [AdapterCheckpoint(base, as_adapter(a, i)) for i, a in enumerate(ads)]
    for tvd in (None, torch.bfloat16):
        tv = af.task_vectors(base, views, dtype=tvd or stream.exact_tv_dtype(dtype))
        refs = [("task_arithmetic", {"scale": 0.7}, af.task_arithmetic(base, tv, 0.7)),
                ("ties", {"ties_k": 0.3}, af.ties_merge(base, tv, k=0.3)),
                ("ties", {"ties_scope": "tensor", "ties_keep": "exact"},
                 af.ties_merge(base, tv, scope="tensor", keep="exact"))]
        for chunk in (stream.CHUNK, 7):
            monkeypatch.setattr(stream, "CHUNK", chunk)
            for method, kw, want in refs:
                got = stream.merge_checkpoints(base, ads, method, task_vector_dtype=tvd, **kw)
                for k in base:
                    assert torch.equal(got[k], want[k].to(dtype)), (tvd, chunk, method, kw, k)
    dense = stream.merge_checkpoints(base, [_dense(base, a) for a in ads], "task_arithmetic", scale=0.7)
    got = stream.merge_checkpoints(base, ads, "task_arithmetic", scale=0.7)
    assert dtype == torch.float32 or not all(torch.equal(got[k], dense[k]) for k in base)
