"""AdaMerging within a memory budget: task vectors built one fine-tuned model at a time (every kind of source,
release of in-memory models, storage kinds, one rounding), activation checkpointing (gradients equal to the
plain run), and the causal-LM paths (fused head + entropy, ``positions="all"`` with concat batching)."""

import copy
import gc
import weakref

import pytest
import torch
from test_adamerged import mlp, perturbed

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.io import CheckpointError, save_safetensors
from adamerge_fast.merging import build
from adamerge_fast.merging.task_vectors import round_to_odd_f32, rounded_difference_
from adamerge_fast.models.heads import ClassificationHead

INF = float("inf")


def test_every_kind_of_source_gives_the_same_task_vectors(tmp_path):
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2, 3, 4, 5)]
    ref = af.task_vectors(pre, fts)
    save_safetensors(fts[2].state_dict(), tmp_path / "ft2.safetensors")
    sources = [fts[0], dict(fts[1].state_dict()), tmp_path / "ft2.safetensors", lambda: fts[3],
               lambda: str(tmp_path / "ft2.safetensors")]
    tv = build.build_task_vectors(dict(pre.named_parameters()), sources)
    for k in (0, 1, 2, 3):
        for n in ref:
            assert torch.equal(tv[n][k], ref[n][k]), (k, n)
    assert all(torch.equal(tv[n][4], ref[n][2]) for n in ref)
    # through AdaMergedModel, with a generator (its length from task_names)
    a = af.AdaMergedModel(pre, (f for f in fts), task_names=list("abcde"))
    b = af.AdaMergedModel(pre, task_vectors=ref)
    x = torch.randn(4, 5)
    assert torch.equal(a(x), b(x))


def test_models_are_loaded_one_at_a_time():
    """A loader is called only when its model's turn comes, after the previous model was dropped."""
    pre = mlp(0)
    alive, calls = [], []

    def loader(seed):
        def load():
            calls.append(seed)
            gc.collect()
            assert all(r() is None for r in alive), "the previous fine-tuned model is still alive"
            m = perturbed(pre, seed)
            alive.append(weakref.ref(m))
            return m
        return load

    model = af.AdaMergedModel(pre, [loader(s) for s in (1, 2, 3)])
    assert calls == [1, 2, 3] and model.num_tasks == 3
    gc.collect()
    assert all(r() is None for r in alive)


def test_release_finetuned_frees_in_memory_models_and_keeps_the_result():
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    fts[1][3].weight = pre[3].weight  # a fine-tuned module sharing a tensor with the pretrained one
    sd = dict(perturbed(pre, 3).state_dict())
    ref = af.AdaMergedModel(pre, [copy.deepcopy(fts[0]), copy.deepcopy(fts[1]), dict(sd)])
    before = {n: p.clone() for n, p in pre.named_parameters()}
    model = af.AdaMergedModel(pre, [*fts, sd], release_finetuned=True)
    x = torch.randn(3, 5)
    assert torch.equal(model(x), ref(x))
    assert all(p.numel() == 0 for p in fts[0].parameters())
    assert fts[1][3].weight is pre[3].weight and pre[3].weight.numel() == 21  # shared with the pretrained: kept
    assert all(t.numel() == 0 for t in sd.values())
    assert all(torch.equal(before[n], p) for n, p in pre.named_parameters())
    # without the option nothing is touched
    fresh = [perturbed(pre, 4)]
    af.AdaMergedModel(pre, fresh)
    assert all(p.numel() > 0 for p in fresh[0].parameters())


def test_release_counts_bytes_and_skips_lazy_sources(tmp_path):
    m = mlp(1)
    n = sum(p.numel() * 4 for p in m.parameters())
    assert build.release(m) == n and build.release(m) == 0
    save_safetensors(mlp(2).state_dict(), tmp_path / "f.safetensors")
    lazy = af.load_state_dict(tmp_path / "f.safetensors")
    assert build.release(lazy) == 0  # a read-only lazy checkpoint: nothing to release


def test_bf16_storage_rounds_the_difference_once():
    """fp32 checkpoints stored as bf16: the difference is taken in fp64 (exact here) and rounded once. Taking it in
    fp32 first rounds twice: 1 + 2^-8 + 2^-40 becomes the bf16 tie 1 + 2^-8, which rounds to even (1.0) instead of
    up (1 + 2^-7)."""
    ft, base = torch.tensor([1 + 2**-8, 0.5]), torch.tensor([-(2**-40), 0.25])
    once = rounded_difference_(torch.empty(2, dtype=torch.bfloat16), ft, base, "t")
    assert once.tolist() == [1 + 2**-7, 0.25]
    assert (ft - base).to(torch.bfloat16).tolist() == [1.0, 0.25]  # what double rounding gives
    assert (ft.double() - base.double()).to(torch.bfloat16).tolist() == [1.0, 0.25]  # torch: via float32 too
    g = torch.Generator().manual_seed(0)  # round to odd, then to bf16/fp16 = the nearest value to the exact one
    d = (torch.randn(4096, generator=g, dtype=torch.float64) * 4).clamp(-60000, 60000)
    d[:8] = torch.tensor([0.0, -0.0, 2.0**-140, -(2.0**-30) * (1 + 2**-40), 1.5, 65504, 1 + 2**-11, 3 * 2.0**-20])
    for dt in (torch.bfloat16, torch.float16):
        got = round_to_odd_f32(d).to(dt).double()
        lo = torch.nextafter(got.to(dt), torch.tensor(-float("inf"), dtype=dt)).double()
        hi = torch.nextafter(got.to(dt), torch.tensor(float("inf"), dtype=dt)).double()
        err = (got - d).abs()
        assert ((lo - d).abs() >= err).all() and ((hi - d).abs() >= err).all(), dt
    small = torch.empty(5, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"ft: key 'w' has NaN or inf values \(1 NaN"):
        rounded_difference_(small, torch.tensor([1.0, float("nan"), 0, 0, 0]), torch.zeros(5), "w", "ft: key 'w'")
    with pytest.raises(CheckpointError, match=r"w \(fine-tuned minus pretrained, in float32\) has NaN or inf"):
        rounded_difference_(small, torch.tensor([3e38, 0, 0, 0, 0]), torch.tensor([-3e38, 0, 0, 0, 0]), "w")
    with pytest.raises(CheckpointError, match=r"w overflows float16 \(largest magnitude 7e\+04.*bfloat16 or float32"):
        rounded_difference_(small, torch.tensor([7e4, 0, 0, 0, 0]), torch.zeros(5), "w")


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_rounded_difference_equals_the_exact_difference_rounded_once(dt):
    """fp32 checkpoints, bf16 / fp16 storage, values over many binades (fp16 subnormals included) and differences
    built to land on the storage dtype's ties after a float32 rounding: every entry equals the exact (float64)
    difference rounded once."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 16
    base = torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 4, (n,), generator=g).float()
    ft = base + torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 0, (n,), generator=g).float()
    # ties: exact differences t + tiny, whose float32 rounding is the tie t of the storage dtype
    lo = torch.randn(256, generator=g).to(dt)
    t = (lo.float() + torch.nextafter(lo, torch.tensor(float("inf"), dtype=dt)).float()) / 2  # halfway (in fp32)
    ft[:256], base[:256] = t, -(t.abs() * 2.0**-30)  # t - base = t + |t| 2^-30: rounds to t in fp32
    ft[256:259], base[256:259] = torch.tensor([2.0**-25, 3 * 2.0**-26, 0.0]), torch.tensor([-(2.0**-50), 0.0, 0.0])
    got = rounded_difference_(torch.empty(n, dtype=dt), ft, base, "t")
    want = round_to_odd_f32(ft.double() - base.double()).to(dt)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(got, (ft - base).to(dt))  # the plain float32 difference rounds some of them twice


def test_rounded_difference_chunks(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("adamerge_fast.merging.task_vectors"), "DIFF_CHUNK", 7)
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    out = rounded_difference_(torch.empty(5, 6), a, b, "t")
    assert torch.equal(out, a - b)


def test_a_storage_kind_plugs_in():
    """The builder only calls allocate / write / finish: a storage kind of its own (here: rows kept as a list of
    int8-rounded tensors with a scale) works without touching the builder."""

    class Int8Rows:
        def allocate(self, name, base, K):
            return [None] * K

        def write(self, store, k, finetuned, base, what, source=None):
            d = finetuned.double() - base.double()
            scale = float(d.detach().abs().max()) / 127 or 1.0
            store[k] = ((d / scale).round().to(torch.int8), scale)

        def finish(self, name, store):
            return torch.stack([q.double() * s for q, s in store])

        def nbytes(self, shape, base_dtype, K):
            return K * (int(torch.tensor(shape).prod()) + 8)

    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    tv = build.build_task_vectors(dict(pre.named_parameters()), fts, storage=Int8Rows())
    ref = af.task_vectors(pre, fts)
    for n in ref:
        assert tv[n].shape == ref[n].shape
        assert (tv[n] - ref[n].double()).abs().max() <= ref[n].abs().max() / 127 + 1e-7


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda pre: af.AdaMergedModel(pre, (m for m in [mlp(1)])), ValueError, "task_names"),
        (lambda pre: af.AdaMergedModel(pre, [mlp(1)], task_names=["a", "b"]), ValueError, "1 fine-tuned models given "
         "for 2 tasks"),
        (lambda pre: af.AdaMergedModel(pre, (m for m in [mlp(1)]), task_names=["a", "b"]), ValueError,
         "1 fine-tuned models given for 2 tasks"),
        (lambda pre: af.AdaMergedModel(pre, (m for m in [mlp(1)] * 3), task_names=["a", "b"]), ValueError,
         "more than the 2"),
        (lambda pre: af.AdaMergedModel(pre, [lambda: None]), ValueError, "loader returned None"),
        (lambda pre: af.AdaMergedModel(pre, [3]), TypeError, "fine-tuned model 0: expected an nn.Module"),
        (lambda pre: af.AdaMergedModel(pre, ["/nonexistent/ft.safetensors"]), FileNotFoundError, "not found"),
        (lambda pre: af.AdaMergedModel(pre, [lambda: {**mlp(1).state_dict(), "0.bias": torch.full((7,), INF)}]),
         CheckpointError, "fine-tuned state dict 0: key '0.bias' has NaN or inf"),
    ],
)
def test_bad_sources(call, exc, match):
    with pytest.raises(exc, match=match):
        call(mlp(0))


# ----------------------------------------------------------------------------------- activation checkpointing
def _vit(seed):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    return open_clip.transformer.VisionTransformer(image_size=16, patch_size=8, width=16, layers=3, heads=2,
                                                   mlp_ratio=2.0, output_dim=8)


def _grads(model, x, steps=1):
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), model.raw_coefficients.grad.clone()


def test_checkpointed_blocks_give_the_same_gradients():
    pre = _vit(0)
    fts = [perturbed(pre, s, 0.02) for s in (1, 2)]
    x = torch.randn(3, 3, 16, 16)
    plain = af.AdaMergedModel(pre, fts)
    ck = af.AdaMergedModel(pre, fts, checkpoint_activations=True)
    assert ck.checkpointed == [f"transformer.resblocks.{i}" for i in range(3)]
    assert plain.checkpointed == []
    calls, block_calls = [], []
    blk = ck.skeleton.transformer.resblocks[1]
    blk.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    blk.register_forward_pre_hook(lambda m, a: block_calls.append(1))
    out0, g0 = _grads(plain, x)
    out1, g1 = _grads(ck, x)
    assert len(calls) == 2  # the block ran twice: forward and the recomputation in backward
    assert len(block_calls) == 1  # its own hooks: once per forward
    assert_close(out1, out0.double(), torch.float32, "checkpointed forward")
    assert_close(g1, g0.double(), torch.float32, "checkpointed coefficient gradients")
    with torch.no_grad():  # no recomputation without autograd
        calls.clear()
        ck(x)
        assert len(calls) == 1
    pred = af.AdaMergedModel(pre, fts, checkpoint_activations=lambda p, m: p.endswith("mlp"))
    assert pred.checkpointed == [f"transformer.resblocks.{i}.mlp" for i in range(3)]
    out2, g2 = _grads(pred, x)
    assert_close(g2, g0.double(), torch.float32, "predicate-checkpointed gradients")


def test_checkpoint_option_errors():
    pre = mlp(0)
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        af.AdaMergedModel(pre, [perturbed(pre, 1)], checkpoint_activations=True)
    with pytest.raises(ValueError, match="picked no module"):
        af.AdaMergedModel(pre, [perturbed(pre, 1)], checkpoint_activations=lambda p, m: False)
    with pytest.raises(ValueError, match="a bool or a predicate"):
        af.AdaMergedModel(pre, [perturbed(pre, 1)], checkpoint_activations="yes")


# ------------------------------------------------------------------------------------------ causal LMs
def _lm_setup(kind, positions, fused, tie=False, **kw):
    from adamerge_fast.models import hf

    overrides = {"tie_word_embeddings": True} if tie else {}
    lm = hf.tiny_causal_lm(kind, seed=0, **overrides)
    pre = hf.CausalLMForEntropy(lm, positions, fused_entropy=fused, chunk=5)
    fts = []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        fts.append({"lm." + k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in lm.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    data = {}
    for t in ("a", "b"):
        batches = []
        for _ in range(3):
            ids = torch.randint(0, 64, (3, 6), generator=g)
            mask = torch.ones_like(ids)
            mask[0, 4:] = 0  # right padding
            mask[1, :2] = 0  # left padding
            batches.append({"input_ids": ids, "attention_mask": mask})
        data[t] = batches
    return hf, pre, fts, data


@pytest.mark.parametrize("kind,tie", [("llama", False), ("gpt2", True)])
def test_positions_all_concat_equals_sequential_and_fused_equals_unfused(kind, tie):
    """Per-task token-mean entropies over real tokens: the same coefficient trajectory with concat batching as
    with sequential batching, fused or not (llama: a merged lm_head; gpt2: the head tied to the embedding)."""
    runs = {}
    for fused in (False, True):
        for batching in ("sequential", "concat"):
            hf, pre, fts, data = _lm_setup(kind, "all", fused, tie)
            model = af.AdaMergedModel(pre, fts)
            heads = {t: hf.IdentityHead() for t in data}
            h = af.adamerge(model, heads, data, steps=3, task_batching=batching, progress=False)
            runs[fused, batching] = (torch.stack(h.coefficients), torch.tensor(h.loss))
    ref_c, ref_l = runs[False, "sequential"]
    for key, (c, loss) in runs.items():
        assert_close(c, ref_c.double(), torch.float32, f"coefficients {key}")
        assert_close(loss, ref_l.double(), torch.float32, f"loss {key}")
    assert not torch.equal(ref_c[-1], ref_c[0])  # the coefficients moved


def test_fused_output_and_rows_per_example():
    hf, pre, fts, data = _lm_setup("llama", "all", True)
    plain = hf.CausalLMForEntropy(pre.lm, "all")
    b = data["a"][0]
    counts = pre.rows_per_example(**b)
    assert counts.tolist() == [4, 4, 6]
    out = pre(**b)
    assert isinstance(out, hf.LinearHeadInputs) and out.rows == 14 and out.tau_w is None
    with torch.no_grad():
        assert_close(out.logits(), plain(**b).double(), torch.float32, "fused logits")
        assert_close(out.entropy(), af.entropy(plain(**b)).double(), torch.float32, "fused entropy")
    merged = af.AdaMergedModel(pre, fts)
    assert merged.rows_per_example(**b).tolist() == [4, 4, 6]
    out = merged(**b)
    assert out.tau_w is not None and out.coef_w.requires_grad  # the merged lm_head, this forward's coefficients
    last = hf.CausalLMForEntropy(pre.lm, "last", fused_entropy=True)
    assert last.rows_per_example(**b).tolist() == [1, 1, 1] and last(**b).rows == 3


def test_fused_entropy_refuses_scaled_logits():
    from adamerge_fast.models import hf

    lm = hf.tiny_causal_lm("llama", seed=0)
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        hf.CausalLMForEntropy(lm, fused_entropy=True)


# ------------------------------------------------------------------------------------------------ memory plan
def test_plan_items_and_phases():
    from adamerge_fast import memory

    pre = _vit(0)
    n_params = sum(p.numel() for p in pre.parameters())
    x = torch.zeros(1, 3, 16, 16)
    p32 = memory.plan(pre, 4, x, batch_size=8)
    p16 = memory.plan(pre, 4, x, batch_size=8, task_vector_dtype=torch.bfloat16)
    assert p32.items["task_vectors"] == 4 * n_params * 4 and p16.items["task_vectors"] == 4 * n_params * 2
    assert p32.items["pretrained"] == memory.module_bytes(pre) and p32.items["data"] == 4 * 8 * 3 * 16 * 16 * 4
    assert p32.items["activations"] > 0 and p32.total == max(p32.build, p32.step)
    seq = memory.plan(pre, 4, x, batch_size=8, task_batching="sequential")
    big = memory.plan(pre, 4, x, batch_size=32)
    ck = memory.plan(pre, 4, x, batch_size=32, checkpoint_activations=True)
    assert seq.items["activations"] < p32.items["activations"] < big.items["activations"]
    assert ck.items["activations"] < big.items["activations"]
    # fine-tuned models in memory: held through the step unless released as the task vectors fill
    held = memory.plan(pre, 4, x, batch_size=8, finetuned_in_memory=4 * 1000)
    rel = memory.plan(pre, 4, x, batch_size=8, finetuned_in_memory=4 * 1000, released=True)
    assert held.step == p32.step + 4000 and rel.step == p32.step and rel.build < held.build
    text = p32.format()
    assert "task vectors (float32)" in text and "total (the larger)" in text and "bfloat16" in p16.summary()


def test_plan_for_a_built_model_matches_the_plan_before():
    from adamerge_fast import memory

    pre = _vit(0)
    fts = [perturbed(pre, s, 0.02) for s in (1, 2)]
    model = af.AdaMergedModel(pre, fts, task_vector_dtype=torch.bfloat16)
    x = torch.zeros(1, 3, 16, 16)
    after = memory.plan_for_model(model, x, batch_size=4)
    before = memory.plan(pre, 2, x, batch_size=4, task_vector_dtype=torch.bfloat16)
    assert after.items["task_vectors"] == before.items["task_vectors"]
    assert after.items["activations"] == before.items["activations"]
    assert after.items["pretrained"] == before.items["pretrained"] and after.build == 0 and after.step == before.step


def test_plan_traces_the_fused_lm_head_with_less_memory():
    from adamerge_fast import memory
    from adamerge_fast.models import hf

    lm = hf.tiny_causal_lm("llama", seed=0, vocab_size=4096)
    ids = {"input_ids": torch.zeros(1, 64, dtype=torch.long)}
    head = {"a": hf.IdentityHead()}
    plain = memory.plan(hf.CausalLMForEntropy(lm, "all"), 3, ids, heads=head, batch_size=4)
    fused = memory.plan(hf.CausalLMForEntropy(lm, "all", fused_entropy=True, chunk=16), 3, ids, heads=head,
                        batch_size=4)
    logits = 3 * 4 * 64 * 4096 * 4  # all tasks' fp32 logits
    assert plain.items["activations"] > 3 * logits  # logits, their gradient, one task's softmax temporaries
    assert fused.items["activations"] < plain.items["activations"] / 5  # the 16-row tiles instead


@pytest.mark.parametrize("value,expected", [("8GiB", 8 << 30), ("512M", 512_000_000), ("1.5e3", 1500),
                                            ("2 gb", 2_000_000_000), ("3KiB", 3072)])
def test_parse_bytes(value, expected):
    from adamerge_fast.memory import parse_bytes

    assert parse_bytes(value) == expected


def test_parse_bytes_rejects():
    from adamerge_fast.memory import parse_bytes

    with pytest.raises(ValueError, match="not a memory size: '8 parsecs'"):
        parse_bytes("8 parsecs")


def _cli_fixture(tmp_path, K=3):
    from test_cli import tiny_backbone

    torch.manual_seed(0)
    pre = tiny_backbone().state_dict()
    save_safetensors(pre, tmp_path / "pre.safetensors")
    for k in range(K):
        g = torch.Generator().manual_seed(k + 1)
        save_safetensors({n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in pre.items()},
                         tmp_path / f"ft{k}.safetensors")
        ClassificationHead(torch.randn(4, 6), torch.zeros(4)).save(tmp_path / f"head{k}.safetensors")
        torch.save(torch.randn(64, 8), tmp_path / f"data{k}.pt")
    return ["adamerge", "--model-factory", "test_cli:tiny_backbone", "--pretrained", str(tmp_path / "pre.safetensors"),
            "--finetuned", *[str(tmp_path / f"ft{k}.safetensors") for k in range(K)],
            "--heads", *[str(tmp_path / f"head{k}.safetensors") for k in range(K)],
            "--data", *[str(tmp_path / f"data{k}.pt") for k in range(K)], "--batch-size", "32", "--steps", "2",
            "--no-progress", "-o", str(tmp_path / "out")]


def test_cli_plan_prints_and_exits_without_running(tmp_path, capsys):
    from adamerge_fast.cli import main

    args = _cli_fixture(tmp_path)
    assert main(args + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert "memory plan:" in out and "task vectors (float32)" in out and "activations and workspace" in out
    assert not (tmp_path / "out" / "merged.safetensors").exists()


def test_cli_max_memory_refuses_in_one_line_with_what_fits(tmp_path, capsys, monkeypatch):
    from test_cli import tiny_backbone

    from adamerge_fast import memory
    from adamerge_fast.cli import main
    from adamerge_fast.models.heads import load_head

    args = _cli_fixture(tmp_path)
    monkeypatch.setattr(memory, "rss_bytes", lambda *a: 0)  # the process itself: left out, so the plan is exact
    heads = {f"t{k}": load_head(tmp_path / f"head{k}.safetensors") for k in range(3)}
    x = torch.zeros(1, 8)
    full = memory.plan(tiny_backbone(), 3, x, heads=heads, batch_size=32, steps=2, released=True)
    seq = memory.plan(tiny_backbone(), 3, x, heads=heads, batch_size=32, steps=2, task_batching="sequential",
                      released=True)
    assert seq.total < full.total
    rc = main(args + ["--max-memory", str((full.total + seq.total) // 2)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "the memory plan needs" in err and "> --max-memory" in err and "would fit:" in err
    assert "--task-batching sequential" in err
    assert not (tmp_path / "out" / "merged.safetensors").exists()
    assert main(args + ["--max-memory", str(full.total)]) == 0  # fits: runs
    assert (tmp_path / "out" / "merged.safetensors").exists()
    rc = main(args + ["--max-memory", "1KiB", "-o", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "no single change" in err
