"""The step benchmark's workloads: a model (open_clip ViT image towers, or a stack of Llama-shaped decoder
layers), K task vectors, K frozen heads and the input batches, all random and deterministic in a seed (values do
not change speed).

ViT towers come from open_clip, or, where open_clip is not installed (the GPU machine) or ``impl="torch"`` is asked
for, from :mod:`.vit`: the same architecture, parameter names, shapes and order in plain torch (``tests/test_bench.py``
checks it against open_clip). ``Workload.info["vit_impl"]`` records which."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import vit

WORKLOADS: dict[str, dict] = {
    # tests only
    "vit-tiny": dict(kind="vit", vision=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
                     embed_dim=32, tasks=3, batch=2, precision="fp32", steps=2),
    "llama-tiny": dict(kind="llama", hidden=64, mlp=172, layers=2, heads=4, vocab=128, seq=16, tasks=3, batch=2,
                       precision="fp32", steps=2),
    "vit-tiny-bf16": dict(kind="vit", vision=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
                          embed_dim=32, tasks=3, batch=2, precision="bf16-autocast", steps=2),
    "llama-tiny-bf16": dict(kind="llama", hidden=64, mlp=172, layers=2, heads=4, vocab=128, seq=16, tasks=3,
                            batch=2, precision="bf16", steps=2),
    # CPU: a reduced ViT that runs in a minute, and the ViT-B/32 image tower at 8 tasks x 2 images
    "vit-small": dict(kind="vit", vision=dict(image_size=224, patch_size=32, width=384, layers=6, head_width=64),
                      embed_dim=512, tasks=8, batch=2, precision="fp32", steps=10),
    # (a) takes minutes per step here: after the 2 checked steps it is timed until 60 s are spent (at least 1 step)
    "vit-b32-cpu": dict(kind="vit", model="ViT-B-32", tasks=8, batch=2, precision="fp32", steps=5,
                        max_method_seconds=60, min_steps=1),
    # GPU
    "vit-b32": dict(kind="vit", model="ViT-B-32", tasks=8, batch=16, precision="fp32", steps=10),
    "vit-b32-bf16": dict(kind="vit", model="ViT-B-32", tasks=8, batch=16, precision="bf16-autocast", steps=10),
    # ViT-L/14 at 8 x 16 images keeps ~55 GiB of fp32 activations alive in one concat step: bf16 autocast by default
    "vit-l14": dict(kind="vit", model="ViT-L-14", tasks=8, batch=16, precision="bf16-autocast", steps=10),
    "vit-l14-fp32": dict(kind="vit", model="ViT-L-14", tasks=8, batch=16, precision="fp32", steps=10),
    # 7B-shaped decoder layers, K=3 bf16 task vectors, bf16 weights, 2 x 256 tokens per task, vocab heads
    "llama7b": dict(kind="llama", hidden=4096, mlp=11008, layers=4, heads=32, vocab=32000, seq=256,
                    tasks=3, batch=2, precision="bf16", steps=10),
}
DEFAULT_WORKLOADS = {"cpu": ["vit-small", "vit-b32-cpu"], "cuda": ["vit-b32", "vit-b32-bf16", "vit-l14", "llama7b"]}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LlamaBlock(nn.Module):
    """A Llama-shaped decoder block: RMSNorm, q/k/v/o projections with causal SDPA (no RoPE), SwiGLU MLP."""

    def __init__(self, hidden: int, mlp: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaStack(nn.Module):
    """Token embedding, a few decoder blocks, the final RMSNorm; returns hidden states ``[B, T, hidden]``."""

    def __init__(self, vocab: int, hidden: int, mlp: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaBlock(hidden, mlp, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)


@dataclass
class Workload:
    name: str
    spec: dict
    device: torch.device
    model: nn.Module  # the pretrained model (frozen, eval)
    names: list[str]  # the merged parameters, in named_parameters() order: the rows of the coefficient table
    task_vectors: dict[str, torch.Tensor]  # {name: [K, *shape]} on the device
    heads: list[nn.Module]
    batches: list[list[torch.Tensor]]  # [task][pool index] model inputs; step s uses pool index s % len
    autocast: torch.dtype | None
    tv_cpu: dict[str, torch.Tensor] | None = None  # CPU copies for the official baseline (lazily)
    info: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return len(self.heads)

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def batch(self, task: int, step: int) -> torch.Tensor:
        pool = self.batches[task]
        return pool[step % len(pool)]

    def cpu_task_vectors(self) -> dict[str, torch.Tensor]:
        if self.tv_cpu is None:
            self.tv_cpu = (self.task_vectors if self.device.type == "cpu"
                           else {n: t.cpu() for n, t in self.task_vectors.items()})
        return self.tv_cpu


def resolve_spec(name: str, overrides: dict | None = None) -> dict:
    """The spec of workload ``name`` with the non-None ``overrides`` applied."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    spec = dict(WORKLOADS[name])
    for k, v in (overrides or {}).items():
        if v is not None:
            spec[k] = v
    return spec


def build_workload(name: str, device: torch.device, overrides: dict | None = None, seed: int = 0) -> Workload:
    """The pretrained model (random init: values do not change speed), K random task vectors, K fixed random
    heads and a pool of 2 input batches per task, all deterministic in ``seed``."""
    spec = resolve_spec(name, overrides)
    K, B, pool = spec["tasks"], spec["batch"], 2
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prec = spec["precision"]
    wdtype = torch.bfloat16 if prec == "bf16" else torch.float32
    autocast = torch.bfloat16 if prec == "bf16-autocast" else None
    impl = None
    if spec["kind"] == "vit":
        build_tower, impl = _vit_builder(spec.get("impl", "auto"))
        if "model" in spec:
            model_name = spec["model"]
            cfg = vit.CONFIGS[model_name] if impl == "torch" else build_tower.open_clip.get_model_config(model_name)
            embed_dim, vision = cfg["embed_dim"], dict(cfg["vision_cfg"])
        else:
            embed_dim, vision = spec["embed_dim"], dict(spec["vision"])
        with torch.device(device):
            model = build_tower(embed_dim, vision)
        feat, classes = embed_dim, 10
        size = vision.get("image_size", 224)
        batches = [[torch.randn(B, 3, size, size, generator=g).to(device) for _ in range(pool)] for _ in range(K)]
    elif spec["kind"] == "llama":
        with torch.device(device):
            model = LlamaStack(spec["vocab"], spec["hidden"], spec["mlp"], spec["layers"], spec["heads"])
        feat, classes = spec["hidden"], spec["vocab"]
        batches = [[torch.randint(0, spec["vocab"], (B, spec["seq"]), generator=g).to(device) for _ in range(pool)]
                   for _ in range(K)]
    else:
        raise ValueError(f"unknown workload kind {spec['kind']!r}")
    model = model.to(wdtype).eval().requires_grad_(False)
    names = [n for n, p in model.named_parameters() if torch.is_floating_point(p)]
    params = dict(model.named_parameters())
    tv_dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    # Task vectors: windows of one random pool at random offsets (values do not change speed; generating
    # K x |theta| fresh normals takes minutes on a small CPU), built one parameter at a time on the device.
    pool_n = 1 << 22
    rand_pool = torch.randn(pool_n, generator=g).mul_(1e-3).to(device)
    offsets = torch.randint(0, pool_n, (len(names), K), generator=g).tolist()
    tvs = {}
    for i, n in enumerate(names):
        p = params[n]
        t = torch.empty((K, *p.shape), device=device, dtype=tv_dtype)
        for k in range(K):
            _fill_from_pool(t[k].view(-1), rand_pool, offsets[i][k])
        tvs[n] = t
    heads = []
    for _ in range(K):
        h = nn.Linear(feat, classes, bias=spec["kind"] == "vit")
        with torch.no_grad():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * feat**-0.5 * 3)
            if h.bias is not None:
                h.bias.zero_()
        heads.append(h.to(device=device, dtype=wdtype).requires_grad_(False))
    info = {
        "params": sum(params[n].numel() for n in names),
        "param_tensors": len(names),
        "weight_dtype": str(wdtype).replace("torch.", ""),
        "task_vector_dtype": str(tv_dtype).replace("torch.", ""),
        "pretrained_bytes": sum(params[n].numel() * params[n].element_size() for n in names),
        "task_vector_bytes": sum(t.numel() * t.element_size() for t in tvs.values()),
    }
    if impl is not None:
        info["vit_impl"] = impl
    return Workload(name, spec, device, model, names, tvs, heads, batches, autocast, info=info)


VIT_IMPLS = ("auto", "open_clip", "torch")


def _vit_builder(impl: str):
    """``(build(embed_dim, vision_cfg), implementation name)``: open_clip's tower builder, or :func:`.vit.build` for
    ``impl="torch"`` and for ``"auto"`` where open_clip is not installed. The open_clip builder carries the module as
    ``.open_clip`` (for its model configs)."""
    if impl not in VIT_IMPLS:
        raise SystemExit(f"unknown ViT implementation {impl!r}; choose from {', '.join(VIT_IMPLS)}")
    if impl != "torch":
        try:
            from adamerge_fast._compat import import_open_clip

            open_clip = import_open_clip()
            from open_clip.model import _build_vision_tower
        except ImportError:
            if impl == "open_clip":
                raise
        else:

            def build_tower(embed_dim, vision_cfg):
                return _build_vision_tower(embed_dim, vision_cfg)

            build_tower.open_clip = open_clip
            return build_tower, "open_clip"
    return vit.build, "torch"


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, off: int) -> None:
    """Copy ``pool[off:]`` into ``flat``, wrapping around to the pool's start as often as needed."""
    pos, n = 0, flat.numel()
    while pos < n:
        take = min(n - pos, pool.numel() - off)
        flat[pos:pos + take].copy_(pool[off:off + take])
        pos, off = pos + take, 0
