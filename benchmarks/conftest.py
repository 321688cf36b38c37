"""pytest-benchmark set-up of the op microbenchmarks (``pytest benchmarks --benchmark-only``)."""

import os

from benchmarks._env import default_device, env_info


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the run's environment (:func:`benchmarks._env.env_info`) beside pytest-benchmark's own."""
    machine_info["adamerge_fast_env"] = env_info(default_device(os.environ.get("ADAMERGE_BENCH_DEVICE")))
