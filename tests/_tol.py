"""The one per-dtype tolerance table, and the comparison every kernel test uses.

Every backend is compared against a float64 oracle. ``dtype`` is the lowest precision among the inputs
that the op reads (x, base/w0 or the task vectors). ``atol`` is scaled by the oracle's magnitude so that
long reductions (dcoef sums over out*in products) are judged relative to their size.
"""

import torch

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=1.6e-2),
}


def lowest(*dtypes):
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    return min((d for d in dtypes if d in order), key=order.index)


def assert_close(actual, expected, dtype, msg=""):
    """``actual`` (any dtype) against the float64 oracle ``expected`` at the tolerance of ``dtype``."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{msg}: NaN in output (unwritten or poisoned element?)"
    t = TOL[dtype]
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=t["rtol"], atol=t["atol"] * scale, msg=lambda m: f"{msg}: {m}")
