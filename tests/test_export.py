"""The streaming checkpoint writer (export.py): safetensors written tensor by tensor, HF directories, the
AdaMerging export as the user's model class, and the mergekit configuration of learned coefficients."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adamerge_fast.export import (
    CheckpointWriter,
    SafetensorsStreamWriter,
    export_merged,
    mergekit_config,
    parse_size,
    plan_shards,
    write_checkpoint,
)
from adamerge_fast.io import CheckpointError, load_state_dict
from adamerge_fast.merging import AdaMergedModel
from adamerge_fast.models import hf


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "noncontig": torch.randn(4, 6, generator=g).t(),
    }


def test_stream_writer_roundtrip(tmp_path):
    ts = _tensors()
    entries = [(k, tuple(t.shape), t.dtype) for k, t in ts.items()]
    w = SafetensorsStreamWriter(tmp_path / "a.safetensors", entries, {"format": "pt", "x": "1"})
    for k, t in ts.items():
        w.write(k, t)
    w.close()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"}


def test_stream_writer_checks(tmp_path):
    entries = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(CheckpointError, match="expected tensor 'a'.*got 'b'"):
        w.write("b", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"expected tensor 'b' \[3\].*got 'b' \[4\]"):
        w.write("b", torch.zeros(4))
    with pytest.raises(CheckpointError, match="closed before tensor 'b'"):
        w.close()


def test_parse_size_and_shards():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5MB") == 1_500_000
    assert parse_size(1234) == 1234 and parse_size("100") == 100
    for bad in ("lots", "5XB", "0", "-1MB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    e = [(str(i), (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]  # 40, 40, 120, 20, 20 bytes
    assert [[x[0] for x in s] for s in plan_shards(e, 80)] == [["0", "1"], ["2"], ["3", "4"]]


def test_checkpoint_writer_directory_and_atomicity(tmp_path):
    ts = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights are never copied")
    (src / ".hidden").write_text("")
    out = write_checkpoint(ts, tmp_path / "out", max_shard_size=2100, copy_files_from=src)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    back = load_state_dict(out)
    assert all(torch.equal(back[k], ts[k]) for k in ts)
    one = write_checkpoint(ts, tmp_path / "one")  # fits one shard: model.safetensors, no index
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    # an error inside the block: nothing appears, the existing output stays
    with pytest.raises(RuntimeError, match="stop"):
        with CheckpointWriter(tmp_path / "out", [(k, (256,), torch.float32) for k in ts], overwrite=True) as w:
            w.write("w0", ts["w0"])
            raise RuntimeError("stop")
    assert torch.equal(load_state_dict(out)["w4"], ts["w4"])
    with pytest.raises(CheckpointError, match="closed before tensor 'w1' was written"):
        with CheckpointWriter(tmp_path / "short.safetensors", [(k, (256,), torch.float32) for k in ts]) as w:
            w.write("w0", ts["w0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "out", "src"]


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_export_adamerged_hf_roundtrip(tmp_path, granularity):
    """An AdaMerged causal LM written as the LM's own class: from_pretrained loads the merged weights, with the
    original key names and dtype; the mergekit configuration gives each tensor its coefficient."""
    from test_cli import _word_tokenizer

    tf = hf.import_transformers()
    pre = hf.tiny_causal_lm("llama", seed=0).to(torch.bfloat16)
    pre.save_pretrained(tmp_path / "pre")
    _word_tokenizer(["a", "b"])[0].save_pretrained(tmp_path / "pre")
    fts = []
    for k in range(2):
        m = hf.tiny_causal_lm("llama", seed=0).to(torch.bfloat16)
        g = torch.Generator().manual_seed(k + 1)
        m.load_state_dict({n: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).bfloat16()
                           for n, v in pre.state_dict().items()})
        m.save_pretrained(tmp_path / f"ft{k}")
        fts.append(tmp_path / f"ft{k}")
    spec = hf.build_causal_lm(tmp_path / "pre", fts, ["a", "b"])
    model = AdaMergedModel(spec.backbone, spec.finetuned, granularity=granularity)
    with torch.no_grad():
        model.raw_coefficients.uniform_(0.1, 0.9, generator=torch.Generator().manual_seed(3))
    out = export_merged(model, spec.export, tmp_path / "merged", max_shard_size="40KB")
    back = tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert back.dtype == torch.bfloat16 and type(back) is type(pre)
    merged = model.merged_state_dict()
    sd = back.state_dict()
    assert sd.keys() == pre.state_dict().keys()
    for n in model.param_names:
        assert torch.equal(sd[n[len("lm."):]], merged[n]), n

    cfg = mergekit_config(model, spec.export, tmp_path / "pre", fts, "bfloat16")
    assert cfg["merge_method"] == "task_arithmetic" and cfg["parameters"] == {"normalize": False, "lambda": 1.0}
    coefs = model.coefficients.detach().double()
    for k, entry in enumerate(cfg["models"]):
        w = entry["parameters"]["weight"]
        for i, n in enumerate(model.param_names):
            name = n[len("lm."):]
            if granularity == "task":
                assert w == float(coefs[0, k])
            else:  # mergekit takes the first filter contained in the tensor name
                first = next(c for c in w if c["filter"] in name)
                assert first["filter"] == name and first["value"] == float(coefs[i, k])


def test_export_unmapped_parameter(tmp_path):
    from test_cli import _word_tokenizer

    pre = hf.tiny_causal_lm("gpt2", seed=0)
    pre.save_pretrained(tmp_path / "pre")
    _word_tokenizer(["a", "b"])[0].save_pretrained(tmp_path / "pre")
    spec = hf.build_causal_lm(tmp_path / "pre", [pre.state_dict()], ["a"])
    model = AdaMergedModel(spec.backbone, spec.finetuned)
    spec.export.key = lambda n: "x." + n
    with pytest.raises(CheckpointError, match="has no entry in the original checkpoint"):
        export_merged(model, spec.export, tmp_path / "m")
    assert not (tmp_path / "m").exists()
