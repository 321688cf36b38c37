"""The step benchmark's own checks (``benchmarks/adamerging_step``): every method computes the same coefficients
on a tiny ViT, and the command writes its JSON. No wall-clock assertions."""

import json

import pytest
import torch

# benchmarks/ is a plain package of the checkout (pytest puts the checkout root on sys.path: pyproject.toml)
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


@pytest.mark.parametrize("workload", ["vit-tiny", "llama-tiny"])
def test_all_methods_agree(workload):
    wl = build_workload(workload, DEVICE)
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
