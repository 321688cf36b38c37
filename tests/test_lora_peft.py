"""LoRA adapters as task vectors, end to end, with PEFT itself as the oracle.

Real adapters are made with ``peft.get_peft_model`` on tiny Llama, GPT-2 (``Conv1D``, ``fan_in_fan_out``) and
CLIP vision models, trained a few steps (A and B both non-zero), with different ranks, rsLoRA, rank/alpha
patterns, trained biases and ``modules_to_save``. ``AdaMergedModel`` reads the saved directories (no PEFT at run
time) and must give: the forward of PEFT's weighted ``cat`` combination merged and unloaded (task-wise
coefficients = the weights), and the coefficient gradients of autograd through the dense merge of PEFT's own
per-adapter ``merge_and_unload`` task vectors, in float64.
"""

import copy

import pytest
import torch
from _lora import cat_merge, dense_task_vectors, train_adapter
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.adapters import read_peft_adapter
from adamerge_fast.io import CheckpointError
from adamerge_fast.merging.lora import MergedLoRALinear

peft = pytest.importorskip("peft")
hf = pytest.importorskip("adamerge_fast.models.hf")
LoraConfig = peft.LoraConfig
f32, f64 = torch.float32, torch.float64


def _ids(seed, n=2, t=7, vocab=64):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama and three adapters: ranks 4 / 8 (rsLoRA) / 2 on different modules, an alpha pattern, a rank
    pattern."""
    root = tmp_path_factory.mktemp("llama")
    base = hf.tiny_causal_lm("llama", seed=0)
    batches = [{"input_ids": _ids(s)} for s in range(3)]
    cfgs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                   alpha_pattern={"layers.0.self_attn.q_proj": 3}),
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}),
        LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]),
    ]  # fmt: skip
    dirs = [train_adapter(base, c, batches, root / f"a{i}", seed=i) for i, c in enumerate(cfgs)]
    return base, dirs


def _lm_loss(model, ids):
    return af.entropy(model(ids), backend="reference").sum()


def test_llama_forward_equals_peft_cat_merge(llama):
    base, dirs = llama
    c = torch.tensor([[0.3, 0.7, 0.5]])
    ours = af.AdaMergedModel(hf.CausalLMForEntropy(base), dirs, granularity="task", init=c)
    oracle = hf.CausalLMForEntropy(cat_merge(base, dirs, c[0]))
    ids = _ids(10, n=3)
    with torch.no_grad():
        assert_close(ours(ids), oracle(ids).double(), f32, "forward vs PEFT cat")
        merged = ours.to_module()
        assert_close(merged(ids), oracle(ids).double(), f32, "to_module vs PEFT cat")
    ref = oracle.state_dict()
    for k, v in merged.state_dict().items():
        assert_close(v, ref[k].double(), f32, k)
    lora_layers = [m for m in ours.modules() if isinstance(m, MergedLoRALinear)]
    assert len(lora_layers) == 2 * 7  # 2 layers x {q, k, v, o, gate, up, down}: each targeted by some task
    assert {tuple(m.ranks) for m in lora_layers} >= {(4, 8), (2,), (8,), (4,), (4, 2)}


def _layerwise_oracle(model, base_wrapped, taus, c, run):
    """float64 autograd through ``theta_0 + sum_k c[row, k] tau_k`` of every parameter row of ``model``."""
    c64 = c.detach().double().requires_grad_()
    base64 = {n: p.detach().double() for n, p in base_wrapped.named_parameters()}
    params = {}
    for i, n in enumerate(model.param_names):
        params[n] = base64[n] + sum(c64[i, k] * taus[k][n] for k in range(len(taus)))
    m64 = _double_copy(base_wrapped)
    out = run(lambda *a: torch.func.functional_call(m64, params, a))
    out.backward()
    return out, c64.grad


def _double_copy(m):
    return copy.deepcopy(m).double()


def test_llama_layerwise_gradients_equal_dense_autograd(llama):
    base, dirs = llama
    wrapped = hf.CausalLMForEntropy(base)
    ours = af.AdaMergedModel(wrapped, dirs, init=0.3)
    with torch.no_grad():
        ours.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(0))
    taus = [{"lm." + n: t for n, t in tv.items()} for tv in dense_task_vectors(base, dirs)]
    ids = _ids(11, n=3)
    loss = _lm_loss(ours, ids)
    loss.backward()
    ref, grad = _layerwise_oracle(ours, wrapped, taus, ours.raw_coefficients, lambda f: _lm_loss(f, ids))
    assert_close(loss, ref, f32, "loss")
    assert_close(ours.raw_coefficients.grad, grad, f32, "layer-wise coefficient gradients")
    touched = {n for tv in taus for n, t in tv.items() if t.abs().sum() > 0}
    rows = [i for i, n in enumerate(ours.param_names) if n not in touched]
    assert rows and bool((ours.raw_coefficients.grad[rows] == 0).all())  # untouched rows: zero gradient


def test_llama_modules_to_save_and_full_model_mix(llama, tmp_path):
    """A task with ``modules_to_save`` (a dense lm_head) beside LoRA tasks, and a full fine-tuned model as a task:
    both take the dense path; parameters no task touches store nothing."""
    base, dirs = llama
    d3 = train_adapter(base, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                       [{"input_ids": _ids(5)}], tmp_path / "mts", seed=3)  # fmt: skip
    full = hf.tiny_causal_lm("llama", seed=0)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    wrapped = hf.CausalLMForEntropy(base)
    sources = [dirs[0], d3, {"lm." + k: v for k, v in full.state_dict().items()}]
    ours = af.AdaMergedModel(wrapped, sources)
    with torch.no_grad():
        ours.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(1))
    assert ours._lora.dense_tasks["lm.lm_head.weight"] == [1, 2]
    assert ours._lora.dense["lm.lm_head.weight"].shape[0] == 2  # no zeros stored for task 0
    full_tv = {"lm." + n: p.detach().double() - q.detach().double()
               for (n, p), (_, q) in zip(full.named_parameters(), base.named_parameters(), strict=True)}
    taus = [{"lm." + n: t for n, t in tv.items()} for tv in dense_task_vectors(base, [dirs[0], d3])] + [full_tv]
    ids = _ids(12)
    loss = _lm_loss(ours, ids)
    loss.backward()
    ref, grad = _layerwise_oracle(ours, wrapped, taus, ours.raw_coefficients, lambda f: _lm_loss(f, ids))
    assert_close(loss, ref, f32, "loss")
    assert_close(ours.raw_coefficients.grad, grad, f32, "coefficient gradients")
    sd = ours.merged_state_dict()
    c = ours.coefficients.detach().double()
    i = ours.param_names.index("lm.lm_head.weight")
    head = "lm.lm_head.weight"
    want = base.lm_head.weight.double() + c[i, 1] * taus[1][head] + c[i, 2] * full_tv[head]
    assert_close(sd["lm.lm_head.weight"], want, f32, "merged lm_head")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (``Conv1D`` layers, ``fan_in_fan_out``, tied embedding) and two adapters of ranks 4 and 3."""
    root = tmp_path_factory.mktemp("gpt2")
    base = hf.tiny_causal_lm("gpt2", seed=0)
    batches = [{"input_ids": _ids(s)} for s in range(3)]
    cfgs = [LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
            LoraConfig(r=3, lora_alpha=5, target_modules=["c_fc", "c_attn"], fan_in_fan_out=True)]  # fmt: skip
    return base, [train_adapter(base, c, batches, root / f"a{i}", seed=i) for i, c in enumerate(cfgs)]


def test_gpt2_conv1d_fan_in_fan_out(gpt2):
    base, dirs = gpt2
    assert read_peft_adapter(dirs[0]).config["fan_in_fan_out"] is True
    c = torch.tensor([[0.4, 0.9]])
    ours = af.AdaMergedModel(hf.CausalLMForEntropy(base), dirs, granularity="task", init=c)
    assert sum(isinstance(m, MergedLoRALinear) and m.transposed for m in ours.modules()) == 2 * 4
    oracle = hf.CausalLMForEntropy(cat_merge(base, dirs, c[0]))
    ids = _ids(13)
    with torch.no_grad():
        assert_close(ours(ids), oracle(ids).double(), f32, "forward vs PEFT cat")
        assert_close(ours.to_module()(ids), oracle(ids).double(), f32, "to_module vs PEFT cat")
    wrapped = hf.CausalLMForEntropy(base)
    lw = af.AdaMergedModel(wrapped, dirs)
    with torch.no_grad():
        lw.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(2))
    taus = [{"lm." + n: t for n, t in tv.items()} for tv in dense_task_vectors(base, dirs)]
    loss = _lm_loss(lw, ids)
    loss.backward()
    ref, grad = _layerwise_oracle(lw, wrapped, taus, lw.raw_coefficients, lambda f: _lm_loss(f, ids))
    assert_close(lw.raw_coefficients.grad, grad, f32, "layer-wise coefficient gradients")


def test_clip_vision_lora_biases_and_modules_to_save(tmp_path):
    """CLIP image encoder: LoRA on attention and MLP, rsLoRA, trained biases of the LoRA layers
    (``bias="lora_only"``: dense bias task vectors on a LoRA layer) and a dense ``modules_to_save`` projection."""
    torch.manual_seed(0)
    enc = hf.CLIPImageEncoder.from_config(hf.tiny_clip_vision_config(), seed=0)
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cfgs = [
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"]),
        LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "out_proj"], bias="lora_only"),
        LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj"], modules_to_save=["visual_projection"]),
    ]  # fmt: skip
    dirs = [train_adapter(enc, c, batches, tmp_path / f"a{i}", seed=i) for i, c in enumerate(cfgs)]
    ours = af.AdaMergedModel(enc, dirs)
    with torch.no_grad():
        ours.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(3))
    q = ours.skeleton.get_submodule("vision_model.encoder.layers.0.self_attn.q_proj")
    assert isinstance(q, MergedLoRALinear) and q.ranks == [4, 2] and q.b_tasks.tolist() == [1]
    taus = dense_task_vectors(enc, dirs)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))

    def run(f):
        return f(x).pow(2).mean()

    loss = run(ours)
    loss.backward()
    ref, grad = _layerwise_oracle(ours, enc, taus, ours.raw_coefficients, run)
    assert_close(loss, ref, f32, "loss")
    assert_close(ours.raw_coefficients.grad, grad, f32, "coefficient gradients")
    with torch.no_grad():
        params = {n: p.detach().double() + sum(ours.coefficients[i, k].double() * taus[k][n] for k in range(3))
                  for i, (n, p) in enumerate(enc.named_parameters())}  # fmt: skip
        assert_close(ours.to_module()(x), torch.func.functional_call(_double_copy(enc), params, (x,)), f32, "merged")


# -------------------------------------------------------------------------------------- mappings, errors
def test_plain_mapping_matches_dense_merge():
    """``{name: (A, B, scale)}`` by parameter name or module path, different ranks per task, against the dense
    merge written out here."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 5))
    a = [torch.randn(r, 6) for r in (2, 3)] + [torch.randn(1, 10)]
    b = [torch.randn(10, 2), torch.randn(10, 3), torch.randn(5, 1)]
    sources = [{"0.weight": (a[0], b[0], 0.5)}, {"0": (a[1], b[1], 2.0), "2.weight": (a[2], b[2], 1.5)}]
    ours = af.AdaMergedModel(net, sources)
    with torch.no_grad():
        ours.raw_coefficients.uniform_(0.05, 0.95)
    c = ours.coefficients.detach()
    w0 = net[0].weight + c[0, 0] * 0.5 * b[0] @ a[0] + c[0, 1] * 2.0 * b[1] @ a[1]
    w2 = net[2].weight + c[2, 1] * 1.5 * b[2] @ a[2]
    x = torch.randn(4, 6)
    want = nn.functional.linear(nn.functional.gelu(nn.functional.linear(x, w0, net[0].bias)), w2, net[2].bias)
    with torch.no_grad():
        assert_close(ours(x), want.double(), f32, "forward")
        assert_close(ours.merged_state_dict()["0.weight"], w0.double(), f32, "merged weight")
    assert ours._lora.lora["2.weight"].tasks == [1] and "0.bias" not in ours._lora.dense


def test_adapter_errors_are_one_line(llama, gpt2, tmp_path):
    base, dirs = llama
    g, gdirs = gpt2
    with pytest.raises(CheckpointError, match=r"entry 'transformer\.h\.0\.attn\.c_\w+\.weight' matches no parameter"):
        af.AdaMergedModel(hf.CausalLMForEntropy(base), [gdirs[0]])
    wide = hf.tiny_causal_lm("llama", seed=0, hidden_size=48, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(CheckpointError, match=r"lora_A \[4, 32\] / lora_B \[32, 4\] do not fit parameter "
                                              r"'model.layers.0.self_attn.\w_proj.weight' of shape \[48, 48\]"):
        af.AdaMergedModel(wide, [dirs[0]])
    net = nn.Sequential(nn.Linear(6, 10))
    with pytest.raises(CheckpointError, match="entry '1.weight' matches no parameter"):
        af.AdaMergedModel(net, [{"1.weight": (torch.zeros(2, 6), torch.zeros(10, 2), 1.0)}])
    with pytest.raises(CheckpointError, match=r"entry 'x' must be \(A, B, scale\)"):
        af.AdaMergedModel(net, [{"x": (torch.zeros(2, 6),)}])
    with pytest.raises(ValueError, match="ties .* does not apply to LoRA"):
        af.AdaMergedModel(hf.CausalLMForEntropy(base), dirs, ties=True)
    d = train_adapter(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), [{"input_ids": _ids(0)}],
                      tmp_path / "dora", steps=1)  # fmt: skip
    with pytest.raises(CheckpointError, match="DoRA adapters are not supported"):
        af.AdaMergedModel(base, [d])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors or adapter_model.bin"):
        af.AdaMergedModel(base, [tmp_path / "empty"])
