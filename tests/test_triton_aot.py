"""Cross-compile the Triton kernels for sm_90 / sm_80 (no GPU needed): see ``tools/triton_aot_check.py``.

The interpreter tests (``test_triton.py``) never lower the kernels to PTX/SASS; this one runs the AOT check
script (``--quick``: every launcher-chosen config for sm_90, a representative cover for sm_80) in a fresh
interpreter, because conftest sets ``TRITON_INTERPRET=1`` before triton is imported in this one, and Triton fixes
compiled-vs-interpreted per process.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "triton_aot_check.py"
TIMEOUT_S = 600  # the check itself takes 1-2 min on 2 busy cores; this only guards against a hang


def test_kernels_cross_compile_for_sm90_sm80(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"triton's NVIDIA backend has no bundled ptxas ({ptxas} missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--tmp", str(tmp_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"triton_aot_check.py did not finish in {TIMEOUT_S}s; output so far:\n{out[-4000:]}")
    compiled = [line for line in proc.stdout.splitlines() if re.match(r"(OK|KNOWN) sm_\d+ ", line)]
    tail = proc.stdout[-6000:] + ("\n[stderr]\n" + proc.stderr[-3000:] if proc.stderr.strip() else "")
    assert proc.returncode == 0, f"triton_aot_check.py exited {proc.returncode}:\n{tail}"
    assert len(compiled) > 0, f"no compiled variant reported:\n{tail}"
    for cc in (90, 80):
        assert any(line.split()[1] == f"sm_{cc}" for line in compiled), f"nothing compiled for sm_{cc}:\n{tail}"
    sm90 = [line for line in compiled if line.split()[1] == "sm_90"]
    # issue 12: K = 1 (a constexpr after Triton's specialization), the split-K / split-M variants and the aligned
    # multi-tensor variant are compiled for sm_90; the PTX checks (16-byte vector accesses) ran
    assert any("K=1" in line for line in sm90), "no K = 1 variant compiled for sm_90"
    assert any("_split_sum_kernel" in line for line in sm90) and any("SPLIT=1" in line for line in sm90)
    assert any("_merge_many_kernel ALIGNED=1" in line for line in sm90)
    assert re.search(r"# PTX checks .*_merge_many_kernel \{'ALIGNED': '1'\}: [1-9]", proc.stdout), tail
