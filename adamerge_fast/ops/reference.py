"""Plain-torch implementations of the kernel primitives: the ``reference`` backend's kernels, the default
``entropy`` of every backend, and the fp64 path of the Triton backend.

Accumulation is fp32 (fp64 when any input is fp64); task vectors may be stored in bf16/fp16 below an fp32 base.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype


def _flat(t: torch.Tensor, k: int | None = None) -> torch.Tensor:
    return t.reshape(-1) if k is None else t.reshape(k, -1)


def merge(base: torch.Tensor, deltas: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``base[*S] + sum_k coef[k] * deltas[k]`` with ``deltas[K, *S]``, ``coef[K]`` -> ``[*S]`` in base.dtype."""
    K = deltas.shape[0]
    acc = acc_dtype(base.dtype, deltas.dtype, coef.dtype)
    c = coef.to(acc)
    if deltas.dtype == acc:
        # one matrix-vector product over all K task vectors: [N, K] @ [K]
        out = torch.addmv(_flat(base).to(acc), _flat(deltas, K).t(), c)
    else:  # low-precision task vectors: upcast one at a time (never K full-size fp32 copies)
        out = _flat(base).to(acc, copy=True)
        for k in range(K):
            out.add_(_flat(deltas[k]).to(acc) * c[k])
    return out.reshape(base.shape).to(base.dtype)


def dcoef(grad: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``[(grad * deltas[k]).sum() for k]`` with ``grad[*S]``, ``deltas[K, *S]`` -> ``[K]`` in the acc dtype."""
    K = deltas.shape[0]
    acc = acc_dtype(grad.dtype, deltas.dtype)
    g = _flat(grad).to(acc)
    if deltas.dtype == acc:
        return torch.mv(_flat(deltas, K), g)
    return torch.stack([torch.dot(_flat(deltas[k]).to(acc), g) for k in range(K)])


def entropy_fwd(logits: torch.Tensor) -> torch.Tensor:
    """``-(softmax(z) * log_softmax(z)).sum(-1)``: ``logits[N, C]`` -> ``H[N]`` in fp32 (fp64 for fp64 input).

    ``-inf`` entries of a row with a finite entry contribute 0 (``p log p -> 0``); a row with a NaN or a ``+inf``,
    or of only ``-inf``, gives NaN, as the plain formula does (its ``log_softmax`` is NaN in every entry, and
    ``p != 0`` keeps those NaN in the sum)."""
    acc = acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    p = logp.exp()
    plogp = torch.where(p != 0, p * logp, torch.zeros((), dtype=acc, device=logits.device))
    return -plogp.sum(-1)


def entropy_bwd(grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``dH/dz = -p * (log p + H)`` scaled per row by ``grad[N]``: -> ``[N, C]`` in logits.dtype; 0 at the ``-inf``
    entries of a row with a finite entry, NaN in every entry of a row whose ``H`` is NaN."""
    acc = acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    p = logp.exp()
    h = -torch.where(p != 0, p * logp, torch.zeros((), dtype=acc, device=logits.device)).sum(-1, keepdim=True)
    d = torch.where(p != 0, -p * (logp + h), h * 0)  # h * 0: 0 for a finite row, NaN for a NaN row
    return (d * grad.to(acc).unsqueeze(-1)).to(logits.dtype)
