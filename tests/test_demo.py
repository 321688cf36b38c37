"""The digits demo in its reduced configuration (``--quick``): every row, the conflict it is built to show,
determinism (a second run from the model cache prints the same table), and its output files."""

import json

import pytest

from adamerge_fast.cli import main

ROWS = [
    "Pretrained",
    "Individual (fine-tuned)",
    "Weight averaging",
    "Task arithmetic (λ=0.3)",
    "Task arithmetic (λ=",  # the min-entropy lambda
    "TIES-merging",
    "Task-wise AdaMerging",
    "Layer-wise AdaMerging",
    "Layer-wise AdaMerging++",
]


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "run"
    fig = tmp_path / "docs" / "heatmap.png"
    args = ["demo", "--quick", "--steps", "15", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out),
            "--no-progress"]
    assert main(args + ["--save-figure", str(fig)]) == 0
    first = capsys.readouterr().out
    table = first[first.index("Method"):]
    for r in ROWS:
        assert r in table, r
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert len(rows) == len(ROWS)
    tasks = res["tasks"]
    assert len(tasks) >= 4
    for r in rows.values():
        assert set(r["acc"]) == set(tasks)
    individual = rows["Individual (fine-tuned)"]["avg"]
    ta = rows["Task arithmetic (λ=0.3)"]["avg"]
    assert individual > 90.0
    assert ta < individual - 5.0  # the tasks genuinely conflict
    assert rows["Pretrained"]["avg"] < ta
    for f in ("results.md", "coefficients_layerwise.png", "loss.png"):
        assert (out / f).is_file(), f
    assert "| Layer-wise AdaMerging |" in (out / "results.md").read_text()
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(tasks) + 2

    # deterministic: the second run loads the cached models and prints the same table
    assert main(args + ["--output-dir", str(tmp_path / "run2")]) == 0
    second = capsys.readouterr().out
    assert second[second.index("Method"):second.index("time:")] == table[: table.index("time:")]
