"""The end-to-end AdaMerging step benchmark: ``python -m benchmarks.adamerging_step [options]``.

A thin wrapper over :func:`adamerge_fast.bench.main` (the same code as ``adamerge-fast bench``); see that module
for the methods, the equivalence check, the timing and memory protocol and the floor. Examples::

    python -m benchmarks.adamerging_step                              # this device's default workloads
    python -m benchmarks.adamerging_step --workloads vit-b32,vit-b32-bf16
    python -m benchmarks.adamerging_step --workloads vit-tiny --steps 2 --out /tmp/bench
"""

from __future__ import annotations

import sys

from adamerge_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.adamerging_step"))
