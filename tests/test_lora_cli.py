"""LoRA adapter directories through the command line: ``adamerge --hf-causal-lm`` and ``merge``."""

import subprocess
import sys

import pytest
import torch
from _lora import cat_merge, train_adapter
from safetensors.torch import load_file
from test_cli import _word_tokenizer

from _tol import assert_close
from adamerge_fast.cli import main

peft = pytest.importorskip("peft")
hf = pytest.importorskip("adamerge_fast.models.hf")

WORDS = "the a cat dog sat ran on under mat log big small".split()


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny Llama saved as an HF directory with a word tokenizer, two PEFT adapters (ranks 2 and 4, one rsLoRA)
    and two text files."""
    root = tmp_path_factory.mktemp("lora_cli")
    fast, vocab = _word_tokenizer(WORDS)
    base = hf.tiny_causal_lm("llama", seed=0, vocab_size=len(vocab))
    base.save_pretrained(root / "pre")
    fast.save_pretrained(root / "pre")
    batches = [{"input_ids": torch.randint(0, len(vocab), (2, 6), generator=torch.Generator().manual_seed(s))}
               for s in range(2)]  # fmt: skip
    cfgs = [peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
            peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"])]  # fmt: skip
    dirs = [train_adapter(base, c, batches, root / f"ad{i}", seed=i) for i, c in enumerate(cfgs)]
    (root / "t0.txt").write_text("the cat sat on the mat\na dog ran\n")
    (root / "t1.txt").write_text("small cat\nthe dog sat under a log\nthe big log\n")
    return root, base, dirs


def test_adamerge_hf_causal_lm_with_adapter_dirs(llama_dirs):
    root, base, dirs = llama_dirs
    out = root / "out"
    args = ["adamerge", "--hf-causal-lm", "--pretrained", str(root / "pre"), "--finetuned", *map(str, dirs),
            "--data", str(root / "t0.txt"), str(root / "t1.txt"), "--max-length", "8", "--steps", "3",
            "--batch-size", "2", "--no-progress", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    tf = hf.import_transformers()  # the merged model is a Hugging Face directory of the LM's own class and keys
    back = tf.AutoModelForCausalLM.from_pretrained(str(out / "merged"), local_files_only=True)
    assert type(back) is type(base) and not (out / "merged.safetensors").exists()
    assert not (out / "mergekit_config.yml").exists()  # mergekit's models list takes no adapter directories
    merged = back.state_dict()
    coefs = load_file(str(out / "coefficients.safetensors"))["coefficients"]
    names = [n for n, _ in base.named_parameters()]
    assert coefs.shape == (len(names), 2)  # one row per base parameter tensor
    # the merged q_proj of layer 0 is W0 + sum_k c_k s_k B_k A_k with the learned coefficients (PEFT's cat merge)
    key = "model.layers.0.self_attn.q_proj.weight"
    oracle = cat_merge(base, dirs, coefs[names.index(key)].tolist()).state_dict()
    assert_close(merged[key], oracle[key].double(), torch.float32, key)
    assert torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base.model.layers[0].mlp.down_proj.weight)


def test_merge_with_adapter_dirs_equals_peft(llama_dirs, tmp_path, capsys):
    root, base, dirs = llama_dirs
    out = tmp_path / "ta.safetensors"
    assert main(["merge", "--method", "task-arithmetic", "--scale", "0.6", "--pretrained", str(root / "pre"),
                 "--finetuned", *map(str, dirs), "-o", str(out)]) == 0  # fmt: skip
    merged = load_file(str(out))
    oracle = cat_merge(base, dirs, [0.6, 0.6]).state_dict()
    for k, v in oracle.items():
        if k in merged:
            assert_close(merged[k], v.double(), torch.float32, k)
    assert set(merged) == set(base.state_dict())
    assert main(["merge", "--method", "ties", "--pretrained", str(root / "pre"), "--finetuned", *map(str, dirs),
                 "-o", str(tmp_path / "ties.safetensors")]) == 0  # fmt: skip
    ties = load_file(str(tmp_path / "ties.safetensors"))
    k = "model.layers.1.mlp.down_proj.weight"  # no adapter touches it: the pretrained tensor
    assert torch.equal(ties[k], base.state_dict()[k])
    # an adapter of another model: one line, exit status 1
    g = hf.tiny_causal_lm("gpt2", seed=0)
    g.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert main(["merge", "--method", "average", "--pretrained", str(tmp_path / "gpt2"), "--finetuned", str(dirs[0]),
                 "-o", str(tmp_path / "bad.safetensors")]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no parameter of the pretrained model" in err[0], err


def test_adapters_read_without_importing_peft(llama_dirs):
    """PEFT is a test dependency only: reading an adapter and building the merged model never imports it."""
    root, _, dirs = llama_dirs
    code = ("import sys; import adamerge_fast as af; from adamerge_fast.models import hf; "
            f"m = hf.load_causal_lm({str(root / 'pre')!r}); af.AdaMergedModel(m, [{str(dirs[0])!r}]); "
            "assert 'peft' not in sys.modules, 'peft was imported'")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_export_adamerged_with_adapters_roundtrip(llama_dirs, tmp_path):
    """An AdaMergedModel over adapter directories (LoRA storage) written as the LM's own Hugging Face directory:
    from_pretrained loads exactly the merged state dict (LoRA layers W0 + sum_k c_k s_k B_k A_k included)."""
    from adamerge_fast.export import export_merged
    from adamerge_fast.merging import AdaMergedModel

    root, base, dirs = llama_dirs
    spec = hf.build_causal_lm(root / "pre", dirs, ["a", "b"])
    model = AdaMergedModel(spec.backbone, spec.finetuned)
    assert model._lora is not None
    with torch.no_grad():
        model.raw_coefficients.uniform_(0.1, 0.9, generator=torch.Generator().manual_seed(2))
    out = export_merged(model, spec.export, tmp_path / "merged", max_shard_size="40KB")
    back = hf.import_transformers().AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    sd, merged = back.state_dict(), model.merged_state_dict()
    assert sd.keys() == base.state_dict().keys()
    for n in model.param_names:
        assert torch.equal(sd[n[len("lm."):]], merged[n]), n
    key = "model.layers.0.self_attn.q_proj.weight"  # both adapters touch it
    assert not torch.equal(sd[key], base.state_dict()[key])
