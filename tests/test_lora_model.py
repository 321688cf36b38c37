"""``AdaMergedModel`` on LoRA task vectors beyond the PEFT oracle: no ``[out, in]`` tensor in a training step,
task subsets, every backend, ``adamerge()`` with checkpoints, ``.to()``, the coefficient table."""

import pytest
import torch
from _fixtures import backend_params
from test_lora_ops import _AllocationLog
from torch import nn

import adamerge_fast as af
from _tol import assert_close
from adamerge_fast.adapters import LoraAdapter, LoraModule
from adamerge_fast.ops import lora as lora_ops

f32 = torch.float32
BACKENDS = backend_params()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.LayerNorm(96), nn.Linear(96, 96), nn.GELU(),
                         nn.Linear(96, 64))  # fmt: skip


def _sources(net, seed=0):
    """Three tasks: LoRA on different subsets of the linear layers with ranks 2-6; task 1 also trains the first
    layer's bias and the norm (dense values)."""
    g = torch.Generator().manual_seed(seed)

    def ab(i, r):
        lin = net[i]
        return (0.3 * torch.randn(r, lin.in_features, generator=g), 0.3 * torch.randn(lin.out_features, r, generator=g))

    t0 = {"0.weight": (*ab(0, 4), 0.5), "3.weight": (*ab(3, 2), 2.0)}
    t1 = LoraAdapter({"0": LoraModule(*ab(0, 6), 1.0), "5": LoraModule(*ab(5, 3), 0.25)},
                     {"0.bias": net[0].bias + 0.1, "2.weight": net[2].weight * 1.1}, "task 1")  # fmt: skip
    t2 = {"3": (*ab(3, 5), 1.5), "5.weight": (*ab(5, 2), 0.75)}
    return [t0, t1, t2]


def _model(backend="reference", **kw):
    net = _mlp()
    return net, af.AdaMergedModel(net, _sources(net), backend=backend, **kw)


def test_task_subsets_store_no_zeros():
    net, m = _model()
    lora = m._lora
    assert {n: s.tasks for n, s in lora.lora.items()} == {"0.weight": [0, 1], "3.weight": [0, 2], "5.weight": [1, 2]}
    assert lora.dense_tasks == {"0.bias": [1], "2.weight": [1]} and lora.dense["0.bias"].shape == (1, 96)
    assert m.raw_coefficients.shape == (len(list(net.parameters())), 3)  # one row per base parameter tensor
    assert m._generic_names == ["2.weight"]  # 0.bias is merged by its MergedLoRALinear; 2.bias is untouched
    dense = af.AdaMergedModel(net, [net.state_dict()] * 3)
    assert m.fingerprint() == dense.fingerprint()


def test_forward_backward_never_allocates_a_weight(monkeypatch):
    """A layer-wise training step (forward, entropy, backward) of the LoRA model under a recording dispatch mode:
    no aten op returns new memory the size of the smallest LoRA weight (64 x 96)."""
    _, m = _model()
    monkeypatch.setattr(lora_ops, "use_fast_path", lambda *ts: True)
    x = torch.randn(8, 64)
    log = _AllocationLog()
    with log:
        af.entropy(m(x), backend="reference").sum().backward()
    assert m.raw_coefficients.grad is not None
    big = [(f, s) for f, s in log.sizes if torch.Size(s).numel() >= 64 * 96]
    assert not big, f"weight-sized allocations: {big}"


def _loss_and_grad(m, x):
    m.raw_coefficients.grad = None
    loss = af.entropy(m(x).float(), backend="reference").sum()
    loss.backward()
    return loss.detach(), m.raw_coefficients.grad.clone()


@pytest.mark.parametrize("be", BACKENDS)
def test_every_backend_agrees_with_the_dense_merge(be):
    name, dev = be
    net, m = _model(name)
    m = m.to(dev)
    with torch.no_grad():
        m.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 64, device=dev)
    loss, grad = _loss_and_grad(m, x)
    c64 = m.coefficients.detach().double().requires_grad_()
    sd = m.merged_state_dict()  # materialized from the same coefficients: the dense merge, fp64 below
    srcs = _sources(_mlp())
    params = {}
    for i, (n, p) in enumerate(net.named_parameters()):
        w = p.detach().double().to(dev)
        for k, src in enumerate(srcs):
            mod = n.rpartition(".")[0]
            if isinstance(src, dict):
                e = src.get(n) or (src.get(mod) if n.endswith("weight") else None)
                if e is not None:
                    w = w + c64[i, k] * e[2] * (e[1].double() @ e[0].double()).to(dev)
            else:
                mm = src.lora.get(mod) if n.endswith("weight") else None
                if mm is not None:
                    w = w + c64[i, k] * mm.scale * (mm.b.double() @ mm.a.double()).to(dev)
                if n in src.dense:
                    w = w + c64[i, k] * (src.dense[n].detach().double().to(dev) - p.detach().double().to(dev))
        params[n] = w
        assert_close(sd[n], w, f32, f"merged {n}")
    ref = af.entropy(torch.func.functional_call(net.double().to(dev), params, (x.double(),)), backend="reference").sum()
    ref.backward()
    net.float()
    assert_close(loss, ref, f32, "loss")
    assert_close(grad, c64.grad, f32, "coefficient gradients")


def test_adamerge_runs_checkpoints_and_moves(tmp_path):
    _, m = _model(task_names=["a", "b", "c"])
    heads = {t: nn.Identity() for t in "abc"}
    data = {t: [torch.randn(4, 64, generator=torch.Generator().manual_seed(i))] for i, t in enumerate("abc")}
    before = m.raw_coefficients.detach().clone()
    hist = af.adamerge(m, heads, data, steps=3, lr=1e-2, progress=False, checkpoint=tmp_path / "ck.pt")
    assert len(hist.loss) == 3 and all(torch.isfinite(torch.tensor(hist.loss)))
    assert not torch.equal(before, m.raw_coefficients.detach())
    m.save_coefficients(tmp_path / "c.safetensors")
    _, m2 = _model(task_names=["a", "b", "c"])
    m2.load_coefficients(tmp_path / "c.safetensors")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        y64 = m2.to(torch.float64)(x.double())  # buffers, task subsets and index tensors move together
        assert y64.dtype == torch.float64
        assert_close(m(x), y64, f32, "float64 copy")
        assert_close(m.to_module()(x), y64, f32, "to_module")


def test_parameter_filter_and_coefficient_layout():
    """A parameter filter drops the adapters of the parameters it leaves out (their pretrained values stay);
    the other coefficient layouts run the same merge."""
    net = _mlp()
    m = af.AdaMergedModel(net, _sources(net), parameter_filter=lambda n, p: not n.startswith("5."))
    assert "5.weight" not in m._lora.lora and len(m.param_names) == len(list(net.parameters())) - 2
    assert torch.equal(m.merged_state_dict()["5.weight"], net[5].weight)
    ref = af.AdaMergedModel(net, _sources(net))
    with torch.no_grad():
        ref.raw_coefficients.uniform_(0.05, 0.95, generator=torch.Generator().manual_seed(5))
    tr = af.AdaMergedModel(net, _sources(net), coefficient_layout="tasks_rows",
                           init=ref.raw_coefficients.detach().t().clone())  # fmt: skip
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), tr(x))


def test_dense_task_vectors_rounded_once():
    """The dense task vectors of LoRA runs (trained biases / norms, materialized adapters, full fine-tuned models)
    in a bf16 storage: ``value - W0`` rounded once (``rounded_difference_``), bit for bit; a NaN in an adapter's
    dense value is named by the adapter and key."""
    from adamerge_fast.io import NonFiniteCheckpointError
    from adamerge_fast.merging.task_vectors import rounded_difference_

    net = _mlp()
    srcs = _sources(net)
    full = {n: p.detach() + 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5))
            for n, p in net.named_parameters()}  # fmt: skip
    m = af.AdaMergedModel(net, [*srcs, full], task_vector_dtype=torch.bfloat16)
    params = dict(net.named_parameters())
    for n, want_value in (("0.bias", srcs[1].dense["0.bias"]), ("2.weight", srcs[1].dense["2.weight"])):
        row = m._lora.dense_tasks[n].index(1)
        want = rounded_difference_(torch.empty(params[n].shape, dtype=torch.bfloat16), want_value, params[n], "t")
        assert torch.equal(m._lora.dense[n][row].view(torch.int16), want.view(torch.int16)), n
    n = "3.weight"  # the full model makes every parameter dense: task 0's adapter is materialized (s B A) there
    for task, value, base in ((3, full[n], params[n]), (0, srcs[0]["3.weight"][2] * srcs[0]["3.weight"][1]
                                                        @ srcs[0]["3.weight"][0], None)):
        want = rounded_difference_(torch.empty(params[n].shape, dtype=torch.bfloat16), value, base, "t")
        got = m._lora.dense[n][m._lora.dense_tasks[n].index(task)]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (n, task)
    bad = LoraAdapter({}, {"0.bias": torch.full_like(net[0].bias, float("nan"))}, "bad adapter")
    with pytest.raises(NonFiniteCheckpointError, match="bad adapter: key '0.bias' has NaN or inf values"):
        af.AdaMergedModel(net, [srcs[0], bad])
