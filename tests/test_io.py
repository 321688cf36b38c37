"""Checkpoint reading and atomic writing."""

import json

import pytest
import torch
from safetensors.torch import save_file

import adamerge_fast as af
from adamerge_fast.io import CheckpointError, LazyStateDict, atomic_path, load_state_dict, write_text_atomic


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
