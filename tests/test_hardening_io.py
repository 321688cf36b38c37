"""Reading and writing under failure (issue #11): file modes, a full disk, read-only and unreadable locations,
corrupt torch files, broken sharded checkpoints, outputs that would replace inputs, finiteness checks.

Permission problems are simulated with monkeypatching (the tests may run as root, for whom ``chmod`` denies
nothing); a full disk is simulated by a write that raises ``OSError(ENOSPC)``, and for real on the small file
system named by ``ADAMERGE_TEST_FULL_FS`` when it is set (e.g. a 64 KiB tmpfs).
"""

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import adamerge_fast.io as io
from adamerge_fast.io import (
    CheckpointError,
    NonFiniteError,
    check_finite,
    check_not_input,
    check_stored_finite,
    load_state_dict,
    save_safetensors,
    save_torch,
    write_text_atomic,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


# ------------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = _mode(plain)
    assert want == 0o666 & ~mask
    save_safetensors({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    save_torch({"a": 1}, tmp_path / "a.pt")
    write_text_atomic(tmp_path / "a.json", "{}")
    for f in ("a.safetensors", "a.pt", "a.json"):
        assert _mode(tmp_path / f) == want, f"{f}: {oct(_mode(tmp_path / f))} != {oct(want)}"


def test_atomic_write_keeps_an_existing_files_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "a.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640


# ------------------------------------------------------------------------------------------ full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(3)}, target)
    before = target.read_bytes()

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        _enospc()

    monkeypatch.setattr("safetensors.torch.save_file", half_then_full)
    with pytest.raises(OSError) as ei:
        save_safetensors({"a": torch.zeros(3)}, target)
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left

    monkeypatch.setattr(torch, "save", lambda obj, f: _enospc())
    with pytest.raises(OSError, match="No space left") as ei:
        save_torch({"a": 1}, tmp_path / "ck.pt")
    assert ei.value.filename == str(tmp_path / "ck.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.skipif(not os.environ.get("ADAMERGE_TEST_FULL_FS"), reason="set ADAMERGE_TEST_FULL_FS to a small file "
                    "system (e.g. mount -t tmpfs -o size=64k tmpfs DIR)")
@pytest.mark.parametrize("save,name", [(save_safetensors, "full_test.safetensors"), (save_torch, "full_test.pt")])
def test_disk_full_on_a_real_small_file_system(save, name):
    """safetensors and torch.save report a full disk as their own errors: both come out as OSError(ENOSPC)."""
    d = Path(os.environ["ADAMERGE_TEST_FULL_FS"])
    target = d / name
    save({"a": torch.ones(4)}, target)
    before = target.read_bytes()
    try:
        with pytest.raises(OSError) as ei:
            save({"a": torch.ones(1 << 20)}, target)  # 4 MiB
        assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(target)
        assert target.read_bytes() == before
        assert not [p for p in d.iterdir() if p.name.startswith(".full_test")]
    finally:
        target.unlink()


def test_read_only_location_names_the_output(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="Read-only file system") as ei:
        write_text_atomic(tmp_path / "out.json", "{}")
    assert ei.value.filename == str(tmp_path / "out.json")


# ------------------------------------------------------------------------------------- unreadable files
def test_permission_denied_is_not_reported_as_missing(tmp_path, monkeypatch):
    f = tmp_path / "ck.safetensors"
    save_file({"a": torch.ones(2)}, str(f))
    real_stat, real_open = os.stat, open

    def no_search(p, *a, **k):  # a directory on the path without search permission
        if Path(p) == f:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", no_search)
    with pytest.raises(PermissionError, match="ck.safetensors: checkpoint: permission denied"):
        load_state_dict(f)
    with pytest.raises(PermissionError, match="permission denied"):
        io.existing(f, "fine-tuned checkpoint")
    monkeypatch.setattr(os, "stat", real_stat)

    def no_read(p, *a, **k):  # the file itself is not readable
        if Path(p) == f:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(PermissionError, match="ck.safetensors: checkpoint: permission denied .cannot be read"):
        load_state_dict(f)


# ------------------------------------------------------------------------------------------ torch files
def test_corrupt_or_empty_torch_file_with_and_without_trust(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"garbage bytes, not a checkpoint")
    torch.save({"w": torch.ones(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    for name, reason in [("empty.pt", "empty or truncated"), ("garbage.pt", "corrupt pickle"),
                         ("trunc.pt", "corrupt or truncated zip")]:
        for trust in (False, True):
            with pytest.raises(CheckpointError) as ei:
                load_state_dict(tmp_path / name, trust_pickle=trust)
            msg = str(ei.value)
            assert msg.startswith(f"{tmp_path / name}: not a readable torch checkpoint"), msg
            assert reason in msg and "pickled object" not in msg and len(msg.splitlines()) == 1, msg
    with pytest.raises(CheckpointError, match="whole pickled object"):  # a real pickled module: the pickle hint
        load_state_dict(tmp_path / "module.pt")
    assert set(load_state_dict(tmp_path / "module.pt", trust_pickle=True)) == {"weight", "bias"}


# -------------------------------------------------------------------------------------- sharded checkpoints
def _sharded(d: Path) -> Path:
    d.mkdir()
    save_file({"x": torch.randn(64, 64)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.randn(5)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    return d


def test_sharded_checkpoint_errors_name_the_file(tmp_path):
    d = _sharded(tmp_path / "trunc")
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors: not a readable safetensors"):
        load_state_dict(d)

    d = _sharded(tmp_path / "bad_json")
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid safetensors index"):
        load_state_dict(d)

    d = _sharded(tmp_path / "no_map")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index file"):
        load_state_dict(d)

    d = _sharded(tmp_path / "missing_shard")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index.json: names the shard model-00002-of-00002.safetensors"):
        load_state_dict(d)


# ----------------------------------------------------------------------------------- outputs vs inputs
def test_check_not_input(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "hard.safetensors"
    os.link(a, link)
    sym = tmp_path / "sym.safetensors"
    sym.symlink_to(a)
    for out in (a, tmp_path / "sub" / ".." / "a.safetensors", link, sym):
        with pytest.raises(ValueError, match="would destroy that input"):
            check_not_input(out, [tmp_path / "other.pt", a], "merged checkpoint")
    shard_dir = tmp_path / "hf"
    shard_dir.mkdir()
    with pytest.raises(ValueError, match="inside the input directory"):
        check_not_input(shard_dir / "model.safetensors", [shard_dir])
    check_not_input(tmp_path / "new.safetensors", [a, shard_dir])  # a fresh path is fine


# ---------------------------------------------------------------------------------------- finiteness
def test_finiteness_checks_name_the_tensor():
    check_finite(torch.ones(3), "x")
    check_finite(torch.tensor([1, 2]), "ints are finite")
    with pytest.raises(NonFiniteError, match=r"key 'w' has NaN or inf values \(1 NaN, 2 inf of 4\)"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]), "key 'w'")
    src = torch.tensor([1e5, 1.0])
    with pytest.raises(NonFiniteError, match=r"task vector 0: key 'w' overflows float16 \(largest magnitude 1e\+05.*"
                                             r"bfloat16 or float32"):
        check_stored_finite(src.half(), "task vector 0: key 'w'", src)
    check_stored_finite(src.bfloat16(), "bf16 holds it", src)

