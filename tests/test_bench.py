"""The step benchmark's own checks (``benchmarks/adamerging_step``): every method computes the same coefficients
on a tiny ViT, and the command writes its JSON. No wall-clock assertions."""

import json

import pytest
import torch

# benchmarks/ is a plain package of the checkout (pytest puts the checkout root on sys.path: pyproject.toml)
from _tol import assert_close
from benchmarks.adamerging_step import main
from benchmarks.adamerging_step.protocol import EquivalenceError, check_equivalence
from benchmarks.adamerging_step.runners import available_methods, make_runner
from benchmarks.adamerging_step.workloads import build_workload

DEVICE = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    # the timed kernels allocate normally here (the suite's NaN poisoning is for kernel-coverage tests)
    import adamerge_fast.ops._common as _ops_common

    monkeypatch.setattr(_ops_common, "POISON_OUTPUTS", False)


@pytest.mark.parametrize("workload,overrides", [("vit-tiny", None), ("vit-tiny", {"impl": "torch"}),
                                                ("llama-tiny", None)], ids=["vit-tiny", "vit-tiny-torch", "llama-tiny"])
def test_all_methods_agree(workload, overrides):
    wl = build_workload(workload, DEVICE, overrides)
    methods = available_methods(DEVICE)
    assert methods[:2] == ["official", "functional_call"] and "ours-reference-concat" in methods
    runners = [make_runner(m, wl) for m in methods]
    try:
        rep = check_equivalence(runners, wl, steps=2)
    finally:
        for r in runners:
            r.close()
    assert rep["ok"] and set(rep["methods"]) == set(methods)
    for m, v in rep["methods"].items():
        assert v["max_abs_coef_diff"] <= 1e-5, (m, v)
        assert len(v["losses"]) == 2


def test_equivalence_check_catches_a_wrong_method():
    wl = build_workload("vit-tiny", DEVICE)
    runners = [make_runner("official", wl), make_runner("ours-reference-concat", wl)]
    runners[1].model.raw_coefficients.data[3, 1] += 0.05  # a different start: must be caught
    try:
        with pytest.raises(EquivalenceError, match="disagree"):
            check_equivalence(runners, wl, steps=1)
    finally:
        for r in runners:
            r.close()


def test_cli_writes_results(tmp_path):
    # llama-tiny: the memory subprocesses need not import open_clip (seconds each)
    rc = main(["--workloads", "llama-tiny", "--steps", "2", "--mem-steps", "1", "--quick",
               "--methods", "functional_call,ours-reference-concat", "--no-kernels", "--no-profile",
               "--no-live-memory", "--out", str(tmp_path), "--stem", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.md").exists()
    assert {"benchmark", "command", "env", "workloads", "matmul_rate_flops", "copy_bw_bytes_per_s"} <= set(res)
    assert {"date", "device", "torch", "python", "cpu_model", "backend_status"} <= set(res["env"])
    (w,) = res["workloads"]
    assert {"workload", "spec", "info", "methods", "floor", "equivalence", "default_ours", "goals"} <= set(w)
    assert w["equivalence"]["ok"]
    assert {"floor_s", "flops", "bytes", "compute_s", "memory_s", "bound"} <= set(w["floor"])
    assert set(w["methods"]) == {"functional_call", "ours-reference-concat"}
    ours = w["methods"]["ours-reference-concat"]
    assert ours["step_s"]["n"] == 2 and {"median", "min", "max"} <= set(ours["step_s"])
    assert {"speedup_vs_b", "x_floor", "mem_vs_b", "mem_increase_vs_b"} <= set(ours)
    mem = ours["memory"]
    assert "error" not in mem, mem
    assert {"peak_rss_bytes", "rss_after_build_bytes", "rss_increase_bytes", "ru_maxrss_bytes"} <= set(mem)
    assert mem["peak_rss_bytes"] > 0


def test_plain_torch_vit_b32_is_open_clips_tower():
    """The GPU machine has no open_clip: the step benchmark's plain-torch ViT-B/32 tower must be open_clip's tower
    (same parameter names, shapes and order: 152 tensors, 87,849,216 parameters; same function: open_clip's
    weights loaded strictly give the same features)."""
    from adamerge_fast._compat import import_open_clip
    from benchmarks.adamerging_step import vit

    try:
        open_clip = import_open_clip()
    except ImportError:
        pytest.skip("open_clip is not installed")
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config("ViT-B-32")
    assert {k: cfg["vision_cfg"][k] for k in vit.CONFIGS["ViT-B-32"]["vision_cfg"]} == \
        vit.CONFIGS["ViT-B-32"]["vision_cfg"] and cfg["embed_dim"] == vit.CONFIGS["ViT-B-32"]["embed_dim"]  # fmt: skip
    torch.manual_seed(0)
    ref = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()
    ours = vit.build(**vit.CONFIGS["ViT-B-32"]).eval()
    shapes = [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == shapes
    assert len(shapes) == 152 and sum(p.numel() for p in ours.parameters()) == 87_849_216
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(ours(x), ref(x).double(), torch.float32, "ViT-B/32 features")


def test_vit_workload_without_open_clip(monkeypatch):
    """``impl="auto"`` falls back to the plain-torch tower when open_clip cannot be imported; the workload records
    which tower it built."""
    import adamerge_fast._compat as compat

    def missing():
        raise ImportError("open_clip is not installed")

    monkeypatch.setattr(compat, "import_open_clip", missing)
    wl = build_workload("vit-tiny", DEVICE)
    assert wl.info["vit_impl"] == "torch" and wl.names[:3] == ["class_embedding", "positional_embedding", "proj"]
    with pytest.raises(ImportError):
        build_workload("vit-tiny", DEVICE, {"impl": "open_clip"})


def test_gpu_ops_benchmark_report_parts(tmp_path):
    """benchmarks/bench_gpu_ops.py needs a GPU to time anything; its ``auto`` suggestion (backends ordered by the
    geometric mean time over the cases all of them ran) and its markdown are checked on synthetic rows, and it
    refuses to run without CUDA."""
    from benchmarks import bench_gpu_ops as B

    rows = [dict(section="merged_linear", op="merged_linear", case=c, backend=b, fwd_bwd_ms=t)
            for c, ts in (("a", (1.0, 4.0, 9.0)), ("b", (4.0, 1.0, 9.0)), ("c", (2.0, 1.0, 9.0)))
            for b, t in zip(("cuda", "triton", "reference"), ts, strict=True)]  # fmt: skip
    rows.append(dict(section="merged_linear", op="merged_linear", case="d", backend="cuda", fwd_bwd_ms=0.01))
    rows.append(dict(section="merged_linear", op="merged_linear", case="a", backend="materialize", fwd_bwd_ms=0.1))
    rows.append(dict(section="entropy", op="entropy_fwd", case="x", backend="triton", ms=1.0))
    sug = B.auto_suggestion(rows)
    assert sug["merged_linear"]["order"] == ["triton", "cuda", "reference"] and sug["merged_linear"]["cases"] == 3
    assert sug["entropy_fwd"]["order"] == ["triton"]
    res = dict(device="dev", date="today", torch="t", triton="3", copy_Bps=4e12, matmul_flops={"bf16": 7e14},
               rows=rows, auto_suggestion=sug, cut=["entropy: 1x1 and later rows"], elapsed_s=1.0)
    md = B.render_markdown(res)
    assert "`merged_linear`: triton" in md and "## merged_linear" in md and "Cut by the time budget" in md
    if not torch.cuda.is_available():
        assert B.main(["--out", str(tmp_path)]) == 2 and not list(tmp_path.iterdir())
