"""LoRA adapters as task vectors: read them (PEFT adapter directories, plain mappings), match them to a pretrained
model, and run the merged model on them without ever densifying a LoRA layer.

Task k's adapter on a linear layer with pretrained ``W0 [out, in]`` is ``A_k [r_k, in]``, ``B_k [out, r_k]`` and a
scale ``s_k`` (``lora_alpha / r``; ``lora_alpha / sqrt(r)`` with rsLoRA); its task vector is ``s_k B_k A_k``. A
layer whose weight only has LoRA task vectors becomes :class:`MergedLoRALinear`, which calls
:func:`adamerge_fast.ops.merged_lora_linear` on ``W0`` and the concatenated adapters of the tasks that have one
there. What else an adapter holds (PEFT's ``modules_to_save``, trained biases, norms) is a dense task vector
``value - base`` and takes the dense path. A parameter that a task does not touch has a zero task vector for that
task, and nothing is stored for it: each parameter keeps the list of tasks that touch it, and the coefficient
columns of those tasks are gathered (``coefs[row, tasks]``) where it is merged.

PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin`` read
weights-only) are read with safetensors; PEFT itself is not imported. Keys are matched to the pretrained model's
parameter names after removing PEFT's ``base_model.model.`` (and ``.base_layer``); the remaining prefix difference
(e.g. the ``lm.`` of :class:`adamerge_fast.models.hf.CausalLMForEntropy`) is inferred once per adapter, and a key
that matches nothing, or an adapter whose shapes do not fit, is a one-line :class:`~adamerge_fast.io.CheckpointError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import ops
from ..io import CheckpointError, LazyStateDict, PrefixView, check_fits, load_state_dict, shape_dtype
from .task_vectors import as_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_EA, _EB = ".lora_embedding_A", ".lora_embedding_B"


# --------------------------------------------------------------------------------------------------- adapters
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
    ``transposed``: parameters stored ``[in, out]`` (from the module types; a module's own ``transposed`` flag
    wins). Raises a one-line :class:`CheckpointError` for a key that matches nothing or a shape that does not
    fit."""
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
        t = m.transposed if m.transposed is not None else bool(transposed.get(name, False))
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


# -------------------------------------------------------------------------------------- the model's view
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (transformers): a linear layer with its weight stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def layer_layouts(model: nn.Module) -> tuple[dict[str, bool], set[str]]:
    """``(transposed, rewritable)``: the parameters stored ``[in, out]`` (``Conv1D`` and ``nn.Embedding`` weights,
    for matching adapters), and the weights whose module can run as :class:`MergedLoRALinear` (``nn.Linear`` or
    ``Conv1D`` with untied parameters, not inside an ``nn.MultiheadAttention``, which reads them directly)."""
    transposed: dict[str, bool] = {}
    rewritable: set[str] = set()
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    mha = {path for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for path, m in model.named_modules():
        pre = path + "." if path else ""
        if is_conv1d(m) or isinstance(m, nn.Embedding):
            transposed[pre + "weight"] = True
        if (type(m) in _LINEARS or is_conv1d(m)) and path.rpartition(".")[0] not in mha:
            params = [p for p in (m.weight, getattr(m, "bias", None)) if p is not None]
            if all(counts.get(id(p), 0) == 1 for p in params):
                rewritable.add(pre + "weight")
    return transposed, rewritable


@dataclass
class LoraStack:
    """The LoRA task vectors of one weight: the adapters of the tasks ``tasks`` concatenated along the rank."""

    tasks: list[int]
    a: torch.Tensor  # [R, in]
    b: torch.Tensor  # [out, R]
    ranks: list[int]
    scale: torch.Tensor  # [len(tasks)] fp32
    transposed: bool


@dataclass
class LoraTaskVectors:
    """What :class:`~adamerge_fast.merging.AdaMergedModel` holds for LoRA sources: ``lora`` (weights run by
    :class:`MergedLoRALinear`), ``dense`` stacked task vectors ``[len(tasks), *shape]`` with ``dense_tasks``
    (the tasks they belong to); a parameter in neither is untouched by every task."""

    num_tasks: int
    lora: dict[str, LoraStack]
    dense: dict[str, torch.Tensor]
    dense_tasks: dict[str, list[int]]


def collect(
    pretrained: nn.Module,
    params: Mapping[str, torch.Tensor],
    sources: Sequence[Any],
    *,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> LoraTaskVectors:
    """The task vectors of ``sources`` (one per task: a LoRA adapter in any form :func:`is_lora_source` accepts, or
    a full fine-tuned model / state dict / checkpoint, whose every parameter is a dense task vector) against the
    floating parameters ``params`` (``{name: tensor}``) of ``pretrained``. Adapters stay low-rank on the weights
    :func:`layer_layouts` calls rewritable when no task has a dense task vector there; elsewhere they are
    materialized (``s B A``, one tensor at a time). ``dtype``: storage dtype of adapters and task vectors (default:
    their own, the pretrained parameter's for dense ones)."""
    if len(sources) == 0:
        raise ValueError("need at least one fine-tuned model or adapter (got zero tasks)")
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    transposed, rewritable = layer_layouts(pretrained)
    lora_of: dict[str, list[tuple[int, LoraModule]]] = {}
    dense_of: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, src in enumerate(sources):
        if is_lora_source(src):
            res = resolve(as_adapter(src, i), shapes, transposed)
            for n, m in res.lora.items():
                lora_of.setdefault(n, []).append((i, m))
            for n, v in res.dense.items():
                dense_of.setdefault(n, []).append((i, _difference(v, params[n], f"{res.source}: {n!r}")))
        else:  # a full fine-tuned model: every parameter a dense task vector
            sd = as_state_dict(src, trust_pickle=trust_pickle)
            what = src if isinstance(src, (str, os.PathLike)) else f"fine-tuned model {i}"
            check_fits(params, sd, str(what), check_dtype=True, ref_name="the pretrained model")
            for n in params:
                dense_of.setdefault(n, []).append((i, _difference(sd[n], params[n], f"{what}: {n!r}")))
    out = LoraTaskVectors(len(sources), {}, {}, {})
    for n in params:  # named_parameters order
        entries = lora_of.get(n, [])
        dense = dense_of.get(n, [])
        if entries and (dense or n not in rewritable):  # this weight takes the dense path: materialize the adapters
            dense = sorted(dense + [(i, m.delta()) for i, m in entries], key=lambda e: e[0])
            entries = []
        if entries:
            a = torch.cat([m.a.detach().to(dtype or m.a.dtype) for _, m in entries])
            b = torch.cat([m.b.detach().to(dtype or m.b.dtype) for _, m in entries], dim=1)
            device = params[n].device
            out.lora[n] = LoraStack([i for i, _ in entries], a.to(device), b.to(device), [m.rank for _, m in entries],
                                    torch.tensor([m.scale for _, m in entries], dtype=torch.float32, device=device),
                                    bool(entries[0][1].transposed))  # fmt: skip
        if dense:
            st = torch.stack([d.to(dtype or params[n].dtype) for _, d in dense]).to(params[n].device)
            out.dense[n], out.dense_tasks[n] = st.contiguous(), [i for i, _ in dense]
    return out


def _difference(value: torch.Tensor, base: torch.Tensor, what: str) -> torch.Tensor:
    """``value - base`` in fp32 (fp64 for fp64), checked finite."""
    acc = torch.float64 if torch.float64 in (value.dtype, base.dtype) else torch.float32
    d = value.detach().to(base.device, acc) - base.detach().to(acc)
    if not torch.isfinite(d).all():
        raise CheckpointError(f"{what}: task vector has NaN or inf values")
    return d


# -------------------------------------------------------------------------------------------- the layer
class MergedLoRALinear(nn.Module):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight is ``W0 + sum_k c[w_row, tasks[k]] s_k B_k A_k`` and whose
    bias is ``b0 + sum_j c[b_row, b_tasks[j]] tau_b[j]``; runs :func:`adamerge_fast.ops.merged_lora_linear`."""

    def __init__(self, ctx, w0: torch.Tensor, stack: LoraStack, w_row: int, b0=None, tau_b=None, b_tasks=None,
                 b_row=None, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self._ctx = ctx
        self.transposed = stack.transposed
        self.register_buffer("w0", w0.t() if stack.transposed else w0, persistent=False)  # [out, in] (a view)
        self.register_buffer("lora_a", stack.a, persistent=False)  # [R, in]
        self.register_buffer("lora_b", stack.b, persistent=False)  # [out, R]
        self.register_buffer("scale", stack.scale, persistent=False)  # [k]
        self.register_buffer("w_tasks", torch.tensor(stack.tasks, dtype=torch.long, device=w0.device),
                             persistent=False)  # fmt: skip
        self.register_buffer("b0", b0, persistent=False)  # [out] | None
        self.register_buffer("tau_b", tau_b, persistent=False)  # [kb, out] | None
        tb = None if tau_b is None else torch.tensor(b_tasks, dtype=torch.long, device=w0.device)
        self.register_buffer("b_tasks", tb, persistent=False)
        self.ranks, self.w_row, self.b_row, self.backend = list(stack.ranks), w_row, b_row, backend

    def forward(self, x):
        c = self._ctx.get()
        cw = c[self.w_row].index_select(0, self.w_tasks)
        cb = None if self.tau_b is None else c[self.b_row].index_select(0, self.b_tasks)
        return ops.merged_lora_linear(x, self.w0, self.lora_a, self.lora_b, self.ranks, cw, self.scale, self.b0,
                                      self.tau_b, cb, backend=self.backend)  # fmt: skip

    @torch.no_grad()
    def merged_weight(self, coefs: torch.Tensor) -> torch.Tensor:
        """``W0 + sum_k c_k s_k B_k A_k`` in the original layout and dtype (materialized: the one ``[out, in]``
        tensor, at the end)."""
        c = coefs[self.w_row].index_select(0, self.w_tasks).float() * self.scale.float()
        rows = torch.repeat_interleave(c, torch.tensor(self.ranks, device=c.device), output_size=sum(self.ranks))
        w = torch.addmm(self.w0.float(), self.lora_b.float() * rows, self.lora_a.float())
        return (w.t() if self.transposed else w).to(self.w0.dtype).contiguous()

    @torch.no_grad()
    def merged_bias(self, coefs: torch.Tensor) -> torch.Tensor | None:
        if self.b0 is None or self.tau_b is None:
            return self.b0
        return ops.merge(self.b0, self.tau_b, coefs[self.b_row].index_select(0, self.b_tasks), backend=self.backend)

    def extra_repr(self):
        return (f"in={self.w0.shape[1]}, out={self.w0.shape[0]}, ranks={self.ranks}, "
                f"tasks={self.w_tasks.tolist()}, row={self.w_row}")  # fmt: skip


def merged_lora_modules(model, skel: nn.Module, store: LoraTaskVectors) -> list[tuple[str, MergedLoRALinear]]:
    """``[(path, MergedLoRALinear)]`` for every module of ``skel`` whose weight has LoRA task vectors in ``store``
    (the bias merged when some task has a dense task vector for it). ``model``: the
    :class:`~adamerge_fast.merging.AdaMergedModel` being built (its coefficient context, rows, backend)."""
    out = []
    for path, m in skel.named_modules():
        pre = path + "." if path else ""
        stack = store.lora.get(pre + "weight")
        if stack is None:
            continue
        bias = getattr(m, "bias", None)
        bname = pre + "bias"
        tau_b = store.dense.get(bname) if bias is not None else None
        out.append((path, MergedLoRALinear(
            model._ctx, m.weight.detach(), stack, model._coef_row(pre + "weight"),
            None if bias is None else bias.detach(), tau_b, store.dense_tasks.get(bname),
            model._coef_row(bname) if tau_b is not None else None, model.backend,
        )))  # fmt: skip
    return out


def merge_groups(bases, deltas, table: torch.Tensor, groups, backend: str) -> list[torch.Tensor]:
    """``merge_many`` over parameters whose task vectors cover different task subsets: ``groups`` is a list of
    ``(positions, tasks)`` (long tensors); each group is one ``merge_many`` with the coefficient columns
    ``tasks`` of its rows of ``table``."""
    out: list[torch.Tensor | None] = [None] * len(bases)
    for pos, tasks in groups:
        idx = pos.tolist()
        merged = ops.merge_many([bases[i] for i in idx], [deltas[i] for i in idx],
                                table.index_select(0, pos).index_select(1, tasks), backend=backend)  # fmt: skip
        for i, t in zip(idx, merged, strict=True):
            out[i] = t
    return out  # type: ignore[return-value]


def task_groups(names: Sequence[str], tasks_of: Mapping[str, list[int]], device) -> list[tuple]:
    """``[(positions, tasks)]`` as long tensors on ``device``: the positions in ``names`` that share one task
    subset, for :func:`merge_groups`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(tuple(tasks_of[n]), []).append(i)
    return [(torch.tensor(pos, dtype=torch.long, device=device), torch.tensor(t, dtype=torch.long, device=device))
            for t, pos in groups.items()]  # fmt: skip


__all__ = [
    "LoraAdapter",
    "LoraModule",
    "LoraTaskVectors",
    "MergedLoRALinear",
    "as_adapter",
    "adapter_from_mapping",
    "collect",
    "is_adapter_dir",
    "is_lora_source",
    "read_peft_adapter",
    "resolve",
]
