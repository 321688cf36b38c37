"""Host (Python + dispatcher) time per op call: the eager fast path vs the ``torch.library`` custom ops.

Every public op runs in plain eager mode through an ``autograd.Function`` over the backend
(``adamerge_fast.ops._library.EAGER_FAST_PATH``, the default) and through the custom ops otherwise
(``torch.compile``, fake tensors, modes, transforms; or ``ADAMERGE_EAGER_CUSTOM_OPS=1``). On tiny shapes the
kernels take almost no time, so the difference is what the Python and dispatcher layers cost per call: on a
GPU this is the time the device may sit idle between kernels when the host cannot run ahead.

Each case is forward + backward of one op on tiny tensors with the ``reference`` backend (the same backend
calls on both paths), the two paths interleaved per round; median of the rounds.

Usage::

    python -m benchmarks.bench_host_overhead            # writes benchmarks/results/host_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import adamerge_fast.ops as amf
from adamerge_fast.ops import _library

from ._env import env_info, loadavg, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _cases(backend: str):
    g = torch.Generator().manual_seed(0)
    K = 2
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    w0, tw = torch.randn(8, 8, generator=g), torch.randn(K, 8, 8, generator=g)
    b0, tb = torch.randn(8, generator=g), torch.randn(K, 8, generator=g)
    cw = torch.rand(K, generator=g, requires_grad=True)
    cb = torch.rand(K, generator=g, requires_grad=True)
    base, deltas = torch.randn(8, generator=g), torch.randn(K, 8, generator=g)
    bases = [torch.randn(8, generator=g) for _ in range(16)]
    dl = [torch.randn(K, 8, generator=g) for _ in range(16)]
    cm = torch.rand(16, K, generator=g, requires_grad=True)
    logits = torch.randn(4, 10, generator=g, requires_grad=True)

    def merged_linear():
        amf.merged_linear(x, w0, tw, cw, b0, tb, cb, backend=backend).sum().backward()

    def merge():
        amf.merge(base, deltas, cw, backend=backend).sum().backward()

    def merge_many():
        sum(o.sum() for o in amf.merge_many(bases, dl, cm, backend=backend)).backward()

    def entropy():
        amf.entropy(logits, backend=backend).sum().backward()

    return {"merged_linear": merged_linear, "merge": merge, "merge_many (16 tensors)": merge_many, "entropy": entropy}


def _time(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def run(backend: str = "reference", rounds: int = 15, calls: int = 200) -> dict:
    res = {}
    for name, fn in _cases(backend).items():
        per = {"fast path (autograd.Function)": [], "custom op": []}
        for flag in (True, False):  # warm up both paths
            _library.EAGER_FAST_PATH = flag
            _time(fn, 20)
        try:
            for _ in range(rounds):
                for label, flag in (("fast path (autograd.Function)", True), ("custom op", False)):
                    _library.EAGER_FAST_PATH = flag
                    per[label].append(_time(fn, calls))
        finally:
            _library.EAGER_FAST_PATH = True
        med = {k: statistics.median(v) * 1e6 for k, v in per.items()}
        res[name] = {"us_per_call_fwd_bwd": med, "saved_us": med["custom op"] - med["fast path (autograd.Function)"]}
        print(f"{name:26s} " + "  ".join(f"{k}: {v:7.1f} us" for k, v in med.items())
              + f"  saved {res[name]['saved_us']:.1f} us")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_host_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS / "host_overhead"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = env_info("cpu")
    res = run(args.backend, args.rounds)
    env["loadavg_end"] = loadavg()
    data = {
        "date": env["date"],
        "command": "python -m benchmarks.bench_host_overhead",
        "machine": f"{env['cpu_model']}, {env['nproc']} logical CPUs, {env['platform']}",
        "torch": env["torch"],
        "backend": args.backend,
        "env": env,
        "results": res,
    }
    lines = [
        "# Host time per op call: eager fast path vs custom op",
        "",
        f"- date: {data['date']}; machine: {data['machine']}; torch {data['torch']}; backend `{args.backend}`",
        f"- command: `{data['command']}`; forward + backward on tiny tensors, paths interleaved, median of "
        f"{args.rounds} rounds of 200 calls, 1 thread",
        "",
        "| op | fast path us | custom op us | saved us per call |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        m = r["us_per_call_fwd_bwd"]
        lines.append(f"| {name} | {m['fast path (autograd.Function)']:.1f} | {m['custom op']:.1f} | "
                     f"{r['saved_us']:.1f} |")
    js, md = write_results(args.out, data, "\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
