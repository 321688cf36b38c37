"""The command line under the failures of issue #11: each is one line on stderr and a non-zero exit, nothing is
half-written, no input or checkpoint is replaced without an explicit flag, and ``--debug`` keeps the traceback."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import _perturb, tiny_backbone  # the --model-factory is test_cli:tiny_backbone

from adamerge_fast import cli
from adamerge_fast.cli import main
from adamerge_fast.io import save_safetensors
from adamerge_fast.models.heads import ClassificationHead

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("hcli")
    torch.manual_seed(0)
    pre = tiny_backbone().state_dict()
    save_safetensors(pre, d / "pre.safetensors")
    for k in range(2):
        save_safetensors(_perturb(pre, k + 1), d / f"ft{k}.safetensors")
        w = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + k))
        ClassificationHead(w, torch.zeros(4)).save(d / f"head{k}.safetensors")
        torch.save(torch.randn(24, 8, generator=torch.Generator().manual_seed(20 + k)), d / f"data{k}.pt")
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(30))
    x[13, 2] = float("nan")  # the data seed 0 shuffles example 13 into the second batch of 8: step 1
    torch.save(x, d / "data_nan.pt")
    bad_pre = dict(pre)
    bad_pre["3.bias"] = pre["3.bias"].clone()
    bad_pre["3.bias"][1] = float("nan")
    save_safetensors(bad_pre, d / "pre_nan.safetensors")
    save_safetensors({k: v + 1e5 for k, v in pre.items()}, d / "ft_big.safetensors")
    return d


def _merge_args(d, out, *extra, pre="pre.safetensors", fts=("ft0.safetensors", "ft1.safetensors")):
    return ["merge", "--method", "task-arithmetic", "--pretrained", str(d / pre),
            "--finetuned", *[str(d / f) for f in fts], "-o", str(out), *extra]


def _adamerge_args(d, out, *extra, data=("data0.pt", "data1.pt")):
    return ["adamerge", "--model-factory", "test_cli:tiny_backbone",
            "--pretrained", str(d / "pre.safetensors"),
            "--finetuned", str(d / "ft0.safetensors"), str(d / "ft1.safetensors"),
            "--heads", str(d / "head0.safetensors"), str(d / "head1.safetensors"),
            "--data", *[str(d / f) for f in data], "--batch-size", "8", "--no-progress", "-o", str(out), *extra]


@pytest.fixture(autouse=True)
def _factory_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command gets as far as building the model (a check must come before it)."""
    def fail(*a, **k):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(cli, "_build_spec", fail)


# ----------------------------------------------------------------------------------- non-finite results
def test_adamerge_nan_data_exits_with_one_line_and_writes_no_result(fx, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_adamerge_args(fx, out, "--steps", "6", "--checkpoint-every", "1",
                               data=("data0.pt", "data_nan.pt"))) == 1
    err = _one_line(capsys, "task 'data_nan'", "at step", "NaN or inf")
    assert not (out / "merged.safetensors").exists() and not (out / "coefficients.safetensors").exists()
    assert not (out / "history.json").exists()
    assert "at step 1;" in err  # seed 0 shuffles row 13 into the second batch
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # the checkpoint of the last good step is intact
    assert ck["step"] == 1 and torch.isfinite(ck["raw_coefficients"]).all()
    with pytest.raises(ValueError, match="NaN or inf"):  # --debug: the traceback
        main(["--debug", *_adamerge_args(fx, tmp_path / "dbg", "--steps", "6", data=("data0.pt", "data_nan.pt"))])


@pytest.mark.parametrize("flag,values", [("--init", ["nan"]), ("--init", ["inf"]), ("--clamp", ["nan", "nan"]),
                                         ("--lr", ["inf"])])
def test_adamerge_non_finite_options_are_usage_errors(fx, tmp_path, capsys, flag, values, no_loading):
    assert main(_adamerge_args(fx, tmp_path / "o", flag, *values)) == 2
    _one_line(capsys, flag)


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_merge_non_finite_scale_is_a_usage_error(fx, tmp_path, capsys, scale):
    assert main(_merge_args(fx, tmp_path / "m.safetensors", "--scale", scale)) == 2
    _one_line(capsys, "--scale")
    assert main(_merge_args(fx, tmp_path / "m.safetensors", "--scale", "1e39")) == 1  # beyond float32
    _one_line(capsys, "scale", "float32")
    assert not list(tmp_path.iterdir())


def test_merge_fp16_overflow_names_key_and_dtype(fx, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(_merge_args(fx, out, "--task-vector-dtype", "fp16", fts=("ft_big.safetensors",))) == 1
    _one_line(capsys, "task vector 0: key '0.", "overflows float16", "bf16 or fp32")
    assert not list(tmp_path.iterdir())
    assert main(_merge_args(fx, out, "--task-vector-dtype", "bf16", fts=("ft_big.safetensors",))) == 0


def test_merge_overflowing_output_is_not_written(fx, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(_merge_args(fx, out, "--scale", "1e34", fts=("ft_big.safetensors",))) == 1  # 1e34 * 1e5 > fp32 max
    _one_line(capsys, "merged tensor", "float32", "NaN or inf")
    assert not list(tmp_path.iterdir())


def test_merge_nan_in_pretrained_names_its_file_and_key(fx, tmp_path, capsys):
    assert main(_merge_args(fx, tmp_path / "m.safetensors", pre="pre_nan.safetensors")) == 1
    err = _one_line(capsys, "pre_nan.safetensors: key '3.bias'", "NaN")
    assert "task vector" not in err


# ------------------------------------------------------------------------------------------- data loss
def test_merge_refuses_to_replace_an_input(fx, tmp_path, capsys):
    ft = tmp_path / "ft.safetensors"
    ft.write_bytes((fx / "ft0.safetensors").read_bytes())
    before = ft.read_bytes()
    os.link(ft, tmp_path / "hard.safetensors")
    (tmp_path / "sym.safetensors").symlink_to(ft)
    (tmp_path / "sub").mkdir()
    args = ["merge", "--method", "average", "--pretrained", str(fx / "pre.safetensors"), "--finetuned", str(ft),
            str(fx / "ft1.safetensors"), "-o"]
    for out in (ft, tmp_path / "sub" / ".." / "ft.safetensors", tmp_path / "hard.safetensors",
                tmp_path / "sym.safetensors", fx / "pre.safetensors"):
        assert main([*args, str(out)]) == 1
        _one_line(capsys, "would destroy that input")
    assert ft.read_bytes() == before


def test_adamerge_refuses_an_earlier_runs_checkpoint(fx, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_adamerge_args(fx, out, "--steps", "4")) == 0
    ck = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(_adamerge_args(fx, out, "--steps", "2")) == 1
    _one_line(capsys, "checkpoint of an earlier run", "--resume", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == ck
    assert main(_adamerge_args(fx, out, "--steps", "2", "--overwrite")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(_adamerge_args(fx, out, "--steps", "3", "--resume")) == 0


def test_adamerge_output_checks_come_before_loading(fx, tmp_path, capsys, monkeypatch, no_loading):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(_adamerge_args(fx, f, "--steps", "2")) == 1
    _one_line(capsys, "a_file", "not a directory")
    hf = tmp_path / "hf_pre"  # an input directory: the outputs would become part of that checkpoint
    hf.mkdir()
    save_safetensors(load_file(str(fx / "pre.safetensors")), hf / "model.safetensors")
    args = _adamerge_args(fx, hf, "--steps", "2")
    args[args.index(str(fx / "pre.safetensors"))] = str(hf)
    assert main(args) == 1
    _one_line(capsys, "inside the input directory", "hf_pre")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", read_only)
    assert main(_adamerge_args(fx, tmp_path / "new" / "run", "--steps", "2")) == 1
    _one_line(capsys, "cannot write", "Read-only file system")
    assert main(_merge_args(fx, tmp_path / "m.safetensors")) == 1
    _one_line(capsys, "cannot write", "Read-only file system")


@pytest.mark.parametrize("device,needle", [("nonsense", "not a torch device"), ("cuda", "CUDA is not available"),
                                           ("cuda:0", "CUDA is not available")])
def test_device_checked_before_loading(fx, tmp_path, capsys, monkeypatch, device, needle, no_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_adamerge_args(fx, tmp_path / "o", "--device", device)) == 1
    _one_line(capsys, "--device", needle)


def test_backend_checked_before_loading(fx, tmp_path, capsys, no_loading):
    assert main(_adamerge_args(fx, tmp_path / "o", "--backend", "nonexistent")) == 1
    _one_line(capsys, "--backend", "nonexistent", "unknown backend")


# ------------------------------------------------------------------------------------------ resume
def test_resume_refuses_changed_settings_and_fewer_steps(fx, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_adamerge_args(fx, out, "--steps", "3", "--lr", "0.01")) == 0
    capsys.readouterr()
    for extra, needles in [(["--lr", "0.02"], ["'lr'", "0.01", "0.02"]),
                           (["--lr", "0.01", "--ties"], ["'ties'"]),
                           (["--lr", "0.01", "--seed", "3"], ["'seed'", "0", "3"]),
                           (["--lr", "0.01", "--batch-size", "4"], ["'batch_size'"]),
                           (["--lr", "0.01", "--clamp", "0", "2"], ["'clamp'"])]:
        args = _adamerge_args(fx, out, "--steps", "5", "--resume", *extra)
        if "--batch-size" in extra:
            args.remove("8")
            args.remove("--batch-size")
        assert main(args) == 1, extra
        _one_line(capsys, *needles)
    assert main(_adamerge_args(fx, out, "--steps", "2", "--resume", "--lr", "0.01")) == 1
    _one_line(capsys, "steps=2", "below the checkpoint's step 3")
    data = torch.load(out / "checkpoint.pt", weights_only=True)
    data["raw_coefficients"] += 0.1
    torch.save(data, out / "checkpoint.pt")
    assert main(_adamerge_args(fx, out, "--steps", "5", "--resume", "--lr", "0.01")) == 1
    _one_line(capsys, "checkpoint.pt", "digest")


# ----------------------------------------------------------------------------------- write failures
def test_disk_full_during_merge_and_checkpoint(fx, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.safetensors"
    assert main(_merge_args(fx, out)) == 0
    before = out.read_bytes()

    def full(self, name, t):  # the merge streams its output tensor by tensor: the disk fills halfway
        self._f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("adamerge_fast.export.SafetensorsStreamWriter.write", full)
    capsys.readouterr()
    assert main(_merge_args(fx, out, "--overwrite")) == 1
    _one_line(capsys, f"{out}: No space left on device")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run = tmp_path / "run"

    def full_torch(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_torch)
    assert main(_adamerge_args(fx, run, "--steps", "2", "--checkpoint-every", "1")) == 1
    _one_line(capsys, "checkpoint.pt: No space left on device")
    assert not run.exists() or not [p for p in run.iterdir() if p.name != "checkpoint.pt"]


def test_outputs_get_the_umask_mode(fx, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_merge_args(fx, tmp_path / "m.safetensors")) == 0
        assert main(_adamerge_args(fx, tmp_path / "run", "--steps", "1")) == 0
    finally:
        os.umask(old)
    for f in [tmp_path / "m.safetensors", *(tmp_path / "run").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ----------------------------------------------------------------------------------- unreadable inputs
def test_corrupt_torch_files_with_and_without_trust_pickle(fx, tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name, reason in (("empty.pt", "empty or truncated"), ("garbage.pt", "corrupt pickle")):
        for trust in ([], ["--trust-pickle"]):
            args = ["merge", "--method", "average", "--pretrained", str(tmp_path / name), "--finetuned",
                    str(fx / "ft0.safetensors"), "-o", str(tmp_path / "m.safetensors"), *trust]
            assert main(args) == 1
            err = _one_line(capsys, name, "not a readable torch checkpoint", reason)
            assert "pickled object" not in err


def test_sharded_checkpoint_errors_name_the_file(fx, tmp_path, capsys):
    pre = load_file(str(fx / "pre.safetensors"))
    keys = sorted(pre)
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({k: pre[k] for k in keys[:2]}, str(d / "model-1.safetensors"))
    save_file({k: pre[k] for k in keys[2:]}, str(d / "model-2.safetensors"))
    wm = {k: "model-1.safetensors" if i < 2 else "model-2.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    args = ["merge", "--method", "average", "--pretrained", str(d), "--finetuned", str(fx / "ft0.safetensors"),
            "-o", str(tmp_path / "m.safetensors")]
    assert main(args) == 0
    shard = d / "model-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    assert main(args) == 1
    _one_line(capsys, "model-2.safetensors: not a readable safetensors file")
    (d / "model.safetensors.index.json").write_text("{broken")
    assert main(args) == 1
    _one_line(capsys, "model.safetensors.index.json: not a valid safetensors index")


def test_permission_denied_is_reported_as_such(fx, tmp_path, capsys, monkeypatch):
    target = fx / "ft1.safetensors"
    real_open = open

    def no_read(p, *a, **k):
        if isinstance(p, (str, os.PathLike)) and Path(p) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", no_read)
    assert main(_merge_args(fx, tmp_path / "m.safetensors")) == 1
    err = _one_line(capsys, "ft1.safetensors", "permission denied")
    assert "not found" not in err and "No such file" not in err


# ----------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["merge", "--help"]) == 130
    _one_line(capsys, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "merge", "--help"])


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_entry_point_imports_no_torch_before_main():
    """The console script imports ``adamerge_fast.cli`` before ``main`` can catch Ctrl-C: that import must be light."""
    r = _python("import sys, adamerge_fast.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_ctrl_c_while_importing_torch_in_a_real_process():
    """A KeyboardInterrupt raised while the command imports torch (as Ctrl-C there would) ends the process with one
    line and status 130, no traceback."""
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from adamerge_fast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = _python(code, "merge", "--help")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip() == "adamerge-fast: interrupted"


def test_debug_keeps_the_traceback(fx, tmp_path):
    ft = tmp_path / "ft.safetensors"
    ft.write_bytes((fx / "ft0.safetensors").read_bytes())
    with pytest.raises(ValueError, match="would destroy that input"):
        main(["--debug", "merge", "--method", "average", "--pretrained", str(fx / "pre.safetensors"),
              "--finetuned", str(ft), "-o", str(ft)])

