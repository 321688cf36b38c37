"""Reading and writing checkpoints: safetensors (lazy, mmap), sharded directories, HF model directories,
torch state-dict files (``weights_only=True``), and whole pickled modules only with an explicit opt-in.

Everything written goes to a temporary file in the target directory first and is renamed into place, so
an interrupted write (or a full disk) never leaves a half-written file behind, and the renamed file gets the mode a
plain ``open()`` would give it. Finiteness checks that name the tensor (:func:`check_finite`,
:func:`check_stored_finite`) and the output-versus-input check (:func:`check_not_input`) live here so that every
writer calls the same ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit: the message names the file or key and what was expected."""


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or inf: the message names it (file, key, dtype, task or step)."""


class NonFiniteCheckpointError(NonFiniteError, CheckpointError):
    """A NaN or inf read from a checkpoint (or made by casting its values to a storage dtype)."""


def check_finite(t: torch.Tensor, what: str, hint: str = "", *, error: type[NonFiniteError] = NonFiniteError) -> None:
    """Raise ``error`` ``"<what> has NaN or inf values (N NaN, M inf of T)<hint>"`` unless every element of the
    floating tensor ``t`` is finite (other dtypes always are)."""
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    raise error(f"{what} has NaN or inf values ({n_nan} NaN, {n_inf} inf of {t.numel()}){hint}")


def check_stored_finite(stored: torch.Tensor, what: str, source: torch.Tensor | None = None, *,
                        error: type[NonFiniteError] = NonFiniteError) -> None:
    """After finite values were cast to a storage dtype (``stored``): raise ``error`` naming ``what`` and
    ``stored.dtype`` when the cast overflowed to inf, with the largest magnitude of ``source`` (the values before
    the cast) and the fix (bfloat16 or float32 storage)."""
    if bool(torch.isfinite(stored).all()):
        return
    dt = stored.dtype
    big = f"largest magnitude {float(source.detach().abs().max()):.4g}, " if source is not None else ""
    raise error(
        f"{what} overflows {str(dt).replace('torch.', '')} ({big}which holds at most {torch.finfo(dt).max:.4g}): "
        "store it as bfloat16 or float32 (command line: --task-vector-dtype bf16 or fp32)"
    )


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _plain_open_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` leaves ``path`` with: an existing file keeps its mode, a new one gets
    ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` as an ``OSError`` of the same errno (and subclass) whose filename is ``path``, the file being written."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The renamed file gets the mode a plain ``open()`` would give it (an existing file's mode, else ``0o666`` less the
    umask), not the temporary file's ``0o600``. An ``OSError`` while creating, writing or renaming (disk full, a
    read-only or unwritable location) is re-raised with ``path`` as its filename; ``path`` is then left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _naming(e, path) from e
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _plain_open_mode(path))
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, path) from e
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
        try:
            save_file(out, str(tmp), metadata=dict(metadata or {}))
        except Exception as e:  # safetensors reports I/O errors (a full disk) as its own error type
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from e
    return Path(path)


class _RecordingWriter:
    """A file wrapper for ``torch.save`` that keeps the ``OSError`` of a failed write: torch reports it as an
    unrelated ``RuntimeError`` ("enforce fail ... unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path) -> Path:
    """``torch.save`` atomically; a failed write (a full disk) raises its ``OSError`` naming ``path``."""
    with atomic_path(path, ".pt") as tmp, open(tmp, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise
    return Path(path)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files; a tensor is read (mmap) when indexed."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = []
        self._where: dict[str, int] = {}
        for f in files:
            check_readable(f, "safetensors file")
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file ({_first_line(e)})") from e
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


def check_readable(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)`` if it exists and can be read; else ``FileNotFoundError("<path>: <what> not found")`` or
    ``PermissionError("<path>: <what>: permission denied ...")`` — never a permission problem reported as a missing
    file (``os.path.exists`` and, from Python 3.13, ``Path.exists`` return False for both)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{p}: {what} not found") from None
    except PermissionError:
        raise PermissionError(f"{p}: {what}: permission denied (a directory on the path cannot be searched)") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            os.scandir(p).close()
        else:
            with open(p, "rb"):
                pass
    except PermissionError:
        raise PermissionError(f"{p}: {what}: permission denied (cannot be read)") from None
    return p


def existing(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)``, or ``FileNotFoundError("<path>: <what> not found")`` when nothing is there
    (``PermissionError`` naming it when it cannot be read: :func:`check_readable`)."""
    return check_readable(path, what)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> None:
    """Raise ``ValueError`` when ``output`` would replace one of ``inputs``: the same path once resolved (symlinks,
    ``..``), the same inode (a hard link), or a file inside an input directory (a sharded checkpoint)."""
    out = Path(output)
    for inp in inputs:
        src = Path(inp)
        if _same_file(out, src):
            raise ValueError(f"{out}: the {what} is the input {src}; writing it would destroy that input (choose "
                             "another output path)")
        if src.is_dir():
            try:
                inside = out.resolve().is_relative_to(src.resolve())
            except OSError:
                inside = False
            if inside:
                raise ValueError(f"{out}: the {what} is inside the input directory {src}; writing it would change "
                                 "that input (choose another output path)")


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
    try:
        check_readable(p, "checkpoint")  # a permission problem is a PermissionError, not "no such file"
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file or directory") from None
    if p.is_dir():
        index = sorted(p.glob("*.safetensors.index.json"))
        if index:
            files = _index_shards(index[0])
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
        return LazyStateDict([p])
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        if not _holds_pickled_objects(p, e):  # an empty, truncated or corrupt file
            raise CheckpointError(f"{p}: not a readable torch checkpoint ({_load_error_reason(e)})") from e
        from .safe_pickle import RefusedPickle, load_official

        try:
            return load_official(p).state_dict
        except RefusedPickle as refused:
            if not trust_pickle:
                why = str(refused).removeprefix(f"{p}: ")
                raise CheckpointError(f"{p}: cannot be loaded as a plain state dict ({why}): {_PICKLE_HINT}") from e
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"{p}: the pickled object cannot be loaded ({_load_error_reason(e2)})") from e2
    return _as_state_dict(obj, p)


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names (each checked to exist), or a ``CheckpointError`` naming
    the index file or the missing shard."""
    try:
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(wm.values())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index file ({e})") from None
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a safetensors index file (expected a 'weight_map' of key -> shard "
                              "file)") from None
    if not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{index}: the 'weight_map' must map keys to shard file names")
    files = sorted(index.parent / n for n in names)
    for f in files:
        try:
            check_readable(f, f"shard named by {index.name}")
        except FileNotFoundError:
            raise CheckpointError(f"{index}: names the shard {f.name}, which is not in {index.parent}") from None
    return files


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _holds_pickled_objects(p: Path, e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` failed on ``p`` because the pickle names globals (classes,
    functions: a whole pickled object), not because the file is empty or corrupt. Read from the archive's pickle
    opcodes, executing nothing (``get_unsafe_globals_in_checkpoint``); for a file that is no zip archive, from torch's
    message."""
    get = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if get is not None and zipfile.is_zipfile(p):
        try:
            return bool(get(p))
        except Exception:  # a damaged archive or pickle stream
            return False
    msg = str(e)
    return "Unsupported global" in msg or "GLOBAL " in msg


def _load_error_reason(e: BaseException) -> str:
    """A short reason for a failed ``torch.load``: what the file's bytes are, not torch's advice text."""
    if isinstance(e, EOFError):
        return "the file is empty or truncated"
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        detail = msg.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"corrupt pickle data: {detail[0]}" if detail else "corrupt pickle data"
    if "PytorchStreamReader" in msg:
        return f"corrupt or truncated zip archive: {_first_line(e).split(': ', 1)[-1].split('.')[0]}"
    return f"{type(e).__name__}: {_first_line(e)[:160]}"


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
