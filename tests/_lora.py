"""Real PEFT LoRA adapters for the tests: trained a few steps on tiny models (so that A and B are both non-zero),
saved with ``save_pretrained``, and PEFT's own merges as the oracle."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def train_adapter(base: nn.Module, config, batches, out_dir: Path, *, steps: int = 4, seed: int = 0,
                  loss=None) -> Path:  # fmt: skip
    """``peft.get_peft_model`` on a copy of ``base``, ``steps`` Adam steps (lr 2e-2) on ``loss(model, batch)``
    (default: the mean square of the output), ``save_pretrained(out_dir)``. The LoRA B matrices start at zero:
    after the steps every A and B is non-zero (checked)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    loss = loss or (lambda m, b: _output(m(**b) if isinstance(b, dict) else m(b)).float().pow(2).mean())
    model.train()
    for i in range(steps):
        opt.zero_grad()
        loss(model, batches[i % len(batches)]).backward()
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.detach().abs().sum() > 0, f"{n} is still zero"
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def merged_and_unloaded(base: nn.Module, adapter_dir: Path, dtype=torch.float64) -> nn.Module:
    """PEFT's own dense merge of one adapter into a ``dtype`` copy of ``base``."""
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), str(adapter_dir))
    return m.merge_and_unload()


def dense_task_vectors(base: nn.Module, adapter_dirs, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    """Per adapter, ``{name: merged - pretrained}`` over ``base``'s parameters (PEFT's merge_and_unload)."""
    ref = {n: p.detach().to(dtype) for n, p in base.named_parameters()}
    out = []
    for d in adapter_dirs:
        merged = dict(merged_and_unloaded(base, d, dtype).named_parameters())
        out.append({n: merged[n].detach().to(dtype) - ref[n] for n in ref})
    return out


def cat_merge(base: nn.Module, adapter_dirs, weights, dtype=torch.float32) -> nn.Module:
    """PEFT's ``add_weighted_adapter(..., combination_type="cat")`` of the adapters with ``weights``, merged and
    unloaded: ``W0 + sum_k w_k s_k B_k A_k`` (the first adapter must not use rsLoRA: the combined adapter copies
    its config with ``lora_alpha = r``)."""
    from peft import PeftModel

    names = [f"t{i}" for i in range(len(adapter_dirs))]
    m = PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), str(adapter_dirs[0]), adapter_name=names[0])
    for n, d in zip(names[1:], adapter_dirs[1:], strict=True):
        m.load_adapter(str(d), adapter_name=n)
    m.add_weighted_adapter(names, [float(w) for w in weights], "mix", combination_type="cat")
    m.set_adapter("mix")
    return m.merge_and_unload()
