"""Figures of an AdaMerging run, written as PNG through a temporary file renamed into place (matplotlib, Agg).

- :func:`plot_coefficients`: heatmap of a coefficient table (parameter tensor x task).
- :func:`plot_loss`: the entropy objective per step (summed over tasks, and each task's).

Used by ``adamerge-fast plot`` and the digits demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **savefig_kw) -> Path:
    """``fig.savefig(path, format="png", dpi=120, bbox_inches="tight", **savefig_kw)`` through a temporary file
    renamed onto ``path``; the figure is closed."""
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, **{"format": "png", "dpi": 120, "bbox_inches": "tight", **savefig_kw})
    finally:
        _pyplot().close(fig)
    return Path(path)


def plot_coefficients(rows: Sequence[str], tasks: Sequence[str], values, path, title: str | None = None) -> Path:
    """Heatmap of a coefficient table ``values`` ``[len(rows), len(tasks)]`` (rows: parameter tensors, or one
    row "all" for task-wise coefficients), written as PNG to ``path``."""
    import numpy as np

    plt = _pyplot()
    v = np.asarray(values, dtype=float).reshape(len(rows), len(tasks))
    h = min(max(2.0, 0.16 * len(rows) + 1.2), 60.0)
    w = max(4.0, 0.9 * len(tasks) + 3.5)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=7 if len(rows) > 30 else 9)
    ax.set_xlabel("task")
    ax.set_ylabel("layer (parameter tensor)" if len(rows) > 1 else "")
    fig.colorbar(im, ax=ax, label="merging coefficient λ")
    ax.set_title(title or "AdaMerging coefficients")
    return save_figure(fig, path)


def plot_loss(loss: Sequence[float], path, task_loss: Sequence[dict] | None = None, title: str | None = None) -> Path:
    """The loss per step (``loss``: summed over tasks; ``task_loss``: ``{task: loss}`` per step), as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(1, len(loss) + 1), loss, label="sum over tasks", color="black", lw=1.5)
    if task_loss:
        for t in task_loss[0]:
            ax.plot(range(1, len(task_loss) + 1), [d[t] for d in task_loss], lw=0.8, alpha=0.7, label=t)
    ax.set_xlabel("step")
    ax.set_ylabel("mean prediction entropy")
    ax.set_title(title or "AdaMerging objective")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


__all__ = ["plot_coefficients", "plot_loss", "save_figure"]
