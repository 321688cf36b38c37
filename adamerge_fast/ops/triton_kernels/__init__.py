"""Triton kernels of the ``"triton"`` backend, one module per op (Liger-Kernel style: kernel + launcher).

* :mod:`.merge`          ``merge`` / ``dcoef`` of one tensor, and the one-launch ``merge_many`` / ``dcoef_many``
* :mod:`.merged_linear`  ``x @ (w0 + sum_k c_k tau_k).T`` forward, ``dx`` and ``dcoef_w`` without ever holding an
                         ``[out, in]`` gradient (and, in the fused strategy, without the merged weight either)
* :mod:`.entropy`        row-wise softmax entropy and its gradient, chunked over the class dimension
* :mod:`.linear_entropy` the tile step of ``linear_entropy``: a logits tile's entropy and gradient, in place

Importing this package imports Triton (``ImportError`` when it is not installed). Whether the kernels run
compiled (CUDA) or through the Triton interpreter (CPU tensors) is fixed at import time by
``TRITON_INTERPRET``; :data:`INTERPRET` records which.
"""

from ._common import INTERPRET

__all__ = ["INTERPRET"]
