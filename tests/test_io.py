"""Checkpoint reading and atomic writing."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import adamerge_fast as af
from adamerge_fast.io import (
    CheckpointError,
    LazyStateDict,
    add_prefix,
    atomic_path,
    check_fits,
    load_into,
    load_state_dict,
    shape_dtype,
    strip_prefix,
    write_text_atomic,
)


def test_safetensors_file_and_sharded_dir(tmp_path):
    a, b = {"x": torch.randn(3, 4)}, {"y": torch.randn(5)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}})
    )
    sd = load_state_dict(tmp_path)
    assert isinstance(sd, LazyStateDict) and set(sd) == {"x", "y"}
    assert torch.equal(sd["x"], a["x"]) and torch.equal(sd["y"], b["y"])
    assert torch.equal(load_state_dict(tmp_path / "model-00002-of-00002.safetensors")["y"], b["y"])


def test_torch_state_dict_weights_only(tmp_path):
    sd = {"w": torch.randn(2, 2)}
    torch.save({"state_dict": sd}, tmp_path / "ck.pt")
    assert torch.equal(load_state_dict(tmp_path / "ck.pt")["w"], sd["w"])


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no"):
        load_state_dict(tmp_path / "empty")
    torch.save({"w": torch.zeros(1), "n": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="entry 'n' is not a tensor"):
        load_state_dict(tmp_path / "mixed.pt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    af.save_safetensors({"a": torch.ones(2), "b": torch.ones(2)[:1]}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert torch.equal(load_state_dict(target)["b"], torch.ones(1))


def test_write_text_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "report.md"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n" and [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_prefix_views_read_shapes_lazily(tmp_path, monkeypatch):
    w, b = torch.randn(3, 4), torch.zeros(3, dtype=torch.float16)
    save_file({"model.visual.w": w, "model.visual.b": b, "text.x": torch.ones(2)}, str(tmp_path / "ck.safetensors"))
    sd = load_state_dict(tmp_path / "ck.safetensors")
    assert strip_prefix(sd, ["module."]) is sd
    vis = strip_prefix(sd, ["module.", "model.visual."])
    assert sorted(vis) == ["b", "w"] and len(vis) == 2
    nested = add_prefix(vis, "enc.")
    assert sorted(nested) == ["enc.b", "enc.w"] and "enc.w" in nested and "w" not in nested
    with pytest.raises(KeyError):
        nested["w"]

    def no_read(self, key):
        raise AssertionError(f"tensor {key!r} was read")

    monkeypatch.setattr(LazyStateDict, "__getitem__", no_read)  # shapes, dtypes and membership from the header
    assert shape_dtype(nested, "enc.b") == ((3,), torch.float16)
    assert shape_dtype(sd, "model.visual.w") == ((3, 4), torch.float32)
    check_fits({"enc.w": torch.empty(3, 4), "enc.b": torch.empty(3, dtype=torch.float16)}, nested, "ck",
               check_dtype=True)
    monkeypatch.undo()
    assert torch.equal(nested["enc.w"], w) and torch.equal(vis["b"], b)
    assert shape_dtype({"x": torch.ones(2, dtype=torch.int8)}, "x") == ((2,), torch.int8)  # a plain dict


def test_check_fits_names_the_key_and_the_file():
    ref = nn.Sequential(nn.Linear(4, 3))
    good = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    check_fits(ref, {**good, "head.weight": torch.ones(1)}, "ok.pt")  # keys beyond the module's are ignored
    with pytest.raises(CheckpointError, match=r"^other.pt: missing key '0.bias' \(1 of the 2 tensors of the model "
                       r"are missing; it has other keys such as 'x'; a checkpoint of another architecture\?\)$"):
        check_fits(ref, {"0.weight": good["0.weight"], "x": torch.ones(1)}, "other.pt")
    with pytest.raises(CheckpointError, match=r"^wide.pt: key '0.weight' has shape \[3, 5\], the model has \[3, 4\]"):
        check_fits(ref, {**good, "0.weight": torch.ones(3, 5)}, "wide.pt")
    as_double = {**good, "0.bias": good["0.bias"].double()}
    check_fits(ref, as_double, "double.pt")  # dtypes only with check_dtype
    with pytest.raises(CheckpointError, match=r"double.pt: key '0.bias' has dtype torch.float64, the base has "
                       r"torch.float32 \(convert it first\)"):
        check_fits(ref, as_double, "double.pt", check_dtype=True, ref_name="the base")
    # a state-dict reference, restricted to some keys
    check_fits(good, {"0.weight": good["0.weight"]}, "part.pt", keys=["0.weight"], check_dtype=True)
    with pytest.raises(CheckpointError, match="missing key '0.bias'"):
        check_fits(good, {"0.weight": good["0.weight"]}, "part.pt")


def test_load_into_casts_and_checks():
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    src = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        src[1].running_mean.fill_(2.0)
    assert load_into(m, src.state_dict(), "src.pt") is m
    assert m[0].weight.dtype == torch.float32 and torch.equal(m[0].weight, src[0].weight.float())
    assert torch.equal(m[1].running_mean, torch.full((3,), 2.0))  # buffers are copied too
    with pytest.raises(CheckpointError, match="src.pt: key '1.running_mean' has shape"):
        load_into(m, {**src.state_dict(), "1.running_mean": torch.zeros(4)}, "src.pt")
