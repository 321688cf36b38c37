"""Stacked task vectors built one fine-tuned model at a time (model-outer).

:func:`build_task_vectors` preallocates the storage of every parameter's task vectors (``[K, *shape]``), then
takes the fine-tuned models one after the other: each is read (a path is opened, a callable is called), its
rows are written (task ``k``'s row of every parameter), and it is released before the next one is loaded.
So the peak is the pretrained weights + the task vectors + one fine-tuned model, whatever ``K``, when the
models come as paths or loaders. In-memory models are held by the caller anyway; ``release=True`` frees
each one's tensors once its rows are taken (a documented side effect: the module is left empty).

A *storage kind* decides what a parameter's task vectors are stored as (:class:`DenseRows`: a dense tensor in a
chosen dtype). The builder only calls its three steps, so another kind (quantized rows, low-rank adapters)
plugs in by implementing them::

    store = kind.allocate(name, base, K)      # before any model is read
    kind.write(store, k, finetuned, base, what, source)  # task k's rows: finetuned - base (base None: finetuned is
                                              # the difference); what / source name the entry and the tensor
    result = kind.finish(name, store)         # after the K-th model: what the merged layers read

and ``kind.nbytes(shape, base_dtype, K)`` for the memory plan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sized
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

from .._compat import malloc_trim
from ..io import NonFiniteCheckpointError, check_finite, check_fits, existing, load_state_dict
from .task_vectors import Source, rounded_difference_, source_name

#: a fine-tuned model as the builder takes it: a module, a state dict, a checkpoint path, or a callable with no
#: arguments that returns one of those (called when the model's turn comes)
Loader = Callable[[], Source]
FinetunedSource = Union[Source, Loader]


class RowStorage(Protocol):
    """A storage kind for stacked task vectors (see the module docstring)."""

    def allocate(self, name: str, base: torch.Tensor, K: int) -> Any: ...

    def write(self, store: Any, k: int, finetuned: torch.Tensor, base: torch.Tensor | None, what: str,
              source: str | None = None) -> None: ...

    def finish(self, name: str, store: Any) -> Any: ...

    def nbytes(self, shape: Sequence[int], base_dtype: torch.dtype, K: int) -> int: ...


class DenseRows:
    """Dense ``[K, *shape]`` task vectors in ``dtype`` (default: the pretrained tensor's dtype) on ``device``
    (default: the pretrained tensor's device). Row ``k`` is ``finetuned - base`` rounded once
    (:func:`~adamerge_fast.merging.task_vectors.rounded_difference_`)."""

    def __init__(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"task-vector storage dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype, self.device = dtype, device

    def allocate(self, name: str, base: torch.Tensor, K: int) -> torch.Tensor:
        # torch.empty: pages of a large allocation become resident only when a row is written
        dev = self.device if self.device is not None else base.device
        return torch.empty((K, *base.shape), dtype=self.dtype or base.dtype, device=dev)

    def write(self, store: torch.Tensor, k: int, finetuned: torch.Tensor, base: torch.Tensor | None, what: str,
              source: str | None = None) -> None:
        rounded_difference_(store[k], finetuned, base, what, source)

    def finish(self, name: str, store: torch.Tensor) -> torch.Tensor:
        return store

    def nbytes(self, shape: Sequence[int], base_dtype: torch.dtype, K: int) -> int:
        dt = self.dtype or base_dtype
        return K * math.prod(shape) * dt.itemsize


def _open(src: FinetunedSource, k: int, trust_pickle: bool) -> tuple[Mapping[str, torch.Tensor], str, Any]:
    """``(state dict, its name for messages, the in-memory object release may empty or None)`` of source ``k``."""
    owned = None
    if callable(src) and not isinstance(src, nn.Module):
        src = src()
        if src is None:
            raise ValueError(f"fine-tuned model {k}: its loader returned None (expected a module, a state dict or a "
                             "checkpoint path)")
    else:
        owned = src if isinstance(src, (nn.Module, Mapping)) else None
    if isinstance(src, nn.Module):
        return dict(src.named_parameters()), f"fine-tuned model {k}", owned
    if isinstance(src, Mapping):
        return src, source_name(src, f"fine-tuned state dict {k}"), owned
    if isinstance(src, (str, os.PathLike)):
        return load_state_dict(existing(src, "fine-tuned checkpoint"), trust_pickle=trust_pickle), str(src), None
    raise TypeError(f"fine-tuned model {k}: expected an nn.Module, a state dict, a checkpoint path or a callable "
                    f"returning one, got {type(src).__name__}")


#: glibc's ``malloc_trim(0)`` (:func:`adamerge_fast._compat.malloc_trim`): hands the free pages inside the heap
#: back to the OS (tensors of a few MiB often live on the heap, and freeing them leaves the pages resident otherwise)
return_free_memory = malloc_trim


def release(obj: nn.Module | Mapping[str, torch.Tensor], keep: Iterable[torch.Tensor] = ()) -> int:
    """Free the tensor storage an in-memory fine-tuned model holds: every parameter and buffer of a module (and
    every tensor of a mutable state dict) is replaced by an empty tensor of its dtype and device. Tensors
    sharing storage with one of ``keep`` (the pretrained weights) are left alone. Returns the bytes dropped
    (freed when nothing else refers to them; the builder then calls :func:`return_free_memory`)."""
    kept = {t.untyped_storage().data_ptr() for t in keep if t.numel()}
    freed = 0

    def gone(t: torch.Tensor) -> bool:
        return t.numel() > 0 and t.untyped_storage().data_ptr() not in kept

    if isinstance(obj, nn.Module):
        with torch.no_grad():
            for t in list(obj.parameters()) + [b for b in obj.buffers() if b is not None]:
                if gone(t):
                    freed += t.numel() * t.element_size()
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    elif isinstance(obj, dict):
        for key, t in list(obj.items()):
            if isinstance(t, torch.Tensor) and gone(t):
                freed += t.numel() * t.element_size()
                obj[key] = torch.empty(0, dtype=t.dtype, device=t.device)
    return freed


def num_sources(finetuned: Iterable[FinetunedSource], K: int | None) -> int:
    """How many fine-tuned models ``finetuned`` holds: its length, or ``K`` for an iterator (checked when both)."""
    if isinstance(finetuned, Sized):
        n = len(finetuned)
        if K is not None and K != n:
            raise ValueError(f"{n} fine-tuned models given for {K} tasks")
        return n
    if K is None:
        raise ValueError("fine-tuned models given as an iterator (a generator): say how many with task_names=... "
                         "(one name per model)")
    return K


def build_task_vectors(
    base: Mapping[str, torch.Tensor],
    finetuned: Iterable[FinetunedSource],
    *,
    keys: Sequence[str] | None = None,
    K: int | None = None,
    storage: RowStorage | None = None,
    release_finetuned: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Stacked task vectors ``{name: storage of [K, *shape]}`` of ``finetuned`` against ``base``, one model at a
    time (see the module docstring).

    Args:
        base: the pretrained tensors ``{name: [*shape]}`` (a module's ``dict(named_parameters())`` or a state dict).
        finetuned: ``K`` sources (modules, state dicts, checkpoint paths, or callables returning one), a sequence
            or an iterator (then ``K`` is required); each is loaded only when its turn comes.
        keys: the parameters (default: every key of ``base``), in order.
        K: the number of models (checked against ``len(finetuned)``; required for an iterator).
        storage: the storage kind (default :class:`DenseRows` in each pretrained tensor's dtype).
        release_finetuned: after its rows are taken, empty each in-memory module / mutable state dict given in
            ``finetuned`` (:func:`release`; tensors shared with ``base`` are kept). Models the builder loads
            itself (paths, callables) are always dropped before the next is loaded.
    Raises :class:`~adamerge_fast.io.CheckpointError` naming the model and key when a model lacks a key or has
    another shape or dtype, :class:`~adamerge_fast.io.NonFiniteCheckpointError` naming the checkpoint (or the
    pretrained model) and key on a NaN/inf, or the task vector's key and dtype when storing it overflows;
    ``ValueError`` when the number of models is not ``K``.
    """
    keys = list(base.keys()) if keys is None else list(keys)
    K = num_sources(finetuned, K)
    if K == 0:
        raise ValueError("need at least one fine-tuned model (got zero tasks)")
    storage = storage if storage is not None else DenseRows()
    stores = {n: storage.allocate(n, base[n].detach(), K) for n in keys}
    base_checked: dict[str, bool] = {}
    k = -1
    for k, src in enumerate(finetuned):
        if k >= K:
            raise ValueError(f"more than the {K} fine-tuned models announced")
        sd, what, owned = _open(src, k, trust_pickle)
        del src
        check_fits(base, sd, what, keys=keys, check_dtype=True, ref_name="the pretrained model")
        exact = getattr(sd, "task_vector", None)  # a view that knows its difference (adapters.AdapterCheckpoint)
        for n in keys:
            entry = f"task vector {k}: key {n!r}"
            if exact is not None:
                storage.write(stores[n], k, exact(n), None, entry)
                continue
            if not base_checked.get(n):  # the pretrained tensor, once: a NaN there is not the fine-tuned model's
                check_finite(base[n].detach(), f"the pretrained model: key {n!r}", error=NonFiniteCheckpointError)
                base_checked[n] = True
            storage.write(stores[n], k, sd[n], base[n], entry, f"{what}: key {n!r}")
        del sd
        if release_finetuned and owned is not None:
            release(owned, keep=base.values())
        del owned
        return_free_memory()  # what this model held (released, or loaded here and dropped) leaves the process
    if k + 1 != K:
        raise ValueError(f"{k + 1} fine-tuned models given for {K} tasks")
    return {n: storage.finish(n, stores.pop(n)) for n in keys}


__all__ = ["build_task_vectors", "DenseRows", "RowStorage", "release", "return_free_memory", "num_sources",
           "FinetunedSource", "Loader"]
