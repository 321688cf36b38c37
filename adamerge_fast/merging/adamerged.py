"""``AdaMergedModel``: a drop-in ``nn.Module`` running ``theta_0 + sum_k lambda_k tau_k`` with learnable lambda.

How the forward runs (DESIGN.md, "the data path"):

- ``nn.Linear`` layers become :class:`MergedLinear` and call :func:`adamerge_fast.ops.merged_linear` on
  ``W0`` and the stacked task vectors — no merged weight is kept, and on fused backends none is ever built.
- ``nn.MultiheadAttention`` (open_clip's attention) becomes :class:`MergedMultiheadAttention`: the packed
  in-projection and the out-projection go through ``merged_linear``, attention through
  ``scaled_dot_product_attention``.
- every other parameter (LayerNorm, biases of other modules, embeddings, convolutions, ...) is merged by one
  :func:`adamerge_fast.ops.merge_many` call per forward and fed to the module through
  ``torch.func.functional_call`` — so any module works.

The coefficient table matches the official AdaMerging code: one row per parameter tensor in
``pretrained.named_parameters()`` order (one row in total for task-wise), one column per task.
``raw_coefficients`` is the trainable parameter; ``coefficients`` is it clamped to ``clamp``; the
pretrained model's coefficient is fixed at 1.

Options for drop-in wrappers (:mod:`adamerge_fast.compat`), all off by default: ``coefficient_layout`` stores
``raw_coefficients`` as ``[rows, K]`` (default), ``[K, rows]`` (FusionBench's layer-wise ``merge_weight``) or
``[K]`` (task-wise only; FusionBench's task-wise ``merge_weight``); ``normalize="softmax"`` turns each row of the
clamped table into weights over the tasks that sum to 1 (FusionBench's ``normalized_merging_weights``);
``parameter_filter`` picks the parameters that get a row (``"requires_grad"``: FusionBench's rule) — the others stay
at their pretrained values.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import math
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops
from ..io import CheckpointError, check_finite, save_safetensors
from ..ops.quant import FORMATS, QuantizedTensor
from . import lora
from . import quantized as _quantized
from .build import DenseRows, FinetunedSource, build_task_vectors
from .static import check_ties_k, ties_split
from .task_vectors import check_task_vectors


class _CoefContext:
    """Holds the clamped coefficient table during one forward; read by the merged layers."""

    coefs: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.coefs is None:
            raise RuntimeError("merged layers run only inside AdaMergedModel.forward")
        return self.coefs


class MergedLinear(nn.Module):
    """``nn.Linear`` whose weight is ``W0 + sum_k c[w_row, k] tau_w[k]`` (and bias likewise)."""

    def __init__(self, ctx, w0, tau_w, w_row, b0=None, tau_b=None, b_row=None, backend="auto"):
        super().__init__()
        self._ctx = ctx
        self.register_buffer("w0", w0, persistent=False)  # [out, in]
        # [K, out, in]: a dense buffer, or (quantized storage) the parts of a QuantizedTensor in `tau_w_q`
        quantized = isinstance(tau_w, QuantizedTensor)
        self.register_buffer("tau_w", None if quantized else tau_w, persistent=False)
        self.tau_w_q = _quantized.QuantizedBuffers(tau_w) if quantized else None
        self.register_buffer("b0", b0, persistent=False)  # [out] | None
        self.register_buffer("tau_b", tau_b, persistent=False)  # [K, out] | None
        self.w_row, self.b_row, self.backend = w_row, b_row, backend

    def weight_task_vectors(self) -> torch.Tensor | QuantizedTensor:
        """The weight's task vectors ``[K, out, in]``: the dense buffer or the :class:`QuantizedTensor`."""
        return self.tau_w if self.tau_w_q is None else self.tau_w_q.get()

    def forward(self, x, rows: slice | None = None):
        """``x @ W.T + b``; ``rows`` restricts the layer to output rows ``rows`` (attention's separate
        q/k/v projections use thirds of the packed in-projection)."""
        w0, tau_w, b0, tau_b = self.w0, self.weight_task_vectors(), self.b0, self.tau_b
        if rows is not None:
            w0, tau_w = w0[rows], tau_w.rows(rows) if isinstance(tau_w, QuantizedTensor) else tau_w[:, rows]
            b0 = None if b0 is None else b0[rows]
            tau_b = None if tau_b is None else tau_b[:, rows]
        c = self._ctx.get()
        cb = c[self.b_row] if tau_b is not None else None
        return ops.merged_linear(x, w0, tau_w, c[self.w_row], b0, tau_b, cb, backend=self.backend)

    def extra_repr(self):
        K = self.weight_task_vectors().shape[0]
        return f"in={self.w0.shape[1]}, out={self.w0.shape[0]}, K={K}, row={self.w_row}"


class MergedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed in-projection, no bias_k/bias_v, no add_zero_attn) on merged
    projections, with ``scaled_dot_product_attention``. Same call signature and return value."""

    def __init__(self, mha: nn.MultiheadAttention, in_proj: MergedLinear, out_proj: MergedLinear):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj, self.out_proj = in_proj, out_proj

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        E, H = self.embed_dim, self.num_heads
        # identity of the inputs, before the transposes below make new tensor objects: self-attention projects
        # once with the packed weight (one merged_linear call), key = value (cross-attention) once for k and v
        same_qkv, same_kv = query is key and key is value, key is value
        if not self.batch_first:  # work in [N, L, E]
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        proj = self.in_proj
        if same_qkv:
            q, k, v = proj(query).chunk(3, dim=-1)
        elif same_kv:
            q = proj(query, slice(0, E))
            k, v = proj(key, slice(E, 3 * E)).chunk(2, dim=-1)
        else:
            q, k, v = (proj(t, slice(i * E, (i + 1) * E)) for i, t in enumerate((query, key, value)))
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))  # [N, H, L|S, D]
        mask = None
        if attn_mask is not None:
            m = attn_mask.reshape(N, H, L, S) if attn_mask.dim() == 3 else attn_mask
            mask = _additive_mask(m, q)
        if key_padding_mask is not None:
            kp = key_padding_mask.reshape(N, 1, 1, S)
            kp = _additive_mask(kp, q)
            mask = kp if mask is None else mask + kp
        causal = bool(is_causal) and mask is None
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (E // H) ** 0.5
            if mask is not None:
                scores = scores + mask
            if causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            w = torch.softmax(scores, dim=-1)
            o = F.dropout(w, p) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            w = None
        o = self.out_proj(o.transpose(1, 2).reshape(N, L, E))
        if unbatched:
            o = o.squeeze(0)
        elif not self.batch_first:
            o = o.transpose(0, 1)
        if w is not None:
            w = w.mean(1) if average_attn_weights else w
            if unbatched:
                w = w.squeeze(0)
        return o, w


def _additive_mask(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = masked) as an additive ``-inf``/0 mask in ``like``'s dtype; float masks as they are."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
    return m.to(like.dtype)


def _rewritable_mha(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.MultiheadAttention)
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and not m.add_zero_attn
        and type(m.out_proj) in _LINEARS
    )


_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _meta_template(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose tensors live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        mt = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
    return _copy.deepcopy(module, memo)


def _set_child(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``path`` (the root itself for ``""``); return the (new) root."""
    if not path:
        return new
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[name] = new
    return root


def block_paths(module: nn.Module) -> list[str]:
    """Paths of the children of every ``nn.ModuleList`` holding two or more modules of one type (a transformer's
    blocks: open_clip ``transformer.resblocks``, HF ``model.layers`` / ``encoder.layers``), outermost lists only."""
    out: list[str] = []
    for path, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or any(path.startswith(p + ".") for p in out):
            continue
        if len({type(c) for c in m}) == 1:
            out += [f"{path}.{i}" if path else str(i) for i in range(len(m))]
    return out


class _CheckpointedForward:
    """A module's forward under ``torch.utils.checkpoint`` (non-reentrant). The module's tensors at call time
    (the merged ones ``AdaMergedModel.forward`` feeds through ``functional_call``; in the skeleton every tensor is
    a buffer) and the coefficient table are captured, and the recomputation in backward runs the module's own
    forward on exactly those again (its hooks run once per forward; its submodules' hooks again when recomputed)."""

    def __init__(self, ctx: _CoefContext, module: nn.Module, forward):
        self.ctx, self.module, self.forward = ctx, module, forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        coefs = self.ctx.get()
        state = [(m, n, t) for m in self.module.modules() for n, t in m._buffers.items() if t is not None]

        def run(*a, **kw):
            saved = [(m, n, m._buffers[n]) for m, n, _ in state]
            prev, self.ctx.coefs = self.ctx.coefs, coefs
            try:
                for m, n, t in state:
                    m._buffers[n] = t
                return self.forward(*a, **kw)
            finally:
                self.ctx.coefs = prev
                for m, n, t in saved:
                    m._buffers[n] = t

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _stacked_task_vectors(pretrained, base, finetuned, task_vectors, ties, dtype, trust_pickle, *, K=None,
                          release_finetuned=False):
    """``{name: [K, *shape]}`` for every parameter of ``base`` (built from ``finetuned`` one model at a time by
    :func:`~adamerge_fast.merging.build.build_task_vectors`, or checked), in ``dtype``, TIES-split for
    AdaMerging++, contiguous, on the pretrained parameters' devices. A quantized ``dtype`` (``"int8"``/``"int4"``)
    or quantized ``task_vectors`` take :func:`_quantized_task_vectors`."""
    names = list(base)
    given_q = task_vectors is not None and any(isinstance(t, QuantizedTensor) for t in task_vectors.values())
    if isinstance(dtype, str) or given_q:
        return _quantized_task_vectors(pretrained, base, finetuned, task_vectors, ties, dtype, trust_pickle, K=K,
                                       release_finetuned=release_finetuned)
    if task_vectors is None:
        tv = build_task_vectors(base, finetuned, keys=names, K=K, storage=DenseRows(dtype),
                                release_finetuned=release_finetuned, trust_pickle=trust_pickle)
    else:
        check_task_vectors(task_vectors, base, names)
        tv = {n: task_vectors[n].detach().to(device=base[n].device, dtype=dtype or task_vectors[n].dtype)
              for n in names}
    if ties:
        tv = ties_split(tv, **ties)
    return {n: t.contiguous() for n, t in tv.items()}


def _quantized_task_vectors(pretrained, base, finetuned, task_vectors, ties, dtype, trust_pickle, K=None,
                            release_finetuned=False):
    """The quantized-storage branch of :func:`_stacked_task_vectors`: parameters of two or more dims get
    :class:`QuantizedTensor` task vectors in format ``dtype`` (built from the checkpoints one model at a time, or
    quantized from dense ``task_vectors``, or given already quantized), the others stay dense. AdaMerging++ trims
    the dense task vectors first (TIES needs them), then quantizes them."""
    names = list(base)
    if dtype is not None and not (isinstance(dtype, str) and dtype in FORMATS):
        raise ValueError(f"task_vector_dtype: quantized task vectors are given, so it must be None or one of "
                         f"{sorted(FORMATS)}, got {dtype!r}")
    if task_vectors is not None:
        _quantized.check_any_task_vectors(task_vectors, base, names)
        if ties and any(isinstance(task_vectors[n], QuantizedTensor) for n in names):
            raise ValueError("ties (AdaMerging++) needs dense task vectors: give dense task_vectors with "
                             "task_vector_dtype='int8'/'int4' (TIES runs first, then quantization)")
        tv = {n: task_vectors[n] for n in names}
    else:  # one fine-tuned model at a time; quantized rows, or dense ones for TIES to trim first
        storage = DenseRows() if ties else _quantized.QuantizedRows(dtype)
        tv = build_task_vectors(base, finetuned, keys=names, K=K, storage=storage, release_finetuned=release_finetuned,
                                trust_pickle=trust_pickle)
    if ties:
        tv = ties_split(tv, **ties)
    out = {}
    for n in names:
        t = tv.pop(n)
        t = t.to(base[n].device) if isinstance(t, QuantizedTensor) else t.detach().to(base[n].device)
        out[n] = (_quantized.quantize_stack(t, dtype) if dtype is not None else t).contiguous()
    return out


# ------------------------------------------------------------------------------ argument checks (issue #11)
#: ``task_vector_dtype`` strings for quantized task vectors (handled where the task vectors are built)
QUANTIZED_TASK_VECTOR_DTYPES = ("int8", "int4")


def _check_clamp(clamp) -> tuple[float, float] | None:
    """``clamp`` as ``(lo, hi)`` floats, or None; ``ValueError`` unless two numbers, neither NaN, with lo <= hi."""
    if clamp is None:
        return None
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise ValueError(f"clamp must be None or (lo, hi), two numbers, got {clamp!r}") from None
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"clamp must be two numbers, not NaN, got ({lo}, {hi})")
    if lo > hi:
        raise ValueError(f"clamp must have lo <= hi, got ({lo}, {hi}): every coefficient would be clamped to {hi}")
    return lo, hi


def _check_init(init) -> None:
    """``ValueError`` unless ``init`` (a number or a table) is finite."""
    if isinstance(init, torch.Tensor):
        if not init.is_floating_point() or not bool(torch.isfinite(init).all()):
            raise ValueError(f"init must be a finite floating table, got a {init.dtype} tensor with non-finite values"
                             if init.is_floating_point() else f"init must be a finite floating table, got {init.dtype}")
        return
    try:
        v = float(init)
    except (TypeError, ValueError):
        raise TypeError(f"init must be a number or a [rows, K] tensor, got {type(init).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"init must be a finite number, got {v}")


def _ties_options(ties) -> dict[str, Any] | None:
    """``ties`` as the :func:`ties_split` options ``{"k", "scope"}`` (defaults filled in), or None when off."""
    if ties is None or ties is False:
        return None
    opts: dict[str, Any] = {"k": 0.2, "scope": "global"}
    if ties is not True:
        if not isinstance(ties, Mapping):
            raise TypeError(f"ties must be None, True or a dict of ties_split options (k, scope), got "
                            f"{type(ties).__name__}")
        unknown = [k for k in ties if k not in opts]
        if unknown:
            raise ValueError(f"ties: unknown option {unknown[0]!r}; expected k (fraction kept) and scope")
        opts.update(ties)
    opts["k"] = check_ties_k(opts["k"], "ties: k")
    if opts["scope"] not in ("global", "tensor"):
        raise ValueError(f"ties: scope must be 'global' or 'tensor', got {opts['scope']!r}")
    return opts


def _check_task_vector_dtype(dtype) -> None:
    if dtype is None or dtype in QUANTIZED_TASK_VECTOR_DTYPES:
        return
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"task_vector_dtype must be None, a floating torch.dtype or one of "
                        f"{QUANTIZED_TASK_VECTOR_DTYPES}, got {dtype!r}")


def _check_backend(backend) -> None:
    names = ("auto", *ops.backend_names())
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def _init_setting(init) -> float | str:
    """``init`` as a JSON value for :meth:`AdaMergedModel.algorithm_settings`: the number, or a digest of a table."""
    if isinstance(init, torch.Tensor):
        t = init.detach().float().cpu().contiguous()
        return "table:" + hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return float(init)


#: ``coefficient_layout`` -> what ``raw_coefficients`` holds: ``[rows, K]``, ``[K, rows]``, ``[K]`` (one row)
COEFFICIENT_LAYOUTS = ("rows_tasks", "tasks_rows", "tasks")


def _layout_shape(layout: str, rows: int, K: int) -> tuple[int, ...]:
    return {"rows_tasks": (rows, K), "tasks_rows": (K, rows), "tasks": (K,)}[layout]


def _initial_table(init: float | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial raw coefficients of ``shape``: ``init`` everywhere, or a float32 copy of a given tensor."""
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(f"init must have shape {list(shape)}, got {list(init.shape)}")
        return init.detach().float().clone()
    return torch.full(shape, float(init))


def _parameter_rule(parameter_filter) -> Callable[[str, nn.Parameter], bool]:
    """``parameter_filter`` (None, ``"requires_grad"`` or a callable ``(name, parameter) -> bool``) as a callable."""
    if parameter_filter is None:
        return lambda n, p: True
    if parameter_filter == "requires_grad":
        return lambda n, p: p.requires_grad
    if callable(parameter_filter):
        return parameter_filter
    raise ValueError(f"parameter_filter must be None, 'requires_grad' or a callable, got {parameter_filter!r}")


class AdaMergedModel(nn.Module):
    """The merged model ``theta_0 + sum_k lambda_k tau_k`` with learnable ``lambda``.

    Args:
        pretrained: the pretrained ``nn.Module`` (``theta_0``). Its modules are copied unless ``copy=False``
            (then they are rewritten in place); its parameter tensors are shared, never copied or written.
        finetuned: one fine-tuned model per task, or ``None`` if ``task_vectors`` is given: modules, state dicts,
            checkpoint paths, or callables (no arguments) that load and return one of those; a sequence, or an
            iterator such as a generator (then ``task_names`` says how many). The task vectors are built one model
            at a time (:func:`~adamerge_fast.merging.build.build_task_vectors`): each model is read, its rows
            written, and dropped before the next is loaded, so with paths or loaders the peak is the pretrained
            weights + the task vectors + one fine-tuned model. LoRA adapters (PEFT adapter directories,
            ``{name: (A, B, scale)}`` mappings, :class:`~adamerge_fast.merging.lora.LoraAdapter`; given as a sequence)
            are task vectors too, kept low-rank (:mod:`adamerge_fast.merging.lora`); a task may also be a full
            fine-tuned model among adapters.
        release_finetuned: side effect, off by default: empty each in-memory fine-tuned module (and mutable
            state dict) of ``finetuned`` once its task vector is taken — its parameters and buffers become empty
            tensors (:func:`~adamerge_fast.merging.build.release`), so their memory is freed as the task vectors
            fill (when nothing else refers to them). The modules are unusable afterwards.
        checkpoint_activations: recompute the activations of the backbone's blocks in the backward instead of
            keeping them (``torch.utils.checkpoint``, non-reentrant): ``True`` checkpoints every child of the
            model's repeated-block lists (:func:`block_paths`), or a predicate ``(path, module) -> bool`` picks
            the modules. The merged layers save no merged weight, so recomputation costs only the forward.
        task_vectors: stacked task vectors ``{name: [K, *shape]}`` for every floating parameter.
        granularity: ``"layer"`` (one coefficient per parameter tensor per task) or ``"task"`` (one per task).
        init: initial coefficient (0.3 as the paper), a float or a ``[rows, K]`` tensor.
        clamp: ``(lo, hi)`` applied in the forward (``None``: no clamp).
        ties: AdaMerging++: ``True`` or a dict of :func:`ties_split` options (``k``, ``scope``) applied to the
            task vectors first.
        task_vector_dtype: storage dtype for the task vectors (e.g. ``torch.bfloat16``), or ``"int8"`` / ``"int4"``:
            quantized task vectors (:mod:`adamerge_fast.ops.quant`; int8: one scale per output row, int4: a scale and
            zero point per group of 128 input columns) for every parameter of two or more dims, read by the kernels
            without dequantizing them in memory; 1-D parameters (biases, norms) keep dense task vectors.
            ``task_vectors`` may also hold :class:`~adamerge_fast.ops.quant.QuantizedTensor` entries (e.g. from
            :func:`~adamerge_fast.merging.quantized.load_task_vectors`).
        backend: op backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``).
        task_names: names of the K tasks (for tables and plots).
        coefficient_layout: what ``raw_coefficients`` holds: ``"rows_tasks"`` ``[rows, K]`` (default),
            ``"tasks_rows"`` ``[K, rows]``, or ``"tasks"`` ``[K]`` (``granularity="task"`` only). ``init`` as a tensor
            has this shape; ``coefficients`` is ``[rows, K]`` whatever the layout.
        normalize: ``None``, or ``"softmax"``: after the clamp, each row becomes ``softmax`` over the tasks
            (FusionBench's ``normalized_merging_weights``).
        parameter_filter: which floating parameters get a coefficient row: ``None`` (all), ``"requires_grad"``
            (FusionBench's rule), or ``(name, parameter) -> bool``. The others keep their pretrained values; their
            task vectors are neither built nor stored.
    """

    def __init__(
        self,
        pretrained: nn.Module,
        finetuned: Iterable[FinetunedSource] | None = None,
        *,
        task_vectors: Mapping[str, torch.Tensor | QuantizedTensor] | None = None,
        granularity: Literal["task", "layer"] = "layer",
        init: float | torch.Tensor = 0.3,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        ties: bool | Mapping[str, Any] | None = None,
        task_vector_dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        task_names: Sequence[str] | None = None,
        copy: bool = True,
        trust_pickle: bool = False,
        release_finetuned: bool = False,
        checkpoint_activations: bool | Callable[[str, nn.Module], bool] = False,
        coefficient_layout: Literal["rows_tasks", "tasks_rows", "tasks"] = "rows_tasks",
        normalize: Literal["softmax"] | None = None,
        parameter_filter: str | Callable[[str, nn.Parameter], bool] | None = None,
    ):
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        clamp = _check_clamp(clamp)
        _check_init(init)
        ties = _ties_options(ties)
        _check_task_vector_dtype(task_vector_dtype)
        _check_backend(backend)
        if coefficient_layout not in COEFFICIENT_LAYOUTS or (coefficient_layout == "tasks" and granularity != "task"):
            raise ValueError(f"coefficient_layout must be one of {COEFFICIENT_LAYOUTS} ('tasks' only with "
                             f"granularity='task'), got {coefficient_layout!r} with granularity={granularity!r}")
        if normalize not in (None, "softmax"):
            raise ValueError(f"normalize must be None or 'softmax', got {normalize!r}")
        if (finetuned is None) == (task_vectors is None):
            raise ValueError("give exactly one of finetuned=... or task_vectors=...")
        keep = _parameter_rule(parameter_filter)
        named = [(n, p) for n, p in pretrained.named_parameters() if torch.is_floating_point(p) and keep(n, p)]
        if not named:
            raise ValueError("pretrained model has no floating-point parameters to merge"
                             + ("" if parameter_filter is None else f" (parameter_filter={parameter_filter!r})"))
        names = [n for n, _ in named]
        self._lora: lora.LoraTaskVectors | None = None
        if isinstance(finetuned, Sequence) and any(lora.is_lora_source(f) for f in finetuned):
            # storage kind "LoRA": low-rank weights run by MergedLoRALinear; `tv` holds the dense task vectors only,
            # of the parameters some task touches densely (its tasks in self._lora.dense_tasks)
            if ties:
                raise ValueError("ties (AdaMerging++) trims dense task vectors: it does not apply to LoRA adapters")
            if isinstance(task_vector_dtype, str):
                raise ValueError(f"task_vector_dtype={task_vector_dtype!r} (quantized dense task vectors) does not "
                                 "apply to LoRA adapters; give a floating dtype or None")
            self._lora = lora.collect(pretrained, dict(named), finetuned, dtype=task_vector_dtype,
                                      trust_pickle=trust_pickle)
            tv, K = self._lora.dense, self._lora.num_tasks
        else:
            tv = _stacked_task_vectors(pretrained, dict(named), finetuned, task_vectors, ties, task_vector_dtype,
                                       trust_pickle, K=None if task_names is None else len(task_names),
                                       release_finetuned=release_finetuned)
            K = next(iter(tv.values())).shape[0]
        self.num_tasks, self.granularity, self.clamp_range, self.backend = K, granularity, clamp, backend
        self.coefficient_layout, self.normalize = coefficient_layout, normalize
        self.param_names = names
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(K)]
        if len(self.task_names) != K:
            raise ValueError(f"task_names has {len(self.task_names)} names for {K} tasks")
        rows = len(names) if granularity == "layer" else 1
        shape = _layout_shape(coefficient_layout, rows, K)
        self.raw_coefficients = nn.Parameter(_initial_table(init, shape).to(named[0][1].device))
        self._settings = {
            "granularity": granularity, "num_tasks": K, "init": _init_setting(init),
            "clamp": None if clamp is None else list(clamp), "ties": ties,
            "task_vector_dtype": None if task_vector_dtype is None else str(task_vector_dtype).replace("torch.", ""),
            "normalize": normalize, "coefficient_layout": coefficient_layout,
        }  # fmt: skip
        if self._lora is not None:  # a run on adapters is another problem than one on dense task vectors
            self._settings["task_vector_storage"] = "lora"

        object.__setattr__(self, "_template", _meta_template(pretrained))
        # every name under which each parameter is reachable (tied weights have several) -> its row in `names`
        row_of_id = {id(p): i for i, (_, p) in enumerate(named)}
        self._aliases = {
            n: row_of_id[id(p)] for n, p in pretrained.named_parameters(remove_duplicate=False) if id(p) in row_of_id
        }
        self._row_index = {n: i for i, n in enumerate(names)}
        self._ctx = _CoefContext()

        if copy:  # own modules, but the parameters' storage is shared with `pretrained` (never written)
            memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in pretrained.parameters()}
            skel = _copy.deepcopy(pretrained, memo)
        else:
            skel = pretrained
        skel.requires_grad_(False)
        skel = self._rewrite_linear_modules(skel, tv)
        self._collect_generic_parameters(skel, tv)
        self.skeleton = skel
        self.checkpointed: list[str] = []  # paths of the modules whose activations are recomputed in backward
        if checkpoint_activations:
            self._checkpoint_modules(checkpoint_activations)

    def _checkpoint_modules(self, which: bool | Callable[[str, nn.Module], bool]) -> None:
        """Wrap the forward of the chosen skeleton modules in :class:`_CheckpointedForward`."""
        if which is True:
            paths = block_paths(self.skeleton)
            if not paths:
                raise ValueError("checkpoint_activations=True: the model has no list of repeated blocks (an "
                                 "nn.ModuleList of modules of one type); pass a predicate (path, module) -> bool")
        elif callable(which):
            paths = [p for p, m in self.skeleton.named_modules() if p and which(p, m)]
            paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]  # outermost only
            if not paths:
                raise ValueError("checkpoint_activations: the predicate picked no module")
        else:
            raise ValueError(f"checkpoint_activations must be a bool or a predicate (path, module) -> bool, got "
                             f"{which!r}")
        for p in paths:
            m = self.skeleton.get_submodule(p)
            m.forward = _CheckpointedForward(self._ctx, m, m.forward)
        self.checkpointed = paths

    def _coef_row(self, name: str) -> int:
        """The coefficient-table row of parameter ``name`` (0 for every parameter when task-wise)."""
        return self._row_index[name] if self.granularity == "layer" else 0

    def _merged_linear(self, weight: str, bias: str | None, w0: torch.Tensor, b0: torch.Tensor | None,
                       tv: Mapping[str, torch.Tensor]) -> MergedLinear:
        """A :class:`MergedLinear` over parameter ``weight`` (and ``bias``, merged when it has a row)."""
        merged_bias = b0 is not None and bias in self._row_index
        return MergedLinear(
            self._ctx, w0.detach(), tv[weight], self._coef_row(weight),
            None if b0 is None else b0.detach(),
            tv[bias] if merged_bias else None, self._coef_row(bias) if merged_bias else None, self.backend,
        )  # fmt: skip

    def _rewrite_linear_modules(self, skel: nn.Module, tv: Mapping[str, torch.Tensor]) -> nn.Module:
        """Replace every ``nn.Linear`` and rewritable ``nn.MultiheadAttention`` whose weight has a coefficient
        row by its merged counterpart; ``self._rewritten`` lists their paths. Returns the (new) root. With LoRA
        sources: the layers whose weight has LoRA task vectors become
        :class:`~adamerge_fast.merging.lora.MergedLoRALinear` instead."""
        self._rewritten: list[str] = []
        if self._lora is not None:
            for path, new in lora.merged_lora_modules(self, skel, self._lora):
                skel = _set_child(skel, path, new)
                self._rewritten.append(path)
            return skel
        for path, m in list(skel.named_modules()):
            if any(path.startswith(h + ".") or h == "" for h in self._rewritten):
                continue  # inside a module already rewritten
            pre = path + "." if path else ""
            if (_rewritable_mha(m) and pre + "in_proj_weight" in self._row_index
                    and pre + "out_proj.weight" in self._row_index):
                inp = self._merged_linear(pre + "in_proj_weight", pre + "in_proj_bias", m.in_proj_weight,
                                          m.in_proj_bias, tv)
                outp = self._merged_linear(pre + "out_proj.weight", pre + "out_proj.bias", m.out_proj.weight,
                                           m.out_proj.bias, tv)
                new: nn.Module = MergedMultiheadAttention(m, inp, outp)
            elif type(m) in _LINEARS and pre + "weight" in self._row_index:
                if m.bias is not None and pre + "bias" in self._aliases and pre + "bias" not in self._row_index:
                    continue  # bias tied elsewhere: keep the module generic (a filtered-out bias stays fixed)
                new = self._merged_linear(pre + "weight", pre + "bias", m.weight, m.bias, tv)
            else:
                continue
            skel = _set_child(skel, path, new)
            self._rewritten.append(path)
        return skel

    def _collect_generic_parameters(self, skel: nn.Module, tv: Mapping[str, torch.Tensor]) -> None:
        """Every parameter left in a generic module becomes a non-persistent buffer of the skeleton (its base
        tensor) and is merged by one ``merge_many`` per forward, then fed to ``functional_call``. A parameter
        reachable under several names (tied weights) is merged once and fed under each of its names."""
        self._generic_names: list[str] = []  # canonical (named_parameters) names of the merge_many rows
        self._generic_base_buffers: list[str] = []  # the skeleton buffer holding each one's base tensor
        self._generic_feed: list[tuple[str, int]] = []  # (name in the skeleton, index into _generic_names)
        pos: dict[str, int] = {}
        for full, p in list(skel.named_parameters(remove_duplicate=False)):
            mod_path, _, pn = full.rpartition(".")
            mod = skel.get_submodule(mod_path) if mod_path else skel
            del mod._parameters[pn]
            mod.register_buffer(pn, p.detach(), persistent=False)
            if full not in self._aliases or self.param_names[self._aliases[full]] not in tv:
                continue  # a non-floating parameter, or one no task touches (LoRA sources): kept as it is
            canon = self.param_names[self._aliases[full]]
            if canon not in pos:
                pos[canon] = len(self._generic_names)
                self._generic_names.append(canon)
                self._generic_base_buffers.append(full)
            self._generic_feed.append((full, pos[canon]))
        self._generic_rows = [self._coef_row(n) for n in self._generic_names]
        device = self.raw_coefficients.device
        self.register_buffer("_generic_rows_t", torch.tensor(self._generic_rows, dtype=torch.long, device=device),
                             persistent=False)
        self._generic_task_vectors = nn.Module()
        for i, n in enumerate(self._generic_names):
            if isinstance(tv[n], QuantizedTensor):  # quantized storage: submodule q{i} holds the parts
                self._generic_task_vectors.add_module(f"q{i}", _quantized.QuantizedBuffers(tv[n]))
            else:
                self._generic_task_vectors.register_buffer(f"t{i}", tv[n], persistent=False)
        self._generic_cache: list | None = None
        # LoRA sources: task vectors of task subsets, merged per subset (None: every parameter has all K tasks)
        self._generic_groups = None if self._lora is None else lora.task_groups(
            self._generic_names, self._lora.dense_tasks, device)  # fmt: skip

    # -------------------------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        self._generic_cache = None
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_generic_groups", None) is not None:
            self._generic_groups = [(fn(p), fn(t)) for p, t in self._generic_groups]
        return out

    def _generic_tensors(self) -> list[list[torch.Tensor]]:
        """``[bases, task vectors]`` of the parameters merged by ``merge_many`` (cached until ``.to()``)."""
        if self._generic_cache is None:
            bases = [self.skeleton.get_buffer(n) for n in self._generic_base_buffers]
            holder = self._generic_task_vectors
            deltas = [getattr(holder, f"q{i}").get() if hasattr(holder, f"q{i}") else holder.get_buffer(f"t{i}")
                      for i in range(len(self._generic_names))]
            self._generic_cache = [bases, deltas]
        return self._generic_cache

    def _as_table(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` (in ``coefficient_layout``) as a ``[rows, K]`` table (a view)."""
        if self.coefficient_layout == "tasks_rows":
            return raw.t()
        if self.coefficient_layout == "tasks":
            return raw.unsqueeze(0)
        return raw

    @property
    def coefficients(self) -> torch.Tensor:
        """The coefficient table ``[rows, K]`` (rows = parameter tensors, or 1 for task-wise) whatever the layout:
        ``raw_coefficients`` clamped to ``clamp``, then (``normalize="softmax"``) a softmax over each row."""
        c = self._as_table(self.raw_coefficients)
        if self.clamp_range is not None:
            lo, hi = self.clamp_range
            c = c.clamp(lo, hi)
        if self.normalize == "softmax":
            c = c.softmax(dim=1)
        return c if self.coefficient_layout == "rows_tasks" else c.contiguous()

    def forward(self, *args, **kwargs):
        coefs = self.coefficients
        self._ctx.coefs = coefs
        try:
            params = {}
            if self._generic_names:
                bases, deltas = self._generic_tensors()
                if self._generic_groups is None:
                    merged = ops.merge_many(bases, deltas, coefs[self._generic_rows_t], backend=self.backend)
                else:  # LoRA sources: one merge_many per task subset
                    merged = lora.merge_groups(bases, deltas, coefs[self._generic_rows_t], self._generic_groups,
                                               self.backend)  # fmt: skip
                params = {full: merged[i] for full, i in self._generic_feed}
            return torch.func.functional_call(self.skeleton, params, args, kwargs)
        finally:
            self._ctx.coefs = None

    def rows_per_example(self, *args, **kwargs) -> torch.Tensor | None:
        """Output rows per example ``[B]`` for these inputs, when the wrapped model's forward gives a variable number
        of rows per example and says so through its own ``rows_per_example`` (e.g.
        :class:`~adamerge_fast.models.hf.CausalLMForEntropy` with ``positions="all"``); ``None`` otherwise."""
        fn = getattr(self.skeleton, "rows_per_example", None)
        return None if fn is None else fn(*args, **kwargs)

    # -------------------------------------------------------------------------------------------------
    def _row_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(base, task vectors [K, ...], coefficient row) of parameter ``name``."""
        if name in self._generic_names:
            i = self._generic_names.index(name)
            bases, deltas = self._generic_tensors()
            return bases[i], deltas[i], self._generic_rows[i]
        m, leaf = self._merged_layer_of(name)
        if leaf == "weight":
            return m.w0, m.weight_task_vectors(), m.w_row
        return m.b0, m.tau_b, m.b_row

    def _merged_layer_of(self, name: str) -> tuple[MergedLinear, str]:
        """The :class:`MergedLinear` holding parameter ``name`` of a rewritten module, and ``"weight"``/``"bias"``."""
        mod_path, _, leaf = name.rpartition(".")
        if leaf in ("in_proj_weight", "in_proj_bias"):
            return self.skeleton.get_submodule(mod_path).in_proj, leaf[len("in_proj_"):]
        return self.skeleton.get_submodule(mod_path), leaf

    def _fixed_tensor(self, key: str) -> torch.Tensor:
        """A state-dict entry without a coefficient row (a buffer, a non-floating or filtered-out parameter)."""
        if any(key.startswith(path + ".") or path == "" for path in self._rewritten):
            m, leaf = self._merged_layer_of(key)  # a filtered-out parameter of a rewritten layer
            return m.w0 if leaf == "weight" else m.b0
        return self.skeleton.get_buffer(key)

    def task_vector_bytes(self) -> int:
        """Bytes of the task vectors this model holds (dense and quantized storage)."""
        return _quantized.nbytes({n: self._row_tensors(n)[1] for n in self.param_names})

    @torch.no_grad()
    def merged_parameter(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``theta_0 + sum_k lambda_k tau_k`` of parameter ``name`` (a ``param_names`` entry), accumulated in
        float32 (float64 when ``dtype`` differs from the parameter's) and rounded once to ``dtype`` (default: the
        parameter's dtype)."""
        base, tau, r = self._row_tensors(name)
        coef = self.coefficients.detach()[r]
        if dtype is None or dtype == base.dtype:
            return ops.merge(base, tau, coef, backend=self.backend)
        return ops.merge(base.double(), tau, coef.double(), backend=self.backend).to(dtype)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The merged model's full state dict (the pretrained architecture's keys), materialized once (each tensor
        merged in fp32 from its task vectors, dequantized in the kernel when quantized, and rounded once)."""
        coefs = self.coefficients.detach()
        merged = {} if self._lora is None else self._lora_merged_parameters(coefs)
        for name in self.param_names:
            if name not in merged:
                merged[name] = self.merged_parameter(name)
        out = {}
        for key in self._template.state_dict(keep_vars=True):
            if key in self._aliases:
                out[key] = merged[self.param_names[self._aliases[key]]]
            else:
                out[key] = self._fixed_tensor(key)
        return out

    def _lora_merged_parameters(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        """With LoRA sources: every parameter, materialized (the LoRA layers' weights, task-subset merges, and the
        pretrained tensor of a parameter no task touches)."""
        out = {}
        for path in self._rewritten:  # MergedLoRALinear
            m = self.skeleton.get_submodule(path)
            pre = path + "." if path else ""
            out[pre + "weight"] = m.merged_weight(coefs)
            if m.b0 is not None:
                out[pre + "bias"] = m.merged_bias(coefs)
        bases, deltas = self._generic_tensors()
        for i, name in enumerate(self._generic_names):
            tasks = torch.tensor(self._lora.dense_tasks[name], dtype=torch.long, device=coefs.device)
            out[name] = ops.merge(bases[i], deltas[i], coefs[self._generic_rows[i]].index_select(0, tasks),
                                  backend=self.backend)  # fmt: skip
        for name in self.param_names:
            if name not in out:
                out[name] = self.skeleton.get_buffer(name)
        return out

    def to_module(self) -> nn.Module:
        """A plain module of the pretrained architecture holding the merged weights."""
        m = _copy.deepcopy(self._template)
        m.load_state_dict(self.merged_state_dict(), assign=True)
        for full, r in self._aliases.items():  # assign=True unties tied weights: tie them again
            canon = self.param_names[r]
            if full != canon:
                mod_path, _, pn = full.rpartition(".")
                (m.get_submodule(mod_path) if mod_path else m)._parameters[pn] = m.get_parameter(canon)
        for name, b in list(m.named_buffers()):  # non-persistent buffers (e.g. Llama's rotary inv_freq) are not in
            if b.is_meta:  # the state dict: the skeleton's own (the pretrained model's) values
                mod_path, _, bn = name.rpartition(".")
                (m.get_submodule(mod_path) if mod_path else m)._buffers[bn] = self.skeleton.get_buffer(name)
        return m

    def save_merged(self, path) -> None:
        """Write the merged state dict as safetensors (atomically); :class:`~adamerge_fast.io.NonFiniteError` naming
        the first tensor with a NaN/inf, before anything is written."""
        sd = self.merged_state_dict()
        for k, t in sd.items():
            check_finite(t, f"merged tensor {k!r}")
        save_safetensors(sd, path, {"format": "pt", "producer": "adamerge_fast"})

    # -------------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the model a coefficient table belongs to: names, shapes, K and granularity."""
        h = hashlib.sha256()
        h.update(f"{self.granularity}|{self.num_tasks}|".encode())
        if self.coefficient_layout != "rows_tasks" or self.normalize is not None:
            h.update(f"layout={self.coefficient_layout}|normalize={self.normalize}|".encode())
        for n in self.param_names:
            h.update(f"{n}:{tuple(self._template.get_parameter(n).shape)};".encode())
        return h.hexdigest()[:16]

    def algorithm_settings(self) -> dict[str, Any]:
        """The settings that define this model's optimization problem, as JSON values: ``granularity``,
        ``num_tasks``, ``init`` (a number, or a digest of the initial table), ``clamp``, ``ties`` (the TIES options
        or None) and ``task_vector_dtype``. :func:`~adamerge_fast.optim.adamerge` stores them in its checkpoints and
        refuses to resume with different ones."""
        return dict(self._settings)

    def save_coefficients(self, path) -> None:
        save_safetensors(
            {"raw_coefficients": self.raw_coefficients.detach(), "coefficients": self.coefficients.detach()},
            path,
            {"fingerprint": self.fingerprint(), "granularity": self.granularity, "tasks": ",".join(self.task_names)},
        )

    def load_coefficients(self, path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint():
                raise CheckpointError(
                    f"{path}: coefficients belong to another model (fingerprint {meta.get('fingerprint')!r}, "
                    f"this model {self.fingerprint()!r}: granularity, task count or parameter shapes differ)"
                )
            raw = f.get_tensor("raw_coefficients")
        with torch.no_grad():
            self.raw_coefficients.copy_(raw)

    def coefficient_table(self) -> list[tuple[str, list[float]]]:
        """``[(row name, [lambda_1..K])]``; the row name is the parameter name, or ``"all"`` for task-wise."""
        c = self.coefficients.detach().float().cpu().tolist()
        names = self.param_names if self.granularity == "layer" else ["all"]
        return list(zip(names, c))

    def format_coefficients(self, max_rows: int | None = None) -> str:
        rows = self.coefficient_table()
        w = max(len(n) for n, _ in rows)
        head = " " * w + " | " + " ".join(f"{t[:8]:>8}" for t in self.task_names)
        lines = [head, "-" * len(head)]
        shown = rows
        if max_rows is not None and len(rows) > max_rows:
            shown = rows[: max_rows // 2] + [("...", [])] + rows[-max_rows // 2 :]
        for n, vals in shown:
            lines.append(f"{n:<{w}} | " + " ".join(f"{v:8.4f}" for v in vals))
        return "\n".join(lines)
