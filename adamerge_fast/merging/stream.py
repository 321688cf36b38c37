"""Static merges of checkpoints streamed tensor by tensor (out of core), like mergekit.

:func:`merge_checkpoints` reads one tensor name at a time from the pretrained and every fine-tuned checkpoint
(safetensors files and sharded Hugging Face directories are read per tensor, nothing stays mapped), merges it,
writes it (:class:`adamerge_fast.export.CheckpointWriter`) and drops it: the peak memory is about ``K + 2``
times the largest tensor (in the checkpoints' dtype) plus float32 task-vector buffers of :data:`CHUNK` elements
per task, whatever the model size (``like="mergekit"`` TIES: also a boolean mask per task and the in-place
magnitude sort of :data:`SORT_THREADS` tasks at a time, 12 bytes per element each). The result equals the in-memory
merges of :mod:`adamerge_fast.merging.static` on exact task vectors (``task_vectors(..., dtype=...)`` with
float32 for bf16/fp16 checkpoints, float64 for fp32 ones: :func:`exact_tv_dtype`).

TIES with ``scope="global"`` needs each task's magnitude threshold over its whole task vector before the first
tensor can be trimmed. :func:`global_thresholds` finds it exactly without holding the task vectors: a radix
select over the magnitudes' bit patterns (non-negative floats order as their integer bit patterns), one
streaming pass per 16 bits, gathering the candidates once few enough are left. A float32 model takes two
passes before the merge pass (plus one for the majority sign of ``sign_tie="majority"``).

``like="mergekit"`` reproduces mergekit 0.1.5 (configured with ``dtype: float32``): its task arithmetic, TIES
and DARE-TIES semantics (weights, ``normalize``, ``lambda``, per-tensor magnitude trimming to exactly
``max(1, int(density*n))`` entries, the +1 sign for zero sums, DARE's L1-norm rescaling) and its float32
order of operations, so that outputs equal mergekit's element by element (DARE's random masks excepted). Which of
the entries tied in magnitude at TIES's threshold are kept is what ``torch.argsort(descending=True)`` (an unstable
sort) puts first, as in mergekit, so equality with a mergekit run holds where both use the same torch build (torch
2.13.0+cpu gave the same tie order with ``ATEN_CPU_CAPABILITY`` default, avx2 and avx512).
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._compat import malloc_trim
from ..adapters import AdapterCheckpoint, as_adapter, is_lora_source
from ..export import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, nbytes
from ..io import (
    CheckpointError,
    NonFiniteCheckpointError,
    check_finite,
    check_fits,
    existing,
    load_state_dict,
    shape_dtype,
    streaming,
)
from ..ops._common import acc_dtype
from ..ops.quant import FORMATS, quantize
from . import static
from .static import TiesPlan
from .task_vectors import floating_keys, rounded_difference_, source_name

METHODS = ("average", "task_arithmetic", "ties", "dare")
Source = Any  # a checkpoint path, a state dict or an nn.Module


@dataclass(frozen=True)
class MergeOptions:
    """The options of a static merge (see :func:`merge_checkpoints`); ``None`` fields take the defaults of
    ``like`` (ours, or mergekit's)."""

    method: str = "task_arithmetic"
    scale: float | None = None
    weights: tuple[float, ...] | None = None
    normalize: bool | None = None
    ties_k: float | None = None
    ties_merge: str | None = None
    ties_scope: str | None = None
    ties_keep: str | None = None
    sign_tie: str | None = None
    dare_p: float | None = None
    dare_then: str | None = None
    dare_rescale: str | None = None
    seed: int = 0
    task_vector_dtype: torch.dtype | str | None = None
    like: str | None = None

    def resolved(self) -> "MergeOptions":
        """Every ``None`` option filled in from the preset (``like``), checked."""
        method = self.method.replace("-", "_")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.like not in (None, "mergekit"):
            raise ValueError(f"like must be None or 'mergekit', got {self.like!r}")
        mk = self.like == "mergekit"
        dare_ties = method == "dare" and (self.dare_then or ("ties" if mk else "task_arithmetic")).replace(
            "-", "_") == "ties"
        if mk and method == "average":
            raise ValueError("like='mergekit': use method='task_arithmetic' with weights and normalize=True for "
                             "mergekit's weighted average (method 'linear')")
        d = dict(scale=1.0 if mk else 0.3, normalize=(method == "ties") if mk else False,
                 ties_k=1.0 if (mk and dare_ties) else 0.2, ties_scope="tensor" if mk else "global",
                 ties_keep="exact" if mk else "ties", sign_tie="positive" if mk else "majority",
                 dare_p=0.5, dare_then="ties" if mk else "task_arithmetic", dare_rescale="l1" if mk else "inverse")
        ties_merge = self.ties_merge
        if ties_merge is None:
            norm = self.normalize if self.normalize is not None else d["normalize"]
            ties_merge = ("mean" if norm else "sum") if (mk or self.normalize is not None) else "mean"
        elif self.normalize is not None and (ties_merge == "mean") != self.normalize and method in ("ties", "dare"):
            raise ValueError(f"ties_merge={ties_merge!r} contradicts normalize={self.normalize} (TIES normalizes "
                             "by the disjoint mean)")
        r = replace(self, method=method, ties_merge=ties_merge,
                    **{k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in d.items()})
        r = replace(r, dare_then=r.dare_then.replace("-", "_"))
        if r.dare_then not in ("task_arithmetic", "ties"):
            raise ValueError(f"dare_then must be 'task_arithmetic' or 'ties', got {self.dare_then!r}")
        static.check_scale(r.scale, "merge: scale")
        static.check_ties_options(r.ties_k, r.ties_scope, r.ties_keep, r.sign_tie, r.ties_merge)
        static.check_dare_options(r.dare_p, r.dare_rescale)
        if isinstance(r.task_vector_dtype, str) and (r.task_vector_dtype not in FORMATS or mk):
            raise ValueError(f"task_vector_dtype={r.task_vector_dtype!r}: a torch dtype or one of {sorted(FORMATS)}, "
                             "and not with like='mergekit' (its deltas are the checkpoints' own)")
        if mk and method in ("ties", "dare") and r.ties_scope != "tensor":
            raise ValueError("like='mergekit' trims each tensor separately: ties_scope must be 'tensor'")
        return r

    @property
    def uses_ties(self) -> bool:
        return self.method == "ties" or (self.method == "dare" and self.dare_then == "ties")

    def metadata(self) -> dict[str, str]:
        """The options as strings (safetensors metadata of the output)."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None}


# ----------------------------------------------------------------------------------------------- sources
def open_source(src: Source, what: str, trust_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """A name -> tensor mapping that reads one tensor at a time: safetensors files and directories through
    :class:`adamerge_fast.io.StreamingStateDict`; torch files are loaded whole (``weights_only``)."""
    if isinstance(src, nn.Module):
        return src.state_dict()
    if isinstance(src, Mapping):
        return src
    return streaming(load_state_dict(existing(src, what), trust_pickle=trust_pickle))


def exact_tv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which ``theta_k - theta_0`` of ``dtype`` checkpoints is exact (differences within a factor
    2^15 of each other): float32 for bf16/fp16, float64 for fp32/fp64."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


class _Lazy(Sequence[torch.Tensor]):
    """``[sd[key] for sd in sds]``, each tensor read from its checkpoint when indexed."""

    def __init__(self, sds: Sequence[Mapping[str, torch.Tensor]], key: str):
        self.sds, self.key = sds, key

    def __getitem__(self, i):
        return self.sds[i][self.key]

    def __len__(self):
        return len(self.sds)

    def difference(self, i: int) -> torch.Tensor | None:
        """Task ``i``'s exact difference when its checkpoint is a view that knows it
        (:class:`~adamerge_fast.adapters.AdapterCheckpoint`: ``s B A`` unrounded), else ``None``."""
        exact = getattr(self.sds[i], "task_vector", None)
        return None if exact is None else exact(self.key)


def _row(fts: Sequence[torch.Tensor], base: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Task ``i`` as ``(flat tensor, flat base or None)``: its fine-tuned tensor against the base, or (``None``) the
    exact difference itself where the source knows it (:meth:`_Lazy.difference`)."""
    diff = getattr(fts, "difference", None)
    d = diff(i) if diff is not None else None
    return (fts[i].reshape(-1), base.reshape(-1)) if d is None else (d.reshape(-1), None)


def _check_base(b: torch.Tensor, key: str, names: Sequence[str] | None) -> None:
    if not _all_finite(b):
        check_finite(b, f"{names[0] if names else 'the pretrained checkpoint'}: key {key!r}",
                     error=NonFiniteCheckpointError)


def _source(names: Sequence[str] | None, i: int, key: str) -> str:
    return f"{names[i + 1] if names else f'fine-tuned checkpoint {i}'}: key {key!r}"


def _difference_(out: torch.Tensor, ft: torch.Tensor, base: torch.Tensor | None, low: torch.dtype | str | None,
                 what: str, source: str | None, cols: int | None = None) -> torch.Tensor:
    """``out = ft - base`` (``base=None``: ``ft`` is the difference) in ``out``'s exact dtype, rounded once through
    ``low`` first when given (as stored task vectors are): both through
    :func:`~adamerge_fast.merging.task_vectors.rounded_difference_`. ``low`` ``"int8"`` / ``"int4"``: the float32
    difference of whole rows of ``cols`` columns (:func:`_quantized_cols`) quantized and dequantized, as
    ``AdaMergedModel(task_vector_dtype=...)`` stores it (``cols`` None: a tensor of fewer than two dims, float32)."""
    if isinstance(low, str):
        d = rounded_difference_(torch.empty(out.shape, dtype=torch.float32), ft, base, what, source)
        if cols is not None and d.numel():
            d = quantize(d.reshape(1, -1, cols), low).dequantize_task(0).reshape(out.shape)
        return out.copy_(d)
    if low is None or low == out.dtype:
        return rounded_difference_(out, ft, base, what, source)
    return out.copy_(rounded_difference_(torch.empty(out.shape, dtype=low), ft, base, what, source))


CHUNK = 1 << 16  # elements per chunk of the task vectors of one tensor (methods that work element by element):
# the elementwise passes over a chunk's temporaries stay in cache, and (K <= 3, float32) each is below the 1 MB
# mmap threshold that `adamerge-fast merge` sets (`_compat.mmap_large_allocations`), so they come from the heap
# instead of fresh zeroed pages (measured, 1.1B bf16 task arithmetic like mergekit: 22 s at 2^18, 9 s at 2^16)


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, through a sum first (a NaN or inf makes the sum non-finite; the elementwise
    check runs only then, in case the sum overflowed)."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _quantized_cols(base: torch.Tensor, opts: MergeOptions) -> int | None:
    """The columns per row of ``base`` when its task vectors are quantized (``task_vector_dtype`` ``"int8"`` /
    ``"int4"``, two or more dims: scales per row or per group of a row), else None."""
    if not isinstance(opts.task_vector_dtype, str) or base.dim() < 2:
        return None
    return max(1, math.prod(base.shape[1:]))


def _whole_tensor(opts: MergeOptions) -> bool:
    """Whether a tensor's task vectors are needed at once: DARE's masks (one draw of ``[K, *S]``; with per-tensor
    TIES after it, its thresholds over the tensor). Otherwise they are formed and merged chunk by chunk."""
    return opts.method == "dare"


def _tensor_plan(key: str, base: torch.Tensor, fts: Sequence[torch.Tensor], opts: MergeOptions,
                 plan: TiesPlan, names: Sequence[str] | None = None) -> TiesPlan:
    """Per-tensor TIES as a plan over this tensor alone (its thresholds and tie budgets from one task's magnitudes
    at a time, and its majority sign in a pass over the chunks), so that trimming, election and merging run chunk
    by chunk: the same result as :func:`~adamerge_fast.merging.static.trim` on the whole tensor."""
    acc = exact_tv_dtype(base.dtype)
    n = base.numel()
    r = static.keep_rank(n, plan.k, plan.keep)
    th, budgets = [], []
    _check_base(base.reshape(-1), key, names)
    for i in range(len(fts)):
        f, b = _row(fts, base, i)
        a = _difference_(torch.empty(n, dtype=acc), f, b, opts.task_vector_dtype, f"task vector {i}: key {key!r}",
                         None if b is None else _source(names, i, key), _quantized_cols(base, opts)).abs_()
        del f, b
        v = a.kthvalue(n - r + 1).values if n else a.new_zeros(())
        th.append(v)
        budgets.append(r - int((a > v).sum()))
        del a
    tp = TiesPlan(k=plan.k, scope="global", keep=plan.keep, sign_tie=plan.sign_tie, weights=plan.weights,
                  thresholds=torch.stack(th), budgets=list(budgets), _budgets0=list(budgets))
    if plan.sign_tie == "majority":
        total = 0.0
        for _, tau in task_vector_chunks(key, base, fts, opts, None, names):
            total += float(static.sign_sum(static.trim(tau, tp), tp.weights).sum())
        tp.restart()
        tp.majority = float(torch.sign(torch.tensor(total)))
    return tp


def task_vector_chunks(key: str, base: torch.Tensor, fts: Sequence[torch.Tensor], opts: MergeOptions,
                       gen: torch.Generator | None, names: Sequence[str] | None = None
                       ) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(flat slice, tau[K, c])`` over one tensor: exact task vectors (float32 for bf16/fp16 checkpoints, float64
    for fp32/fp64; rounded through ``opts.task_vector_dtype`` when given, as stored task vectors would be), DARE
    applied (``gen``), in chunks of :data:`CHUNK` elements (one chunk: :func:`_whole_tensor`; whole rows when the task
    vectors are quantized: :func:`_quantized_cols`). Each fine-tuned
    tensor is read once, in its own dtype: with the base and the output, ``K + 2`` tensors of the checkpoint's
    size are alive, plus the chunk's float32 task vectors."""
    K = len(fts)
    acc = exact_tv_dtype(base.dtype)
    b = base.reshape(-1)
    rows = [_row(fts, base, i) for i in range(K)]
    n = b.numel()
    cols = _quantized_cols(base, opts)
    step = max(n, 1) if _whole_tensor(opts) else CHUNK if cols is None else max(1, CHUNK // cols) * cols
    for a in range(0, max(n, 1), step):
        e = min(n, a + step)
        _check_base(b[a:e], key, names)
        st = torch.empty((K, e - a), dtype=acc)
        for i, (f, bi) in enumerate(rows):
            _difference_(st[i], f[a:e], None if bi is None else bi[a:e], opts.task_vector_dtype,
                         f"task vector {i}: key {key!r}", None if bi is None else _source(names, i, key), cols)
        if opts.method == "dare":
            st = static.dare_tensor(st, opts.dare_p, gen, opts.dare_rescale)
        yield slice(a, e), st


# ------------------------------------------------------------------------------------- global thresholds
_GATHER_MAX = 1 << 24  # gather a task's remaining candidates once at most this many are left


class _RadixSelect:
    """The ``q``-th smallest (1-based) of a stream of non-negative floats, exactly, 16 bits per pass; also counts
    the values above it. Feed every value once per pass (:meth:`feed`), then :meth:`end_pass`."""

    def __init__(self, q: int, dtype: torch.dtype):
        self.q, self.dtype = q, dtype
        self.width = 64 if dtype == torch.float64 else 32
        self.int_dtype = torch.int64 if dtype == torch.float64 else torch.int32
        self.known, self.prefix, self.above = 0, 0, 0
        self.gather = False
        self.value: torch.Tensor | None = None
        self._hist = torch.zeros(1 << 16, dtype=torch.int64)
        self._cands: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return self.value is not None

    def feed(self, a: torch.Tensor) -> None:
        bits = a.reshape(-1).to(self.dtype).view(self.int_dtype)
        if self.known:
            bits = bits[(bits >> (self.width - self.known)) == self.prefix]
        if self.gather:
            self._cands.append(bits.clone())
        else:
            digits = ((bits >> (self.width - self.known - 16)) & 0xFFFF).long()
            if digits.numel() > 1 << 16:
                self._hist += torch.bincount(digits, minlength=1 << 16)
            else:  # cheaper than bincount's full-length pass for few values
                self._hist.index_put_((digits,), torch.ones_like(digits), accumulate=True)

    def end_pass(self) -> None:
        if self.gather:
            c = torch.cat(self._cands) if self._cands else torch.empty(0, dtype=self.int_dtype)
            v = c.kthvalue(self.q).values
            self.above += int((c > v).sum())
            self.value = v.view(self.dtype)
            return
        cum = self._hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(self.q)))  # first bin with cum >= q
        self.q -= int(cum[b - 1]) if b else 0
        self.above += int(cum[-1] - cum[b])
        in_bin = int(self._hist[b])
        self.prefix = (self.prefix << 16) | b
        self.known += 16
        self._hist.zero_()
        if self.known == self.width:
            self.value = torch.tensor(self.prefix, dtype=self.int_dtype).view(self.dtype)
        elif in_bin <= _GATHER_MAX:
            self.gather = True


def global_thresholds(read: Callable[[], Iterator[torch.Tensor]], n: int, K: int, plan: TiesPlan,
                      dtype: torch.dtype = torch.float32, progress: Callable[[str], Any] | None = None) -> int:
    """Fill ``plan.thresholds`` (and ``plan.budgets``) exactly as :func:`adamerge_fast.merging.static.global_thresholds`
    does from the whole task vectors, reading them as a stream: ``read()`` yields the ``[K, *S]`` task vectors of
    every tensor in order (one call per pass), ``n`` is the number of entries per task. Returns the passes made."""
    r = static.keep_rank(n, plan.k, plan.keep)
    sel = [_RadixSelect(n - r + 1, dtype) for _ in range(K)]
    passes = 0
    while not all(s.done for s in sel):
        passes += 1
        for t in read():
            a = static._magnitudes(t)
            for i, s in enumerate(sel):
                if not s.done:
                    s.feed(a[i])
        for s in sel:
            if not s.done:
                s.end_pass()
    plan.thresholds = torch.stack([s.value for s in sel]).to(dtype)
    if plan.keep == "exact":
        plan.budgets = [r - s.above for s in sel]
        plan._budgets0 = list(plan.budgets)
    return passes


# ----------------------------------------------------------------------------------------- one tensor
def merge_tensor(key: str, base: torch.Tensor, fts: Sequence[torch.Tensor], opts: MergeOptions,
                 plan: TiesPlan | None, gen: torch.Generator | None, backend=None,
                 names: Sequence[str] | None = None) -> torch.Tensor:
    """The merged value of one tensor from the pretrained ``base`` and the fine-tuned ``fts`` (one tensor each),
    rounded once to ``base.dtype``; ``gen`` draws the DARE masks, ``plan`` carries TIES's global state."""
    K = len(fts)
    if opts.method == "average":
        coef = static.coefficients(K, 1.0 / K)
    elif not opts.uses_ties:
        coef = static.coefficients(K, opts.scale, opts.weights, opts.normalize)
    if opts.uses_ties and opts.ties_scope == "tensor" and not _whole_tensor(opts) and plan.k < 1.0:
        plan = _tensor_plan(key, base, fts, opts, plan, names)
    b = base.reshape(-1)
    out = torch.empty_like(b)
    for sl, tau in task_vector_chunks(key, base, fts, opts, gen, names):
        if not opts.uses_ties:
            out[sl] = static.combine(b[sl], tau, coef, backend)
        else:
            trimmed = static.trim(tau, plan)
            sel = static.select(trimmed, static.elect(trimmed, plan))
            out[sl] = static.disjoint_merge(b[sl], sel, opts.scale, opts.ties_merge, plan.weights, backend)
    return out.reshape(base.shape)


SORT_THREADS = 2  # tasks whose magnitudes are sorted side by side (torch's CPU sort of one row is single-threaded)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """An operand whose arithmetic with float32 tensors equals that of ``t.float()``: ``t`` itself when it widens
    to float32 exactly (bf16, fp16, fp32), else ``t.float()`` (a float64 operand would make the arithmetic
    float64)."""
    return t if t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.to(torch.float32)


def _explain_nonfinite(key: str, b: torch.Tensor, rows: Sequence[torch.Tensor], names: Sequence[str] | None) -> None:
    """Raise :class:`~adamerge_fast.io.NonFiniteCheckpointError` naming the first input of one tensor that is not
    finite (the pretrained ``b``, then each fine-tuned row), or the first task vector whose float32 difference
    overflows; return when every one is finite."""
    _check_base(b, key, names)
    for i, f in enumerate(rows):
        check_finite(f, _source(names, i, key), error=NonFiniteCheckpointError)
        check_finite(f.to(torch.float32, copy=True).sub_(_f32(b)), f"task vector {i}: key {key!r}",
                     error=NonFiniteCheckpointError)


def _magnitude_mask(f: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor | None:
    """mergekit's ``magnitude`` sparsification of one flat task vector ``f - b`` (in float32) as a boolean mask:
    the first ``m`` positions of ``torch.argsort(|f - b|, descending=True)`` (so ties in magnitude at the threshold
    fall as that unstable sort orders them); ``None`` when ``f - b`` is not finite. Where the ``m`` largest
    magnitudes are all larger than the rest (no tie at the threshold, e.g. float32 checkpoints), a selection
    (``kthvalue``) gives the same set without the sort."""
    n = f.numel()
    a = f.to(torch.float32, copy=True).sub_(_f32(b)).abs_()
    if not _all_finite(a):
        return None
    if f.dtype not in (torch.bfloat16, torch.float16) and n:
        v = a.kthvalue(n - m + 1).values
        keep = a >= v
        if int(keep.sum()) == m:
            return keep
        del keep
    idx = torch.empty(n, dtype=torch.long)
    torch.sort(a, descending=True, out=(a, idx))  # argsort's order; sorting in place saves a copy of the values
    del a
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx[:m]] = True
    return mask


def _magnitude_masks(key: str, b: torch.Tensor, rows: Sequence[torch.Tensor], density: float,
                     names: Sequence[str] | None) -> list[torch.Tensor]:
    """:func:`_magnitude_mask` of every task's flat row (``max(1, int(density * n))`` entries each), up to
    :data:`SORT_THREADS` tasks at a time (each holds 12 bytes per element while it sorts)."""
    m = max(1, int(density * b.numel()))
    if len(rows) > 1 and SORT_THREADS > 1 and b.numel() >= CHUNK:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(rows), SORT_THREADS)) as ex:
            masks = list(ex.map(lambda f: _magnitude_mask(f, b, m), rows))
    else:
        masks = [_magnitude_mask(f, b, m) for f in rows]
    if any(mask is None for mask in masks):
        _explain_nonfinite(key, b, rows, names)
    return masks


def _mergekit_mix(deltas: torch.Tensor, w: torch.Tensor, b: torch.Tensor, opts: MergeOptions) -> torch.Tensor:
    """mergekit 0.1.5's combination of sparsified float32 deltas ``[K, c]`` (overwritten) with weights ``w``
    (``[K, 1]``) onto the float32 base ``b`` (``[c]``), its operations in its order: weighted deltas, TIES's sign
    consensus (+1 where the sum is >= 0), sum over tasks, ``normalize`` by the (masked) weight sum, ``lambda``
    (``opts.scale``). Elementwise, so chunks of the elements give the whole tensor's values."""
    deltas.mul_(w)
    if opts.uses_ties:
        majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        normalize = opts.ties_merge == "mean"
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        normalize = bool(opts.normalize)
    if normalize:
        mixed /= divisor
    if opts.scale != 1:
        mixed *= opts.scale
    return mixed.add_(b)


def _mergekit_dare_deltas(b: torch.Tensor, rows: Sequence[torch.Tensor], opts: MergeOptions,
                          gen: torch.Generator | None) -> torch.Tensor:
    """mergekit's DARE sparsification of whole flat rows (one ``[K, n]`` draw of the masks from ``gen``; the
    rescaling uses the whole task vector's L1 norm): the float32 deltas ``[K, n]``."""
    keep = torch.rand((len(rows), b.numel()), generator=gen) >= opts.dare_p
    deltas = torch.empty((len(rows), b.numel()), dtype=torch.float32)
    for i, f in enumerate(rows):
        d = f.to(torch.float32, copy=True).sub_(b)
        masked = d * keep[i].to(torch.float32)
        if opts.dare_rescale == "l1":
            before, after = d.abs().sum(), masked.abs().sum()
            if not (before < 1e-7 or after < 1e-7):
                masked = masked * (before / after)
        elif opts.dare_rescale == "inverse":
            masked = masked / (1.0 - opts.dare_p)
        deltas[i] = masked
    return deltas


def merge_tensor_mergekit(key: str, base: torch.Tensor, fts: Sequence[torch.Tensor], opts: MergeOptions,
                          plan: TiesPlan | None = None, gen: torch.Generator | None = None,
                          backend=None, names: Sequence[str] | None = None) -> torch.Tensor:
    """One tensor merged with mergekit 0.1.5's semantics and float32 order of operations (``dtype: float32``):
    the fine-tuned deltas (sparsified per tensor: magnitude for TIES, seeded random for DARE), times their
    weights, sign consensus (TIES), summed, divided by the (masked) weight sum with ``normalize``, times
    ``lambda``, added to the base, rounded once to ``base.dtype``.

    Each fine-tuned tensor is read once. TIES's magnitude masks need a whole task vector each
    (:func:`_magnitude_masks`); the arithmetic is elementwise and runs over :data:`CHUNK` elements at a time
    (DARE: the whole tensor, its masks being one draw), so the values equal mergekit's whole-tensor ones."""
    K = len(fts)
    b = base.reshape(-1)
    n = b.numel()
    rows = [fts[i].reshape(-1) for i in range(K)]
    w = torch.tensor(list(opts.weights) if opts.weights is not None else [1.0] * K, dtype=torch.float32)
    w = w.reshape(K, 1)
    masks = None
    if opts.method == "ties" and opts.ties_k < 1.0:
        masks = _magnitude_masks(key, b, rows, opts.ties_k, names)
    out = torch.empty_like(b)
    step = max(n, 1) if opts.method == "dare" else CHUNK
    for a in range(0, max(n, 1), step):
        sl = slice(a, min(n, a + step))
        b32 = b[sl].to(torch.float32)
        if opts.method == "dare":
            deltas = _mergekit_dare_deltas(b32, [f[sl] for f in rows], opts, gen)
        else:
            deltas = torch.empty((K, b32.numel()), dtype=torch.float32)
            for i, f in enumerate(rows):
                torch.sub(_f32(f[sl]), b32, out=deltas[i])  # f.float() - b32
                if masks is not None:
                    deltas[i].mul_(masks[i][sl])
        out[sl] = _mergekit_mix(deltas, w, b32, opts)
        del deltas, b32
    if not _all_finite(out):
        _explain_nonfinite(key, b, rows, names)
    return out.reshape(base.shape)


# --------------------------------------------------------------------------------------------- the merge
def _is_hf_dir(p: Any) -> bool:
    return isinstance(p, (str, os.PathLike)) and Path(p).is_dir() and (Path(p) / "config.json").is_file()


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge_checkpoints(
    pretrained: Source,
    finetuned: Sequence[Source],
    method: str = "task_arithmetic",
    out: str | os.PathLike | None = None,
    *,
    scale: float | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool | None = None,
    ties_k: float | None = None,
    ties_merge: str | None = None,
    ties_scope: str | None = None,
    ties_keep: str | None = None,
    sign_tie: str | None = None,
    dare_p: float | None = None,
    dare_then: str | None = None,
    dare_rescale: str | None = None,
    seed: int = 0,
    task_vector_dtype: torch.dtype | str | None = None,
    like: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    trust_pickle: bool = False,
    backend: str | None = None,
) -> Path | dict[str, torch.Tensor]:
    """Merge ``finetuned`` checkpoints into ``pretrained`` one tensor at a time; write ``out`` or return the result.

    Every floating tensor of ``pretrained`` is merged from exact task vectors ``tau_k = theta_k - theta_0``
    (float32 for bf16/fp16 checkpoints, float64 for fp32) accumulated in float64 and rounded once to its dtype;
    other tensors are copied. Methods (``scale`` defaults to 0.3, ``like="mergekit"``:
    1.0):

    - ``"average"``: ``theta_0 + mean_k tau_k``;
    - ``"task_arithmetic"``: ``theta_0 + scale * sum_k w_k tau_k`` (``/ sum_k w_k`` with ``normalize``);
    - ``"ties"``: TIES with ``ties_k`` (0.2), ``ties_merge`` (``"mean"``/``"sum"``), ``ties_scope``
      (``"global"``/``"tensor"``), ``ties_keep`` (``"ties"``/``"exact"``), ``sign_tie``
      (``"majority"``/``"positive"``), ``weights`` (see :func:`adamerge_fast.merging.static.ties_merge`);
    - ``"dare"``: drop entries with probability ``dare_p`` (0.5; ``seed``), rescale (``dare_rescale``:
      ``"inverse"`` 1/(1-p), ``"l1"``, ``"none"``), then ``dare_then`` (``"task_arithmetic"`` or ``"ties"``).

    ``like="mergekit"``: mergekit 0.1.5's semantics and float32 arithmetic (see the module docstring): scale is
    mergekit's ``lambda``, ``weights`` its per-model ``weight``, ``ties_k`` its ``density`` (for DARE:
    ``1 - dare_p`` is the density, and TIES's magnitude trimming is off), ``normalize`` its ``normalize``.

    Args:
        pretrained, finetuned: checkpoint paths (``.safetensors`` files, sharded / Hugging Face directories,
            torch state-dict files), state dicts or modules; the fine-tuned ones must hold every floating tensor
            of ``pretrained`` with its shape and dtype.
        out: ``None`` returns ``{name: tensor}``; a path ending in ``.safetensors`` writes one file; any other
            path writes a Hugging Face directory (shards of at most ``max_shard_size`` bytes, e.g. ``"2GB"``, with
            ``model.safetensors.index.json``; the pretrained directory's config/tokenizer/generation files are
            copied when it is one). Written atomically; an existing ``out`` is replaced only with ``overwrite``,
            and never when it is (or contains) an input.
        task_vector_dtype: round each task vector to this dtype first (as stored task vectors would be); ``"int8"`` /
            ``"int4"``: quantize and dequantize each tensor of two or more dims (one scale per row; a scale and zero
            point per 128 columns), as ``AdaMergedModel(task_vector_dtype=...)`` stores them.
        progress: a progress bar over the bytes of the tensors (tqdm, on stderr).
    Returns:
        ``out`` as a ``Path``, or the merged state dict.
    """
    opts = MergeOptions(method=method, scale=scale,
                        weights=None if weights is None else tuple(float(w) for w in weights),
                        normalize=normalize, ties_k=ties_k, ties_merge=ties_merge, ties_scope=ties_scope,
                        ties_keep=ties_keep, sign_tie=sign_tie, dare_p=dare_p, dare_then=dare_then,
                        dare_rescale=dare_rescale, seed=seed, task_vector_dtype=task_vector_dtype,
                        like=like).resolved()
    if len(finetuned) == 0:
        raise ValueError("merge: need at least one fine-tuned checkpoint (got zero tasks)")
    K = len(finetuned)
    if opts.weights is not None and len(opts.weights) != K:
        raise ValueError(f"weights: expected one weight per fine-tuned checkpoint ({K}), got {len(opts.weights)}")
    base = open_source(pretrained, "pretrained checkpoint", trust_pickle)
    keys = floating_keys(base)
    if not keys:
        raise CheckpointError(f"{pretrained}: no floating-point tensors to merge")
    fts = []
    for i, f in enumerate(finetuned):
        if is_lora_source(f):  # a LoRA adapter: the fine-tuned checkpoint it stands for, resolved against the base
            fts.append(AdapterCheckpoint(base, as_adapter(f, i)))
            continue
        sd = open_source(f, "fine-tuned checkpoint", trust_pickle)
        what = str(f) if isinstance(f, (str, os.PathLike)) else f"fine-tuned state dict {i}"
        check_fits(base, sd, what, keys=keys, check_dtype=True, ref_name="the pretrained checkpoint")
        fts.append(sd)
    names = [source_name(pretrained, "the pretrained checkpoint")]
    names += [source_name(f, f"fine-tuned checkpoint {i}") for i, f in enumerate(finetuned)]
    merged_keys = set(keys)
    entries = [(k, *shape_dtype(base, k)) for k in base.keys()]
    total = sum(nbytes(s, d) for _, s, d in entries)

    def bar(desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)

    plan = None
    if opts.uses_ties and opts.like != "mergekit":
        plan = TiesPlan(k=opts.ties_k, scope=opts.ties_scope, keep=opts.ties_keep, sign_tie=opts.sign_tie,
                        weights=None if opts.weights is None else static._weights(K, opts.weights))
        _global_passes(plan, base, fts, keys, opts, bar, names)

    gen = torch.Generator(device="cpu").manual_seed(opts.seed) if opts.method == "dare" else None
    result: dict[str, torch.Tensor] = {}
    if out is None:
        sink = None
    else:
        inputs = [p for p in (pretrained, *finetuned) if isinstance(p, (str, os.PathLike))]
        sink = CheckpointWriter(out, entries, max_shard_size=max_shard_size,
                                metadata={"producer": "adamerge_fast", **opts.metadata()},
                                copy_files_from=pretrained if _is_hf_dir(pretrained) else None,
                                overwrite=overwrite, inputs=inputs)
    with (sink if sink is not None else _NullContext()), bar(f"merge ({opts.method})") as pbar:
        for k, shape, dtype in entries:
            b = base[k]
            if k in merged_keys:
                with torch.no_grad():
                    merge_one = merge_tensor_mergekit if opts.like == "mergekit" else merge_tensor
                    t = merge_one(k, b, _Lazy(fts, k), opts, plan, gen, backend, names)
                if not _all_finite(t):
                    check_finite(t, f"merged tensor {k!r} ({str(t.dtype).replace('torch.', '')})",
                                 " (scale too large for the checkpoint's dtype?)", error=NonFiniteCheckpointError)
            else:
                t = b
            if sink is not None:
                sink.write(k, t)
            else:
                result[k] = t
            pbar.update(nbytes(shape, dtype))
            del t, b
            malloc_trim()
    return Path(out) if out is not None else result


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _global_passes(plan: TiesPlan, base, fts, keys, opts: MergeOptions, bar, names: Sequence[str]) -> None:
    """The streaming passes TIES needs before merging: global thresholds, and the global majority sign."""
    def tensors(desc: str) -> Iterator[torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(opts.seed) if opts.method == "dare" else None
        with bar(desc) as pbar:
            for k in keys:
                b = base[k]
                for _, tau in task_vector_chunks(k, b, _Lazy(fts, k), opts, gen, names):
                    yield tau
                del b
                malloc_trim()
                pbar.update(nbytes(*shape_dtype(base, k)))

    K = len(fts)
    if plan.scope == "global" and plan.k < 1.0:
        n = sum(int(torch.Size(shape_dtype(base, k)[0]).numel()) for k in keys)
        dtype = acc_dtype(*(exact_tv_dtype(shape_dtype(base, k)[1]) for k in keys))
        count = iter(range(1, 100))
        global_thresholds(lambda: tensors(f"TIES thresholds (pass {next(count)})"), n, K, plan, dtype)
    if plan.scope == "global" and plan.sign_tie == "majority":
        total = 0.0
        for tau in tensors("TIES majority sign"):
            total += float(static.sign_sum(static.trim(tau, plan), plan.weights).sum())
        plan.restart()
        plan.majority = float(torch.sign(torch.tensor(total)))


def format_summary(seconds: float) -> str:
    """``"<seconds>s, peak RSS <GiB> GiB"`` for the final line of a merge."""
    return f"{seconds:.1f}s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"


__all__ = ["merge_checkpoints", "MergeOptions", "global_thresholds", "merge_tensor", "merge_tensor_mergekit",
           "open_source", "peak_rss_bytes", "format_summary", "METHODS"]
