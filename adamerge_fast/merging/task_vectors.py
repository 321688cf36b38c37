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

from ..io import CheckpointError, check_fits, load_state_dict, shape_dtype

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


def rounded_difference_(out: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor, what: str) -> torch.Tensor:
    """``out.copy_(finetuned - base)`` with the difference rounded once into ``out.dtype``, chunked over the
    flattened tensor (:data:`DIFF_CHUNK` elements); ``out``, ``finetuned``, ``base``: ``[*S]`` (``out`` contiguous,
    on any device: the inputs are moved there chunk by chunk). Raises :class:`CheckpointError` naming ``what`` when
    the difference has a NaN or inf, or overflows ``out.dtype``. Returns ``out``.

    How: float64 inputs (or storage) subtract in float64 and, into bf16/fp16, go through :func:`round_to_odd_f32`.
    Otherwise the subtraction is float32, which is exact for bf16/fp16 inputs (unless their exponents differ by more
    than 15) and rounded once for float32 inputs, so storing it as float32 rounds once. Stored as bf16/fp16, a
    rounded float32 difference could be rounded twice: only a float32 result exactly halfway between two storage
    values rounds differently from the exact difference, so those few entries are recomputed in float64 and rounded
    to odd first (:func:`_ties`)."""
    if tuple(finetuned.shape) != tuple(out.shape) or tuple(base.shape) != tuple(out.shape):
        raise CheckpointError(f"{what}: shape {list(finetuned.shape)}, expected {list(out.shape)}")
    narrow = out.dtype in (torch.bfloat16, torch.float16)
    wide = torch.float64 in (finetuned.dtype, base.dtype, out.dtype)
    recheck = narrow and not wide and torch.float32 in (finetuned.dtype, base.dtype)
    top = torch.finfo(out.dtype).max
    o, f, b = out.view(-1), finetuned.detach().reshape(-1), base.detach().reshape(-1)
    for i in range(0, o.numel(), DIFF_CHUNK):
        j = min(i + DIFF_CHUNK, o.numel())
        fc, bc = f[i:j].to(o.device), b[i:j].to(o.device)
        acc = torch.float64 if wide else torch.float32
        d = fc.to(acc) - bc.to(acc)
        lo, hi = torch.aminmax(d)
        m = max(-float(lo), float(hi))  # NaN when d has a NaN
        if not math.isfinite(m):
            raise CheckpointError(f"{what} has NaN or inf values")
        if m > top:
            raise CheckpointError(f"{what}: its difference reaches {m:.3g}, beyond {out.dtype}'s range")
        o[i:j].copy_(round_to_odd_f32(d) if wide and narrow else d)
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
) -> TaskVectors:
    """Stacked task vectors ``{name: [K, *shape]}`` of ``finetuned`` against ``pretrained``.

    ``keys``: which tensors (default: every floating-point parameter of ``pretrained`` — for a module, in
    ``named_parameters()`` order). ``dtype``: storage dtype of the task vectors (e.g. ``torch.bfloat16``);
    the difference is taken in the checkpoints' own precision first. Keys of the fine-tuned checkpoints that the
    pretrained lacks (e.g. classification heads) are ignored. Raises :class:`CheckpointError` naming the key on a
    missing key, a shape or dtype mismatch, or a non-finite value.
    """
    if len(finetuned) == 0:
        raise ValueError("task_vectors: need at least one fine-tuned model (got zero tasks)")
    base = as_state_dict(pretrained, trust_pickle=trust_pickle)
    keys = list(keys) if keys is not None else floating_keys(base)
    fts = [as_state_dict(f, trust_pickle=trust_pickle) for f in finetuned]
    for i, ft in enumerate(fts):
        check_fits(base, ft, f"fine-tuned model {i}", keys=keys, check_dtype=True, ref_name="the pretrained model")
    out: TaskVectors = {}
    for k in keys:
        b = base[k].detach()
        dev = device if device is not None else b.device
        st = torch.empty((len(fts), *b.shape), dtype=dtype or b.dtype, device=dev)
        for i, ft in enumerate(fts):
            d = ft[k].detach().to(dev) - b.to(dev)
            if not torch.isfinite(d).all():
                raise CheckpointError(f"task vector {i}: key {k!r} has NaN or inf values")
            st[i].copy_(d)
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
        if not t.is_meta and not torch.isfinite(t).all():  # meta: shapes only (a memory plan)
            raise CheckpointError(f"task vectors: key {k!r} has NaN or inf values")
    if not K:
        raise ValueError("task vectors: zero tasks")
    return K


def unstack(tv: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``{name: [K, *S]}`` -> K dicts ``{name: [*S]}`` (views)."""
    K = next(iter(tv.values())).shape[0]
    return [{k: v[i] for k, v in tv.items()} for i in range(K)]
