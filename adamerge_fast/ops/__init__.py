"""The op contract of adamerge_fast. Every op has the same semantics on every backend.

Plain-torch semantics (``K`` task vectors, accumulation in fp32, or fp64 when an input is fp64)::

    merge(base[*S], deltas[K, *S], coef[K])        = base + sum_k coef[k] * deltas[k]          -> [*S]
    merge_many([b_i], [d_i], coefs[n, K])          = [merge(b_i, d_i, coefs[i]) for i]
    merged_linear(x[*, in], w0[out, in], tau_w[K, out, in], coef_w[K],
                  b0[out]|None, tau_b[K, out]|None, coef_b[K]|None)
                                                   = x @ merge(w0, tau_w, coef_w).T + merge(b0, tau_b, coef_b)
    merged_lora_linear(x[*, in], w0[out, in], lora_a[R, in], lora_b[out, R], ranks[K], coef_w[K], scale[K],
                       b0, tau_b[Kb, out], coef_b[Kb])
                                                   = x @ (w0 + sum_k coef_w[k] scale[k] B_k A_k).T + merged bias
    entropy(logits[N, C])                          = -(softmax(logits) * log_softmax(logits)).sum(-1)  -> [N]
    linear_entropy(h[N, D], w0[V, D], b0[V]|None, tau_w=[K, V, D]|None, coef_w=[K]|None, tau_b, coef_b,
                   reduction="none"|"mean"|"sum")  = entropy(h @ merge(w0, tau_w, coef_w).T + merge(b0, tau_b, coef_b))
                                                     -> [N] (or its mean / sum), never holding the [N, V] logits

All are differentiable. The fast paths are the coefficient gradients:
``d coef[k] = <grad, deltas[k]>`` and, for ``merged_linear``, ``d coef_w[k] = <dy^T x, tau_w[k]>`` computed
without allocating the ``[out, in]`` weight gradient on fused backends; the merged weight is recomputed in
backward, never saved. Task vectors may be stored in bf16/fp16 below an fp32 ``w0``. ``merged_lora_linear`` takes
LoRA adapters as the weight's task vectors (``A_k = lora_a[rows of task k]``, ``B_k = lora_b[:, those columns]``)
and never forms an ``[out, in]`` tensor besides ``w0`` (:mod:`.lora`).

``backend``: ``"auto"`` (default; or the ``ADAMERGE_BACKEND`` environment variable), or a registered name:
``"reference"``, ``"cpu"`` (C++ extension), ``"triton"``, ``"cuda"`` (see :func:`backend_names`). The backends and
the order in which ``auto`` tries them are registered in one block below (:mod:`._registry`).

Import graph of this package (``a -> b``: module ``a`` imports ``b``; no cycle; ``(lazy)``: imported when a backend
is first constructed, as an optional dependency)::

    _common                       -> (torch only)
    reference                     -> _common
    _backend                      -> _common, reference
    _registry                     -> _backend
    _library                      -> _common, _registry
    lora                          -> _common, reference, _library, _registry
    cpp_backend                   -> _common, _backend; adamerge_fast._C (lazy)
    triton_backend                -> _common, _backend, reference; triton, triton_kernels (lazy)
    triton_kernels                -> triton_kernels._common
    triton_kernels._common        -> (torch, triton only)
    triton_kernels.merge          -> _common, triton_kernels._common
    triton_kernels.merged_linear  -> _common, triton_kernels._common, triton_kernels.merge
    triton_kernels.entropy        -> _common, triton_kernels._common
    triton_kernels.lora  -> _common, triton_kernels._common, triton_kernels.merge, triton_kernels.merged_linear
    triton_kernels.linear_entropy -> _common, triton_kernels.entropy
    _linear_entropy               -> _common, _library, _registry
    __init__                      -> _backend, _registry, _library, _linear_entropy, lora, cpp_backend, triton_backend

Kernel modules and backends never import the registry or the dispatcher; only the op modules ``_library`` and
``lora`` (the custom ops, which carry a backend *name*) and this module do.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _library, _linear_entropy
from ._backend import Backend, ReferenceBackend
from ._registry import (
    ANY_DEVICE,
    AUTO_ORDER,
    BACKEND_NAMES,
    OPS,
    BackendUnavailableError,
    auto_order,
    backend_names,
    backend_status,
    get_backend,
    register_backend,
    resolve,
    unregister_backend,
)
from .cpp_backend import CppBackend, CudaBackend
from .lora import merged_lora_linear
from .triton_backend import TritonBackend

__all__ = [
    "merge",
    "merge_many",
    "merged_linear",
    "merged_lora_linear",
    "entropy",
    "linear_entropy",
    "resolve",
    "backend_status",
    "get_backend",
    "register_backend",
    "unregister_backend",
    "backend_names",
    "auto_order",
    "Backend",
    "BackendUnavailableError",
    "BACKEND_NAMES",
    "AUTO_ORDER",
    "OPS",
    "ANY_DEVICE",
]

# -- the backends, and where ``auto`` picks them ------------------------------------------------------------
# On a device type and op, ``auto`` tries the backends that declare it, highest priority first, and takes the
# first available one. ``reference`` (plain torch) runs everywhere and comes last. On the CPU the C++ kernels
# are preferred for the memory-bound merge ops, where benchmarks/results/cpu_merge.md shows them ahead of the
# K-pass torch reference; ``merged_linear`` there merges with the same kernel and then calls the torch matmul.
# The extension has no CPU entropy kernel, so CPU entropy and linear_entropy stay on ``reference``.
# ``merged_lora_linear`` has no kernel of the extension (``cpu``/``cuda`` would run the same plain-torch composite as
# ``reference``): ``auto`` takes ``reference`` on the CPU and the fused Triton kernels on CUDA. Nor has the CUDA
# extension a ``linear_entropy`` tile kernel: Triton's serves that op on CUDA.
# On CUDA the order is per op, from what each implementation does (GPU timings of every backend for every op:
# ``python -m benchmarks.bench_gpu_ops``, run by ``make gpu-check``; set the order from its ``auto_suggestion``):
# * merge, merge_many (and their dcoef backward): ``cuda`` first. Both it and ``triton`` stream the K task vectors
#   once with 16-byte loads; the extension's multi-tensor launches carry their item table as a kernel parameter
#   (no host-to-device copy per call), and it accumulates fp64 partials.
# * merged_linear: ``triton`` first. Its fused small-M kernel and its coefficient gradient ``dcoef_w`` (the
#   ``dy^T x`` tiles contracted with the task vectors: as many FLOPs as the forward matmul) run on tensor cores
#   (``tl.dot``), and large M goes to cuBLAS; the extension computes both on CUDA cores (FMA tiles in shared memory).
# * entropy: ``triton`` first. Its forward reads the logits once (online softmax; the extension's kernel reads them
#   twice), its backward twice (extension: three times), and it reads strided logits in place (the extension copies
#   a non-contiguous view first).
# ``cuda`` stays the fallback of ``triton`` for merged_linear and entropy (priority 150 < 200 for those two ops).
register_backend("reference", ReferenceBackend, priority=0, auto={ANY_DEVICE: OPS})
register_backend("cpu", CppBackend, priority=100, auto={"cpu": ("merge", "merge_many", "merged_linear")})
register_backend("triton", TritonBackend, priority=200, auto={"cuda": OPS})
register_backend("cuda", CudaBackend, priority={ANY_DEVICE: 300, "merged_linear": 150, "entropy": 150},
                 auto={"cuda": tuple(o for o in OPS if o not in ("merged_lora_linear", "linear_entropy"))})

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name}: expected a floating dtype (fp16/bf16/fp32/fp64), got {t.dtype}")


def _check_merge_args(where: str, base: Tensor, deltas: Tensor, coef: Tensor, coef_name: str = "coef") -> None:
    _check_float(f"{where}: base", base)
    _check_float(f"{where}: deltas", deltas)
    _check_float(f"{where}: {coef_name}", coef)
    if deltas.dim() != base.dim() + 1 or tuple(deltas.shape[1:]) != tuple(base.shape):
        raise ValueError(
            f"{where}: deltas must have shape [K, *base.shape] = [K, {', '.join(map(str, base.shape))}], "
            f"got {list(deltas.shape)}"
        )
    K = deltas.shape[0]
    if K < 1:
        raise ValueError(f"{where}: need at least one task vector (deltas has K=0)")
    if coef.shape != (K,):
        raise ValueError(f"{where}: {coef_name} must have shape [K]=[{K}], got {list(coef.shape)}")
    for n, t in (("deltas", deltas), (coef_name, coef)):
        if t.device != base.device:
            raise ValueError(f"{where}: {n} is on {t.device} but base is on {base.device}")


def merge(base: Tensor, deltas: Tensor, coef: Tensor, *, backend: str | None = None) -> Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` with ``deltas[K, *S]``, ``coef[K]`` -> ``[*S]`` (base dtype)."""
    _check_merge_args("merge", base, deltas, coef)
    be = resolve(backend, "merge", base.device)
    return _library.merge(base, deltas, coef, be)


def merge_many(
    bases: Sequence[Tensor], deltas: Sequence[Tensor], coefs: Tensor, *, backend: str | None = None
) -> list[Tensor]:
    """``[merge(bases[i], deltas[i], coefs[i]) for i]`` in one call; ``coefs`` is ``[n, K]``."""
    bases, deltas = list(bases), list(deltas)
    if len(bases) != len(deltas):
        raise ValueError(f"merge_many: {len(bases)} bases but {len(deltas)} deltas")
    if not bases:
        return []
    _check_float("merge_many: coefs", coefs)
    if coefs.dim() != 2 or coefs.shape[0] != len(bases):
        raise ValueError(f"merge_many: coefs must have shape [n={len(bases)}, K], got {list(coefs.shape)}")
    K, dev = coefs.shape[1], coefs.device
    for i, (b, d) in enumerate(zip(bases, deltas, strict=True)):
        # one cheap predicate per item (this runs once per forward over every small tensor of a model); the
        # full check only on failure, for its message
        ok = isinstance(b, Tensor) and isinstance(d, Tensor) and b.dtype in _FLOAT and d.dtype in _FLOAT
        if ok:
            ds = d.shape
            ok = len(ds) == b.dim() + 1 and ds[0] == K and ds[1:] == b.shape and b.device == dev == d.device
        if not ok:
            _check_merge_args(f"merge_many[{i}]", b, d, coefs[i], "coefs[i]")
            raise ValueError(  # not reached when _check_merge_args covers every case of the predicate
                f"merge_many[{i}]: bases[{i}] {list(b.shape)} on {b.device}, deltas[{i}] {list(d.shape)} on "
                f"{d.device} and coefs [n, K={K}] on {dev} do not fit together"
            )
    be = resolve(backend, "merge_many", bases[0].device)
    return _library.merge_many(bases, deltas, coefs, be)


def merged_linear(
    x: Tensor,
    w0: Tensor,
    tau_w: Tensor,
    coef_w: Tensor,
    b0: Optional[Tensor] = None,
    tau_b: Optional[Tensor] = None,
    coef_b: Optional[Tensor] = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``x[*, in] @ (w0 + sum_k coef_w[k] tau_w[k]).T + (b0 + sum_k coef_b[k] tau_b[k])`` -> ``[*, out]``.

    ``w0[out, in]``, ``tau_w[K, out, in]``, ``coef_w[K]``; ``b0[out]`` or None; ``tau_b[K, out]`` and
    ``coef_b[K]`` both given or both None (then the bias ``b0`` is not merged). Output in ``x.dtype``; under
    autocast ``x`` is first cast to the autocast dtype, like ``nn.Linear``.
    """
    _check_float("merged_linear: x", x)
    _check_merge_args("merged_linear(weight)", w0, tau_w, coef_w, "coef_w")
    if w0.dim() != 2:
        raise ValueError(f"merged_linear: w0 must be [out, in], got {list(w0.shape)}")
    out_f, in_f = w0.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"merged_linear: x must be [*, in={in_f}], got {list(x.shape)}")
    if x.device != w0.device:
        raise ValueError(f"merged_linear: x is on {x.device} but w0 is on {w0.device}")
    if (tau_b is None) != (coef_b is None):
        raise ValueError("merged_linear: tau_b and coef_b must be given together")
    if tau_b is not None:
        if b0 is None:
            raise ValueError("merged_linear: tau_b given without b0")
        _check_merge_args("merged_linear(bias)", b0, tau_b, coef_b, "coef_b")
    if b0 is not None and tuple(b0.shape) != (out_f,):
        raise ValueError(f"merged_linear: b0 must be [out={out_f}], got {list(b0.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    be = resolve(backend, "merged_linear", x.device)
    lead = x.shape[:-1]
    y = _library.merged_linear(x.reshape(-1, in_f), w0, tau_w, coef_w, b0, tau_b, coef_b, be)
    return y.reshape(*lead, out_f)


def entropy(logits: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax entropy per row: ``logits[N, C]`` -> ``[N]`` (fp32; fp64 for fp64 logits).

    Stable for large logits; ``-inf`` entries of a row with a finite entry contribute 0 (and get a zero gradient);
    a row with a NaN or a ``+inf``, or of only ``-inf``, gives NaN and a NaN gradient, as the plain formula does.
    Leading dims are flattened: ``[*, C] -> [*]``.
    """
    _check_float("entropy: logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"entropy: logits must be [N, C] with C >= 1, got {list(logits.shape)}")
    be = resolve(backend, "entropy", logits.device)
    lead = logits.shape[:-1]
    return _library.entropy(logits.reshape(-1, logits.shape[-1]), be).reshape(lead)


def linear_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    tau_w: Optional[Tensor] = None,
    coef_w: Optional[Tensor] = None,
    tau_b: Optional[Tensor] = None,
    coef_b: Optional[Tensor] = None,
    reduction: str = "none",
    chunk: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Softmax entropy of the logits ``h @ W.T + b`` per row, without holding the logits (:mod:`._linear_entropy`).

    ``h[*, D]`` (leading dims flattened into N rows); ``weight`` = ``w0[V, D]``, ``bias`` = ``b0[V]`` or None;
    ``tau_w[K, V, D]`` with ``coef_w[K]``: a merged head ``W = w0 + sum_k coef_w[k] tau_w[k]``; ``tau_b[K, V]`` with
    ``coef_b[K]``: a merged bias. ``reduction``: ``"none"`` -> ``[*]``; ``"mean"`` / ``"sum"`` -> a scalar (its
    gradients are formed in the forward: no recomputation). ``chunk``: rows per logits tile (default: a fp32 tile
    of at most 64 MiB). fp32 result (fp64 when an input is fp64); differentiable in ``h``, ``weight``, ``bias``,
    ``coef_w``, ``coef_b``.
    """
    _check_float("linear_entropy: h", h)
    _check_float("linear_entropy: weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"linear_entropy: weight must be [V, D], got {list(weight.shape)}")
    V, D = weight.shape
    if h.dim() < 1 or h.shape[-1] != D:
        raise ValueError(f"linear_entropy: h must be [*, D={D}], got {list(h.shape)}")
    if h.device != weight.device:
        raise ValueError(f"linear_entropy: h is on {h.device} but weight is on {weight.device}")
    if bias is not None:
        _check_float("linear_entropy: bias", bias)
        if tuple(bias.shape) != (V,) or bias.device != weight.device:
            raise ValueError(f"linear_entropy: bias must be [V={V}] on {weight.device}, got {list(bias.shape)} on "
                             f"{bias.device}")
    if (tau_w is None) != (coef_w is None) or (tau_b is None) != (coef_b is None):
        raise ValueError("linear_entropy: tau_w and coef_w (tau_b and coef_b) must be given together")
    if tau_w is not None:
        _check_merge_args("linear_entropy(weight)", weight, tau_w, coef_w, "coef_w")
    if tau_b is not None:
        if bias is None:
            raise ValueError("linear_entropy: tau_b given without a bias")
        _check_merge_args("linear_entropy(bias)", bias, tau_b, coef_b, "coef_b")
    if reduction not in _linear_entropy.REDUCTIONS:
        raise ValueError(f"linear_entropy: reduction must be one of {_linear_entropy.REDUCTIONS}, got {reduction!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"linear_entropy: chunk must be a positive int (rows per logits tile), got {chunk!r}")
    be = resolve(backend, "linear_entropy", h.device)
    lead = h.shape[:-1]
    out = _linear_entropy.linear_entropy(h.reshape(-1, D), weight, bias, tau_w, coef_w, tau_b, coef_b, reduction,
                                         chunk or _linear_entropy.default_chunk(V), be)
    return out.reshape(lead) if reduction == "none" else out
