"""PNG plots of simulated runs (matplotlib's Agg canvas; no pyplot global state).

- :func:`plot_run`: ``accuracy.png`` (mean test accuracy across nodes with the min-max band, vs
  round and vs simulated seconds), ``loss.png`` (train and test loss vs round) and
  ``consensus.png`` (consensus distance vs round, log scale).
- :func:`plot_comparison`: every run of a comparison on one figure, accuracy vs round and vs
  simulated seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_comparison", "plot_run"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _series(records: Sequence[Mapping[str, Any]], key: str, x: str = "round"
            ) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            xs.append(rec[x])
            ys.append(v)
    return xs, ys


def plot_run(records: Sequence[Mapping[str, Any]], out_dir: str | Path, *, title: str = ""
             ) -> list[Path]:
    """Write the run's plots into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    has_acc = any(rec.get("accuracy_mean") is not None for rec in records)
    if has_acc:
        fig = _figure(11, 4)
        for i, x in enumerate(("round", "sim_seconds")):
            ax = fig.add_subplot(1, 2, i + 1)
            xs, mean = _series(records, "accuracy_mean", x)
            _, lo = _series(records, "accuracy_min", x)
            _, hi = _series(records, "accuracy_max", x)
            ax.plot(xs, mean, label="mean over nodes")
            if len(lo) == len(xs) and len(hi) == len(xs):
                ax.fill_between(xs, lo, hi, alpha=0.25, label="min-max")
            ax.set_xlabel("round" if x == "round" else "simulated seconds")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        written.append(out / "accuracy.png")
        fig.savefig(written[-1], dpi=100)

    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in (("train_loss", "train (local steps)"), ("loss_mean", "test, mean")):
        xs, ys = _series(records, key)
        if ys:
            ax.plot(xs, ys, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=100)

    xs, ys = _series(records, "consensus_distance")
    if ys:
        fig = _figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(xs, [max(y, 1e-30) for y in ys])
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("consensus distance (1/n) Σ‖x_i − x̄‖²")
        ax.grid(alpha=0.3)
        ax.set_title(title)
        fig.tight_layout()
        written.append(out / "consensus.png")
        fig.savefig(written[-1], dpi=100)
    return written


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *,
                    title: str = "") -> Path:
    """All runs on one figure: mean accuracy vs round and vs simulated seconds."""
    fig = _figure(12, 4.5)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for label, records in runs.items():
        for ax, x in zip(axes, ("round", "sim_seconds"), strict=True):
            xs, ys = _series(records, "accuracy_mean", x)
            ax.plot(xs, ys, label=label)
    for ax, x in zip(axes, ("round", "simulated seconds"), strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel("mean test accuracy")
        ax.grid(alpha=0.3)
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize="small", loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
