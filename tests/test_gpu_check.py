"""The parts of ``make gpu-check`` (tools/gpu_check.py) that run without a GPU: argument handling, the phase plan and
its budgets, the runner (budgets, concurrent phases, stopped process groups, skipped phases after a failed build),
the report (at most 8 files under $OUT), the build check, and the make target / script."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


GC = _load()


def test_dry_run_lists_every_phase_within_the_target(capsys, tmp_path):
    assert GC.main(["--dry-run", "--python", "/usr/bin/python3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for n, name in enumerate(("build", "tests", "sanitizer", "bench"), start=1):
        assert re.search(rf"^phase {n} {name}: budget \d+s, expected \d+s", out, re.M), out
    assert "setup.py build_ext --inplace" in out and "-m gpu tests" in out and "tools/gpu_sanitize.py" in out
    assert "benchmarks.bench_gpu_ops" in out and "benchmarks.adamerging_step" in out
    assert ".venv" not in out and "/usr/bin/python3 " in out  # the interpreter it is given, never the .venv
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    args = GC._parse(["--python", "python3"])
    phases = GC.plan(args, "python3", tmp_path)
    assert [p.number for p in phases] == [1, 2, 3, 4]
    assert GC.total_budget(phases) <= GC.TOTAL_TARGET_S  # issue 12: the whole run under 8 minutes
    assert sum(p.expected_s for p in phases if p.number != 3) < GC.TOTAL_TARGET_S  # phase 3 runs beside phase 2
    build = phases[0]
    assert build.required and build.steps[0].env["ADAMERGE_REQUIRE_EXT"] == "1"
    assert build.steps[0].env["ADAMERGE_REQUIRE_CUDA"] == "1" and build.steps[0].env["ADAMERGE_CUDA_ARCHS"] == "90"


def test_arguments(tmp_path):
    phases = GC.plan(GC._parse(["--quick"]), "python3", tmp_path)
    assert [p.number for p in phases] == [1, 2]
    phases = GC.plan(GC._parse(["--phases", "3,4", "--budget-scale", "2"]), "python3", tmp_path)
    assert [p.number for p in phases] == [3, 4]
    assert phases[1].budget_s == 2 * sum(b.budget_s for b in GC.BENCHMARKS)
    for bad in (["--phases", "5"], ["--phases", "a"], ["--budget-scale", "0"], ["--bogus"]):
        with pytest.raises(SystemExit):
            GC._parse(bad)
    assert GC._parse([]).out == os.environ.get("OUT")


def test_benchmarks_are_one_line_each(tmp_path):
    """Phase 4 runs every entry of BENCHMARKS, each with its own budget; placeholders are filled in."""
    extra = GC.Benchmark("mine", ("{py}", "-m", "benchmarks.mine", "--out", "{work}", "--budget", "{budget_inner}"),
                         30, 20, "mine.json", "mine.md")  # fmt: skip
    GC.BENCHMARKS.append(extra)
    try:
        (bench,) = GC.plan(GC._parse(["--phases", "4"]), "py3", tmp_path)
    finally:
        GC.BENCHMARKS.remove(extra)
    assert [s.label for s in bench.steps][-1] == "mine"
    assert bench.steps[-1].argv == ["py3", "-m", "benchmarks.mine", "--out", str(tmp_path), "--budget", "24"]
    assert bench.steps[-1].budget_s == 30


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_runner_budgets_groups_and_skips(tmp_path):
    """Fake phases: a required first phase passes; in the next group two phases run side by side, one passes, one
    outlives its budget and is stopped with its whole process group (its child never writes its marker); then a
    required phase fails and the phase after it is skipped."""
    marker = tmp_path / "child_finished"
    pidfile = tmp_path / "child.pid"
    child = tmp_path / "child.py"
    child.write_text(f"import time, pathlib\ntime.sleep(60)\npathlib.Path({str(marker)!r}).write_text('x')\n")
    slow = ("import subprocess, sys, time, pathlib; "
            f"c = subprocess.Popen([sys.executable, {str(child)!r}]); "
            f"pathlib.Path({str(pidfile)!r}).write_text(str(c.pid)); print('started', flush=True); time.sleep(60)")
    phases = [
        GC.Phase(1, "build", 30, 1, "fake", [GC.Step(_py("print('extension _C.so'); print('cubins: sm_90')"),
                                                      "build.log")], required=True,
                 summarize=GC._summarize_build),
        GC.Phase(2, "tests", 30, 1, "fake", [GC.Step(_py("print('== 3 passed, 1 skipped in 0.2s ==')"), "tests.log",
                                                      label="gpu-marked")], group=2, summarize=GC._summarize_pytest),
        GC.Phase(3, "sanitizer", 10, 1, "fake", [GC.Step(_py(slow), "sanitizer.log")], group=2),
        GC.Phase(4, "bench", 30, 1, "fake", [GC.Step(_py("import sys; sys.exit(3)"), "bench.log", label="ops"),
                                             GC.Step(_py("print('never')"), "bench.log", label="step")],
                 group=4, required=True, summarize=GC._summarize_bench),
        GC.Phase(5, "after", 30, 1, "fake", [GC.Step(_py("print('never')"), "bench.log")]),
    ]  # fmt: skip
    lines = []
    results = GC.run_plan(phases, tmp_path, log=lines.append)
    status = {r.number: r.status for r in results}
    assert status == {1: "PASS", 2: "PASS", 3: "TIMEOUT", 4: "FAIL", 5: "SKIP"}
    assert results[0].summary == "built _C.so with CUDA (cubins: sm_90)"
    assert results[1].summary == "gpu-marked: 3 passed, 1 skipped"
    assert results[3].summary == "ops: exit 3"  # the required phase stopped at its first failing step
    assert "phase 4 (bench) did not pass" in results[4].summary
    assert len(lines) == 5 and all(line.startswith("[gpu-check] phase ") for line in lines)
    log = (tmp_path / "sanitizer.log").read_text()
    assert "started" in log and "stopped: budget spent" in log
    child_pid = int(pidfile.read_text())
    for _ in range(50):  # the stopped group's child is gone (killed, not left running; a zombie counts as gone)
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child_pid} of the stopped phase still runs")
    assert not marker.exists()


def test_report_writes_at_most_eight_files(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    for name in ("build.log", "tests.log", "bench.log", "scratch.png"):
        (work / name).write_text("x\n")
    (work / "gpu_ops.json").write_text(json.dumps({
        "copy_Bps": 4.3e12, "matmul_flops": {"bf16": 7.9e14}, "rows": [
            {"op": "merge_many", "of_copy": 0.85}, {"op": "dcoef_many", "of_copy": 0.7}],
        "auto_suggestion": {"merged_linear": {"order": ["triton", "cuda", "reference"], "cases": 40}}}))
    (work / "step_cuda.json").write_text(json.dumps({"workloads": [{"workload": "vit-b32", "goals": [
        {"goal": "speedup_vs_b", "target": ">= 5x", "value": 6.1, "met": True}]}]}))
    (work / "gpu_ops.md").write_text("# ops table\n")
    results = [GC.Result(1, "build", "PASS", 50.0, 90, 60, "built"), GC.Result(2, "tests", "FAIL", 100.0, 180, 120,
                                                                                "gpu-marked: 1 failed")]  # fmt: skip
    phases = GC.plan(GC._parse(["--quick"]), "python3", work)
    GC.write_report(results, phases, GC._parse([]), work, out, 150.0)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and set(files) <= set(GC.OUTPUT_FILES) and "scratch.png" not in files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in GC.OUTPUT_FILES) and len(GC.OUTPUT_FILES) <= 8
    md = (out / "gpu_check.md").read_text()
    assert "| 2 tests | FAIL |" in md and "triton < cuda < reference" in md and "# ops table" in md
    assert "merge_many` best fraction of the copy bandwidth: 0.85" in md and "speedup_vs_b = 6.10" in md
    doc = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in doc["phases"]] == ["PASS", "FAIL"] and doc["target_s"] == 480


def test_summaries_of_pytest_and_sanitizer_output():
    phase = GC.Phase(2, "tests", 1, 1, "", [GC.Step([], "t.log", label="a"), GC.Step([], "t.log", label="b")])
    out = GC._summarize_pytest(phase, ["....\n==== 12 passed, 3 skipped, 1 deselected in 40.10s ====\n",
                                       "F\n1 failed, 5 passed in 2.00s\n"], [0, 1])  # fmt: skip
    assert out == "a: 12 passed, 3 skipped, 1 deselected; b: 1 failed, 5 passed"
    s = GC._summarize_sanitizer(None, ["gpu_sanitize: 466 checks, 0 mismatches\n========= ERROR SUMMARY: 0 errors\n"],
                                [0])  # fmt: skip
    assert s == "memcheck ERROR SUMMARY: 0 errors; 466 checks, 0 mismatches"


def test_build_check_fails_loudly_without_cuda(capsys):
    """Phase 1 fails (and stops the run) unless the extension has its CUDA kernels: here it is a CPU build."""
    pytest.importorskip("adamerge_fast._C")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: tests/test_gpu.py checks the build there")
    assert GC.verify_build("90") == 1
    assert "BUILD CHECK FAILED: adamerge_fast._C was built without CUDA" in capsys.readouterr().out


def test_setup_refuses_a_build_without_cuda_when_required():
    """``ADAMERGE_REQUIRE_CUDA=1`` (set by phase 1) turns a CPU-only build into an error before anything compiles."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    env = dict(os.environ, ADAMERGE_REQUIRE_CUDA="1")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode != 0 and "ADAMERGE_REQUIRE_CUDA=1 but the CUDA kernels cannot be built" in r.stderr


def test_script_and_make_target(tmp_path):
    """``make gpu-check`` runs scripts/gpu_check.sh with $PYTHON (default python3), without ``make setup``."""
    mk = (ROOT / "Makefile").read_text()
    target = re.search(r"^gpu-check:(.*)\n\t(.*)$", mk, re.M)
    assert target and target.group(1).strip() == "" and "scripts/gpu_check.sh" in target.group(2)
    sh = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert '"${PYTHON:-python3}" tools/gpu_check.py' in sh and ".venv" not in sh.split("set -euo")[1]
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--quick"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"output {tmp_path}" in r.stdout and "phase 2 tests" in r.stdout and "phase 3" not in r.stdout
