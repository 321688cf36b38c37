"""``make gpu-check``: every GPU verdict and figure of the project from one command, on a machine with a GPU.

Runs with the interpreter it is started with (``python3`` on the GPU machine: torch with CUDA, Triton, pytest,
pytest-xdist and nvcc already there; no ``.venv``, no network, no open_clip), from the checkout's root, in phases, each
with its own time budget (the phase is stopped when it runs out) and one summary line::

    1 build      the extension in place for sm_90 (ADAMERGE_REQUIRE_EXT=1, ADAMERGE_CUDA_ARCHS=90); fails loudly, and
                 stops the run, unless adamerge_fast._C loads with its CUDA kernels and carries sm_90 code
    2 tests      every test marked ``gpu`` (tests/test_gpu.py and any other), then the GPU suite: the op contract on
                 the cuda and triton backends, the Triton and extension tests, AdaMergedModel and adamerge
    3 sanitizer  compute-sanitizer --tool memcheck on tools/gpu_sanitize.py (every GPU op once, small odd shapes);
                 runs beside phase 2 (its own process; the GPU has room for both)
    4 bench      the benchmarks of BENCHMARKS, one after the other, each within its own budget

``--quick`` runs phases 1-2. Output under ``$OUT`` when set (else ``runs/gpu_check/<time>``): at most 8 files, see
:data:`OUTPUT_FILES`. The summary (gpu_check.md) also carries the key figures and the goals of issue 12.

Adding to it (one line each): a GPU test: mark it ``@pytest.mark.gpu`` (any file under tests/; skip it without
CUDA); a benchmark: an entry of :data:`BENCHMARKS` (command, budget, expected time, the JSON it writes).

Usage::

    python3 tools/gpu_check.py [--quick] [--dry-run] [--phases 1,2] [--budget-scale 1.5] [--jobs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_TARGET_S = 480  # the whole run, issue 12: under 8 minutes on one H100/H200

# The files written under $OUT (the GPU machine's tool returns at most 8, at most 2 folders deep).
OUTPUT_FILES = ("gpu_check.md", "gpu_check.json", "build.log", "tests.log", "sanitizer.log", "bench.log",
                "gpu_ops.json", "step_cuda.json")  # fmt: skip

# The test files of the GPU suite (phase 2, second step); tests marked ``gpu`` anywhere run in the first step.
SUITE = ("tests/test_ops_contract.py", "tests/test_triton.py", "tests/test_cpp_ext.py", "tests/test_adamerged.py",
         "tests/test_optim.py", "tests/test_lora_ops.py", "tests/test_linear_entropy.py",
         "tests/test_entropy_nonfinite.py")  # fmt: skip
# Suite tests that check the build machinery, not the GPU (CI runs them): nvcc -c and header syntax checks.
DESELECT = ("tests/test_cpp_ext.py::test_cuda_sources_compile", "tests/test_cpp_ext.py::test_cuda_binding_syntax")


@dataclasses.dataclass
class Benchmark:
    """One benchmark of phase 4: ``argv`` (``{py}``, ``{work}`` and ``{budget}`` are filled in), its time budget and
    expected time in seconds, the JSON it writes under the work folder (copied to $OUT when listed in OUTPUT_FILES),
    and its markdown (appended to gpu_check.md)."""

    name: str
    argv: tuple[str, ...]
    budget_s: float
    expected_s: float
    json: str
    markdown: str


# Expected times are estimates for one H200 (no GPU has run them yet): ops = 2 calibrations (~5 s) + ~45 Triton
# compiles (~1 s each) + ~260 do_bench calls (~0.1 s each); step = 2 workloads x (build ~5 s + 2 checked steps of the
# official baseline, ~4 s each on 16 CPU cores + 3 interleaved timed steps capped at 10 s + 2 memory subprocesses
# ~8 s each).
BENCHMARKS: list[Benchmark] = [
    Benchmark("ops", ("{py}", "-m", "benchmarks.bench_gpu_ops", "--budget-s", "{budget_inner}", "--out", "{work}",
                      "--stem", "gpu_ops"), 90, 70, "gpu_ops.json", "gpu_ops.md"),
    Benchmark("step", ("{py}", "-m", "benchmarks.adamerging_step", "--workloads", "vit-b32,vit-b32-bf16",
                       "--vit-impl", "torch", "--methods", "official,functional_call,ours-auto-concat",
                       "--memory-methods", "functional_call,ours-auto-concat", "--steps", "3", "--check-steps", "2",
                       "--max-method-seconds", "10", "--min-steps", "1", "--no-kernels", "--no-profile",
                       "--out", "{work}", "--stem", "step_cuda"), 120, 100, "step_cuda.json", "step_cuda.md"),
]  # fmt: skip


@dataclasses.dataclass
class Step:
    """One command of a phase: ``argv`` run from the checkout, output appended to ``log``; ``budget_s`` None: what
    is left of the phase's budget."""

    argv: list[str]
    log: str
    env: dict = dataclasses.field(default_factory=dict)
    budget_s: float | None = None
    label: str = ""


@dataclasses.dataclass
class Phase:
    number: int
    name: str
    budget_s: float
    expected_s: float
    expected_note: str
    steps: list[Step]
    group: int = 0  # phases of one group run at the same time
    required: bool = False  # a failure stops the run (the build)
    summarize: object = None  # callable(phase, outputs: list[str], rcs: list[int]) -> str
    unavailable: str | None = None  # why the phase cannot run here (then SKIP)


@dataclasses.dataclass
class Result:
    number: int
    name: str
    status: str  # PASS | FAIL | TIMEOUT | SKIP
    seconds: float
    budget_s: float
    expected_s: float
    summary: str

    def line(self) -> str:
        return (f"[gpu-check] phase {self.number} {self.name}: {self.status} {self.seconds:.1f}s of "
                f"{self.budget_s:.0f}s budget (expected {self.expected_s:.0f}s): {self.summary}")  # fmt: skip


# ------------------------------------------------------------------------------------------------ planning
def _find_tool(name: str) -> str | None:
    """``name`` on PATH, else in a CUDA toolkit or Nsight folder."""
    cands = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    for pattern in (f"/usr/local/cuda*/bin/{name}", f"/usr/local/cuda*/{name}/{name}", f"/opt/nvidia/**/{name}"):
        cands += sorted(glob.glob(pattern, recursive=True))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def verify_build(archs: str) -> int:
    """Phase 1's check: ``adamerge_fast._C`` loads, was built with CUDA, registers its CUDA kernels, and its cubins
    include sm_<first arch> (``cuobjdump --list-elf``, when cuobjdump is found). Prints what it found; 1 on a miss."""
    import torch

    import adamerge_fast._C as ext

    print(f"extension {ext.__file__}")
    problems = []
    if not getattr(ext, "WITH_CUDA", 0):
        problems.append("adamerge_fast._C was built without CUDA")
    elif not bool(torch.ops.adamerge_fast.k_has_cuda()):
        problems.append("torch.ops.adamerge_fast.k_has_cuda() is False")
    want = f"sm_{archs.replace(',', ';').split(';')[0].strip()}"
    tool = _find_tool("cuobjdump")
    if tool is None:
        print("cuobjdump not found: the sm_ code of the extension is not listed")
    else:
        r = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True)
        found = sorted(set(re.findall(r"sm_\d+a?", r.stdout)))
        print(f"cubins: {', '.join(found) or r.stderr.strip() or 'none'}")
        if want not in found:
            problems.append(f"no {want} cubin in {ext.__file__}")
    for msg in problems:
        print(f"BUILD CHECK FAILED: {msg}")
    return 1 if problems else 0


def _has_xdist(py: str) -> bool:
    try:
        return subprocess.run([py, "-c", "import xdist"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def plan(args, py: str, work: Path) -> list[Phase]:
    """The phases to run, budgets scaled by ``args.budget_scale``."""
    s = args.budget_scale
    env = {"PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    build_env = dict(env, ADAMERGE_REQUIRE_EXT="1", ADAMERGE_REQUIRE_CUDA="1", ADAMERGE_CUDA_ARCHS=args.archs,
                     MAX_JOBS=str(args.jobs))
    phases = [
        Phase(1, "build", 90 * s, 60, "estimated: the CUDA sources take 10 s of one CPU core each here (nvcc -c, "
              "sm_90); torch headers and ninja on 16 cores", [
                  Step([py, "setup.py", "build_ext", "--inplace"], "build.log", build_env, label="build_ext"),
                  Step([py, "tools/gpu_check.py", "--verify-build", "--archs", args.archs], "build.log", env,
                       label="verify")], required=True,
              summarize=_summarize_build),  # fmt: skip
    ]
    n = max(1, args.jobs)
    xd = ["-n", str(min(n, 8)), "--dist", "loadfile"] if _has_xdist(py) else []
    pyt = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", *xd]
    ignore = [f"--ignore={f}" for f in SUITE]
    phases.append(Phase(2, "tests", 180 * s, 120, "estimated: ~250 Triton compiles over 8 workers, inductor for the "
                        "reduce-overhead test, the large-shape tests ~20 s", [
                            Step([*pyt, "-m", "gpu", "tests", *ignore], "tests.log", env, label="gpu-marked"),
                            Step([*pyt, *SUITE, *[f"--deselect={d}" for d in DESELECT]], "tests.log", env,
                                 label="suite")],
                        group=2, summarize=_summarize_pytest))  # fmt: skip
    san = _find_tool("compute-sanitizer")
    san_env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    phases.append(Phase(3, "sanitizer", 90 * s, 60, "estimated: torch start-up and ~40 kernels under memcheck", [
        Step([san or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20", py,
              "tools/gpu_sanitize.py"], "sanitizer.log", san_env, label="memcheck")], group=2,
        summarize=_summarize_sanitizer, unavailable=None if san else "compute-sanitizer not found"))  # fmt: skip
    steps = []
    for b in BENCHMARKS:
        argv = [a.format(py=py, work=str(work), budget_inner=str(int(b.budget_s * s * 0.8))) for a in b.argv]
        steps.append(Step(argv, "bench.log", env, budget_s=b.budget_s * s, label=b.name))
    phases.append(Phase(4, "bench", sum(b.budget_s for b in BENCHMARKS) * s, sum(b.expected_s for b in BENCHMARKS),
                        "estimated per benchmark in BENCHMARKS", steps, group=4,
                        summarize=_summarize_bench))  # fmt: skip
    wanted = {1, 2} if args.quick else {1, 2, 3, 4}
    if args.phases:
        wanted = {int(p) for p in args.phases.split(",")}
    return [p for p in phases if p.number in wanted]


def total_budget(phases: list[Phase]) -> float:
    """Wall-clock bound of a plan: the groups run one after another, the phases of a group side by side."""
    groups: dict[int, float] = {}
    for p in phases:
        g = p.group or -p.number
        groups[g] = max(groups.get(g, 0.0), p.budget_s)
    return sum(groups.values())


# ------------------------------------------------------------------------------------------------ summaries
def _summarize_build(phase, outputs, rcs):
    text = "\n".join(outputs)
    if rcs and rcs[0] != 0:
        err = [ln for ln in text.splitlines() if "error" in ln.lower()][-3:]
        return "build failed: " + (" | ".join(err) or "see build.log")
    if len(rcs) > 1 and rcs[1] != 0:
        why = re.findall(r"BUILD CHECK FAILED: (.*)", text) or [ln for ln in text.splitlines() if ln.strip()][-1:]
        return "the CUDA extension is missing or incomplete: " + ("; ".join(why) or "see build.log")
    m = re.search(r"^extension (.*)$", text, re.M)
    c = re.search(r"^cubins: (.*)$", text, re.M)
    return f"built {Path(m.group(1)).name if m else '?'} with CUDA (cubins: {c.group(1) if c else 'not listed'})"


_PYTEST_TAIL = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in ([\d.]+)s", re.M)


def _summarize_pytest(phase, outputs, rcs):
    parts = []
    for step, out in zip(phase.steps, outputs, strict=False):
        m = _PYTEST_TAIL.findall(out)
        parts.append(f"{step.label}: {m[-1][0] if m else 'no result line'}")
    return "; ".join(parts)


def _summarize_sanitizer(phase, outputs, rcs):
    out = "\n".join(outputs)
    m = re.search(r"ERROR SUMMARY: \d+ errors?", out)
    g = re.search(r"gpu_sanitize: (.*)", out)
    return f"memcheck {m.group(0) if m else 'no ERROR SUMMARY line'}; {g.group(1) if g else 'no gpu_sanitize line'}"


def _summarize_bench(phase, outputs, rcs):
    return "; ".join(f"{s.label}: {'ok' if rc == 0 else f'exit {rc}'}" for s, rc in zip(phase.steps, rcs, strict=False))


# ------------------------------------------------------------------------------------------------ running
def _run_step(step: Step, budget: float, work: Path, lock: threading.Lock) -> tuple[int, str, bool]:
    """Run ``step`` for at most ``budget`` seconds (its whole process group is killed after); returns (exit status,
    output, timed out)."""
    env = dict(os.environ, **step.env)
    header = f"\n===== {step.label or step.argv[0]}: {' '.join(step.argv)} (budget {budget:.0f}s)\n"
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)  # fmt: skip
    except OSError as e:
        out = f"cannot start {step.argv[0]}: {e}\n"
        with lock, open(work / step.log, "a") as f:
            f.write(header + out)
        return 127, out, False
    chunks: list[str] = []

    def pump():
        for line in proc.stdout:
            chunks.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(budget, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    reader.join(timeout=10)
    out = "".join(chunks)
    tail = f"\n===== exit {proc.returncode}{' (stopped: budget spent)' if timed_out else ''} after " \
           f"{time.perf_counter() - t0:.1f}s\n"  # fmt: skip
    with lock, open(work / step.log, "a") as f:
        f.write(header + out + tail)
    return proc.returncode, out, timed_out


def run_phase(phase: Phase, work: Path, lock: threading.Lock) -> Result:
    if phase.unavailable:
        return Result(phase.number, phase.name, "SKIP", 0.0, phase.budget_s, phase.expected_s, phase.unavailable)
    t0 = time.perf_counter()
    outputs, rcs, status = [], [], "PASS"
    for step in phase.steps:
        left = phase.budget_s - (time.perf_counter() - t0)
        budget = min(step.budget_s, left) if step.budget_s is not None else left
        if budget <= 0:
            status = "TIMEOUT"
            break
        rc, out, timed_out = _run_step(step, budget, work, lock)
        outputs.append(out)
        rcs.append(rc)
        if timed_out:
            status = "TIMEOUT"
            if step.budget_s is None:
                break
        elif rc != 0 and status == "PASS":
            status = "FAIL"
            if phase.required:
                break
    summary = phase.summarize(phase, outputs, rcs) if phase.summarize else f"exit {rcs}"
    return Result(phase.number, phase.name, status, time.perf_counter() - t0, phase.budget_s, phase.expected_s,
                  summary)


def run_plan(phases: list[Phase], work: Path, log=print) -> list[Result]:
    """Run the phases (groups in order, the phases of a group side by side); a failed required phase skips the rest."""
    results: list[Result] = []
    lock = threading.Lock()
    groups: list[list[Phase]] = []
    for p in phases:
        if groups and p.group and groups[-1][0].group == p.group:
            groups[-1].append(p)
        else:
            groups.append([p])
    stop = None
    for grp in groups:
        if stop:
            results += [Result(p.number, p.name, "SKIP", 0.0, p.budget_s, p.expected_s, stop) for p in grp]
            for r in results[-len(grp):]:
                log(r.line())
            continue
        out: dict[int, Result] = {}

        def one(p):
            out[p.number] = run_phase(p, work, lock)
            log(out[p.number].line())

        threads = [threading.Thread(target=one, args=(p,)) for p in grp]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in grp:
            results.append(out[p.number])
            if p.required and out[p.number].status != "PASS":
                stop = f"phase {p.number} ({p.name}) did not pass"
    return results


# ------------------------------------------------------------------------------------------------ report
def _device() -> dict:
    code = ("import json, torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'device': p.name if p else None, 'sms': p.multi_processor_count if p else None, "
            "'memory_GiB': round(p.total_memory / 2**30, 1) if p else None, 'gpus': torch.cuda.device_count()}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - recorded in the report
        info = {"error": f"could not read the device: {e}"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def key_figures(work: Path) -> list[str]:
    """Lines for the summary from the benchmarks' JSON: ceilings, the auto order per op, the step ratios, goals."""
    lines = []
    ops = work / "gpu_ops.json"
    if ops.exists():
        r = json.loads(ops.read_text())
        lines.append(f"- copy {r['copy_Bps'] / 1e9:.0f} GB/s; matmul "
                     + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in r["matmul_flops"].items()))  # fmt: skip
        for op, s in r.get("auto_suggestion", {}).items():
            lines.append(f"- fastest backend for `{op}` (geometric mean over {s['cases']} cases): "
                         + " < ".join(s["order"]))  # fmt: skip
        best = {}
        for row in r["rows"]:
            if row.get("of_copy") is not None and row["op"] in ("merge_many", "dcoef_many", "dcoef", "merge"):
                best[row["op"]] = max(best.get(row["op"], 0.0), row["of_copy"])
        for op, v in best.items():
            lines.append(f"- `{op}` best fraction of the copy bandwidth: {v:.2f} (goal >= 0.80)")
    step = work / "step_cuda.json"
    if step.exists():
        r = json.loads(step.read_text())
        for w in r.get("workloads", []):
            if "error" in w:
                lines.append(f"- step {w['workload']}: {w['error']}")
                continue
            for g in w.get("goals", []):
                v = g["value"]
                lines.append(f"- step {w['workload']} {g['goal']} = {'n/a' if v is None else f'{v:.2f}'} "
                             f"(target {g['target']}): {'met' if g['met'] else 'MISSED'}")  # fmt: skip
    return lines


def write_report(results, phases, args, work: Path, out: Path, t_total: float) -> None:
    info = _device()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc = {"date": date, "device": info, "command": " ".join(["tools/gpu_check.py", *sys.argv[1:]]),
           "total_s": t_total, "total_budget_s": total_budget(phases), "target_s": TOTAL_TARGET_S,
           "phases": [dataclasses.asdict(r) for r in results], "figures": key_figures(work)}  # fmt: skip
    md = [f"# make gpu-check: {info.get('device')} ({date})", "",
          f"torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, "
          f"{info.get('gpus')} GPU(s); "
          f"total {t_total:.0f} s (budget {total_budget(phases):.0f} s, target < {TOTAL_TARGET_S} s)", "",
          "| phase | status | time (s) | budget (s) | expected (s) | summary |", "|---|---|---:|---:|---:|---|"]
    md += [f"| {r.number} {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | {r.expected_s:.0f} | "
           f"{r.summary} |" for r in results]  # fmt: skip
    if doc["figures"]:
        md += ["", "## Key figures", "", *doc["figures"]]
    for b in BENCHMARKS:
        p = work / b.markdown
        if p.exists():
            md += ["", f"## Benchmark `{b.name}`", "", p.read_text()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    for name in OUTPUT_FILES:
        src = work / name
        if src.exists() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)


def _parse(argv):
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="phases 1-2 only (build and tests)")
    p.add_argument("--phases", help="comma-separated phase numbers to run (default: all; --quick: 1,2)")
    p.add_argument("--dry-run", action="store_true", help="list the phases, their budgets and commands; run nothing")
    p.add_argument("--verify-build", action="store_true", help=argparse.SUPPRESS)  # phase 1's second step
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (a slower GPU)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel build jobs and test workers")
    p.add_argument("--archs", default="90", help="ADAMERGE_CUDA_ARCHS of the build (default 90)")
    p.add_argument("--python", default=sys.executable, help="interpreter of every phase (default: this one)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="output folder (default: $OUT, else "
                   "runs/gpu_check/<time>)")  # fmt: skip
    args = p.parse_args(argv)
    if args.budget_scale <= 0:
        p.error("--budget-scale must be positive")
    if args.phases and not re.fullmatch(r"[1-4](,[1-4])*", args.phases):
        p.error(f"--phases takes numbers from 1 to 4 separated by commas, got {args.phases!r}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.verify_build:
        return verify_build(args.archs)
    out = Path(args.out) if args.out else ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    phases = plan(args, args.python, work)
    total = total_budget(phases)
    print(f"[gpu-check] {len(phases)} phases, budget {total:.0f}s (target < {TOTAL_TARGET_S}s), output {out}",
          flush=True)  # fmt: skip
    if args.dry_run:
        beside = {p.number: ", ".join(str(q.number) for q in phases if q.group and q.group == p.group and q is not p)
                  for p in phases}  # fmt: skip
        for p in phases:
            print(f"phase {p.number} {p.name}: budget {p.budget_s:.0f}s, expected {p.expected_s:.0f}s "
                  f"({p.expected_note}){f', beside phase(s) {beside[p.number]}' if beside[p.number] else ''}"
                  f"{f'; SKIP: {p.unavailable}' if p.unavailable else ''}")  # fmt: skip
            for s in p.steps:
                print(f"    [{s.label}] {' '.join(s.argv)}" + (f"  (budget {s.budget_s:.0f}s)" if s.budget_s else ""))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    t0 = time.perf_counter()
    results = run_plan(phases, work, log=lambda s: print(s, flush=True))
    t_total = time.perf_counter() - t0
    write_report(results, phases, args, work, out, t_total)
    print(f"[gpu-check] total {t_total:.1f}s; " + ", ".join(f"{r.number} {r.name} {r.status}" for r in results)
          + f"; report {out / 'gpu_check.md'}", flush=True)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.status == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
