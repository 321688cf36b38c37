"""Backend registry and dispatcher: one op contract, several implementations.

Every backend implements the same kernel interface (see :class:`Backend`). The public ops in
:mod:`adamerge_fast.ops` resolve a backend name once per call (``"auto"`` or an explicit name, or the
``ADAMERGE_BACKEND`` environment variable) and pass the *resolved* name into the ``torch.library``
custom op, so the choice is visible to ``torch.compile`` and ``opcheck`` as a plain string argument.

``auto`` picks, per device type and per op, the first available backend in :data:`AUTO_ORDER`; it falls
back to ``reference`` quietly (a debug log line). An explicit request for a backend that is not
available on the device of the inputs raises :class:`BackendUnavailableError` naming why.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("adamerge_fast")

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
OPS = ("merge", "merge_many", "merged_linear", "entropy")

# Preference order for ``auto``, per device type and op. The ``cpu`` C++ backend is picked on the CPU for
# the memory-bound merge ops, where benchmarks/results show it beats the K-pass torch reference; for
# merged_linear it materializes with the same kernel and then calls the torch matmul, so it wins there too.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {op: ("cuda", "triton", "reference") for op in OPS},
    "cpu": {
        "merge": ("cpu", "reference"),
        "merge_many": ("cpu", "reference"),
        "merged_linear": ("cpu", "reference"),
        "entropy": ("reference",),
    },
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, or wrong device)."""


class Backend:
    """The kernel interface. Shapes use K = number of task vectors.

    Subclasses implement at least ``merge``/``dcoef`` (and say where they run in ``unavailable_reason``);
    the defaults below build the other ops from those two primitives, materializing one tensor at a time.
    All returned tensors are fresh (never alias an input).
    """

    name = "abstract"

    # -- availability -------------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` when this backend runs on ``device``; otherwise a sentence saying why not."""
        raise NotImplementedError

    def available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) is None

    # -- primitives ---------------------------------------------------------------------------------
    def merge(self, base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``base[*S] + sum_k coef[k] * deltas[k]`` -> ``[*S]`` in ``base.dtype`` (accumulated in fp32+)."""
        raise NotImplementedError

    def dcoef(self, grad: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``[<grad, deltas[k]> for k]`` -> ``[K]`` in the accumulation dtype (fp32, or fp64 for fp64)."""
        raise NotImplementedError

    # -- composites (overridden by fused backends) ------------------------------------------------------
    def merge_many(self, bases, deltas, coefs):
        """``[merge(bases[i], deltas[i], coefs[i]) for i]``; ``coefs`` is ``[n, K]``."""
        return [self.merge(b, d, coefs[i]) for i, (b, d) in enumerate(zip(bases, deltas))]

    def dcoef_many(self, grads, deltas):
        """``[n, K]``: row i is ``dcoef(grads[i], deltas[i])``."""
        return torch.stack([self.dcoef(g, d) for g, d in zip(grads, deltas)])

    def merged_linear_fwd(self, x, w0, tau_w, coef_w, b0, tau_b, coef_b):
        """``x[M, in] @ merge(w0, tau_w, coef_w).T + merge(b0, tau_b, coef_b)`` -> ``[M, out]`` in x.dtype.

        Just-in-time strategy: this one layer's merged weight exists only inside this call.
        """
        w = self.merge(w0, tau_w, coef_w).to(x.dtype)
        b = _merged_bias(self, b0, tau_b, coef_b)
        return torch.nn.functional.linear(x, w, None if b is None else b.to(x.dtype))

    def merged_linear_bwd(self, dy, x, w0, tau_w, coef_w, tau_b, need_dx, need_dcoef_w, need_dcoef_b):
        """Returns ``(dx[M, in] | empty, dcoef_w[K] | empty, dcoef_b[K] | empty)``.

        ``dx = dy @ W``; ``dcoef_w[k] = <dy^T x, tau_w[k]>``; ``dcoef_b[k] = <dy.sum(0), tau_b[k]>``.
        """
        acc = acc_dtype(w0.dtype, x.dtype)
        def empty():  # distinct tensors: custom-op outputs must not alias each other
            return dy.new_empty(0, dtype=acc)

        dx = empty()
        if need_dx:
            w = self.merge(w0, tau_w, coef_w).to(dy.dtype)
            dx = (dy @ w).to(x.dtype)
        dcw = empty()
        if need_dcoef_w:
            dw = dy.to(acc).t() @ x.to(acc)  # [out, in]: the weight gradient this composite does allocate
            dcw = self.dcoef(dw, tau_w)
        dcb = empty()
        if need_dcoef_b:
            dcb = self.dcoef(dy.to(acc).sum(0), tau_b)
        return dx, dcw, dcb

    def entropy_fwd(self, logits):
        from .reference import entropy_fwd

        return entropy_fwd(logits)

    def entropy_bwd(self, grad, logits):
        from .reference import entropy_bwd

        return entropy_bwd(grad, logits)


def _merged_bias(backend: Backend, b0, tau_b, coef_b):
    if b0 is None:
        return None
    if tau_b is None:
        return b0
    return backend.merge(b0, tau_b, coef_b)


# Tests set this (or ADAMERGE_POISON=1): kernels allocate outputs through new_output, which then fills them
# with NaN so that any element a kernel fails to write shows up in the comparison.
POISON_OUTPUTS = os.environ.get("ADAMERGE_POISON", "") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: uninitialized normally, NaN-poisoned under test."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# -- registry --------------------------------------------------------------------------------------------
_FACTORIES: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend | BaseException] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a lazily constructed backend (construction may import Triton or load the extension)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def get_backend(name: str) -> Backend:
    """The backend object; raises :class:`BackendUnavailableError` if it cannot be constructed."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKEND_NAMES}")
    inst = _INSTANCES.get(name)
    if inst is None:
        try:
            inst = _FACTORIES[name]()
        except (ImportError, OSError, RuntimeError) as e:  # not installed / not built: remembered
            inst = e
            log.debug("backend %s could not be loaded: %s", name, e)
        _INSTANCES[name] = inst
    if isinstance(inst, BaseException):
        raise BackendUnavailableError(f"backend {name!r} is not available: {inst}") from inst
    return inst


def backend_status(device: torch.device | str = "cpu") -> dict[str, str]:
    """``{name: "available" | reason}`` for every registered backend on ``device``."""
    device = torch.device(device)
    out = {}
    for name in _FACTORIES:
        try:
            reason = get_backend(name).unavailable_reason(device)
        except BackendUnavailableError as e:
            reason = str(e)
        out[name] = reason or "available"
    return out


_warned: set[str] = set()


def resolve(backend: str | None, op: str, device: torch.device) -> str:
    """Turn ``backend`` (``None``/``"auto"``/a name) into the name of a backend that runs ``op`` here."""
    if backend is None or backend == "auto":
        backend = os.environ.get("ADAMERGE_BACKEND", "auto") or "auto"
    if backend != "auto":
        be = get_backend(backend)  # raises a clear error when not built / not installed
        reason = be.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device}: {reason}")
        return backend
    order = AUTO_ORDER.get(device.type, {}).get(op, ("reference",))
    for name in order:
        try:
            if get_backend(name).available(device):
                return name
        except BackendUnavailableError:
            pass
        key = f"{name}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            log.debug("auto: backend %s unavailable on %s, trying the next", name, device.type)
    return "reference"
