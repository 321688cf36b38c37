"""Quantized task vectors: the container every op reads, quantization and plain-torch dequantization.

A :class:`QuantizedTensor` holds the K stacked task vectors of one parameter, logical shape ``[K, *S]``, seen as
``K`` matrices ``[R, C]`` with ``R = S[0]`` and ``C = prod(S[1:])`` (a 1-D ``S`` is one row ``[1, S[0]]``; a 0-D
one is ``[1, 1]``). Two formats (Kim et al., *Task Vector Quantization for Memory-Efficient Model Merging*,
ICCV 2025, quantize task vectors with min-max affine quantization and dequantize before merging; here the ops
read the quantized values directly)::

    int8 (bits=8):  qdata int8  [K, R, C], scales fp32 [K, R]            value = scales[k, r] * qdata[k, r, c]
                    symmetric, one scale per output row per task: scale = max|row| / 127, q in [-127, 127]
    int4 (bits=4):  qdata uint8 [K, R, ceil(C/2)], scales fp32 [K, R, G], zeros uint8 [K, R, G],
                    G = ceil(C / group_size):      value = scales[k, r, g] * (q[k, r, c] - zeros[k, r, g]),
                    g = c // group_size; column c is in byte c // 2, the low nibble for even c, the high for odd.
                    Asymmetric min-max per group of ``group_size`` (default 128) input columns, as the paper's
                    affine scheme: lo = min(min(group), 0), hi = max(max(group), 0), scale = (hi - lo) / 15,
                    zero = round(-lo / scale) in [0, 15], q = clamp(round(x / scale) + zero, 0, 15). The range
                    always holds 0, so exact zeros (TIES-trimmed entries, untouched parameters) stay exactly 0.

The rounding error of every element is at most ``scale / 2`` of its row (int8) or group (int4). The
dequantized value is *defined* as the fp32 ``scale * q`` / ``scale * (q - zero)``: the forward of every op
merges with it and the coefficient gradient is taken against it.

Every ``[R, C]`` matrix of a stack is row-major and contiguous (the stack's dim 0 may have any stride, e.g. a
slice of rows); the kernels (``cpu``: ``csrc/cpu/qmerge_kernels.inc``; ``triton``: ``triton_kernels/quant.py``)
dequantize inside their loops, so no dense task vector is rebuilt.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

FORMATS = {"int8": 8, "int4": 4}  # the task_vector_dtype strings
DEFAULT_GROUP_SIZE = 128
_QDTYPE = {8: torch.int8, 4: torch.uint8}


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """``(R, C)`` of the matrix view of one task vector of shape ``shape`` (``S``)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    return shape[0], math.prod(shape[1:])


def format_bits(fmt: str) -> int:
    """8 or 4 for ``"int8"`` / ``"int4"``; ``ValueError`` otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"quantized task-vector format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


class QuantizedTensor(NamedTuple):
    """``[K, *S]`` stacked task vectors in int8 (per-row scale) or int4 (per-group scale and zero point).

    ``qdata``/``scales``/``zeros`` as in the module docstring (``zeros`` is None for int8); ``bits``: 8 or 4;
    ``group_size``: input columns per int4 group (0 for int8: one scale per row); ``shape``: the logical
    ``[K, *S]``. Build with :func:`quantize` (or :func:`empty` + :func:`quantize_into`, one task at a time).
    """

    qdata: Tensor
    scales: Tensor
    zeros: Optional[Tensor]
    bits: int
    group_size: int
    shape: torch.Size

    # -- description --------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self.shape[0])

    @property
    def task_shape(self) -> torch.Size:
        return torch.Size(self.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def format(self) -> str:
        return "int8" if self.bits == 8 else "int4"

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in self.components() if t is not None)

    def components(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.qdata, self.scales, self.zeros

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"QuantizedTensor({self.format}, shape={list(self.shape)}{g}, device={self.device})"

    # -- conversion ----------------------------------------------------------------------------------
    def to(self, device=None) -> "QuantizedTensor":
        """The same task vectors on ``device`` (the packed form moves as it is)."""
        z = None if self.zeros is None else self.zeros.to(device)
        return self._replace(qdata=self.qdata.to(device), scales=self.scales.to(device), zeros=z)

    def contiguous(self) -> "QuantizedTensor":
        z = None if self.zeros is None else self.zeros.contiguous()
        return self._replace(qdata=self.qdata.contiguous(), scales=self.scales.contiguous(), zeros=z)

    def dequantize_task(self, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Task ``k``'s dequantized vector ``[*S]`` in ``dtype`` (computed in fp32, fp64 for ``dtype=float64``)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        R, C = rows_cols(self.shape[1:])
        if self.bits == 8:
            v = self.qdata[k].to(acc) * self.scales[k].to(acc)[:, None]
        else:
            packed = self.qdata[k]
            q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(R, -1)[:, :C]
            g = torch.arange(C, device=q.device) // self.group_size
            v = (q.to(acc) - self.zeros[k][:, g].to(acc)) * self.scales[k][:, g].to(acc)
        return v.reshape(self.shape[1:]).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized ``[K, *S]`` stack in ``dtype``."""
        return torch.stack([self.dequantize_task(k, dtype) for k in range(self.num_tasks)])

    def rows(self, sl: slice) -> "QuantizedTensor":
        """Rows ``sl`` of every task (views; ``S`` must be at least 2-D): ``[K, len(sl), *S[1:]]``."""
        if len(self.shape) < 3:
            raise ValueError(f"QuantizedTensor.rows: needs task vectors of at least 2 dims, shape {list(self.shape)}")
        n = len(range(*sl.indices(int(self.shape[1]))))
        z = None if self.zeros is None else self.zeros[:, sl]
        return self._replace(qdata=self.qdata[:, sl], scales=self.scales[:, sl], zeros=z,
                             shape=torch.Size((self.shape[0], n, *self.shape[2:])))


# ---------------------------------------------------------------------------------------------- checks
def component_shapes(shape: Sequence[int], bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of ``qdata``, ``scales`` (and ``zeros``) of a ``[K, *S]`` stack in this format."""
    K = int(shape[0])
    R, C = rows_cols(shape[1:])
    if bits == 8:
        return {"qdata": (K, R, C), "scales": (K, R)}
    G = -(-C // group_size)
    return {"qdata": (K, R, -(-C // 2)), "scales": (K, R, G), "zeros": (K, R, G)}


def check_format(bits: int, group_size: int, where: str = "quantized task vectors") -> None:
    if bits == 8:
        if group_size != 0:
            raise ValueError(f"{where}: int8 has one scale per row (group_size 0), got group_size={group_size}")
    elif bits == 4:
        if not (isinstance(group_size, int) and group_size >= 2 and group_size % 2 == 0):
            raise ValueError(f"{where}: int4 group_size must be an even integer >= 2, got {group_size!r}")
    else:
        raise ValueError(f"{where}: bits must be 8 or 4, got {bits!r}")


def check_quantized(where: str, qt: QuantizedTensor, task_shape: Sequence[int] | None = None) -> None:
    """Raise a one-line error naming ``where`` when the parts of ``qt`` do not fit each other (or ``task_shape``)."""
    check_format(qt.bits, qt.group_size, where)
    shape = tuple(qt.shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"{where}: need at least one task vector, logical shape {list(shape)}")
    if task_shape is not None and tuple(task_shape) != shape[1:]:
        raise ValueError(f"{where}: quantized task vectors must have shape [K, {', '.join(map(str, task_shape))}], "
                         f"got {list(shape)}")
    want = component_shapes(shape, qt.bits, qt.group_size)
    parts = {"qdata": qt.qdata, "scales": qt.scales, "zeros": qt.zeros}
    dtypes = {"qdata": _QDTYPE[qt.bits], "scales": torch.float32, "zeros": torch.uint8}
    if qt.bits == 8 and qt.zeros is not None:
        raise ValueError(f"{where}: int8 task vectors have no zero points (zeros must be None)")
    for name, shp in want.items():
        t = parts[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtypes[name]:
            raise TypeError(f"{where}: {name} must be {dtypes[name]} for {qt.format}, got {t.dtype}")
        if tuple(t.shape) != shp:
            raise ValueError(f"{where}: {name} must have shape {list(shp)} for logical shape {list(shape)}, "
                             f"got {list(t.shape)}")
        if t.device != qt.qdata.device:
            raise ValueError(f"{where}: {name} is on {t.device} but qdata is on {qt.qdata.device}")


# -------------------------------------------------------------------------------------------- quantize
def empty(shape: Sequence[int], fmt: str = "int8", *, group_size: int = DEFAULT_GROUP_SIZE,
          device: torch.device | str | None = None) -> QuantizedTensor:
    """An unfilled ``[K, *S]`` stack (fill task k with :func:`quantize_into`)."""
    bits = format_bits(fmt)
    gs = 0 if bits == 8 else int(group_size)
    check_format(bits, gs)
    shp = component_shapes(shape, bits, gs)
    q = torch.zeros(shp["qdata"], dtype=_QDTYPE[bits], device=device)
    s = torch.zeros(shp["scales"], dtype=torch.float32, device=device)
    z = torch.zeros(shp["zeros"], dtype=torch.uint8, device=device) if bits == 4 else None
    return QuantizedTensor(q, s, z, bits, gs, torch.Size(tuple(int(x) for x in shape)))


def _quantize_rows(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One task vector as ``[R, C]`` fp32 -> its (qdata, scales, zeros) rows."""
    R, C = x.shape
    if bits == 8:
        scale = x.abs().amax(1) / 127.0 if C else x.new_zeros(R)  # [R]
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale, None
    G = -(-C // group_size)
    xg = torch.nn.functional.pad(x, (0, G * group_size - C)).reshape(R, G, group_size)  # zero padding: in range
    lo = xg.amin(-1).clamp(max=0.0)
    hi = xg.amax(-1).clamp(min=0.0)
    scale = (hi - lo) / 15.0  # [R, G]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    zero = torch.round(-lo * inv).clamp_(0, 15)
    q = (torch.round(xg * inv[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8).reshape(R, -1)[:, :C]
    if C % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zero.to(torch.uint8)


def quantize_into(qt: QuantizedTensor, k: int, x: Tensor) -> None:
    """Quantize one task vector ``x`` (shape ``S``, any floating dtype) into slot ``k`` of ``qt``."""
    if tuple(x.shape) != tuple(qt.shape[1:]):
        raise ValueError(f"quantize_into: task vector must have shape {list(qt.shape[1:])}, got {list(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize_into: task vector must be floating point, got {x.dtype}")
    R, C = rows_cols(x.shape)
    xf = x.detach().to(device=qt.device, dtype=torch.float32).reshape(R, C)
    if not torch.isfinite(xf).all():
        raise ValueError("quantize_into: the task vector has NaN or inf values")
    q, s, z = _quantize_rows(xf, qt.bits, qt.group_size)
    qt.qdata[k].copy_(q)
    qt.scales[k].copy_(s)
    if z is not None:
        qt.zeros[k].copy_(z)


def quantize(stack: Tensor, fmt: str = "int8", *, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedTensor:
    """``[K, *S]`` floating task vectors -> :class:`QuantizedTensor` (``fmt`` ``"int8"`` or ``"int4"``), one task
    at a time (never more than one fp32 copy of one task vector)."""
    if not isinstance(stack, Tensor) or stack.dim() < 1 or stack.shape[0] < 1:
        raise ValueError(f"quantize: expected stacked task vectors [K, *S] with K >= 1, got "
                         f"{list(stack.shape) if isinstance(stack, Tensor) else type(stack).__name__}")
    qt = empty(stack.shape, fmt, group_size=group_size, device=stack.device)
    for k in range(stack.shape[0]):
        quantize_into(qt, k, stack[k])
    return qt


def max_error(qt: QuantizedTensor) -> Tensor:
    """The bound on the rounding error of each element, ``scale / 2`` of its row or group: ``[K, *S]`` fp32."""
    R, C = rows_cols(qt.shape[1:])
    K = qt.num_tasks
    if qt.bits == 8:
        b = (qt.scales / 2)[:, :, None].expand(K, R, C)
    else:
        g = torch.arange(C, device=qt.device) // qt.group_size
        b = (qt.scales / 2)[:, :, g]
    return b.reshape(qt.shape)
