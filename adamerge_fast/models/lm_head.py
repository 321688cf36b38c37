"""Hidden states + the linear head that turns them into logits, handed over instead of the logits.

A causal LM's entropy objective sees ``[N, V]`` logits with V up to 128k. A model built with
``fused_entropy=True`` (:class:`~adamerge_fast.models.hf.CausalLMForEntropy`) returns a :class:`LinearHeadInputs`
instead: the hidden states ``[N, D]`` and the head's tensors — for a head that ``AdaMergedModel`` merges, the
pretrained weight, the task vectors and this forward's coefficients — and :func:`adamerge_fast.optim.adamerge`
computes each task's mean entropy with :func:`adamerge_fast.ops.linear_entropy`, which never holds the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..merging.adamerged import MergedLinear


@dataclass
class LinearHeadInputs:
    """``hidden [N, D]`` and a linear head ``W = weight + sum_k coef_w[k] tau_w[k]`` (``weight [V, D]`` alone when
    ``tau_w`` is None), bias likewise; what the logits ``hidden @ W.T + b`` would be made of."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    tau_w: Tensor | None = None
    coef_w: Tensor | None = None
    tau_b: Tensor | None = None
    coef_b: Tensor | None = None
    backend: str | None = None
    chunk: int | None = None

    @classmethod
    def from_head(cls, hidden: Tensor, head: nn.Module, *, chunk: int | None = None) -> "LinearHeadInputs":
        """From an ``nn.Linear`` (its current weight and bias: inside ``AdaMergedModel.forward`` a tied or generic
        head's are the merged ones) or a :class:`MergedLinear` (read during ``AdaMergedModel.forward``: its
        coefficient rows of this forward's table)."""
        if isinstance(head, MergedLinear):
            coefs = head._ctx.get()  # the table of the running AdaMergedModel.forward (raises outside it)
            return cls(hidden, head.w0, head.b0, head.tau_w, coefs[head.w_row], head.tau_b,
                       None if head.tau_b is None else coefs[head.b_row], head.backend, chunk)  # fmt: skip
        if isinstance(head, nn.Linear):
            return cls(hidden, head.weight, head.bias, chunk=chunk)
        raise TypeError(f"fused entropy needs a linear head (nn.Linear or a merged one), got {type(head).__name__}")

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    def split(self, sizes: Sequence[int]) -> list["LinearHeadInputs"]:
        """One :class:`LinearHeadInputs` per group of ``sizes`` rows (the head is shared)."""
        return [replace(self, hidden=h) for h in torch.split(self.hidden, list(sizes))]

    def entropy(self, reduction: str = "none") -> Tensor:
        """:func:`adamerge_fast.ops.linear_entropy` of these rows (``[N]``, or its ``"mean"`` / ``"sum"``)."""
        return ops.linear_entropy(self.hidden, self.weight, self.bias, tau_w=self.tau_w, coef_w=self.coef_w,
                                  tau_b=self.tau_b, coef_b=self.coef_b, reduction=reduction, chunk=self.chunk,
                                  backend=self.backend)  # fmt: skip

    def logits(self) -> Tensor:
        """The logits ``[N, V]``, materialized (for checks; the point of this class is not to)."""
        w, b = self.weight, self.bias
        if self.tau_w is not None:
            w = ops.merge(w, self.tau_w, self.coef_w, backend=self.backend)
        if b is not None and self.tau_b is not None:
            b = ops.merge(b, self.tau_b, self.coef_b, backend=self.backend)
        dt = self.hidden.dtype
        return nn.functional.linear(self.hidden, w.to(dt), None if b is None else b.to(dt))


def rows_of(out) -> int:
    """Rows of a model output: a tensor's first dimension, or a :class:`LinearHeadInputs`' rows."""
    return out.rows if isinstance(out, LinearHeadInputs) else out.shape[0]


def split_rows(out, sizes: Sequence[int]) -> list:
    """``out`` (a tensor or a :class:`LinearHeadInputs`) split into groups of ``sizes`` rows."""
    return out.split(list(sizes)) if isinstance(out, LinearHeadInputs) else list(torch.split(out, list(sizes)))


def mean_entropy(prediction) -> Tensor:
    """The batch-mean softmax entropy of a head's output: logits ``[N, C]`` (:func:`adamerge_fast.ops.entropy`), or
    a :class:`LinearHeadInputs` (:func:`adamerge_fast.ops.linear_entropy` with ``reduction="mean"``)."""
    if isinstance(prediction, LinearHeadInputs):
        return prediction.entropy("mean")
    return ops.entropy(prediction).mean()


__all__ = ["LinearHeadInputs", "rows_of", "split_rows", "mean_entropy"]
