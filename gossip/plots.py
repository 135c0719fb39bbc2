"""The one plot module of both executors: PNG plots of run directories (matplotlib's Agg
canvas; no pyplot global state).

- :func:`plot_metrics`: a real run (``launch.train``): every rank a thin line, the mean a thick one;
- :func:`plot_run`, :func:`plot_comparison`: simulated runs (one record per round, figures over
  all nodes) and comparisons of them;
- :func:`plot_label_distribution`: the nodes' label mix of a non-IID partition.

A real run's records (``metrics.jsonl``) each have a ``kind``:

- ``"sync"``: one per rank per synchronisation, with the mean train ``loss`` since the last one;
- ``"eval"``: one per rank per evaluation, with ``test_loss`` and (where defined)
  ``test_accuracy``;
- ``"consensus"``: one per evaluation, with ``consensus_distance`` (mean squared distance of the
  ranks' models to their average).

:func:`plot_metrics` draws every rank as a thin line and the mean over ranks as a thick one.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_PLOTTED_NODES", "MAX_PLOTTED_RANKS", "plot_comparison",
           "plot_label_distribution", "plot_metrics", "plot_run"]

#: Per-rank lines drawn at most (the mean always covers all ranks).
MAX_PLOTTED_RANKS = 32
#: Nodes shown in a label-distribution plot at most.
MAX_PLOTTED_NODES = 200


def _series(records: Iterable[Mapping[str, Any]], kind: str, key: str, x: str, who: str
            ) -> dict[int, tuple[list[float], list[float]]]:
    out: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        value = r.get(key)
        if r.get("kind") != kind or value is None or r.get(x) is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        xs, ys = out[int(r.get(who, 0))]
        xs.append(float(r[x]))
        ys.append(float(value))
    return dict(out)


def _mean(series: dict[int, tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    by_x: dict[float, list[float]] = defaultdict(list)
    for xs, ys in series.values():
        for a, b in zip(xs, ys, strict=True):
            by_x[a].append(b)
    xs = sorted(by_x)
    return xs, [sum(by_x[a]) / len(by_x[a]) for a in xs]


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _draw(ax: Any, series: dict[int, tuple[list[float], list[float]]], label: str,
          color: str, *, linestyle: str = "-") -> None:
    for i, who in enumerate(sorted(series)[:MAX_PLOTTED_RANKS]):
        xs, ys = series[who]
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle,
                label=f"{label} (per rank)" if i == 0 and len(series) > 1 else None)
    xs, ys = _mean(series)
    ax.plot(xs, ys, color=color, linewidth=2.0, linestyle=linestyle,
            label=f"{label} (mean of {len(series)})" if len(series) > 1 else label)


def _save(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=100)
    return path


def plot_metrics(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str], *,
                 title: str = "", x: str = "step", who: str = "rank") -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` and ``consensus.png`` (those with data) to ``out_dir``.

    ``x`` is the horizontal axis key (e.g. ``"step"`` or ``"sim_seconds"``), ``who`` the key that
    names a node (``"rank"`` for real runs). Returns the paths written.
    """
    records = list(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written: list[Path] = []

    train = _series(records, "sync", "loss", x, who)
    test = _series(records, "eval", "test_loss", x, who)
    if train or test:
        fig, ax = _figure()
        if train:
            _draw(ax, train, "train loss", "tab:blue")
        if test:
            _draw(ax, test, "test loss", "tab:orange", linestyle="--")
        positive = all(v > 0 for s in (train, test) for _, ys in s.values() for v in ys)
        if positive:
            ax.set_yscale("log")
        written.append(_save(fig, ax, out / "loss.png", f"{prefix}loss", x, "loss"))

    acc = _series(records, "eval", "test_accuracy", x, who)
    if acc:
        fig, ax = _figure()
        _draw(ax, acc, "test accuracy", "tab:green")
        ax.set_ylim(0.0, 1.0)
        written.append(_save(fig, ax, out / "accuracy.png", f"{prefix}test accuracy", x,
                             "accuracy"))

    cons = _series(records, "consensus", "consensus_distance", x, who)
    if cons:
        fig, ax = _figure()
        _draw(ax, cons, "consensus distance", "tab:red")
        if all(v > 0 for _, ys in cons.values() for v in ys):
            ax.set_yscale("log")
        written.append(_save(fig, ax, out / "consensus.png", f"{prefix}consensus distance", x,
                             "mean ||x_i - mean x||^2"))
    return written


# ----------------------------------------------------------------------------- simulated runs


def _sized_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _round_series(records: Sequence[Mapping[str, Any]], key: str, x: str = "round"
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
        fig = _sized_figure(11, 4)
        for i, x in enumerate(("round", "sim_seconds")):
            ax = fig.add_subplot(1, 2, i + 1)
            xs, mean = _round_series(records, "accuracy_mean", x)
            _, lo = _round_series(records, "accuracy_min", x)
            _, hi = _round_series(records, "accuracy_max", x)
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

    fig = _sized_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in (("train_loss", "train (local steps)"), ("loss_mean", "test, mean")):
        xs, ys = _round_series(records, key)
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

    xs, ys = _round_series(records, "consensus_distance")
    if ys:
        fig = _sized_figure(6, 4)
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
    fig = _sized_figure(12, 4.5)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for label, records in runs.items():
        for ax, x in zip(axes, ("round", "sim_seconds"), strict=True):
            xs, ys = _round_series(records, "accuracy_mean", x)
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


# ----------------------------------------------------------------------------- partitions


def plot_label_distribution(counts: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a stacked bar chart (one bar per node, first 200 nodes) of class counts to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_nodes, num_classes], got shape {counts.shape}")
    shown = counts[:MAX_PLOTTED_NODES]
    num_nodes, num_classes = shown.shape
    fig = Figure(figsize=(min(4.0 + 0.08 * num_nodes, 20.0), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = _class_colors(num_classes)
    x = np.arange(num_nodes)
    bottom = np.zeros(num_nodes)
    for c in range(num_classes):
        ax.bar(x, shown[:, c], bottom=bottom, width=0.9, color=colors[c], label=str(c))
        bottom += shown[:, c]
    title = "label distribution per node"
    if len(counts) > MAX_PLOTTED_NODES:
        title += f" (first {MAX_PLOTTED_NODES} of {len(counts)} nodes)"
    ax.set_title(title)
    ax.set_xlabel("node")
    ax.set_ylabel("samples")
    if num_classes <= 20:
        ax.legend(title="class", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=100)


def _class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    if num_classes <= 20:
        return [cmap(i) for i in range(num_classes)]
    return [cmap(i / max(num_classes - 1, 1)) for i in range(num_classes)]
