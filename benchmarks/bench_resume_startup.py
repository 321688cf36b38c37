"""Start-up time of a resumed image-folder AdaMerging run: fast-forward by skipping batch indices vs by decoding.

An image-folder problem (2 tasks, a folder of JPEGs each, ``ImageTransform`` to ``--size``) is run for ``--steps``
steps with a checkpoint; then, interleaved over ``--rounds`` rounds, three runs of ONE more step are timed from
scratch (model, loaders, optimizer):

- ``resume, skip``: ``adamerge(..., resume=checkpoint)`` on the loaders of :func:`adamerge_fast.data.load_task_data`,
  which skip the checkpoint's batches without reading them (``skip_batches``) — the behaviour since issue #11;
- ``resume, decode``: the same loaders behind a wrapper without ``skip_batches``, so every skipped batch is drawn and
  its images decoded — the behaviour before;
- ``fresh``: a new 1-step run (nothing to fast-forward), the floor.

Both resumed runs are checked to give the same coefficients. Reported: the median wall time of each and the ratios.

Usage::

    python -m benchmarks.bench_resume_startup      # writes benchmarks/results/resume_startup.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import adamerge_fast as af
from adamerge_fast.data import ImageTransform, load_task_data

from ._env import env_info, loadavg, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("a", "b")


def _images(root: Path, n: int, px: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for t in TASKS:
        (root / t).mkdir(parents=True)
        for i in range(n):
            arr = (torch.rand(px, px + 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / t / f"{i}.jpg", quality=90)


class _NoSkip:
    """A loader without ``skip_batches``: ``adamerge`` must draw (decode) every skipped batch."""

    def __init__(self, dl):
        self.dl = dl

    def __iter__(self):
        return iter(self.dl)


def _problem(size: int):
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 32), nn.GELU(), nn.Linear(32, 16))
    fts = []
    for k in range(len(TASKS)):
        m = copy.deepcopy(pre)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        fts.append(m)
    heads = {t: nn.Linear(16, 5 + i).requires_grad_(False) for i, t in enumerate(TASKS)}
    return pre, fts, heads


def _run(root: Path, size: int, batch: int, steps: int, *, resume=None, checkpoint=None, skip=True):
    pre, fts, heads = _problem(size)
    t0 = time.perf_counter()
    data = {t: load_task_data(root / t, batch_size=batch, transform=ImageTransform(size), seed=i)
            for i, t in enumerate(TASKS)}
    if not skip:
        data = {t: _NoSkip(dl) for t, dl in data.items()}
    model = af.AdaMergedModel(pre, fts)
    af.adamerge(model, heads, data, steps=steps, lr=0.01, resume=resume, checkpoint=checkpoint, progress=False)
    return time.perf_counter() - t0, model.raw_coefficients.detach().clone()


def run(steps: int, batch: int, images: int, px: int, size: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _images(root, images, px)
        ck = root / "checkpoint.pt"
        t_first, _ = _run(root, size, batch, steps, checkpoint=ck)
        print(f"initial run of {steps} steps: {t_first:.1f}s")
        times: dict[str, list[float]] = {"resume, skip": [], "resume, decode": [], "fresh": []}
        coefs = {}
        for r in range(rounds):
            for label in times:
                if label == "fresh":
                    t, c = _run(root, size, batch, 1)
                else:
                    t, c = _run(root, size, batch, steps + 1, resume=ck, skip=label == "resume, skip")
                    coefs[label] = c
                times[label].append(t)
                print(f"round {r}: {label:15s} {t:6.2f}s")
        same = torch.equal(coefs["resume, skip"], coefs["resume, decode"])
        if not same:
            raise AssertionError("the two resumed runs disagree")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "all_s": times, "initial_run_s": t_first, "same_coefficients": same,
            "decode_over_skip": med["resume, decode"] / med["resume, skip"],
            "skip_over_fresh": med["resume, skip"] / med["fresh"],
            "decode_over_fresh": med["resume, decode"] / med["fresh"]}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_resume_startup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps before the checkpoint (default 200)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=96, help="images per task folder (default 96)")
    ap.add_argument("--px", type=int, default=224, help="height of the JPEGs (width + 32; default 224)")
    ap.add_argument("--size", type=int, default=32, help="ImageTransform size (default 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "resume_startup"))
    args = ap.parse_args(argv)
    env = env_info("cpu")
    res = run(args.steps, args.batch_size, args.images, args.px, args.size, args.rounds)
    env["loadavg_end"] = loadavg()
    cmd = "python -m benchmarks.bench_resume_startup" + (" " + " ".join(argv) if argv else "")
    data = {"date": env["date"], "command": cmd, "machine": f"{env['cpu_model']}, {env['nproc']} logical CPUs",
            "options": vars(args), "env": env, "results": res}
    m = res["median_s"]
    lines = [
        "# Start-up of a resumed image-folder run: skipping vs decoding the fast-forwarded batches",
        "",
        f"- date: {data['date']}; machine: {data['machine']}; torch {env['torch']}; load {env['loadavg_start']} -> "
        f"{env['loadavg_end']}",
        f"- command: `{cmd}`; 2 tasks, {args.images} JPEGs of {args.px}x{args.px + 32} per task, ImageTransform "
        f"{args.size}, batch {args.batch_size}; checkpoint at step {args.steps}, then one more step; median of "
        f"{args.rounds} interleaved rounds, each run from scratch (model, loaders, optimizer)",
        "",
        "| run | median s |",
        "| --- | ---: |",
        *(f"| {k} | {v:.2f} |" for k, v in m.items()),
        "",
        f"decode / skip: {res['decode_over_skip']:.1f}x; skip / fresh: {res['skip_over_fresh']:.2f}x; decode / fresh: "
        f"{res['decode_over_fresh']:.1f}x; the two resumed runs give the same coefficients: "
        f"{res['same_coefficients']}.",
    ]
    js, md = write_results(args.out, data, "\n".join(lines))
    print("\n".join(lines[-6:]))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
