"""The environment of a benchmark run, recorded the same way by every benchmark script.

:func:`env_info` is what goes into each result file: date, device, versions (python, torch, CUDA, Triton,
adamerge_fast), CPU model and threads, platform, git revision, load average and the status of every registered
backend. :func:`measured_backends` names the backends a benchmark times on a device. :func:`write_results` writes a
run's JSON and markdown pair.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import adamerge_fast
from adamerge_fast import ops
from adamerge_fast.io import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent  # the checkout: benchmarks/ and adamerge_fast/ side by side


def cpu_model() -> str:
    """The ``model name`` of ``/proc/cpuinfo`` (else what :mod:`platform` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev() -> str | None:
    """The checkout's short commit, ``+dirty`` when it has uncommitted changes; None outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other jobs on a shared machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_device(name: str | None = None) -> torch.device:
    """``name`` as a device; without one, CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def env_info(device: torch.device | str = "cpu") -> dict:
    """What a result file records about the run on ``device``. Add ``loadavg_end`` at the end of the run."""
    device = torch.device(device)
    cpu = cpu_model()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "device_type": device.type,
        "cpu_model": cpu,
        "cpu_threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "adamerge_fast": getattr(adamerge_fast, "__version__", None),
        "platform": platform.platform(),
        "git": git_rev(),
        "backend_status": ops.backend_status(device),
        "loadavg_start": loadavg(),
    }
    try:
        from adamerge_fast.ops.cpp_backend import extension_info

        info["extension"] = extension_info()
    except Exception as e:  # recorded: the extension is not built or does not load
        info["extension"] = f"not loaded: {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    except Exception as e:  # recorded: installed but fails to import
        info["triton"] = f"not importable: {e}"
    return info


def skip_reason(backend: str, device: torch.device, status: dict[str, str] | None = None) -> str | None:
    """Why ``backend`` is not timed on ``device`` (None: it is). Triton is timed on CUDA only: on the CPU it runs
    through its interpreter, which is not what a benchmark should measure."""
    if backend == "triton" and device.type != "cuda":
        return "triton is benchmarked on CUDA only (the CPU interpreter is not a benchmark)"
    status = ops.backend_status(device) if status is None else status
    reason = status.get(backend, "unknown backend")
    return None if reason == "available" else reason


def measured_backends(device: torch.device) -> list[str]:
    """The registered backends (registration order) that are timed on ``device``."""
    status = ops.backend_status(device)
    return [b for b in ops.BACKEND_NAMES if skip_reason(b, device, status) is None]


def write_results(out: str | os.PathLike, data: dict, markdown: str, *, indent: int = 1) -> tuple[Path, Path]:
    """Write ``out.json`` (``data``; values JSON cannot hold as their ``str``) and ``out.md`` (``markdown``), each
    atomically, creating the folder; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    write_text_atomic(js, json.dumps(data, indent=indent, default=str) + "\n")
    write_text_atomic(md, markdown if markdown.endswith("\n") else markdown + "\n")
    return js, md
