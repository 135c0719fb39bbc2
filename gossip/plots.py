"""The one plot module of both executors: PNG plots of run directories (matplotlib's Agg
canvas; no pyplot global state).

- :func:`plot_metrics`: a real run (``launch.train``): every rank a thin line, the mean a thick one;
- :func:`plot_run`, :func:`plot_comparison`: simulated runs (one record per round, figures over
  all nodes) and comparisons of them;
- :func:`plot_label_distribution`: the nodes' label mix of a non-IID partition (bars, or
  :func:`plot_label_heatmap` for many nodes).

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

from gossip.data import class_entropy

__all__ = ["BARS_UP_TO", "MAX_PLOTTED_NODES", "MAX_PLOTTED_RANKS", "plot_comparison",
           "plot_comparison_seeds", "plot_label_distribution", "plot_label_heatmap",
           "plot_metrics", "plot_run"]

#: Per-rank lines drawn at most (the mean always covers all ranks).
MAX_PLOTTED_RANKS = 32
#: Nodes shown in a label-distribution plot at most.
MAX_PLOTTED_NODES = 200
#: Above this many nodes the label plot is a heat map and an entropy histogram, not bars.
BARS_UP_TO = 64


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


def _margins(fig: Any, *, left: float, wspace: float = 0.2) -> None:
    """Fixed margins for the simulator's per-run figures: ``tight_layout`` draws each figure once
    more just to measure its text (about 0.25 s a figure, the bulk of writing the plots)."""
    fig.subplots_adjust(left=left, right=0.97, bottom=0.12, top=0.9, wspace=wspace)


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
        _margins(fig, left=0.08, wspace=0.22)
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
    _margins(fig, left=0.13)
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=100)

    xs, ys = _round_series(records, "consensus_distance")
    if any(y > 0 for y in ys):  # all zero: one global model (FedAvg, DiLoCo), nothing to draw
        fig = _sized_figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(xs, [max(y, 1e-30) for y in ys])
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("consensus distance (1/n) Σ‖x_i − x̄‖²")
        ax.grid(alpha=0.3)
        ax.set_title(title)
        _margins(fig, left=0.15)
        written.append(out / "consensus.png")
        fig.savefig(written[-1], dpi=100)
    return written


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *,
                    title: str = "", formats: Sequence[str] = ("png",)) -> Path:
    """All runs on one figure: mean accuracy vs round and vs simulated seconds. Written once per
    format in ``formats`` (``path`` with that suffix: png, svg, pdf); returns the first."""
    return plot_comparison_seeds({label: [records] for label, records in runs.items()}, path,
                                 title=title, formats=formats)


def plot_comparison_seeds(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
                          path: str | Path, *, title: str = "",
                          formats: Sequence[str] = ("png",)) -> Path:
    """:func:`plot_comparison` of several seeds per label: the mean over the seeds as a line,
    +-1 std (sample std) shaded; the x of a point is the seeds' mean (simulated seconds differ
    between seeds)."""
    fig = _sized_figure(12, 4.5)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for label, seeds in runs.items():
        for ax, x in zip(axes, ("round", "sim_seconds"), strict=True):
            series = [_round_series(records, "accuracy_mean", x) for records in seeds]
            n = min(len(xs) for xs, _ in series)
            xs = np.mean([s[0][:n] for s in series], axis=0)
            ys = np.array([s[1][:n] for s in series], dtype=np.float64)
            mean = ys.mean(axis=0)
            line = ax.plot(xs, mean, label=label if len(seeds) == 1
                           else f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                sd = ys.std(axis=0, ddof=1)
                ax.fill_between(xs, mean - sd, mean + sd, color=line[0].get_color(),
                                alpha=0.2, lw=0)
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
    for fmt in formats:
        fig.savefig(path.with_suffix(f".{fmt}"), format=fmt, dpi=100)
    return path.with_suffix(f".{formats[0]}")


# ----------------------------------------------------------------------------- partitions


def plot_label_distribution(counts: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write the per-node class counts ``counts`` [nodes, classes] to ``path`` (PNG): a stacked
    bar chart (one bar per node) up to :data:`BARS_UP_TO` nodes, else
    :func:`plot_label_heatmap` (a fixed number of artists, whatever the number of nodes)."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_nodes, num_classes], got shape {counts.shape}")
    if len(counts) > BARS_UP_TO:
        plot_label_heatmap(counts, path)
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def plot_label_heatmap(counts: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write the label distribution of many nodes to ``path`` (PNG): a heat map of each node's
    class proportions (nodes by classes, one image artist) beside a histogram of the nodes'
    class entropy (one step artist)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_nodes, num_classes], got shape {counts.shape}")
    num_nodes, num_classes = counts.shape
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(11.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    image = ax.imshow(share.T, aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=1.0, origin="lower",
                      extent=(-0.5, num_nodes - 0.5, -0.5, num_classes - 0.5))
    fig.colorbar(image, ax=ax, label="share of the node's samples")
    ax.set_xlabel("node")
    ax.set_ylabel("class")
    ax.set_title(f"class shares per node ({num_nodes} nodes)")
    ax = fig.add_subplot(1, 2, 2)
    entropy = class_entropy(counts)
    top = max(float(np.log2(num_classes)), 1e-9)
    hist, edges = np.histogram(entropy, bins=40, range=(0.0, top))
    ax.stairs(hist, edges, fill=True)
    ax.set_xlabel(f"class entropy, bits (balanced: {top:.2f})")
    ax.set_ylabel("nodes")
    ax.set_title("label skew: entropy of each node's classes")
    # fixed margins: tight_layout would draw the figure once more just to measure its text
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.91, wspace=0.25)
    fig.savefig(os.fspath(path), format="png", dpi=100)


def _class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    if num_classes <= 20:
        return [cmap(i) for i in range(num_classes)]
    return [cmap(i / max(num_classes - 1, 1)) for i in range(num_classes)]
