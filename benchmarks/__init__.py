"""The benchmarks, run from the checkout, each as ``python -m benchmarks.<name> [options]`` (``--help``):

- ``adamerging_step``: one AdaMerging step end to end, ours against the peers' approaches (time, memory, floor);
- ``bench_cpu_merge``: the C++ extension's merge / dcoef loops against torch and the memory floor;
- ``bench_host_overhead``: host time per op call, eager fast path against the custom ops;
- ``bench_triton_ops``: the Triton kernels on a CUDA GPU.

The op microbenchmarks run with ``pytest benchmarks --benchmark-only`` (``test_bench_ops.py``). Every script
records its environment through :mod:`benchmarks._env` and writes its results under ``benchmarks/results/``.
"""
