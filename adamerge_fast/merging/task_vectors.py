"""Task vectors ``tau_k = theta_k - theta_0``, stacked per tensor: ``{name: Tensor[K, *shape]}``.

The stacked form is what every merge in this package consumes: one ``[K, *S]`` tensor per parameter, so the
K task vectors of one tensor sit together (the fused kernels read them in one pass). Sources may be modules,
state dicts, or checkpoint paths (see :func:`adamerge_fast.io.load_state_dict`); they are read one key at a
time, so lazily read safetensors never sit in memory twice.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from ..io import (
    CheckpointError,
    NonFiniteCheckpointError,
    check_finite,
    check_fits,
    check_stored_finite,
    load_state_dict,
    shape_dtype,
)

Source = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]
TaskVectors = dict[str, torch.Tensor]  # name -> [K, *shape]


def as_state_dict(src: Source, *, trust_pickle: bool = False, params_only: bool = True) -> Mapping[str, torch.Tensor]:
    """A name -> tensor mapping for a module (its parameters, or its whole state dict), a mapping, or a path."""
    if isinstance(src, nn.Module):
        return dict(src.named_parameters()) if params_only else src.state_dict()
    if isinstance(src, Mapping):
        return src
    if isinstance(src, (str, os.PathLike)):
        return load_state_dict(src, trust_pickle=trust_pickle)
    raise TypeError(f"expected an nn.Module, a state dict or a checkpoint path, got {type(src).__name__}")


def source_name(src: Source, default: str) -> str:
    """How error messages name a checkpoint: its path (a path, or a lazily read safetensors file or directory), else
    ``default``."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    files = getattr(src, "files", None)
    if files:
        return str(files[0]) if len(files) == 1 else str(files[0].parent)
    return default


#: elements per chunk of :func:`rounded_difference_` (bounds its temporaries to a few times 4 * 2^24 bytes)
DIFF_CHUNK = 1 << 24


def round_to_odd_f32(d: torch.Tensor) -> torch.Tensor:
    """``d`` (float64) rounded to float32 *to odd*: truncated toward zero, the last bit set when inexact. Rounding
    that to bf16/fp16 (round to nearest even) rounds ``d`` correctly, once; ``d.to(torch.bfloat16)`` does not, as
    torch converts float64 to bf16/fp16 through a round-to-nearest float32."""
    f = d.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != d
    f = torch.where(inexact & (back.abs() > d.abs()), torch.nextafter(f, torch.zeros_like(f)), f)
    bits = f.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


def _ties(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the float32 ``s`` lies exactly halfway between two neighbours of ``dtype`` (bf16 / fp16): the only
    values whose rounding to ``dtype`` can differ from the rounding of a more precise value they were rounded from."""
    if dtype == torch.bfloat16:  # bf16 keeps float32's exponent: the 16 low bits are dropped, normal or not
        if sys.byteorder == "little":  # the low halves as int16: one pass over half the bytes
            return s.view(torch.int16)[0::2] == -0x8000
        return (s.view(torch.int32) & 0xFFFF) == 0x8000
    bits = s.view(torch.int32)
    # fp16: 13 low mantissa bits dropped for normal fp16 values, one more per binade below its smallest normal
    # (2^-14); in [2^-25, 2^-24) the implicit bit goes too (the one tie there is 2^-25); below, everything rounds to 0
    exp, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    shift = (13 + (113 - exp).clamp(min=0)).clamp(max=23)
    one = torch.ones((), dtype=torch.int32, device=s.device)
    tie = (mant & ((one << shift) - 1)) == (one << (shift - 1))
    return torch.where(exp >= 103, tie, (exp == 102) & (mant == 0))


def rounded_difference_(out: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor | None, what: str,
                        source: str | None = None) -> torch.Tensor:
    """``out.copy_(finetuned - base)`` with the difference rounded once into ``out.dtype``, chunked over the
    flattened tensor (:data:`DIFF_CHUNK` elements); ``out``, ``finetuned``, ``base``: ``[*S]`` (``out`` contiguous,
    on any device: the inputs are moved there chunk by chunk); ``base=None``: ``finetuned`` is the difference
    already. ``what`` names the task-vector entry (``"task vector 0: key 'w'"``), ``source`` the fine-tuned tensor
    (``"ft.safetensors: key 'w'"``). Raises :class:`~adamerge_fast.io.NonFiniteCheckpointError` naming ``source``
    when the fine-tuned tensor has a NaN or inf, ``what`` when the difference has one or overflows ``out.dtype``
    (then with the largest magnitude and the fix). Returns ``out``.

    How: float64 inputs (or storage) subtract in float64 and, into bf16/fp16, go through :func:`round_to_odd_f32`.
    Otherwise the subtraction is float32, which is exact for bf16/fp16 inputs (unless their exponents differ by more
    than 15) and rounded once for float32 inputs, so storing it as float32 rounds once. Stored as bf16/fp16, a
    rounded float32 difference could be rounded twice: only a float32 result exactly halfway between two storage
    values rounds differently from the exact difference, so those few entries are recomputed in float64 and rounded
    to odd first (:func:`_ties`)."""
    for t in (finetuned, base):
        if t is not None and tuple(t.shape) != tuple(out.shape):
            raise CheckpointError(f"{source or what}: shape {list(t.shape)}, expected {list(out.shape)}")
    narrow = out.dtype in (torch.bfloat16, torch.float16)
    wide = torch.float64 in (finetuned.dtype, out.dtype, *(() if base is None else (base.dtype,)))
    recheck = narrow and not wide and base is not None and torch.float32 in (finetuned.dtype, base.dtype)
    acc = torch.float64 if wide else torch.float32
    top = torch.finfo(out.dtype).max
    o, f = out.view(-1), finetuned.detach().reshape(-1)
    b = None if base is None else base.detach().reshape(-1)
    for i in range(0, o.numel(), DIFF_CHUNK):
        j = min(i + DIFF_CHUNK, o.numel())
        fc = f[i:j].to(o.device)
        bc = None if b is None else b[i:j].to(o.device)
        d = fc.to(acc) if bc is None else fc.to(acc) - bc.to(acc)
        lo, hi = torch.aminmax(d)
        m = max(-float(lo), float(hi))  # NaN when d has a NaN
        if not math.isfinite(m):
            if source is not None:
                check_finite(fc, source, error=NonFiniteCheckpointError)
            check_finite(d, f"{what} (fine-tuned minus pretrained, in {str(acc).replace('torch.', '')})",
                         error=NonFiniteCheckpointError)
        o[i:j].copy_(round_to_odd_f32(d) if wide and narrow else d)
        if m > top:  # the cast overflowed: the message names the entry, the dtype, the largest magnitude, the fix
            check_stored_finite(o[i:j], what, d, error=NonFiniteCheckpointError)
        if recheck:
            idx = _ties(d, out.dtype).nonzero().squeeze(1)
            if idx.numel():
                o[i:j][idx] = round_to_odd_f32(fc[idx].double() - bc[idx].double()).to(out.dtype)
    return out


def floating_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``sd`` holding floating-point tensors (dtypes read lazily: no tensor of a lazy checkpoint
    is loaded)."""
    return [k for k in sd.keys() if shape_dtype(sd, k)[1].is_floating_point]


def task_vectors(
    pretrained: Source,
    finetuned: Sequence[Source],
    *,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_pickle: bool = False,
    names: Sequence[str] | None = None,
) -> TaskVectors:
    """Stacked task vectors ``{name: [K, *shape]}`` of ``finetuned`` against ``pretrained``.

    ``keys``: which tensors (default: every floating-point parameter of ``pretrained`` — for a module, in
    ``named_parameters()`` order). ``dtype``: storage dtype of the task vectors (default: the pretrained
    tensor's; e.g. ``torch.bfloat16``). The difference is rounded to the storage dtype once
    (:func:`rounded_difference_`). Keys of the fine-tuned checkpoints that the
    pretrained lacks (e.g. classification heads) are ignored. ``names``: how messages name the pretrained and each
    fine-tuned checkpoint (default: their paths where known). Raises :class:`CheckpointError` naming the key on a
    missing key or a shape or dtype mismatch, and :class:`~adamerge_fast.io.NonFiniteCheckpointError` (a
    ``CheckpointError``) naming the checkpoint and key on a NaN/inf in the pretrained or a fine-tuned tensor, or the
    key and ``dtype`` when the cast to ``dtype`` overflows.
    """
    if len(finetuned) == 0:
        raise ValueError("task_vectors: need at least one fine-tuned model (got zero tasks)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"task_vectors: dtype must be a floating torch.dtype, got {dtype!r}")
    if names is None:
        names = [source_name(pretrained, "the pretrained model")]
        names += [source_name(f, f"fine-tuned model {i}") for i, f in enumerate(finetuned)]
    elif len(names) != len(finetuned) + 1:
        raise ValueError(f"task_vectors: names must name the pretrained and the {len(finetuned)} fine-tuned "
                         f"checkpoints ({len(finetuned) + 1} names), got {len(names)}")
    base = as_state_dict(pretrained, trust_pickle=trust_pickle)
    keys = list(keys) if keys is not None else floating_keys(base)
    fts = [as_state_dict(f, trust_pickle=trust_pickle) for f in finetuned]
    for i, ft in enumerate(fts):
        check_fits(base, ft, f"fine-tuned model {i}", keys=keys, check_dtype=True, ref_name="the pretrained model")
    out: TaskVectors = {}
    for k in keys:
        b = base[k].detach()
        check_finite(b, f"{names[0]}: key {k!r}", error=NonFiniteCheckpointError)
        dev = device if device is not None else b.device
        st = torch.empty((len(fts), *b.shape), dtype=dtype or b.dtype, device=dev)
        for i, ft in enumerate(fts):
            exact = getattr(ft, "task_vector", None)  # a view that knows its difference (adapters.AdapterCheckpoint)
            what = f"task vector {i}: key {k!r}"
            if exact is not None:
                rounded_difference_(st[i], exact(k), None, what)
            else:
                rounded_difference_(st[i], ft[k], b, what, f"{names[i + 1]}: key {k!r}")
        out[k] = st
    return out


def check_task_vectors(tv: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], keys: Sequence[str]) -> int:
    """Validate stacked task vectors against the pretrained tensors; return K."""
    K = None
    for k in keys:
        if k not in tv:
            raise CheckpointError(f"task vectors: missing key {k!r}")
        t = tv[k]
        if t.dim() != base[k].dim() + 1 or tuple(t.shape[1:]) != tuple(base[k].shape):
            raise CheckpointError(
                f"task vectors: key {k!r} must have shape [K, {', '.join(map(str, base[k].shape))}], "
                f"got {list(t.shape)}"
            )
        if K is None:
            K = t.shape[0]
        elif t.shape[0] != K:
            raise CheckpointError(f"task vectors: key {k!r} has {t.shape[0]} tasks, earlier keys have {K}")
        if not torch.is_floating_point(t):
            raise CheckpointError(f"task vectors: key {k!r} has non-floating dtype {t.dtype}")
        if not t.is_meta:  # meta: shapes only (a memory plan)
            check_finite(t, f"task vectors: key {k!r}", error=NonFiniteCheckpointError)
    if not K:
        raise ValueError("task vectors: zero tasks")
    return K


def unstack(tv: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``{name: [K, *S]}`` -> K dicts ``{name: [*S]}`` (views)."""
    K = next(iter(tv.values())).shape[0]
    return [{k: v[i] for k, v in tv.items()} for i in range(K)]
