"""LoRA adapter files as task vectors: PEFT adapter directories and plain mappings, read without PEFT and matched
to a model's parameter names.

Task k's adapter on a linear layer with pretrained ``W0 [out, in]`` is ``A_k [r_k, in]``, ``B_k [out, r_k]`` and a
scale ``s_k`` (``lora_alpha / r``; ``lora_alpha / sqrt(r)`` with rsLoRA); its task vector is ``s_k B_k A_k``. What
else an adapter holds (PEFT's ``modules_to_save``, trained biases) are full fine-tuned values.

PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin`` read
weights-only) are read with safetensors; PEFT itself is not imported. Keys are matched to the model's parameter
names after removing PEFT's ``base_model.model.`` (and ``.base_layer``); the remaining prefix difference (e.g. the
``lm.`` of :class:`adamerge_fast.models.hf.CausalLMForEntropy`) is inferred once per adapter, and a key that
matches nothing, or an adapter whose shapes do not fit, is a one-line :class:`~adamerge_fast.io.CheckpointError`.

How the merged model runs on adapters without densifying them: :mod:`adamerge_fast.merging.lora`. For data-free
merges of checkpoint files, :class:`AdapterCheckpoint` presents an adapter over a pretrained state dict as the
fine-tuned checkpoint it stands for (``W0 + s B A``, read one tensor at a time), with its exact task vectors.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .io import CheckpointError, LazyStateDict, PrefixView, load_state_dict, shape_dtype

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_EA, _EB = ".lora_embedding_A", ".lora_embedding_B"


@dataclass
class LoraModule:
    """One module's low-rank update ``scale * B @ A`` in the linear layout (``A [r, in]``, ``B [out, r]``).

    ``transposed``: the parameter it updates is stored ``[in, out]`` (GPT-2's ``Conv1D``, PEFT's
    ``fan_in_fan_out``; an embedding's ``[num_embeddings, dim]`` with ``in = num_embeddings``), so its task vector
    is ``(scale * B @ A).T``. ``None``: not known yet (decided from the module type when matched to a model).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool | None = None
    key: str = ""  # where it was read (named in errors)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense task vector ``scale * B @ A`` (transposed when the parameter is stored ``[in, out]``)."""
        d = torch.mm(self.b.to(dtype), self.a.to(dtype)).mul_(self.scale)
        return d.t() if self.transposed else d


@dataclass
class LoraAdapter:
    """One task's adapter: low-rank modules and full-value parameters, keyed by the names the adapter uses
    (module paths for ``lora``, parameter names for ``dense``), before they are matched to a model.

    ``dense``: fine-tuned *values* (PEFT's ``modules_to_save`` and trained biases); the task vector is
    ``value - pretrained``. ``source`` names the adapter in errors.
    """

    lora: dict[str, LoraModule]
    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    source: str = "LoRA adapter"
    config: dict[str, Any] = field(default_factory=dict)


def is_adapter_dir(path) -> bool:
    """True for a directory holding a PEFT ``adapter_config.json``."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / CONFIG_FILE).is_file()


def _is_lora_mapping(src) -> bool:
    if not isinstance(src, Mapping) or isinstance(src, (LazyStateDict, PrefixView)) or not src:
        return False
    return isinstance(next(iter(src.values())), (tuple, list))


def is_lora_source(src) -> bool:
    """An adapter: a :class:`LoraAdapter`, a PEFT adapter directory, or a mapping ``{name: (A, B, scale)}``."""
    return isinstance(src, LoraAdapter) or is_adapter_dir(src) or _is_lora_mapping(src)


def _pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys: the first pattern ``p`` with
    ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def _targets(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT's ``target_modules`` of ``config`` selects ``module`` (a regex string: full match; a list: the
    name or its last components; ``"all-linear"`` or none given: anything)."""
    t = config.get("target_modules")
    if t is None or t == "all-linear":
        return True
    if isinstance(t, str):
        return re.fullmatch(t, module) is not None
    return any(module == x or module.endswith("." + x) for x in t)


def read_peft_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (no PEFT import): ``r``, ``lora_alpha``, ``use_rslora``,
    ``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``, ``target_modules`` and ``modules_to_save`` from
    ``adapter_config.json``, the tensors from ``adapter_model.safetensors`` (lazily) or ``adapter_model.bin``
    (weights-only). Unsupported variants (DoRA, ``lora_bias``, other PEFT methods, convolution LoRA, trainable
    tokens) raise a one-line :class:`CheckpointError`."""
    p = Path(path)
    try:
        cfg = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: not a readable adapter config ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p / CONFIG_FILE}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CheckpointError(f"{p}: a {kind} adapter; only LoRA adapters are supported")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("target_parameters", "target_parameters")):
        if cfg.get(flag):
            raise CheckpointError(f"{p}: {what} adapters are not supported (adapter_config.json sets {flag})")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise CheckpointError(f"{p / CONFIG_FILE}: missing 'r' or 'lora_alpha'")
    weights = next((p / f for f in WEIGHT_FILES if (p / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{p}: no {' or '.join(WEIGHT_FILES)} beside adapter_config.json")
    sd = load_state_dict(weights)
    pairs: dict[str, dict[str, Any]] = {}
    dense: dict[str, str] = {}
    for key in sd.keys():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        name = name.replace(".base_layer.", ".")
        for suffix, part, emb in ((_A, "a", False), (_B, "b", False), (_EA, "a", True), (_EB, "b", True)):
            if name.endswith(suffix):
                entry = pairs.setdefault(name[: -len(suffix)], {"emb": emb})
                entry[part] = key
                break
        else:
            if "lora_" in name or "trainable_tokens" in name:
                raise CheckpointError(f"{weights}: key {key!r} is not a LoRA A/B matrix or a full parameter (DoRA, "
                                      "lora_bias and trainable-token adapters are not supported)")  # fmt: skip
            dense[name] = key
    lora = {}
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for module, e in pairs.items():
        if "a" not in e or "b" not in e:
            have = e.get("a") or e.get("b")
            raise CheckpointError(f"{weights}: key {have!r} has no matching lora_{'B' if 'a' in e else 'A'} tensor")
        a, b = sd[e["a"]], sd[e["b"]]
        if a.dim() != 2 or b.dim() != 2:
            raise CheckpointError(f"{weights}: key {e['a']!r} has shape {list(a.shape)}: LoRA on convolutions is "
                                  "not supported (only linear, Conv1D and embedding layers)")  # fmt: skip
        r = a.shape[0]  # (PEFT's embedding LoRA: A [r, num_embeddings], B [dim, r], delta (B @ A).T: transposed)
        if b.shape[1] != r:
            raise CheckpointError(f"{weights}: {e['a']!r} has rank {r} but {e['b']!r} has shape {list(b.shape)}")
        rk = _pattern_key(rank_pat, module)
        r_cfg = int(rank_pat[rk] if rk is not None else cfg["r"])
        if r_cfg != r:
            raise CheckpointError(f"{weights}: key {e['a']!r} has rank {r}, adapter_config.json says r={r_cfg}")
        ak = _pattern_key(alpha_pat, module)
        alpha = float(alpha_pat[ak] if ak is not None else cfg["lora_alpha"])
        if not _targets(cfg, module):
            raise CheckpointError(f"{weights}: module {module!r} has LoRA weights but is not among target_modules "
                                  f"{cfg.get('target_modules')!r} of adapter_config.json")  # fmt: skip
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transposed = True if e["emb"] else (bool(cfg.get("fan_in_fan_out")) or None)
        lora[module] = LoraModule(a, b, scale, transposed, key=e["a"])
    dense_view = {name: sd[key] for name, key in dense.items()}
    return LoraAdapter(lora, dense_view, str(p), cfg)


def adapter_from_mapping(m: Mapping[str, Any], source: str = "LoRA mapping") -> LoraAdapter:
    """``{name: (A, B, scale)}`` or ``{name: (A, B, scale, fan_in_fan_out)}`` -> :class:`LoraAdapter`. ``name`` is the
    updated parameter's name (``"...q_proj.weight"``) or its module's path; ``A [r, in]``, ``B [out, r]`` in the
    linear layout; ``fan_in_fan_out`` (default: from the module's type) when the parameter is stored ``[in, out]``."""
    lora = {}
    for name, v in m.items():
        if not isinstance(v, (tuple, list)) or len(v) not in (3, 4):
            raise CheckpointError(f"{source}: entry {name!r} must be (A, B, scale) or (A, B, scale, fan_in_fan_out), "
                                  f"got {type(v).__name__}")  # fmt: skip
        a, b, s = v[0], v[1], v[2]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
            raise CheckpointError(f"{source}: entry {name!r}: A and B must be 2-D tensors")
        if b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{source}: entry {name!r}: A has rank {a.shape[0]} but B has shape {list(b.shape)}")
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        lora[module] = LoraModule(a, b, float(s), (bool(v[3]) if len(v) == 4 else None), key=name)
    return LoraAdapter(lora, {}, source)


def as_adapter(src, i: int = 0) -> LoraAdapter:
    """A :class:`LoraAdapter` from any of the forms :func:`is_lora_source` accepts."""
    if isinstance(src, LoraAdapter):
        return src
    if is_adapter_dir(src):
        return read_peft_adapter(src)
    if _is_lora_mapping(src):
        return adapter_from_mapping(src, f"LoRA mapping {i}")
    raise TypeError(f"fine-tuned source {i}: expected a LoRA adapter (directory, LoraAdapter or {{name: (A, B, "
                    f"scale)}}), got {type(src).__name__}")  # fmt: skip


# ----------------------------------------------------------------------------------------------- matching
def _key_maps(first: str, names: Iterable[str]) -> list[tuple[str, str]]:
    """Candidate ``(strip, add)`` prefix rewrites taking ``first`` onto a name of ``names``: drop the first i dotted
    components of ``first`` (fewest first; the last two, a module's and its parameter's name, always stay), put the
    part of the matched name before the rest in front."""
    parts = first.split(".")
    out: list[tuple[str, str]] = []
    for i in range(max(1, len(parts) - 1)):
        rest = ".".join(parts[i:])
        strip = ".".join(parts[:i]) + ("." if i else "")
        adds = sorted({n[: len(n) - len(rest)] for n in names
                       if n.endswith(rest) and (len(n) == len(rest) or n[len(n) - len(rest) - 1] == ".")}, key=len)
        out += [(strip, add) for add in adds]  # fmt: skip
    return out


@dataclass
class ResolvedAdapter:
    """An adapter matched to a model: ``lora`` and ``dense`` keyed by the model's parameter names."""

    lora: dict[str, LoraModule]
    dense: dict[str, torch.Tensor]
    source: str


def resolve(adapter: LoraAdapter, shapes: Mapping[str, tuple], transposed: Mapping[str, bool] | None = None
            ) -> ResolvedAdapter:  # fmt: skip
    """Match ``adapter`` to the parameters ``shapes`` (``{name: shape}``) of a model: every LoRA module to its
    ``weight`` and every dense tensor to a parameter, through one prefix rewrite inferred for the whole adapter.
    ``transposed``: ``{name: stored [in, out]}`` from the module types (:func:`transposed_parameters`); where a
    parameter is not in it (a state dict), the adapter's own flag (``fan_in_fan_out``) decides. Raises a one-line
    :class:`CheckpointError` for a key that matches nothing or a shape that does not fit."""
    transposed = transposed or {}
    keys = [m + ".weight" for m in adapter.lora] + list(adapter.dense)
    if not keys:
        raise CheckpointError(f"{adapter.source}: the adapter holds no tensors")
    names = list(shapes)
    best, best_hits = None, -1
    for strip, add in _key_maps(keys[0], names):
        hits = sum(k.startswith(strip) and add + k[len(strip):] in shapes for k in keys)
        if hits > best_hits:
            best, best_hits = (strip, add), hits
        if hits == len(keys):
            break

    def target(k: str) -> str | None:
        if best is None or not k.startswith(best[0]):
            return None
        t = best[1] + k[len(best[0]):]
        return t if t in shapes else None

    for k in keys:
        if target(k) is None:
            where = f" (as {best[1] + k[len(best[0]):]!r})" if best is not None and k.startswith(best[0]) else ""
            raise CheckpointError(f"{adapter.source}: adapter entry {k!r}{where} matches no parameter of the "
                                  "pretrained model (an adapter of another model?)")  # fmt: skip
    lora: dict[str, LoraModule] = {}
    for module, m in adapter.lora.items():
        name = target(module + ".weight")
        shape = tuple(shapes[name])
        t = transposed.get(name)  # the module's layout when known, else the adapter's flag
        t = t if t is not None else bool(m.transposed)
        want = (shape[1], shape[0]) if t and len(shape) == 2 else shape  # [out, in] of the linear layout
        if len(shape) != 2 or (m.b.shape[0], m.a.shape[1]) != want:
            raise CheckpointError(
                f"{adapter.source}: {m.key or module!r}: lora_A {list(m.a.shape)} / lora_B {list(m.b.shape)} do not "
                f"fit parameter {name!r} of shape {list(shape)}"
                + (" (stored [in, out]: fan_in_fan_out)" if t else "")
            )  # fmt: skip
        lora[name] = LoraModule(m.a, m.b, m.scale, t, m.key or module)
    dense: dict[str, torch.Tensor] = {}
    for k in adapter.dense:
        name = target(k)
        got = tuple(shape_dtype(adapter.dense, k)[0])
        if got != tuple(shapes[name]):
            raise CheckpointError(f"{adapter.source}: {k!r} has shape {list(got)}, the pretrained parameter "
                                  f"{name!r} has {list(shapes[name])}")  # fmt: skip
        if name in lora:
            raise CheckpointError(f"{adapter.source}: parameter {name!r} has both LoRA weights and a full value")
        dense[name] = adapter.dense[k]
    return ResolvedAdapter(lora, dense, adapter.source)


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (transformers): a linear layer with its weight stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def transposed_parameters(model: nn.Module) -> dict[str, bool]:
    """``{weight name: stored [in, out]}`` for the layers of ``model`` adapters update: ``True`` for ``Conv1D`` and
    ``nn.Embedding`` (an adapter's ``A [r, in]``, ``B [out, r]`` update them as ``(s B A).T``), ``False`` for
    ``nn.Linear``. The module's layout wins over an adapter's ``fan_in_fan_out`` flag, as in PEFT."""
    return {(path + "." if path else "") + "weight": is_conv1d(m) or isinstance(m, nn.Embedding)
            for path, m in model.named_modules() if is_conv1d(m) or isinstance(m, (nn.Embedding, nn.Linear))}


def check_adapter(src, model: nn.Module, i: int = 0) -> LoraAdapter:
    """Read adapter source ``src`` (any form :func:`is_lora_source` accepts) and check that it fits ``model``
    (:func:`resolve`; raises a one-line :class:`CheckpointError`); returns the adapter."""
    adapter = as_adapter(src, i)
    resolve(adapter, {n: tuple(p.shape) for n, p in model.named_parameters()}, transposed_parameters(model))
    return adapter


class AdapterCheckpoint(Mapping[str, torch.Tensor]):
    """A lazy, read-only view of ``base`` (a pretrained state dict) with ``adapter`` applied: the fine-tuned
    checkpoint the adapter stands for. ``view[k]`` is ``base[k] + s B A`` (transposed for ``fan_in_fan_out``), the
    adapter's full value (``modules_to_save``, biases) or ``base[k]``, in ``base[k]``'s dtype, computed when read;
    :meth:`task_vector` is the exact difference (fp32), which :func:`adamerge_fast.merging.task_vectors` uses
    instead of ``view[k] - base[k]`` (that would round ``W0 + s B A`` to a 16-bit base's precision first)."""

    def __init__(self, base: Mapping[str, torch.Tensor], adapter: LoraAdapter):
        self.base, self.source = base, adapter.source
        shapes = {k: shape_dtype(base, k)[0] for k in base.keys()}
        res = resolve(adapter, shapes)
        self._lora, self._dense = res.lora, res.dense

    def __getitem__(self, key: str) -> torch.Tensor:
        b = self.base[key]
        if key in self._lora:
            return (b.float() + self._lora[key].delta()).to(b.dtype)
        if key in self._dense:
            return self._dense[key].to(b.dtype)
        return b

    def __contains__(self, key) -> bool:
        return key in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.keys())

    def __len__(self) -> int:
        return len(self.base)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return shape_dtype(self.base, key)

    def task_vector(self, key: str) -> torch.Tensor:
        """``view[key] - base[key]`` before any rounding, in fp32 (fp64 for an fp64 base)."""
        b = self.base[key]
        acc = torch.float64 if b.dtype == torch.float64 else torch.float32
        if key in self._lora:
            return self._lora[key].delta(acc)
        if key in self._dense:
            return self._dense[key].to(acc) - b.to(acc)
        return torch.zeros(b.shape, dtype=acc)


__all__ = [
    "AdapterCheckpoint",
    "LoraAdapter",
    "LoraModule",
    "ResolvedAdapter",
    "adapter_from_mapping",
    "as_adapter",
    "check_adapter",
    "is_adapter_dir",
    "is_conv1d",
    "is_lora_source",
    "read_peft_adapter",
    "resolve",
    "transposed_parameters",
]
