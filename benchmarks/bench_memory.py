"""Memory within a budget: peak RSS of AdaMerging set-ups, each in a fresh process.

Sections (``python -m benchmarks.bench_memory SECTION [...]``; results in ``benchmarks/results/memory_*.{json,md}``):

- ``fusionbench``: ViT-B/32 image encoder (open_clip, random init) x 8 tasks, the pretrained and 8 fine-tuned models
  built in memory by the process; FusionBench's ``LayerWiseMergedModel`` (``fusion-bench`` 0.2.33, in its own
  environment: ``--fb-python``) driven by the loop of its ``LayerWiseAdaMergingAlgorithm`` vs ``AdaMergedModel`` +
  ``adamerge`` given the same in-memory models, with ``release_finetuned=True`` (fp32 and bf16 task vectors), and
  with the fine-tuned models built on demand by loaders. Peak RSS (``VmHWM``) of construction + steps.
- ``plan``: the memory plan (:func:`adamerge_fast.memory.plan`, with the process's own RSS measured before any
  model exists) against the measured peak RSS of the whole run, on two workloads.
- ``checkpoint``: activation checkpointing on / off on a long-sequence causal-LM workload: peak RSS, step time.
- ``lm-entropy``: a Llama-shaped model (4 layers, width 1024, V = 128256, 2048 tokens per task, 3 tasks, merged LM
  head): fused head + entropy (``ops.linear_entropy``) vs logits + ``ops.entropy``, and a "body" run whose loss
  ignores the LM head (its increase is what both share): peak RSS and step time.

Every configuration runs in a fresh process (``--_worker``), so each peak is its own. Figures are ratios measured
side by side in one invocation, plus absolute values on the machine named in the results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TAG = "BENCH_MEMORY_RESULT "
GiB = 1 << 30
FB_PYTHON = "/work/wt/c-compat/.venv-compat/bin/python"  # an environment with fusion-bench==0.2.33 (issue 13)


# ------------------------------------------------------------------------------------------------ process side
def _status(key: str) -> int:
    from adamerge_fast.memory import rss_bytes

    return rss_bytes(key) or 0


def _reset_hwm() -> bool:
    from benchmarks.adamerging_step.protocol import _reset_peak_rss

    return _reset_peak_rss()


def _vit_b32(seed: int):
    import torch

    from adamerge_fast._compat import import_open_clip

    oc = import_open_clip()
    torch.manual_seed(seed)
    return oc.transformer.VisionTransformer(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                                            mlp_ratio=4.0, output_dim=512).eval()


def _finetuned(pre, seed: int, scale: float = 1e-3):
    import torch

    m = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def _heads_and_data(K: int, batch: int, steps: int, width: int = 512, classes: int = 10, image: int = 224):
    import torch

    g = torch.Generator().manual_seed(100)
    heads = [torch.randn(classes, width, generator=g) for _ in range(K)]
    data = [[torch.randn(batch, 3, image, image, generator=g) for _ in range(steps)] for _ in range(K)]
    return heads, data


def _warm(model, x) -> None:
    """One forward + backward on one input: the runtime's one-time state (thread pools, kernels) is part of the
    baseline of every method, not of its first step."""
    import torch

    y = model(x[:1])
    (y.float().sum() * torch.ones((), requires_grad=True)).backward()


def worker_fusionbench(cfg: dict) -> dict:
    """ViT-B/32 x K: FusionBench's wrapper or ours, given the same in-memory fine-tuned models (or loaders)."""
    import torch

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    K, steps, batch = cfg["K"], cfg["steps"], cfg["batch"]
    pre = _vit_b32(0)
    heads, data = _heads_and_data(K, batch, steps)
    _warm(pre, data[0][0])
    method = cfg["method"]
    loaders = method.startswith("ours-loaders")
    fts = None if loaders else [_finetuned(pre, k + 1) for k in range(K)]
    gc.collect()
    out = {"rss_models_bytes": _status("VmRSS"), "hwm_reset": _reset_hwm()}
    t0 = time.perf_counter()
    times = []
    if method == "fusionbench":
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss
        from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

        n_layers = sum(1 for p in pre.parameters() if p.requires_grad)
        module = LayerWiseMergedModel(get_layer_wise_weights(K, n_layers, 0.3), pre, fts, clamp_weights=True)
        del fts
        out["build_s"] = time.perf_counter() - t0
        opt = torch.optim.Adam([module.merge_weight], lr=1e-3)
        module.merge_weights()
        for s in range(steps):  # FusionBench's LayerWiseAdaMergingAlgorithm.test_time_adaptation, step by step
            ts = time.perf_counter()
            for k in range(K):
                feats = module(data[k][s])
                logits = torch.nn.functional.normalize(feats, dim=-1) @ heads[k].t()
                loss = entropy_loss(logits)
                loss.backward(retain_graph=True)
            opt.step()
            opt.zero_grad()
            module.merge_weights()
            times.append(time.perf_counter() - ts)
    else:
        import adamerge_fast as af
        from adamerge_fast.models.heads import ClassificationHead

        dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg["tv_dtype"]]
        sources = [(lambda k=k: _finetuned(pre, k + 1)) for k in range(K)] if loaders else fts
        model = af.AdaMergedModel(pre, sources, task_vector_dtype=dtype, release_finetuned=cfg["release"],
                                  task_names=[f"t{k}" for k in range(K)])
        del fts, sources
        out["build_s"] = time.perf_counter() - t0
        hmods = {f"t{k}": ClassificationHead(heads[k]) for k in range(K)}
        dsets = {f"t{k}": data[k] for k in range(K)}
        stamps = [time.perf_counter()]
        af.adamerge(model, hmods, dsets, steps=steps, task_batching=cfg["batching"], progress=False,
                    callback=lambda *a: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps, stamps[1:])]
    out.update(peak_rss_bytes=_status("VmHWM"), step_s=times, ru_maxrss_bytes=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def _llama(hidden, layers, vocab, inter=None, seed=0, heads=None, kv=None):
    import torch

    from adamerge_fast._compat import import_transformers

    tf = import_transformers()
    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 64)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter or int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv or heads, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def _lm_finetuned_state(lm, seed, scale=1e-3):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"lm." + k: (v + torch.randn(v.shape, generator=g, dtype=v.dtype) * scale) if v.is_floating_point() else v
            for k, v in lm.state_dict().items()}


class _BodyHead:
    """A head whose 'logits' are the first 8 hidden features: the loss runs through the body but not the LM head."""

    def __call__(self, out):
        return out.hidden[:, :8]


class _OneRowHead:
    """The LM head (merged) on one row per task: its merged weight and weight gradient, without the logits."""

    def __call__(self, out):
        return replace(out, hidden=out.hidden[:1])


def worker_lm(cfg: dict) -> dict:
    """A causal LM, K tasks of ``batch`` sequences of ``seq`` tokens, fine-tuned models built on demand; ``variant``:
    ``unfused`` | ``fused`` | ``body``; optional activation checkpointing. Reports the memory plan made before."""
    import torch

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    if cfg.get("as_limit_gib"):  # an allocation beyond it fails in this process instead of waking the OOM killer
        lim = int(cfg["as_limit_gib"] * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import adamerge_fast as af
    from adamerge_fast import memory
    from adamerge_fast._compat import import_transformers
    from adamerge_fast.models import hf

    import_transformers()  # the libraries are part of the process the plan measures
    out = {"rss_start_bytes": _status("VmRSS")}
    K, steps = cfg["K"], cfg["steps"]
    lm = _llama(cfg["hidden"], cfg["layers"], cfg["vocab"], cfg.get("inter"), kv=cfg.get("kv"))
    variant = cfg["variant"]
    pre = hf.CausalLMForEntropy(lm, "all", fused_entropy=variant != "unfused")
    g = torch.Generator().manual_seed(7)
    data = {f"t{k}": [{"input_ids": torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)}
                      for _ in range(steps)] for k in range(K)}
    head = {"body": _BodyHead, "head": _OneRowHead}.get(variant, hf.IdentityHead)
    heads = {t: head() for t in data}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg["tv_dtype"]]
    ck = bool(cfg.get("checkpoint"))
    if cfg.get("plan"):
        t0 = time.perf_counter()
        plan = memory.plan(pre, K, data["t0"][0], heads={"t0": hf.IdentityHead()}, task_vector_dtype=dtype,
                           steps=steps, checkpoint_activations=ck, process=out["rss_start_bytes"])
        out.update(plan_total_bytes=plan.total, plan_items=plan.items, plan_build=plan.build, plan_step=plan.step,
                   plan_s=time.perf_counter() - t0)
    loaders = [(lambda k=k: _lm_finetuned_state(lm, k + 1)) for k in range(K)]
    t0 = time.perf_counter()
    model = af.AdaMergedModel(pre, loaders, task_vector_dtype=dtype, task_names=list(data), checkpoint_activations=ck)
    del loaders
    gc.collect()
    out["build_s"] = time.perf_counter() - t0
    out["rss_after_build_bytes"] = _status("VmRSS")
    out["build_peak_bytes"] = _status("VmHWM")
    out["hwm_reset"] = _reset_hwm()
    stamps = [time.perf_counter()]
    af.adamerge(model, heads, data, steps=steps, task_batching="concat", progress=False,
                callback=lambda *a: stamps.append(time.perf_counter()))
    out["step_s"] = [b - a for a, b in zip(stamps, stamps[1:])]
    out["step_peak_bytes"] = _status("VmHWM")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process
    return out


def worker_vit_plan(cfg: dict) -> dict:
    """ViT-B/32 x K from loaders, the memory plan made before anything is built, then the run."""
    import torch

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    import adamerge_fast as af
    from adamerge_fast import memory
    from adamerge_fast._compat import import_open_clip
    from adamerge_fast.models.heads import ClassificationHead

    import_open_clip()  # the libraries are part of the process the plan measures
    out = {"rss_start_bytes": _status("VmRSS")}
    K, steps, batch = cfg["K"], cfg["steps"], cfg["batch"]
    pre = _vit_b32(0)
    heads, data = _heads_and_data(K, batch, steps)
    hmods = {f"t{k}": ClassificationHead(heads[k]) for k in range(K)}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg["tv_dtype"]]
    t0 = time.perf_counter()
    plan = memory.plan(pre, K, data[0][0], heads=hmods, task_vector_dtype=dtype, steps=steps,
                       task_batching=cfg["batching"], process=out["rss_start_bytes"])
    out.update(plan_total_bytes=plan.total, plan_items=plan.items, plan_build=plan.build, plan_step=plan.step,
               plan_s=time.perf_counter() - t0)
    model = af.AdaMergedModel(pre, [(lambda k=k: _finetuned(pre, k + 1)) for k in range(K)], task_vector_dtype=dtype,
                              task_names=list(hmods))
    out["build_peak_bytes"] = _status("VmHWM")
    af.adamerge(model, hmods, {f"t{k}": data[k] for k in range(K)}, steps=steps, task_batching=cfg["batching"],
                progress=False)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


WORKERS = {"fusionbench": worker_fusionbench, "lm": worker_lm, "vit_plan": worker_vit_plan}


# ------------------------------------------------------------------------------------------------- driver side
def run_worker(kind: str, cfg: dict, python: str | None = None, timeout: int = 1200) -> dict:
    """One configuration in a fresh process (``python``: another environment's interpreter)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    p = subprocess.run([python or sys.executable, "-m", "benchmarks.bench_memory", "--_worker", kind, json.dumps(cfg)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(TAG):
            res = json.loads(line[len(TAG):])
            res["wall_s"] = time.perf_counter() - t0
            return {**cfg, **res}
    return {**cfg, "error": f"worker exited {p.returncode}: {(p.stderr or p.stdout)[-3000:]}"}


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _env() -> dict:
    from benchmarks._env import env_info

    return env_info("cpu")


def _machine() -> str:
    e = _env()
    return f"{e['device']}, {e['cpu_threads']} torch threads, torch {e['torch']}"


def _write(name: str, rows: list[dict], md: str, extra: dict | None = None) -> None:
    from benchmarks._env import write_results

    write_results(RESULTS / f"memory_{name}", {"env": _env(), "rows": rows, **(extra or {})}, md)
    print(md)


def section_fusionbench(args) -> None:
    base = {"K": 8, "steps": args.steps, "batch": 2, "threads": args.threads}
    configs = [("fusionbench", {"method": "fusionbench"}, args.fb_python),
               ("ours fp32, release_finetuned, concat", {"method": "ours", "tv_dtype": "fp32", "release": True,
                                                         "batching": "concat"}, None),
               ("ours fp32, release_finetuned, sequential", {"method": "ours", "tv_dtype": "fp32", "release": True,
                                                             "batching": "sequential"}, None),
               ("ours bf16, release_finetuned, concat", {"method": "ours", "tv_dtype": "bf16", "release": True,
                                                         "batching": "concat"}, None),
               ("ours bf16, release_finetuned, sequential", {"method": "ours", "tv_dtype": "bf16", "release": True,
                                                             "batching": "sequential"}, None),
               ("ours fp32, models kept (release_finetuned=False)", {"method": "ours", "tv_dtype": "fp32",
                                                                     "release": False, "batching": "concat"}, None),
               ("ours bf16, fine-tuned models from loaders", {"method": "ours-loaders", "tv_dtype": "bf16",
                                                             "release": False, "batching": "concat"}, None)]
    rows = []
    for label, c, py in configs:
        r = run_worker("fusionbench", {**base, **c}, python=py)
        r["label"] = label
        rows.append(r)
        print(label, _gib(r.get("peak_rss_bytes")), r.get("error", "")[:300], flush=True)
    fb = rows[0].get("peak_rss_bytes")
    lines = ["# AdaMerging within a memory budget: ours vs FusionBench's wrapper (ViT-B/32 x 8 tasks)", "",
             "`python -m benchmarks.bench_memory fusionbench` (each row a fresh process). The process builds the "
             "pretrained ViT-B/32 image encoder (open_clip, random init, 87.8M parameters, 335 MiB fp32) and 8 "
             "fine-tuned copies (pretrained + seeded noise) in memory, then the wrapper and "
             f"{args.steps} AdaMerging steps (8 tasks x 2 images, layer-wise). FusionBench: "
             "`LayerWiseMergedModel` of fusion-bench 0.2.33 (it turns the fine-tuned modules into task vectors in "
             "place) driven by the loop of its `LayerWiseAdaMergingAlgorithm.test_time_adaptation` (merge once per "
             "step, one backward per task). Ours: `AdaMergedModel(pre, finetuned, release_finetuned=True, "
             "task_vector_dtype=...)` + `adamerge`. Peak RSS = `VmHWM` from just after the models exist (construction "
             "+ steps); the models alone are the 'models built' column. 'loaders': the fine-tuned models are built "
             "on demand by callables (as from checkpoint files), never all in memory.", "",
             "| method | models built (RSS) | peak RSS | vs FusionBench | build | step (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]!r} | | | | |")
            continue
        st = sorted(r.get("step_s") or [0])
        ratio = f"{r['peak_rss_bytes'] / fb:.2f}x" if fb else "-"
        lines.append(f"| {r['label']} | {_gib(r['rss_models_bytes'])} | {_gib(r['peak_rss_bytes'])} | {ratio} | "
                     f"{r.get('build_s', 0):.1f} s | {st[len(st) // 2]:.2f} s |")
    lines += ["", f"Machine: {_machine()}, {args.threads or 'default'} threads; glibc malloc defaults.", ""]
    _write("fusionbench", rows, "\n".join(lines))


def section_plan(args) -> None:
    configs = [("vit_plan", "ViT-B/32 x 8 tasks x 4 images, fp32, concat, loaders",
                {"K": 8, "steps": 2, "batch": 4, "tv_dtype": "fp32", "batching": "concat"}),
               ("vit_plan", "ViT-B/32 x 4 tasks x 8 images, bf16, sequential, loaders (held out)",
                {"K": 4, "steps": 2, "batch": 8, "tv_dtype": "bf16", "batching": "sequential"}),
               ("lm", "Llama 4 x 512, V 32000, 3 tasks x 2 x 512 tokens, bf16 task vectors, logits (unfused)",
                {"K": 3, "steps": 2, "batch": 2, "seq": 512, "hidden": 512, "layers": 4, "vocab": 32000,
                 "tv_dtype": "bf16", "variant": "unfused", "plan": True}),
               ("lm", "same, fused head + entropy",
                {"K": 3, "steps": 2, "batch": 2, "seq": 512, "hidden": 512, "layers": 4, "vocab": 32000,
                 "tv_dtype": "bf16", "variant": "fused", "plan": True})]
    rows = []
    for kind, label, c in configs:
        r = run_worker(kind, {**c, "threads": args.threads})
        r["label"] = label
        rows.append(r)
        print(label, _gib(r.get("plan_total_bytes")), _gib(r.get("peak_rss_bytes")), r.get("error", "")[:300],
              flush=True)
    lines = ["# Memory plan vs measured peak RSS", "",
             "`python -m benchmarks.bench_memory plan`: in a fresh process, `adamerge_fast.memory.plan` (made before "
             "any model is built; `process` = the RSS measured at that moment) against the process's peak RSS "
             "(`ru_maxrss`) over the whole run (building the task vectors from loaders, 2 AdaMerging steps). The "
             "plan's `runtime` constants (`memory.RUNTIME_BYTES`, `memory.ALLOCATOR_OVERHEAD`) were set from an "
             "earlier run of the first, third and fourth workloads; the second was not used to set them.", "",
             "| workload | plan: build | plan: step | plan total | measured peak | measured / plan |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]!r} | | | | |")
            continue
        lines.append(f"| {r['label']} | {_gib(r['plan_build'])} | {_gib(r['plan_step'])} | "
                     f"{_gib(r['plan_total_bytes'])} | {_gib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / r['plan_total_bytes']:.2f} |")
    lines += ["", f"Machine: {_machine()}; glibc malloc defaults.", ""]
    _write("plan", rows, "\n".join(lines))


def section_checkpoint(args) -> None:
    base = {"K": 3, "steps": 3, "batch": 1, "seq": args.seq, "hidden": 512, "layers": 4, "vocab": 32000,
            "tv_dtype": "bf16", "variant": "fused", "threads": args.threads}
    rows = []
    for ck in (False, True):
        r = run_worker("lm", {**base, "checkpoint": ck})
        r["label"] = "checkpointed blocks" if ck else "plain"
        rows.append(r)
        print(r["label"], _gib(r.get("step_peak_bytes")), r.get("step_s"), r.get("error", "")[:300], flush=True)
    lines = ["# Activation checkpointing (`checkpoint_activations=True`)", "",
             f"`python -m benchmarks.bench_memory checkpoint --seq {args.seq}`: Llama-shaped model (4 layers, width "
             f"512, V = 32000, fused head + entropy), 3 tasks x 1 sequence of {args.seq} tokens, bf16 task vectors, "
             "concat batching, 3 steps, each setting in a fresh process. 'step increase' = peak RSS during the steps "
             "minus the RSS after building the model.", "",
             "| setting | RSS after build | peak RSS (steps) | step increase | step (median of the last 2) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]!r} | | | |")
            continue
        st = sorted(r["step_s"][1:])
        lines.append(f"| {r['label']} | {_gib(r['rss_after_build_bytes'])} | {_gib(r['step_peak_bytes'])} | "
                     f"{_gib(r['step_peak_bytes'] - r['rss_after_build_bytes'])} | {st[len(st) // 2]:.2f} s |")
    if all("error" not in r for r in rows):
        inc = [r["step_peak_bytes"] - r["rss_after_build_bytes"] for r in rows]
        t = [sorted(r["step_s"][1:])[len(r["step_s"][1:]) // 2] for r in rows]
        lines += ["", f"Checkpointed / plain: step increase {inc[1] / inc[0]:.2f}x, step time {t[1] / t[0]:.2f}x."]
    lines += ["", f"Machine: {_machine()}; glibc malloc defaults.", ""]
    _write("checkpoint", rows, "\n".join(lines))


def section_lm_entropy(args) -> None:
    base = {"K": 3, "steps": 2, "batch": 1, "seq": args.tokens, "hidden": 1024, "layers": 4, "vocab": 128256,
            "inter": 2816, "kv": 8, "tv_dtype": "bf16", "threads": args.threads}
    rows = []
    for variant in ("body", "head", "fused", "unfused"):
        cap = {"as_limit_gib": args.as_limit_gib} if variant == "unfused" and args.as_limit_gib else {}
        r = run_worker("lm", {**base, "variant": variant, **cap}, timeout=3600)
        r["label"] = variant
        rows.append(r)
        print(variant, _gib(r.get("step_peak_bytes")), r.get("step_s"), r.get("error", "")[:300], flush=True)
    by = {r["label"]: r for r in rows}
    lines = ["# Fused LM head + entropy vs logits + entropy (Llama-shaped, V = 128256)", "",
             f"`python -m benchmarks.bench_memory lm-entropy`: LlamaForCausalLM (4 layers, width 1024, 16 heads / 8 "
             f"KV heads, MLP 2816, V = 128256, untied head: 309M parameters), 3 tasks x {args.tokens} tokens "
             "(`positions=\"all\"`, concat batching: 3 x 2048 = 6144 rows of logits), bf16 task vectors, the LM head "
             "merged like every other layer, 2 AdaMerging steps, each variant in a fresh process. 'unfused': "
             "`CausalLMForEntropy` returns the logits and `ops.entropy` takes them; 'fused': it returns hidden states "
             "+ the merged head and `ops.linear_entropy(..., reduction=\"mean\")` takes 64 MiB tiles of logits "
             "(gradients formed in the forward); 'body': the loss reads 8 hidden features (the LM head is built and "
             "stored but unused); 'head': the fused path on one row per task, so the merged head weight and its "
             "fp32 weight gradient exist (as in the unfused path's merged linear layer) but no logits to speak of. "
             "'step increase' = peak RSS during the steps minus RSS after building the merged model; 'head + "
             "logits' = step increase minus body's; 'logits' = step increase minus head's.", "",
             "| variant | RSS after build | peak RSS (steps) | step increase | head + logits | logits "
             "| step 2 time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]!r} | | | | |")
            continue
        inc = r["step_peak_bytes"] - r["rss_after_build_bytes"]

        def minus(label):
            o = by.get(label, {})
            return inc - (o["step_peak_bytes"] - o["rss_after_build_bytes"]) if "step_peak_bytes" in o else None

        lines.append(f"| {r['label']} | {_gib(r['rss_after_build_bytes'])} | {_gib(r['step_peak_bytes'])} | "
                     f"{_gib(inc)} | {_gib(minus('body'))} | {_gib(minus('head'))} | {r['step_s'][-1]:.1f} s |")
    if all("error" not in r for r in rows):
        incs = {k: v["step_peak_bytes"] - v["rss_after_build_bytes"] for k, v in by.items()}
        both = {k: incs[k] - incs["body"] for k in ("fused", "unfused")}
        logits = {k: incs[k] - incs["head"] for k in ("fused", "unfused")}
        lines += ["", f"Fused / unfused: logits memory {logits['fused'] / logits['unfused']:.3f}x "
                  f"(1/{logits['unfused'] / max(logits['fused'], 1):.1f}); head-and-logits memory "
                  f"{both['fused'] / both['unfused']:.3f}x (1/{both['unfused'] / max(both['fused'], 1):.1f}); step "
                  f"time {by['fused']['step_s'][-1] / by['unfused']['step_s'][-1]:.2f}x."]
    lines += ["", f"Machine: {_machine()}; glibc malloc defaults.", ""]
    _write("lm_entropy", rows, "\n".join(lines))


SECTIONS = {"fusionbench": section_fusionbench, "plan": section_plan, "checkpoint": section_checkpoint,
            "lm-entropy": section_lm_entropy}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        res = WORKERS[argv[1]](json.loads(argv[2]))
        print(TAG + json.dumps(res, default=str), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("section", nargs="+", choices=sorted(SECTIONS))
    p.add_argument("--steps", type=int, default=2, help="fusionbench: AdaMerging steps (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--fb-python", default=FB_PYTHON, help="python of an environment with fusion-bench 0.2.33")
    p.add_argument("--seq", type=int, default=2048, help="checkpoint: tokens per sequence (default 2048)")
    p.add_argument("--tokens", type=int, default=2048, help="lm-entropy: tokens per task (default 2048)")
    p.add_argument("--as-limit-gib", type=float, default=None,
                   help="lm-entropy: address-space limit of the unfused worker (GiB), so that it fails alone")
    args = p.parse_args(argv)
    for s in args.section:
        SECTIONS[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
