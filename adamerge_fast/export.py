"""Writing merged checkpoints tensor by tensor: one ``.safetensors`` file, or a Hugging Face model directory
(sharded safetensors with ``model.safetensors.index.json``, plus the pretrained directory's config, tokenizer and
generation files), always atomically.

The tensors' names, shapes and dtypes are known before any value is (they are the pretrained checkpoint's), so
:class:`SafetensorsStreamWriter` writes each file's safetensors header first and then every tensor's bytes as it
arrives: nothing but the tensor at hand is held, whatever the shard size. (The safetensors library writes a
file only from a complete dict of tensors; its reader, ``safe_open``, reads these files.)

:class:`CheckpointWriter` plans the shards, writes into a temporary directory (or file) beside the output and
renames it into place at the end; it refuses to replace an existing output without ``overwrite=True`` and never
replaces one of the inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .io import CheckpointError, _naming, _plain_open_mode, _umask

Entry = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype of one output tensor

#: files of a model directory that hold weights (never copied next to merged weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000000"``."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"size {size!r}: expected a number of bytes with an optional unit (KB, MB, GB, MiB, GiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size {size!r}: must be positive")
    return n


def _dtype_code(dtype: torch.dtype) -> str:
    from safetensors.torch import _TYPES  # type: ignore[attr-defined]  # safetensors' own name -> dtype table

    for code, dt in _TYPES.items():
        if dt == dtype:
            return code
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """One safetensors file written in the order of ``entries``: the header up front, then each tensor's bytes
    as :meth:`write` receives it (exactly these names, shapes and dtypes, in this order)."""

    def __init__(self, path: str | os.PathLike, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None):
        if sys.byteorder != "little":  # pragma: no cover
            raise RuntimeError("safetensors stores little-endian data; this writer runs on little-endian hosts only")
        self.path = Path(path)
        self.entries = list(entries)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        for name, shape, dtype in self.entries:
            n = nbytes(shape, dtype)
            header[name] = {"dtype": _dtype_code(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want_name, shape, dtype = self.entries[self._next]
        if name != want_name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise CheckpointError(f"{self.path}: expected tensor {want_name!r} {list(shape)} {dtype} next, got "
                                  f"{name!r} {list(t.shape)} {t.dtype}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            missing = self.entries[self._next][0]
            self._f.close()
            raise CheckpointError(f"{self.path}: closed before tensor {missing!r} was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive groups of ``entries`` of at most ``max_shard_size`` bytes each (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def model_files(src_dir: Path) -> list[Path]:
    """The regular files of a model directory other than weights and hidden files: config, generation config,
    tokenizer, processor, chat template, README."""
    return sorted(p for p in src_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES))


def _same_or_inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside ``b``."""
    return a == b or b in a.parents


def check_output(out: Path, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> None:
    """Refuse an output that is, or contains, one of ``inputs``, and an existing output without ``overwrite``."""
    o = out.resolve()
    for i in inputs:
        ip = Path(i).resolve()
        if _same_or_inside(ip, o):
            raise CheckpointError(f"{out}: the output would replace the input {i}; choose another output path")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass overwrite=True (command line: --overwrite) to replace it")


class CheckpointWriter:
    """Write the tensors of ``entries`` (in that order) to ``out``, atomically.

    ``out`` ending in ``.safetensors``: one file. Otherwise a Hugging Face directory: ``model.safetensors`` or
    shards ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` bytes with
    ``model.safetensors.index.json``, and the files of ``copy_files_from`` (:func:`model_files`: config,
    tokenizer, generation config, ...). Use as a context manager and call :meth:`write` for every entry; the
    result appears at ``out`` only when the block completes (an error removes the temporary output).
    """

    def __init__(self, out: str | os.PathLike, entries: Sequence[Entry], *,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, metadata: Mapping[str, str] | None = None,
                 copy_files_from: str | os.PathLike | None = None, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()):
        self.out = Path(out)
        self.single = self.out.suffix == ".safetensors"
        check_output(self.out, inputs, overwrite)
        self.entries = list(entries)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.copy_from = Path(copy_files_from) if copy_files_from is not None else None
        self.shards = [self.entries] if self.single else plan_shards(self.entries, parse_size(max_shard_size))
        self.total_bytes = sum(nbytes(s, d) for _, s, d in self.entries)
        self._tmp: Path | None = None
        self._writer: SafetensorsStreamWriter | None = None
        self._shard = -1
        self._left = 0

    def _shard_name(self, i: int) -> str:
        n = len(self.shards)
        return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def __enter__(self) -> "CheckpointWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.single:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
            os.close(fd)
        else:
            tmp = tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        self._tmp = Path(tmp)
        return self

    def _open_next(self) -> None:
        self._shard += 1
        path = self._tmp if self.single else self._tmp / self._shard_name(self._shard)
        self._writer = SafetensorsStreamWriter(path, self.shards[self._shard], self.metadata)
        self._left = len(self.shards[self._shard])

    def write(self, name: str, t: torch.Tensor) -> None:
        """The next tensor (``entries`` order)."""
        if self._writer is None or self._left == 0:
            if self._writer is not None:
                self._writer.close()
            if self._shard + 1 >= len(self.shards):
                raise CheckpointError(f"{self.out}: tensor {name!r} is not in the planned output")
            self._open_next()
        self._writer.write(name, t)
        self._left -= 1

    def _finish(self) -> None:
        if self._writer is None and self.entries:
            raise CheckpointError(f"{self.out}: no tensor was written")
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self.shards) - 1 or self._left:
            raise CheckpointError(f"{self.out}: {sum(len(s) for s in self.shards[self._shard + 1:]) + self._left} "
                                  "planned tensors were not written")
        if not self.single:
            if len(self.shards) > 1:
                weight_map = {name: self._shard_name(i) for i, s in enumerate(self.shards) for name, _, _ in s}
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            if self.copy_from is not None:
                for f in model_files(self.copy_from):
                    shutil.copy2(f, self._tmp / f.name)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
                self._replace()
            elif issubclass(exc_type, OSError):  # disk full, a read-only location: name the output
                raise _naming(exc, self.out) from exc
        except OSError as e:
            if e.filename == str(self.out):
                raise
            raise _naming(e, self.out) from e
        finally:
            if self._writer is not None:
                self._writer.abort()
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp) if self._tmp.is_dir() else self._tmp.unlink()

    def _replace(self) -> None:
        """Rename the temporary output onto ``out`` (an existing one, allowed by ``overwrite``, is moved aside
        first and deleted after)."""
        mode = _plain_open_mode(self.out) if self.single else 0o666 & ~_umask()
        if self.single:
            os.chmod(self._tmp, mode)
        else:  # what mkdir and open() would have given them, not the temporary directory's 0o700
            for f in self._tmp.iterdir():
                os.chmod(f, mode)
            os.chmod(self._tmp, 0o777 & ~_umask())
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
            os.replace(self.out, old / "x")
        os.replace(self._tmp, self.out)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old)


def write_checkpoint(tensors: Mapping[str, torch.Tensor], out: str | os.PathLike, **kw) -> Path:
    """Write an in-memory state dict with :class:`CheckpointWriter` (same options); returns ``out``."""
    entries = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    with CheckpointWriter(out, entries, **kw) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(out)


# ------------------------------------------------------------------------------------------ AdaMerging
def export_merged(model, export, out: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  overwrite: bool = False) -> Path:
    """Write the merged backbone of ``model`` (an :class:`~adamerge_fast.merging.AdaMergedModel`) as the model
    the user came with, described by ``export`` (:class:`~adamerge_fast.models.spec.ExportSpec`): the original
    full state dict with every merged parameter in place (its key from ``export.key``, its dtype, rounded once),
    the other tensors copied, to a Hugging Face directory (``export.files_from`` set) or one ``.safetensors``
    file. One merged tensor is held at a time."""
    from .io import shape_dtype, streaming

    src = streaming(export.source())
    canon = {export.key(alias): model.param_names[row] for alias, row in model._aliases.items()}
    unmapped = [export.key(n) for n in model.param_names if export.key(n) not in src]
    if unmapped:
        raise CheckpointError(f"{out}: merged parameter {unmapped[0]!r} has no entry in the original checkpoint "
                              f"({len(unmapped)} of {len(model.param_names)} parameters do not map)")
    entries = [(k, *shape_dtype(src, k)) for k in src.keys()]
    with CheckpointWriter(out, entries, max_shard_size=max_shard_size, copy_files_from=export.files_from,
                          overwrite=overwrite, metadata={"producer": "adamerge_fast"}) as w:
        lora = {} if getattr(model, "_lora", None) is None else model._lora_merged_parameters(
            model.coefficients.detach())
        for k, _, dtype in entries:
            if k not in canon:
                w.write(k, src[k])
            elif canon[k] in lora:
                w.write(k, lora[canon[k]].to(dtype))
            else:
                w.write(k, model.merged_parameter(canon[k], dtype))
    return Path(out)


def mergekit_config(model, export, pretrained: str | os.PathLike, finetuned: Sequence[str | os.PathLike],
                    out_dtype: str | None = None) -> dict:
    """A mergekit configuration that re-applies ``model``'s learned coefficients: ``task_arithmetic`` from
    ``pretrained`` with one ``weight`` per fine-tuned model and tensor (a filter per tensor name, longest first so
    that each tensor's own name is the first filter contained in it; one scalar per model for task-wise
    coefficients), ``normalize: false``, ``lambda: 1``, computed in float32 (``dtype: float32``). Valid when the
    task vectors are the plain ``theta_k - theta_0`` (not TIES-split)."""
    coefs = model.coefficients.detach().double().cpu()
    models = []
    for k, ft in enumerate(finetuned):
        if model.granularity == "task":
            weight: object = float(coefs[0, k])
        else:
            rows = sorted(((export.key(n), float(coefs[i, k])) for i, n in enumerate(model.param_names)),
                          key=lambda kv: (-len(kv[0]), kv[0]))
            weight = [{"filter": name, "value": v} for name, v in rows]
        models.append({"model": str(Path(ft).resolve()), "parameters": {"weight": weight}})
    cfg = {"merge_method": "task_arithmetic", "base_model": str(Path(pretrained).resolve()), "models": models,
           "parameters": {"normalize": False, "lambda": 1.0}, "dtype": "float32"}
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


def write_mergekit_config(path: str | os.PathLike, cfg: Mapping) -> Path:
    """Write ``cfg`` as YAML (JSON is YAML: mergekit's ``yaml.safe_load`` reads it), atomically."""
    from .io import write_text_atomic

    return write_text_atomic(path, json.dumps(cfg, indent=2) + "\n")
