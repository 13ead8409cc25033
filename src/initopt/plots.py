"""Plots (matplotlib, an optional extra: ``pip install 'initopt[plots]'``).

Every function writes a PNG and returns its path.
"""

from __future__ import annotations

import math
from typing import Any

from initopt.errors import InitOptError

__all__ = ["plot_curves", "plot_history", "plot_scales"]


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional extra
        raise InitOptError("plots need matplotlib: pip install 'initopt[plots]'") from e
    return plt


def plot_scales(result: Any, path: str) -> str:
    """Bar chart of the per-tensor scales of an :class:`~initopt.InitResult` (log axis)."""
    plt = _plt()
    names = list(result.scales)
    if not names:
        raise InitOptError("the result has no scales to plot")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [result.scales[n] for n in names], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("scale α")
    ax.set_title(f"{result.method}: per-tensor scales")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(result: Any, path: str, keys: tuple[str, ...] | None = None) -> str:
    """Numeric history entries (loss, gradient norm, GC, GQ, ...) over iterations."""
    plt = _plt()
    hist = result.history
    if not hist:
        raise InitOptError("the result has no history to plot (0 iterations)")
    numeric = [k for k, v in hist[0].items() if isinstance(v, (int, float)) and k not in ("step", "stage", "seconds")]
    keys = keys or tuple(k for k in numeric if any(isinstance(h.get(k), float) for h in hist))
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys, strict=True):
        xs = [i for i, h in enumerate(hist) if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])]
        ax.plot(xs, [hist[i][k] for i in xs], lw=1)
        ax.set_ylabel(k)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].set_title(f"{result.method}: search history")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(report: Any, path: str) -> str:
    """Training loss of a :class:`~initopt.compare.CompareReport`: mean over seeds, min–max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in dict.fromkeys(r["init"] for r in report.runs):
        curves = [r["train_loss"] for r in report.runs if r["init"] == label]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        cols = list(zip(*[c[:n] for c in curves], strict=True))
        finite = [[v for v in col if math.isfinite(v)] or [math.nan] for col in cols]
        mean = [sum(c) / len(c) for c in finite]
        line = ax.plot(range(n), mean, lw=1.2, label=f"{label} ({len(curves)} seeds)")[0]
        ax.fill_between(range(n), [min(c) for c in finite], [max(c) for c in finite], alpha=0.2, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training from each initialization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
