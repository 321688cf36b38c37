"""Quantized task vectors end to end: ``AdaMergedModel(..., task_vector_dtype="int8" | "int4")`` against the same
model over the dequantized (dense fp32) task vectors, building them from checkpoints one tensor at a time, the
safetensors file format and its errors, ``to_module`` / ``save_merged``, AdaMerging++, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adamerged import Tied, mlp, perturbed, small_vit
from test_cli import _ft, _module_args, fixture_dir  # noqa: F401 (fixture_dir: the CLI fixtures, a pytest fixture)
from test_ops_contract import BACKENDS

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.cli import main
from adamerge_fast.io import CheckpointError, save_safetensors
from adamerge_fast.merging.quantized import (
    META_KEY,
    QuantizedBuffers,
    load_task_vectors,
    nbytes,
    quantize_task_vectors,
    save_task_vectors,
)
from adamerge_fast.ops.quant import QuantizedTensor, quantize

F32, F64 = torch.float32, torch.float64


def _dequantized(tv):
    return {k: t.dequantize() if isinstance(t, QuantizedTensor) else t for k, t in tv.items()}


def _check_against_dense(pre, fts, inputs, fmt, backend, **kw):
    """Forward and coefficient gradients of the quantized model equal those of a model over the dequantized task
    vectors (the same values in fp32: only the kernels differ)."""
    tv = quantize_task_vectors(pre, fts, fmt)
    q = af.AdaMergedModel(pre, task_vectors=tv, backend=backend, **kw)
    d = af.AdaMergedModel(pre, task_vectors=_dequantized(tv), backend="reference", **kw)
    g = torch.Generator().manual_seed(0)
    init = torch.rand(q.raw_coefficients.shape, generator=g) * 1.2 - 0.1
    outs = []
    for m in (q, d):
        with torch.no_grad():
            m.raw_coefficients.copy_(init)
        out = m(*inputs)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        (out * w).sum().backward()
        outs.append((out, m.raw_coefficients.grad))
    assert_close(outs[0][0], outs[1][0].double(), F32, f"{fmt} forward")
    assert_close(outs[0][1], outs[1][1].double(), F32, f"{fmt} coefficient gradients")
    return q


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_mlp_quantized_equals_dense_over_dequantized(be, fmt):
    name, dev = be
    pre = mlp(0)
    fts = [perturbed(pre, s).to(dev) for s in (1, 2, 3)]
    pre = pre.to(dev)
    x = torch.randn(6, 5).to(dev)
    q = _check_against_dense(pre, fts, (x,), fmt, name)
    kinds = {n: type(q._row_tensors(n)[1]).__name__ for n in q.param_names}
    assert kinds["0.weight"] == "QuantizedTensor" and kinds["0.bias"] == "Tensor" and kinds["1.weight"] == "Tensor"
    # to_module on this backend: the merged weights (merge over the packed values) give the model's forward
    with torch.no_grad():
        assert_close(q.to_module()(x), q(x).double(), F32, f"{name} to_module forward")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_vit_attention_conv_and_embeddings_quantized(fmt):
    """open_clip ViT: packed attention in-projection (q/k/v row slices of a quantized stack), the patch conv and the
    position embedding quantized and merged by merge_many, layer-wise and task-wise."""
    pre = small_vit(0)
    fts = [perturbed(pre, s, 0.02) for s in (1, 2)]
    x = torch.randn(2, 3, 16, 16)
    q = _check_against_dense(pre, fts, (x,), fmt, "auto")
    assert isinstance(q._row_tensors("conv1.weight")[1], QuantizedTensor)
    assert isinstance(q._row_tensors("transformer.resblocks.0.attn.in_proj_weight")[1], QuantizedTensor)
    _check_against_dense(pre, fts, (x,), fmt, "auto", granularity="task")


def test_tied_weights_quantized():
    torch.manual_seed(0)
    pre = Tied()
    fts = [perturbed(pre, s) for s in (1, 2)]
    _check_against_dense(pre, fts, (torch.randint(0, 11, (3, 4)),), "int4", "auto")


def test_materialize_once_and_bytes(tmp_path):
    """to_module / save_merged: dequantize, merge in fp32, round once; the task-vector bytes of each storage."""
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2, 3)]
    dense = af.AdaMergedModel(pre, fts)
    for fmt in ("int8", "int4"):
        m = af.AdaMergedModel(pre, fts, task_vector_dtype=fmt)
        with torch.no_grad():
            m.raw_coefficients.uniform_(0, 1)
        coefs = m.coefficients.detach()
        sd = m.merged_state_dict()
        for n, p in pre.named_parameters():
            _, tau, r = m._row_tensors(n)
            d = tau.dequantize(F64) if isinstance(tau, QuantizedTensor) else tau.double()
            assert_close(sd[n], p.double() + torch.tensordot(coefs[r].double(), d, 1), F32, n)
        mod = m.to_module()
        x = torch.randn(4, 5)
        assert_close(mod(x), m(x).double(), F32, "to_module forward")
        m.save_merged(tmp_path / f"{fmt}.safetensors")
        got = load_file(str(tmp_path / f"{fmt}.safetensors"))
        assert all(torch.equal(got[k], sd[k]) for k in sd)
        assert m.task_vector_bytes() < dense.task_vector_bytes() * (0.3 if fmt == "int8" else 0.17) + 1000


def test_ties_then_quantize_and_given_task_vectors():
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    m = af.AdaMergedModel(pre, fts, ties={"k": 0.3}, task_vector_dtype="int8")
    ref = af.ties_split(af.task_vectors(pre, fts), k=0.3)
    for n in m.param_names:
        tau = m._row_tensors(n)[1]
        if isinstance(tau, QuantizedTensor):
            assert torch.equal(tau.dequantize()[ref[n] == 0], torch.zeros(int((ref[n] == 0).sum())))
            assert_close(tau.dequantize(), ref[n].double(), torch.bfloat16, n)  # int8 of a trimmed vector
    tv = quantize_task_vectors(pre, fts, "int4")
    with pytest.raises(ValueError, match="ties .* needs dense task vectors"):
        af.AdaMergedModel(pre, task_vectors=tv, ties=True)
    with pytest.raises(ValueError, match="must be None or one of"):
        af.AdaMergedModel(pre, task_vectors=tv, task_vector_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="already int4; cannot store them as int8"):
        af.AdaMergedModel(pre, task_vectors=tv, task_vector_dtype="int8")
    bad = dict(tv)
    bad["0.weight"] = quantize(torch.zeros(3, 7, 5), "int4")
    with pytest.raises(CheckpointError, match="key '0.weight' has 3 tasks, other keys have 2"):
        af.AdaMergedModel(pre, task_vectors=bad)
    bad["0.weight"] = quantize(torch.zeros(2, 7, 4), "int4")
    with pytest.raises(CheckpointError, match=r"key '0.weight'.*shape \[K, 7, 5\]"):
        af.AdaMergedModel(pre, task_vectors=bad)
    dense = af.task_vectors(pre, fts)  # dense task vectors + a quantized dtype: quantized here
    m2 = af.AdaMergedModel(pre, task_vectors=dense, task_vector_dtype="int4")
    assert all(torch.equal(a, b) for a, b in zip(m2._row_tensors("3.weight")[1].components(),
                                                 tv["3.weight"].components(), strict=True))


def test_quantize_from_files_lazily_equals_in_memory(tmp_path):
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    save_safetensors(pre.state_dict(), tmp_path / "pre.safetensors")
    paths = []
    for i, f in enumerate(fts):
        save_safetensors(f.state_dict(), tmp_path / f"ft{i}.safetensors")
        paths.append(tmp_path / f"ft{i}.safetensors")
    from_files = quantize_task_vectors(tmp_path / "pre.safetensors", paths, "int4")
    in_mem = {k: quantize(v, "int4") if v.dim() >= 3 else v for k, v in af.task_vectors(pre, fts).items()}
    assert from_files.keys() == in_mem.keys()
    for k in in_mem:
        a, b = from_files[k], in_mem[k]
        if isinstance(b, QuantizedTensor):
            assert all(torch.equal(x, y) for x, y in zip(a.components(), b.components(), strict=True))
        else:
            assert torch.equal(a, b)
    bad = perturbed(pre, 9).state_dict()
    bad["0.weight"] = torch.full_like(bad["0.weight"], float("inf"))
    with pytest.raises(CheckpointError, match="key '0.weight' has NaN or inf"):
        quantize_task_vectors(pre, [bad], "int8")
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_task_vectors(pre, fts, "int3")


def test_save_load_round_trip_and_errors(tmp_path):
    pre = mlp(0)
    fts = [perturbed(pre, s) for s in (1, 2)]
    tv = quantize_task_vectors(pre, fts, "int4")
    tv["extra.dense"] = torch.randn(2, 3)
    p = save_task_vectors(tv, tmp_path / "tv.safetensors", metadata={"note": "x"})
    back = load_task_vectors(p)
    assert back.keys() == tv.keys() and nbytes(back) == nbytes(tv)
    for k, t in tv.items():
        u = back[k]
        if isinstance(t, QuantizedTensor):
            assert u.shape == t.shape and u.bits == t.bits and u.group_size == t.group_size
            assert all(torch.equal(x, y) for x, y in zip(t.components(), u.components(), strict=True))
        else:
            assert torch.equal(t, u)
    del back["extra.dense"]
    m = af.AdaMergedModel(pre, task_vectors=back)  # a user quantizes once, then merges from the file
    assert isinstance(m._row_tensors("0.weight")[1], QuantizedTensor)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_task_vectors(tv, p)
    save_task_vectors(tv, p, overwrite=True)
    raw = load_file(str(p))
    meta = json.loads(__import__("safetensors").safe_open(str(p), "pt").metadata()[META_KEY])

    def write(tensors, m, name):
        q = tmp_path / name
        save_file(tensors, str(q), metadata=None if m is None else {META_KEY: m if isinstance(m, str) else
                                                                     json.dumps(m)})
        return q

    cases = [
        (write(raw, None, "nometa.safetensors"), "not a task-vector file"),
        (write(raw, "{not json", "badjson.safetensors"), "corrupt"),
        (write(raw, {**meta, "version": 9}, "version.safetensors"), "version 9"),
        (write({k: v for k, v in raw.items() if k != "0.weight.__zeros"}, meta, "missing.safetensors"),
         r"key '0.weight': missing tensor\(s\) \['0.weight.__zeros'\]"),
        (write({**raw, "0.weight.__scales": raw["0.weight.__scales"][:, :3].contiguous()}, meta, "shape.safetensors"),
         r"key '0.weight'.*scales must have shape \[2, 7, 1\]"),
        (write({**raw, "stray": torch.zeros(1)}, meta, "extra.safetensors"), r"not in the file's index: \['stray'\]"),
        (write(raw, {**meta, "tensors": {**meta["tensors"], "0.weight": {"storage": "int3", "shape": [2, 7, 5],
                                                                          "group_size": 0}}}, "storage.safetensors"),
         "unknown storage 'int3'"),
    ]
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    cases.append((tmp_path / "garbage.safetensors", "not a readable safetensors file"))
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_task_vectors(path)
    with pytest.raises(FileNotFoundError):
        load_task_vectors(tmp_path / "absent.safetensors")


def test_buffers_follow_device_and_keep_fp32_scales():
    qt = quantize(torch.randn(2, 3, 5), "int4")
    mod = QuantizedBuffers(qt).to(torch.float64)
    assert mod.get().scales.dtype == F32 and torch.equal(mod.get().qdata, qt.qdata)
    pre = mlp(0)
    m = af.AdaMergedModel(pre, [perturbed(pre, 1)], task_vector_dtype="int8").to("cpu")
    assert m(torch.randn(2, 5)).shape == (2, 4)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_memory_plan_counts_quantized_bytes(fmt):
    """The memory plan of ``task_vector_dtype="int8"|"int4"`` counts the bytes the built model holds (packed values,
    scales, zero points; dense 1-D entries), before and after the build."""
    from adamerge_fast import memory

    pre = small_vit(0)
    fts = [perturbed(pre, s, 0.02) for s in (1, 2)]
    model = af.AdaMergedModel(pre, fts, task_vector_dtype=fmt)
    x = torch.zeros(1, 3, 16, 16)
    before = memory.plan(pre, 2, x, batch_size=4, task_vector_dtype=fmt)
    after = memory.plan_for_model(model, x, batch_size=4)
    assert before.items["task_vectors"] == after.items["task_vectors"] == model.task_vector_bytes()
    assert after.items["pretrained"] == before.items["pretrained"]
    assert before.options["storage"] == after.options["storage"] == fmt
    assert f"task vectors ({fmt})" in before.format()
    f32 = memory.plan(pre, 2, x, batch_size=4)
    assert before.items["task_vectors"] < f32.items["task_vectors"] / 2  # width 16: scales weigh more than at scale
    assert before.items["loading"] > f32.items["loading"]  # the quantizer's fp32 temporaries of one tensor



@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_streamed_merge_quantizes_whole_rows(fmt, monkeypatch):
    """merge_checkpoints(task_vector_dtype="int8"|"int4") streams tensors in chunks of whole rows: with chunks smaller
    than a row (one row per chunk) or than the tensor (three rows), the result equals the merge of the task vectors
    quantized whole (1-D tensors: float32 differences); TIES sees the same dequantized task vectors."""
    from adamerge_fast.merging import stream
    from adamerge_fast.merging.static import task_arithmetic, ties_merge

    monkeypatch.setattr(stream, "CHUNK", 100)
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(7, 300, generator=g), "b": torch.randn(20, 33, generator=g),
           "c": torch.randn(50, generator=g)}
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    tv = {k: torch.stack([f[k] - pre[k] for f in fts]) for k in pre}
    deq = {k: quantize(t, fmt).dequantize() if t.dim() >= 3 else t for k, t in tv.items()}
    got = stream.merge_checkpoints(pre, fts, "task_arithmetic", scale=0.4, task_vector_dtype=fmt)
    want = task_arithmetic(pre, deq, 0.4)
    for k in pre:
        assert_close(got[k], want[k].double(), F32, f"task arithmetic {k}")
    got = stream.merge_checkpoints(pre, fts, "ties", scale=0.7, ties_k=0.3, task_vector_dtype=fmt)
    want = ties_merge(pre, {k: v.double() for k, v in deq.items()}, k=0.3, scale=0.7)
    for k in pre:
        assert_close(got[k], want[k].double(), F32, f"ties {k}")
    with pytest.raises(ValueError, match="not with like='mergekit'"):
        stream.merge_checkpoints(pre, fts, "task_arithmetic", task_vector_dtype=fmt, like="mergekit")


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_merge_and_adamerge_quantized(request, tmp_path, capsys):
    d = request.getfixturevalue("fixture_dir")  # test_cli's module fixture (imported above)
    pre = load_file(str(d / "pre.safetensors"))
    fts = [load_file(str(d / "ft0.safetensors")), load_file(str(d / "ft1.safetensors")), torch.load(d / "ft2.pt")]
    for fmt in ("int8", "int4"):
        out = tmp_path / f"ta_{fmt}.safetensors"
        assert main(["merge", "--method", "task-arithmetic", "--pretrained", str(d / "pre.safetensors"),
                     "--finetuned", *_ft(d), "--task-vector-dtype", fmt, "--scale", "0.4", "-o", str(out)]) == 0
        got = load_file(str(out))
        for k in pre:
            stack = torch.stack([f[k] - pre[k] for f in fts])
            deq = quantize(stack, fmt).dequantize() if stack.dim() >= 3 else stack
            torch.testing.assert_close(got[k], pre[k] + 0.4 * deq.sum(0))
        run = tmp_path / f"run_{fmt}"
        assert main(_module_args(d, run, "--steps", "2", "--task-vector-dtype", fmt)) == 0
        assert (run / "merged.safetensors").is_file()
        assert json.loads((run / "history.json").read_text())["args"]["task_vector_dtype"] == fmt
        assert main(_module_args(d, tmp_path / f"plan_{fmt}", "--task-vector-dtype", fmt, "--plan")) == 0
        assert f"task vectors ({fmt})" in capsys.readouterr().out
    assert main(["merge", "--method", "average", "--pretrained", "x", "--finetuned", "y", "-o", "z.safetensors",
                 "--task-vector-dtype", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ demo
@pytest.mark.slow
def test_demo_compact_quick(tmp_path, capsys):
    """``demo --compact``: one layer-wise AdaMerging row per storage of COMPACT_ROWS, their task-vector bytes."""
    from adamerge_fast.demo import COMPACT_ROWS

    out = tmp_path / "run"
    args = ["demo", "--compact", "--quick", "--steps", "5", "--cache-dir", str(tmp_path / "cache"), "--output-dir",
            str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "demo_compact.json").read_text())
    rows = res["rows"]
    assert [r["name"] for r in rows] == [f"Layer-wise AdaMerging, {r.label}" for r in COMPACT_ROWS]
    nb = [r["task_vector_bytes"] for r in rows]
    assert nb[1] < 0.3 * nb[0] and nb[2] < 0.17 * nb[0]
    for r in rows:
        assert set(r["acc"]) == set(res["tasks"]) and r["name"] in printed
        assert r["delta_avg"] == pytest.approx(r["avg"] - rows[0]["avg"])
    assert "| Layer-wise AdaMerging, int8" in (out / "demo_compact.md").read_text()


@pytest.mark.slow
def test_demo_compact_rows_see_the_same_batches(tmp_path, monkeypatch):
    """Every row of ``demo --compact`` runs AdaMerging on fresh loaders with the same seed, so rows differ only in
    the storage (loaders shared across rows handed the second row another batch order)."""
    import dataclasses

    import adamerge_fast.optim as optim
    from adamerge_fast.demo import QUICK, CompactRow, evaluate_compact

    seen, real = [], optim.adamerge

    def spy(model, heads, loaders, **kw):
        seen.append([next(iter(loaders[t])).clone() for t in loaders])  # each task's first batch
        return real(model, heads, loaders, **kw)

    monkeypatch.setattr(optim, "adamerge", spy)
    cfg = dataclasses.replace(QUICK, steps=2)
    same = CompactRow("fp32", lambda pre, fts: {"task_vector_dtype": None})
    res = evaluate_compact(cfg, [same, same], cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(*seen, strict=True))
    assert res.rows[0].acc == res.rows[1].acc
