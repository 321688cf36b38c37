"""End-to-end AdaMerging step benchmark: ours against the peers' approaches, side by side in one run.

Run it as ``python -m benchmarks.adamerging_step [options]`` from the checkout (``--help`` lists the options);
:func:`main` takes the same arguments as a list (``adamerge-fast bench`` forwards to it). The modules:
:mod:`.workloads` (the models, task vectors, heads and batches), :mod:`.runners` (one runner per method),
:mod:`.protocol` (equivalence check, interleaved timing, memory in fresh processes, the floor),
:mod:`.breakdown` (per-kernel throughput, profiler breakdown), :mod:`.report` (goals, markdown, plot, files) and
:mod:`.cli` (the options and one workload's run).

Methods (all layer-wise, init 0.3, clamp [0, 1], Adam lr 1e-3 betas (0.9, 0.999), one batch per task per step,
the loss the sum over tasks of the batch-mean softmax entropy of a fixed per-task head):

- ``official`` (a): the official AdaMerging code (EnnengYang/AdaMerging, ``main_layer_wise_adamerging.py``):
  for every task batch, every parameter is merged on the CPU with autograd (``sum(p_k * lambda_k)`` over the
  pretrained weights with coefficient 1 and the K task vectors, a Python loop over parameters), copied to the
  device and run through the model (``torch.func.functional_call`` in place of its ``make_functional`` /
  ``load_weights``); the task losses are summed and one backward and one Adam step follow. Each task's graph,
  holding that task's device copy of the merged weights, lives until the backward.
- ``functional_call`` (b): FusionBench's layer-wise AdaMerging (``LayerWiseMergedModel.merge_weights`` +
  ``LayerWiseAdaMergingAlgorithm.test_time_adaptation``): merged on the device once per step by a Python
  loop over tasks and parameters (``sd[name] = sd[name] + tau * w``), a ``functional_call`` forward and a
  ``backward(retain_graph=True)`` per task (autograd holds the merged weights; every backward builds their
  full-size gradients and multiplies them with every task vector), Adam, then the merge for the next step.
- ``ours-<backend>-<concat|sequential>`` (c, d): :class:`adamerge_fast.AdaMergedModel` driven by
  :func:`adamerge_fast.adamerge` itself (run in a worker thread and paused between steps, so what is timed is
  the library's own loop) for every backend available on the device (``reference``, ``cpu``, ``triton``,
  ``cuda``) and both ``task_batching`` modes.

Both peers use the official ``softmax_entropy`` formula (FusionBench adds an ``eps`` inside the log; left out
so all methods compute the same function). Before anything is timed, every method runs ``--check-steps`` steps
from the same initial coefficients on the same batches and its losses and coefficient tables are compared with
``official`` (fp32: 1e-5 absolute on the coefficients, 1e-4 relative on the loss); a mismatch aborts.

Timing: all methods live in one process and their steps are interleaved (ABCABC..., the order rotated every
round) so that a noisy, shared machine affects them alike; only ratios from one run are meaningful. Memory:
each method is re-run in a fresh subprocess (``--mem-steps`` steps) which reports its peak (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the peak RSS, ``VmHWM`` reset after the model and task vectors are
built, and ``ru_maxrss``) and the increase over the state right after the model and task vectors are built.

The floor: ``max(matmul FLOPs / matmul rate, bytes that must move / copy bandwidth)`` with the matmul rate and
copy bandwidth measured in the same run; FLOPs = 3x the backbone forward (forward, input gradient, coefficient
gradient ``dy^T x``) + 2x the frozen heads; bytes = every task vector and pretrained weight read once forward
and once backward, plus every forward activation written and read once.

Workloads (``--workloads``): on the CPU ``vit-small`` (a reduced ViT) and ``vit-b32-cpu`` (the ViT-B/32
image tower, 8 tasks x 2 images); on CUDA ``vit-b32`` / ``vit-b32-bf16`` (8 tasks x 16 images, fp32 /
bf16 autocast), ``vit-l14`` (bf16 autocast; ``vit-l14-fp32``) and ``llama7b`` (4 decoder layers shaped like
Llama-2-7B, hidden 4096, MLP 11008, K=3 bf16 task vectors, 2 x 256 tokens per task, 32000-way heads). A GPU
workload takes a few minutes (``official`` is slow and capped by ``--max-method-seconds``), so on a machine with a
per-command time limit run one workload per command; each writes its own ``adamerging_step_cuda_<workload>.*``::

    python -m benchmarks.adamerging_step --workloads vit-b32
    python -m benchmarks.adamerging_step --workloads vit-b32-bf16 --no-kernels
    python -m benchmarks.adamerging_step --workloads vit-l14 --no-kernels
    python -m benchmarks.adamerging_step --workloads llama7b --no-kernels

A method that runs out of GPU memory is dropped from the run and reported as such. Results: JSON, markdown and a
PNG under ``benchmarks/results/`` (``--out``), with the device, date, versions and the exact command.
"""

from .cli import main

__all__ = ["main"]
