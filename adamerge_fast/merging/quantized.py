"""Quantized task vectors for whole models: built from checkpoints one model at a time, saved and loaded with
safetensors, held by modules.

A model's task vectors are ``{name: [K, *shape]}`` as everywhere in this package, each entry either a dense tensor
or an :class:`~adamerge_fast.ops.quant.QuantizedTensor` (int8: one scale per output row; int4: a scale and a zero
point per group of 128 input columns). Tensors with fewer than two dimensions (biases, norms, scalars) stay dense:
their task vectors are a tiny share of a model's bytes, and a per-row format has no rows to scale there.
Every op of :mod:`adamerge_fast.ops` reads both kinds, so ``AdaMergedModel(..., task_vector_dtype="int8")`` never
rebuilds a dense task vector.

File format (:func:`save_task_vectors`): one safetensors file; a dense entry ``name`` is stored under ``name``, a
quantized one as ``name.__qdata``, ``name.__scales`` (and ``name.__zeros`` for int4); the metadata key
``adamerge_fast.task_vectors`` holds JSON ``{"version": 1, "tensors": {name: {"storage": "dense" | "int8" |
"int4", "shape": [K, *S], "group_size": g}}}``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from ..io import CheckpointError, existing, save_safetensors
from ..ops.quant import (
    DEFAULT_GROUP_SIZE,
    FORMATS,
    QuantizedTensor,
    check_quantized,
    component_shapes,
    empty,
    format_bits,
    quantize,
    quantize_into,
)
from .build import DenseRows, build_task_vectors
from .task_vectors import Source, as_state_dict, check_task_vectors, floating_keys, rounded_difference_

AnyTaskVector = Union[torch.Tensor, QuantizedTensor]
META_KEY = "adamerge_fast.task_vectors"
FORMAT_VERSION = 1
MIN_DIMS = 2  # parameters of fewer dims keep dense task vectors
_PARTS = ("qdata", "scales", "zeros")


def is_quantized_format(dtype) -> bool:
    """Whether ``dtype`` (a ``task_vector_dtype`` value) names a quantized format (``"int8"`` / ``"int4"``)."""
    return isinstance(dtype, str) and dtype in FORMATS


def nbytes(tv: Mapping[str, AnyTaskVector]) -> int:
    """Bytes held by task vectors ``{name: [K, *S]}`` (dense and quantized)."""
    return sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for t in tv.values())


def quantize_stack(t: AnyTaskVector, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE) -> AnyTaskVector:
    """One ``[K, *S]`` entry in format ``fmt``: quantized when ``S`` has at least two dims, else kept dense."""
    if isinstance(t, QuantizedTensor):
        if t.format != fmt:
            raise ValueError(f"task vectors are already {t.format}; cannot store them as {fmt}")
        return t
    return quantize(t, fmt, group_size=group_size) if t.dim() - 1 >= MIN_DIMS else t


class QuantizedRows:
    """The quantized storage kind of :func:`~adamerge_fast.merging.build.build_task_vectors`: a parameter of two
    or more dims gets a :class:`QuantizedTensor` in format ``fmt`` (task ``k``'s difference is formed in fp32 —
    rounded once, checked finite, chunk by chunk, as dense rows are — then quantized into slot ``k``), the others
    dense rows in the pretrained dtype (:class:`~adamerge_fast.merging.build.DenseRows`)."""

    def __init__(self, fmt: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                 device: torch.device | str | None = None):
        self.bits = format_bits(fmt)
        self.fmt, self.group_size, self.device = fmt, int(group_size), device
        self._dense = DenseRows(None, device)

    def allocate(self, name: str, base: torch.Tensor, K: int):
        if base.dim() < MIN_DIMS:
            return self._dense.allocate(name, base, K)
        dev = self.device if self.device is not None else base.device
        return empty((K, *base.shape), self.fmt, group_size=self.group_size, device=dev)

    def write(self, store, k: int, finetuned: torch.Tensor, base: torch.Tensor | None, what: str,
              source: str | None = None) -> None:
        if not isinstance(store, QuantizedTensor):
            self._dense.write(store, k, finetuned, base, what, source)
            return
        d = torch.empty(store.task_shape, dtype=torch.float32, device=store.device)
        rounded_difference_(d, finetuned, base, what, source)
        quantize_into(store, k, d)

    def finish(self, name: str, store):
        return store

    def temporary_bytes(self, numel: int) -> int:
        """Bytes :meth:`write` allocates for a tensor of ``numel`` entries: the fp32 difference and the quantizer's
        fp32 temporaries (:func:`~adamerge_fast.ops.quant.quantize_into`), about four fp32 copies."""
        return 4 * 4 * int(numel)

    def nbytes(self, shape: Sequence[int], base_dtype: torch.dtype, K: int) -> int:
        if len(shape) < MIN_DIMS:
            return self._dense.nbytes(shape, base_dtype, K)
        gs = 0 if self.bits == 8 else self.group_size
        parts = component_shapes((K, *shape), self.bits, gs)
        return sum(math.prod(v) * (4 if n == "scales" else 1) for n, v in parts.items())


def row_storage(task_vector_dtype) -> DenseRows | QuantizedRows:
    """The storage kind of a ``task_vector_dtype`` value: None or a floating dtype -> dense rows; ``"int8"`` /
    ``"int4"`` -> :class:`QuantizedRows`."""
    if is_quantized_format(task_vector_dtype):
        return QuantizedRows(task_vector_dtype)
    return DenseRows(task_vector_dtype)


def quantize_task_vectors(
    pretrained: Source,
    finetuned: Sequence[Source],
    fmt: str = "int8",
    *,
    keys: Iterable[str] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    device: torch.device | str | None = None,
    trust_pickle: bool = False,
) -> dict[str, AnyTaskVector]:
    """Quantized task vectors ``{name: [K, *shape]}`` of ``finetuned`` against ``pretrained``, built one
    fine-tuned model at a time (:func:`~adamerge_fast.merging.build.build_task_vectors` with
    :class:`QuantizedRows`): each difference is formed chunk by chunk, quantized into its slot and dropped, so no
    dense ``[K, *shape]`` stack exists and lazily read checkpoints are never dense in memory. ``keys`` (default:
    every floating tensor of ``pretrained``), sources and errors as :func:`~adamerge_fast.merging.task_vectors`;
    tensors with fewer than two dims stay dense (in the checkpoint's dtype)."""
    storage = QuantizedRows(fmt, group_size, device)
    if len(finetuned) == 0:
        raise ValueError("quantize_task_vectors: need at least one fine-tuned model (got zero tasks)")
    base = as_state_dict(pretrained, trust_pickle=trust_pickle)
    keys = list(keys) if keys is not None else floating_keys(base)
    return build_task_vectors(base, finetuned, keys=keys, storage=storage, trust_pickle=trust_pickle)


def check_any_task_vectors(tv: Mapping[str, AnyTaskVector], base: Mapping[str, torch.Tensor],
                           keys: Sequence[str]) -> int:
    """:func:`~adamerge_fast.merging.task_vectors.check_task_vectors` for entries that may be quantized; returns K."""
    dense = [k for k in keys if not isinstance(tv.get(k), QuantizedTensor)]
    K = check_task_vectors(tv, base, dense) if dense else None
    for k in keys:
        t = tv[k]
        if not isinstance(t, QuantizedTensor):
            continue
        try:
            check_quantized(f"task vectors: key {k!r}", t, base[k].shape)
        except (TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        if K is None:
            K = t.num_tasks
        elif t.num_tasks != K:
            raise CheckpointError(f"task vectors: key {k!r} has {t.num_tasks} tasks, other keys have {K}")
    return K


# ------------------------------------------------------------------------------------------------- files
def save_task_vectors(tv: Mapping[str, AnyTaskVector], path: str | os.PathLike, *,
                      metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write task vectors ``{name: [K, *S]}`` (dense and quantized entries) to one safetensors file, atomically.
    An existing ``path`` is replaced only with ``overwrite=True``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    tensors: dict[str, torch.Tensor] = {}
    index = {}
    for name, t in tv.items():
        if isinstance(t, QuantizedTensor):
            check_quantized(f"save_task_vectors: key {name!r}", t)
            for part, v in zip(_PARTS, t.components(), strict=True):
                if v is not None:
                    tensors[f"{name}.__{part}"] = v
            index[name] = {"storage": t.format, "shape": list(t.shape), "group_size": t.group_size}
        elif isinstance(t, torch.Tensor) and torch.is_floating_point(t):
            tensors[name] = t
            index[name] = {"storage": "dense", "shape": list(t.shape), "group_size": 0}
        else:
            raise TypeError(f"save_task_vectors: key {name!r} must be a floating tensor or a QuantizedTensor, got "
                            f"{type(t).__name__}")
    meta = dict(metadata or {})
    meta[META_KEY] = json.dumps({"version": FORMAT_VERSION, "tensors": index})
    return save_safetensors(tensors, path, meta)


def load_task_vectors(path: str | os.PathLike, *, device: torch.device | str | None = None
                      ) -> dict[str, AnyTaskVector]:
    """Read a file of :func:`save_task_vectors`. Raises :class:`~adamerge_fast.io.CheckpointError` naming the file
    and the key when the file is not such a file, a part is missing or unexpected, or parts do not fit together."""
    from safetensors import SafetensorError, safe_open

    p = existing(path, "task-vector file")
    try:
        f = safe_open(str(p), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    with f:
        meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise CheckpointError(f"{p}: not a task-vector file of save_task_vectors (no {META_KEY!r} metadata)")
        try:
            info = json.loads(meta)
            version, index = info["version"], info["tensors"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: corrupt {META_KEY!r} metadata ({e})") from None
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{p}: task-vector file version {version}, this package reads {FORMAT_VERSION}")
        stored, used = set(f.keys()), set()
        out: dict[str, AnyTaskVector] = {}
        K = None
        for name, e in index.items():
            try:
                storage, shape, gs = e["storage"], torch.Size(e["shape"]), int(e["group_size"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{p}: key {name!r}: corrupt index entry {e!r} ({err})") from None
            if storage == "dense":
                keys = [name]
            elif storage in FORMATS:
                keys = [f"{name}.__{part}" for part in _PARTS[: 3 if storage == "int4" else 2]]
            else:
                raise CheckpointError(f"{p}: key {name!r}: unknown storage {storage!r}")
            missing = [k for k in keys if k not in stored]
            if missing:
                raise CheckpointError(f"{p}: key {name!r}: missing tensor(s) {missing}")
            used.update(keys)
            parts = [f.get_tensor(k) for k in keys]
            if storage == "dense":
                t = parts[0]
                if tuple(t.shape) != tuple(shape) or not torch.is_floating_point(t):
                    raise CheckpointError(f"{p}: key {name!r}: expected a floating tensor of shape {list(shape)}, got "
                                          f"{t.dtype} {list(t.shape)}")
            else:
                t = QuantizedTensor(parts[0], parts[1], parts[2] if storage == "int4" else None, FORMATS[storage], gs,
                                    shape)
                try:
                    check_quantized(f"{p}: key {name!r}", t)
                except (TypeError, ValueError) as err:
                    raise CheckpointError(str(err)) from None
            k_here = int(shape[0]) if len(shape) else 0
            if K is None:
                K = k_here
            elif k_here != K:
                raise CheckpointError(f"{p}: key {name!r} has {k_here} tasks, other keys have {K}")
            out[name] = t.to(device) if device is not None else t
        extra = sorted(stored - used)
        if extra:
            more = " ..." if len(extra) > 5 else ""
            raise CheckpointError(f"{p}: tensors not in the file's index: {extra[:5]}{more}")
    return out


# ---------------------------------------------------------------------------------------------- modules
class QuantizedBuffers(nn.Module):
    """The parts of a :class:`QuantizedTensor` as non-persistent buffers of a module (they follow ``.to(device)``;
    the fp32 scales stay fp32 under dtype casts such as ``.half()``); :meth:`get` returns the tensor."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.register_buffer("qdata", qt.qdata, persistent=False)
        self.register_buffer("scales", qt.scales, persistent=False)
        self.register_buffer("zeros", qt.zeros, persistent=False)
        self.bits, self.group_size, self.shape = qt.bits, qt.group_size, qt.shape

    def get(self) -> QuantizedTensor:
        return QuantizedTensor(self.qdata, self.scales, self.zeros, self.bits, self.group_size, self.shape)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.float()
        return out

    def extra_repr(self) -> str:
        return f"{'int8' if self.bits == 8 else 'int4'}, shape={list(self.shape)}"
