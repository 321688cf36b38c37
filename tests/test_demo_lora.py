"""``adamerge-fast demo --lora --quick``: full fine-tunes vs LoRA fine-tunes of the digits backbone."""

import json

import pytest

from adamerge_fast.cli import main


@pytest.mark.slow
def test_demo_lora_quick(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["demo", "--lora", "--lora-rank", "4", "--quick", "--steps", "10", "--cache-dir", str(cache),
            "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    res = json.loads((out / "demo_lora.json").read_text())
    rows = {r["name"]: r["avg"] for r in res["rows"]}
    kinds = ("full fine-tunes", "LoRA r=4")
    for kind in kinds:
        for method in ("Individual", "Task arithmetic (λ=0.3)", "Layer-wise AdaMerging"):
            assert f"{method}, {kind}" in rows and f"{method}, {kind}" in first
    assert rows["Individual, LoRA r=4"] > 85.0  # the adapters did learn their tasks
    assert rows["Task arithmetic (λ=0.3), LoRA r=4"] < rows["Individual, LoRA r=4"] - 5.0  # and they conflict
    tv = res["task_vector_bytes"]
    assert tv["Layer-wise AdaMerging, LoRA r=4"] < tv["Layer-wise AdaMerging, full fine-tunes"] / 5
    assert "| Layer-wise AdaMerging, LoRA r=4 |" in (out / "demo_lora.md").read_text()
    assert len(list(cache.rglob("lora_r4_*.safetensors"))) == len(res["tasks"])
    # a second run reads the cached adapters and prints the same table
    assert main(args + ["--output-dir", str(tmp_path / "run2")]) == 0
    second = capsys.readouterr().out
    assert second[second.index("Method"):] == first[first.index("Method"):]
    assert main(["demo", "--lora-rank", "x"]) == 2  # a usage error
