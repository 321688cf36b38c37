"""Equality with mergekit 0.1.5 itself (optional: ``make test-mergekit``; skipped unless ADAMERGE_TEST_MERGEKIT=1
and ``.venv-mergekit`` exists). mergekit runs in its own environment through ``benchmarks/mergekit_shim.py``.

- ``like="mergekit"`` reproduces mergekit's task arithmetic, TIES and DARE-TIES (at density 1, where the random
  masks keep everything) element by element, weights, ``normalize`` and ``lambda`` included;
- our float64 task arithmetic is within one bf16 ulp of mergekit's float32 result;
- the mergekit configuration exported for learned AdaMerging coefficients makes mergekit reproduce
  ``AdaMergedModel``'s merged model (one bf16 ulp at most, float32 vs float64 accumulation).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from adamerge_fast.export import export_merged, mergekit_config
from adamerge_fast.io import load_state_dict
from adamerge_fast.merging import AdaMergedModel, stream
from adamerge_fast.models import hf

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = ROOT / ".venv-mergekit" / "bin" / "python"
pytestmark = pytest.mark.skipif(os.environ.get("ADAMERGE_TEST_MERGEKIT") != "1" or not MERGEKIT.exists(),
                                reason="needs ADAMERGE_TEST_MERGEKIT=1 and .venv-mergekit (make test-mergekit)")
K = 3


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    path = out.with_suffix(".yml")
    path.write_text(json.dumps(cfg, indent=2))
    r = subprocess.run([str(MERGEKIT), str(ROOT / "benchmarks" / "mergekit_shim.py"), str(path), str(out),
                        "--random-seed", "0", "--quiet", "--no-copy-tokenizer"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    sd = load_state_dict(out)
    return {k: sd[k] for k in sd}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mk")
    base = hf.tiny_causal_lm("llama", seed=0, hidden_size=64, intermediate_size=128, vocab_size=96).to(torch.bfloat16)
    base.save_pretrained(d / "base")
    sd = base.state_dict()
    for k in range(K):
        g = torch.Generator().manual_seed(k + 1)
        # coarse fine-tuning steps: bf16 task vectors with many magnitude ties, as on real checkpoints
        ft = {n: (v.float() + 0.004 * torch.randn(v.shape, generator=g)).bfloat16() for n, v in sd.items()}
        base.load_state_dict(ft)
        base.save_pretrained(d / f"ft{k}")
    return d, d / "base", [d / f"ft{k}" for k in range(K)]


def _cfg(method, base, fts, weights, params, density=None):
    models = [{"model": str(f), "parameters": {"weight": w, **({"density": density} if density else {})}}
              for f, w in zip(fts, weights)]
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": params,
            "dtype": "float32", "out_dtype": "bfloat16"}


def _equal(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}"


def _within_one_ulp(a, b, max_fraction=0.01):
    """One bf16 ulp apart at most, or (where the merge cancels to about zero) within float64 rounding of the
    tensor's scale."""
    differ = 0
    for k in a:
        up = torch.nextafter(b[k], torch.full_like(b[k], float("inf")))
        dn = torch.nextafter(b[k], torch.full_like(b[k], float("-inf")))
        tiny = (a[k].double() - b[k].double()).abs() <= 2.0**-40 * float(b[k].abs().max())
        assert ((a[k] == b[k]) | (a[k] == up) | (a[k] == dn) | tiny).all(), k
        differ += int((a[k] != b[k]).sum())
    assert differ <= max_fraction * sum(t.numel() for t in a.values())


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7)])
def test_task_arithmetic(models, normalize, lam):
    d, base, fts = models
    w = [0.5, 0.3, 0.2]
    ref = run_mergekit(_cfg("task_arithmetic", base, fts, w, {"normalize": normalize, "lambda": lam}),
                       d / f"ta-{normalize}")
    ours = stream.merge_checkpoints(base, fts, "task_arithmetic", like="mergekit", weights=w, normalize=normalize,
                                    scale=lam)
    _equal(ours, ref)
    exact = stream.merge_checkpoints(base, fts, "task_arithmetic", weights=w, normalize=normalize, scale=lam)
    _within_one_ulp(exact, ref)


@pytest.mark.parametrize("normalize,density,lam", [(True, 0.2, 1.0), (False, 0.35, 0.6)])
def test_ties(models, normalize, density, lam):
    d, base, fts = models
    w = [1.0, 0.6, 1.3]
    ref = run_mergekit(_cfg("ties", base, fts, w, {"normalize": normalize, "lambda": lam}, density),
                       d / f"ties-{normalize}")
    ours = stream.merge_checkpoints(base, fts, "ties", like="mergekit", weights=w, normalize=normalize,
                                    ties_k=density, scale=lam)
    _equal(ours, ref)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_chunked_and_threaded_equal_mergekit(models, monkeypatch, method):
    """The mergekit preset's arithmetic over chunks of 97 elements, and TIES's magnitude masks found two tasks at a
    time in threads (every tensor of at least one chunk), still equal mergekit's whole-tensor result."""
    d, base, fts = models
    w = [0.7, 1.2, 0.4]
    monkeypatch.setattr(stream, "CHUNK", 97)
    params = {"normalize": True, "lambda": 0.8}
    density = 0.3 if method == "ties" else None
    ref = run_mergekit(_cfg(method, base, fts, w, params, density), d / f"chunked-{method}")
    kw = {"ties_k": density} if method == "ties" else {}
    ours = stream.merge_checkpoints(base, fts, method, like="mergekit", weights=w, normalize=True, scale=0.8, **kw)
    _equal(ours, ref)


def test_dare_ties_consensus(models):
    """At density 1 DARE keeps every entry: mergekit's sign consensus and (non-normalized) sum are reproduced."""
    d, base, fts = models
    w = [1.0, 0.5, 0.8]
    ref = run_mergekit(_cfg("dare_ties", base, fts, w, {"lambda": 0.9}, 1.0), d / "dare")
    ours = stream.merge_checkpoints(base, fts, "dare", like="mergekit", weights=w, dare_p=0.0, scale=0.9)
    _equal(ours, ref)


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_adamerging_coefficients_through_mergekit(models, tmp_path, granularity):
    from test_cli import _word_tokenizer

    d, base, fts = models
    _word_tokenizer(["a", "b"])[0].save_pretrained(base)
    spec = hf.build_causal_lm(base, fts, ["a", "b", "c"])
    model = AdaMergedModel(spec.backbone, spec.finetuned, granularity=granularity, task_vector_dtype=torch.float32)
    with torch.no_grad():
        model.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(7))
    ours = export_merged(model, spec.export, tmp_path / "ours")
    ref = run_mergekit(mergekit_config(model, spec.export, base, fts, "bfloat16"), tmp_path / "mk")
    got = load_state_dict(ours)
    _within_one_ulp({k: got[k] for k in got}, ref)
