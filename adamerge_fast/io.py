"""Reading and writing checkpoints: safetensors (lazy, mmap), sharded directories, HF model directories,
torch state-dict files (``weights_only=True``), and whole pickled modules only with an explicit opt-in.

Everything written goes to a temporary file in the target directory first and is renamed into place, so
an interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit: the message names the file or key and what was expected."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed onto it (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file, atomically. Shared storage is cloned (safetensors rejects it)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[k] = t
    with atomic_path(path, ".safetensors") as tmp:
        save_file(out, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def save_torch(obj: Any, path) -> Path:
    """``torch.save`` atomically."""
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)
    return Path(path)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files; a tensor is read (mmap) when indexed."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = []
        self._where: dict[str, int] = {}
        for f in files:
            h = safe_open(str(f), framework="pt", device="cpu")
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"{f}: key {k!r} appears in more than one shard")
                self._where[k] = len(self._handles)
            self._handles.append(h)
        self.files = files

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def __contains__(self, key) -> bool:  # Mapping's default reads the tensor
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``self[key]`` from the file header (no tensor data is read)."""
        if key not in self._where:
            raise KeyError(key)
        sl = self._handles[self._where[key]].get_slice(key)
        from safetensors.torch import _getdtype  # type: ignore[attr-defined]

        return tuple(sl.get_shape()), _getdtype(sl.get_dtype())


class StreamingStateDict(LazyStateDict):
    """A :class:`LazyStateDict` that opens a tensor's file for each read and closes it after: the returned tensor
    is a copy and no file stays mapped, so reading a whole checkpoint tensor by tensor never holds more than
    the tensor at hand (a kept-open file's pages count as resident memory, up to the whole checkpoint).
    Shapes and dtypes still come from the headers of the files opened once at construction."""

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(key)
        with safe_open(str(self.files[self._where[key]]), framework="pt", device="cpu") as h:
            return h.get_tensor(key)


def streaming(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``sd`` as a :class:`StreamingStateDict` when it is a :class:`LazyStateDict`, else ``sd`` itself."""
    if isinstance(sd, LazyStateDict) and not isinstance(sd, StreamingStateDict):
        return StreamingStateDict(sd.files)
    return sd


class PrefixView(Mapping[str, torch.Tensor]):
    """A lazy view of ``sd``: its keys that start with ``strip``, with ``strip`` removed and ``add`` put in
    front. Tensors are read from ``sd`` only when indexed; :func:`shape_dtype` reads through the view."""

    def __init__(self, sd: Mapping[str, torch.Tensor], *, strip: str = "", add: str = ""):
        self.sd = sd
        self._keys = {add + k[len(strip):]: k for k in sd.keys() if k.startswith(strip)}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd[self._keys[key]]

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return shape_dtype(self.sd, self._keys[key])


def shape_dtype(sd: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``(tuple(sd[key].shape), sd[key].dtype)``, without reading the tensor when ``sd`` is lazy (a
    :class:`LazyStateDict` or a :class:`PrefixView` of one)."""
    lazy = getattr(sd, "shape_dtype", None)
    if lazy is not None:
        return lazy(key)
    t = sd[key]
    return tuple(t.shape), t.dtype


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> Mapping[str, torch.Tensor]:
    """The view of ``sd`` under the first of ``prefixes`` that some key starts with (prefix removed), else
    ``sd`` itself."""
    for pre in prefixes:
        if any(k.startswith(pre) for k in sd.keys()):
            return PrefixView(sd, strip=pre)
    return sd


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    """The view of ``sd`` with ``prefix`` in front of every key (e.g. a bare LM checkpoint for a wrapper that
    holds the LM as ``lm``)."""
    return PrefixView(sd, add=prefix)


def check_fits(
    ref: torch.nn.Module | Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    what: str,
    *,
    keys: Iterable[str] | None = None,
    check_dtype: bool = False,
    ref_name: str = "the model",
) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``sd`` holds every one of ``keys`` (default: all of
    ``ref``'s) with ``ref``'s shape (and dtype, with ``check_dtype``).

    ``ref``: a module (its ``named_parameters()``) or a state dict (e.g. the pretrained checkpoint).
    ``what`` names ``sd`` in the message (its file), ``ref_name`` names ``ref``. Shapes and dtypes are read
    with :func:`shape_dtype`, so lazily read checkpoints stay unread. Keys of ``sd`` outside ``keys`` are
    ignored.
    """
    if isinstance(ref, torch.nn.Module):
        ref = dict(ref.named_parameters())
    keys = list(ref.keys()) if keys is None else list(keys)
    missing = [k for k in keys if k not in sd]
    if missing:
        extra = sorted(set(sd.keys()) - set(ref.keys()))
        hint = f"; it has other keys such as {extra[0]!r}" if extra else ""
        raise CheckpointError(
            f"{what}: missing key {missing[0]!r} ({len(missing)} of the {len(keys)} tensors of {ref_name} are "
            f"missing{hint}; a checkpoint of another architecture?)"
        )
    for k in keys:
        (want, want_dtype), (shape, dtype) = shape_dtype(ref, k), shape_dtype(sd, k)
        if shape != want:
            raise CheckpointError(
                f"{what}: key {k!r} has shape {list(shape)}, {ref_name} has {list(want)} "
                "(a checkpoint of another architecture?)"
            )
        if check_dtype and dtype != want_dtype:
            raise CheckpointError(f"{what}: key {k!r} has dtype {dtype}, {ref_name} has {want_dtype} "
                                  "(convert it first)")


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Copy ``sd``'s tensors into ``module``'s state (cast to its dtypes) after :func:`check_fits` of its
    parameters; buffers are copied when ``sd`` has them; other keys of ``sd`` are ignored."""
    check_fits(module, sd, what)
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if k in sd:
                src = sd[k]
                if tuple(src.shape) != tuple(t.shape):
                    raise CheckpointError(f"{what}: key {k!r} has shape {list(src.shape)}, the model has "
                                          f"{list(t.shape)}")
                t.copy_(src.to(t.dtype))
    return module


def existing(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)``, or ``FileNotFoundError("<path>: <what> not found")`` when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")
    return p


_PICKLE_HINT = (
    "it holds a whole pickled object, and unpickling runs arbitrary code from the file. If you trust it, "
    "pass trust_pickle=True (command line: --trust-pickle)."
)


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint into a name -> tensor mapping.

    Accepts: a ``.safetensors`` file or a directory of them (sharded, with or without
    ``*.safetensors.index.json``; this includes Hugging Face model directories) — read lazily; a torch
    file (``.pt``/``.pth``/``.bin``/``.ckpt``) holding a state dict, loaded with ``weights_only=True``;
    a whole pickled ``nn.Module`` only with ``trust_pickle=True`` — except the official AdaMerging / task_vectors
    checkpoints (pickled ``src.modeling`` modules), which are read without running code from the file
    (:func:`adamerge_fast.safe_pickle.load_official`) and need no opt-in.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        index = sorted(p.glob("*.safetensors.index.json"))
        if index:
            wm = json.loads(index[0].read_text())["weight_map"]
            files = sorted({p / f for f in wm.values()})
        else:
            files = sorted(p.glob("*.safetensors"))
        if files:
            return LazyStateDict(files)
        torch_files = sorted(p.glob("pytorch_model*.bin"))
        if len(torch_files) == 1:
            return load_state_dict(torch_files[0], trust_pickle=trust_pickle)
        if torch_files:
            out: dict[str, torch.Tensor] = {}
            for f in torch_files:
                out.update(load_state_dict(f, trust_pickle=trust_pickle))
            return out
        raise CheckpointError(f"{p}: directory holds no *.safetensors or pytorch_model*.bin files")
    if p.suffix == ".safetensors":
        try:
            return LazyStateDict([p])
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        from .safe_pickle import RefusedPickle, load_official

        try:
            return load_official(p).state_dict
        except RefusedPickle as refused:
            if not trust_pickle:
                why = str(refused).removeprefix(f"{p}: ")
                raise CheckpointError(f"{p}: cannot be loaded as a plain state dict ({why}): {_PICKLE_HINT}") from e
        obj = torch.load(p, map_location="cpu", weights_only=False)
    return _as_state_dict(obj, p)


def _as_state_dict(obj: Any, p: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{p}: expected a mapping of names to tensors; entry {bad[0]!r} is not a tensor")
        return obj
    raise CheckpointError(f"{p}: expected a state dict or an nn.Module, found {type(obj).__name__}")
