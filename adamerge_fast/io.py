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
from typing import Any, Iterator, Mapping

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
        tmp.write_text(text)
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

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._handles[self._where[key]].get_slice(key)
        from safetensors.torch import _getdtype  # type: ignore[attr-defined]

        return tuple(sl.get_shape()), _getdtype(sl.get_dtype())


_PICKLE_HINT = (
    "it holds a whole pickled object, and unpickling runs arbitrary code from the file. If you trust it, "
    "pass trust_pickle=True (command line: --trust-pickle)."
)


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint into a name -> tensor mapping.

    Accepts: a ``.safetensors`` file or a directory of them (sharded, with or without
    ``*.safetensors.index.json``; this includes Hugging Face model directories) — read lazily; a torch
    file (``.pt``/``.pth``/``.bin``/``.ckpt``) holding a state dict, loaded with ``weights_only=True``;
    a whole pickled ``nn.Module`` (the original task-vector checkpoints) only with ``trust_pickle=True``.
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
        if not trust_pickle:
            raise CheckpointError(f"{p}: cannot be loaded as a plain state dict: {_PICKLE_HINT}") from e
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
