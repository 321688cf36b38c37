"""Small model fixtures shared by several test files."""

import copy

import pytest
import torch
from torch import nn


def perturbed_copies(model: nn.Module, n: int, scale: float) -> list[nn.Module]:
    """``n`` deep copies of ``model`` ("fine-tuned models"): copy ``s`` (1-based) has ``scale * randn`` added to every
    parameter, drawn from a generator seeded with ``s``."""
    out = []
    for s in range(1, n + 1):
        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        out.append(m)
    return out


def backend_params() -> list:
    """``pytest.param((backend name, device type))`` for every registered backend available here, on the CPU and (when
    present) CUDA; marked ``triton`` for Triton, ``ext`` for the C++ extension, ``gpu`` on CUDA."""
    from adamerge_fast import ops
    from adamerge_fast.ops.cpp_backend import CppBackend
    from adamerge_fast.ops.triton_backend import TritonBackend

    out = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name in ops.backend_names():
            try:
                be = ops.get_backend(name)
            except ops.BackendUnavailableError:
                continue
            if not be.available(torch.device(dev)):
                continue
            marks = [pytest.mark.triton] if isinstance(be, TritonBackend) else []
            if isinstance(be, CppBackend):
                marks.append(pytest.mark.ext)
            if dev == "cuda":
                marks.append(pytest.mark.gpu)
            out.append(pytest.param((name, dev), id=f"{name}-{dev}", marks=marks))
    return out
