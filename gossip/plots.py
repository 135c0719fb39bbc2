"""The one plot module of both executors: PNG plots of run directories (matplotlib's Agg
canvas; no pyplot global state).

- :func:`plot_run`: one run, real (``launch.train``) or simulated, from its records in the one
  schema of :mod:`gossip.records`: test accuracy, loss and consensus distance against steps
  (and simulated seconds, for a simulated run);
- :func:`plot_comparison`: simulated runs side by side (their ``round`` records);
- :func:`plot_label_distribution`: the nodes' label mix of a non-IID partition (bars, or
  :func:`plot_label_heatmap` for many nodes).

Test figures come from the ``eval`` rows (one per node per evaluation): the mean over the rows
of a step is a thick line; up to :data:`MAX_PLOTTED_RANKS` nodes each get a thin line, more get
a min-max band. Train loss comes from ``sync`` records (per rank, averaged) or ``round`` records,
the consensus distance from any record that carries one.
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
from gossip.metrics import atomic_write

__all__ = ["BARS_UP_TO", "MAX_PLOTTED_NODES", "MAX_PLOTTED_RANKS", "plot_comparison",
           "plot_comparison_seeds", "plot_label_distribution", "plot_label_heatmap", "plot_run"]

#: Runs with at most this many evaluated nodes draw each node's line; more draw a min-max band.
MAX_PLOTTED_RANKS = 32
#: Nodes shown in a label-distribution plot at most.
MAX_PLOTTED_NODES = 200
#: Above this many nodes the label plot is a heat map and an entropy histogram, not bars.
BARS_UP_TO = 64


def _ok(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


class _Curves:
    """What :func:`plot_run` draws, gathered in one pass over the records (memory: one entry
    per step, plus the lines of at most :data:`MAX_PLOTTED_RANKS` nodes)."""

    def __init__(self, records: Iterable[Mapping[str, Any]]) -> None:
        # key -> step -> [sum, count, min, max] over the eval rows
        self.stats: dict[str, dict[int, list[float]]] = {"loss": {}, "accuracy": {}}
        self.nodes: dict[Any, dict[str, tuple[list[float], list[float]]]] = {}
        self.many = False  # more nodes than MAX_PLOTTED_RANKS
        self.train: dict[int, list[float]] = defaultdict(list)
        self.consensus: dict[int, float] = {}
        self.sim_seconds: dict[int, float] = {}
        for r in records:
            step, kind = r["step"], r.get("kind")
            if kind == "eval":
                self._eval(r, step)
                continue
            if _ok(r.get("train_loss")):
                self.train[step].append(float(r["train_loss"]))
            if _ok(r.get("consensus_distance")):
                self.consensus[step] = float(r["consensus_distance"])
            if _ok(r.get("sim_seconds")):
                self.sim_seconds[step] = float(r["sim_seconds"])

    def _eval(self, r: Mapping[str, Any], step: int) -> None:
        node = r.get("node")
        lines = None
        if not self.many:
            if node not in self.nodes and len(self.nodes) == MAX_PLOTTED_RANKS:
                self.many, self.nodes = True, {}
            else:
                lines = self.nodes.setdefault(node, {})
        for key, stats in self.stats.items():
            v = r.get(key)
            if not _ok(v):
                continue
            v = float(v)
            s = stats.get(step)
            if s is None:
                stats[step] = [v, 1.0, v, v]
            else:
                s[0] += v
                s[1] += 1.0
                s[2], s[3] = min(s[2], v), max(s[3], v)
            if lines is not None:
                xs, ys = lines.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(v)

    def mean(self, key: str) -> tuple[list[float], list[float], list[float], list[float]]:
        """Steps, and the mean, min and max of ``key`` over each step's eval rows."""
        steps = sorted(self.stats[key])
        st = self.stats[key]
        return ([float(x) for x in steps], [st[x][0] / st[x][1] for x in steps],
                [st[x][2] for x in steps], [st[x][3] for x in steps])


def _sized_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], fmt: str = "png") -> None:
    """``fig.savefig`` by way of a temporary renamed over ``path``: a write that fails (a full
    disk) leaves no half-written image, and an older one stays whole."""
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100))


def _margins(fig: Any, *, left: float, wspace: float = 0.2) -> None:
    """Fixed margins: ``tight_layout`` draws each figure once more just to measure its text
    (about 0.25 s a figure, the bulk of writing the plots)."""
    fig.subplots_adjust(left=left, right=0.97, bottom=0.12, top=0.9, wspace=wspace)


def _log_scale(ax: Any, which: str) -> None:
    """Axis ``which`` ("x" or "y") of ``ax`` on a log scale with plain-text tick labels ("0.1",
    "2", "1e-05"): matplotlib's default labels (``10^{-1}`` as mathtext) are parsed by
    pyparsing, ~0.1 s per figure. Which ticks get a label is still ``LogFormatter``'s choice."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:g}"

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_eval(ax: Any, curves: _Curves, key: str, label: str, color: str, *,
               x: dict[int, float] | None = None, linestyle: str = "-") -> None:
    """The mean of ``key`` over each step's eval rows, with each node's line (few nodes) or the
    min-max band (many); ``x`` maps steps to another axis (simulated seconds)."""
    def at(steps: list[float]) -> list[float]:
        return steps if x is None else [x.get(int(s), math.nan) for s in steps]

    steps, mean, lo, hi = curves.mean(key)
    lines = [v[key] for v in curves.nodes.values() if key in v]
    several = curves.many or len(lines) > 1
    if not curves.many:
        for i, (xs, ys) in enumerate(lines if len(lines) > 1 else []):
            ax.plot(at(xs), ys, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle,
                    label=f"{label}, each node" if i == 0 else None)
    elif any(a != b for a, b in zip(lo, hi, strict=True)):
        ax.fill_between(at(steps), lo, hi, color=color, alpha=0.2, label=f"{label}, min-max")
    ax.plot(at(steps), mean, color=color, linewidth=2.0 if several else 1.5,
            linestyle=linestyle, label=f"{label}, mean over nodes" if several else label)


def _finish(fig: Any, ax: Any, path: Path, *, title: str, xlabel: str, ylabel: str,
            left: float = 0.12) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _margins(fig, left=left)
    _save(fig, path)
    return path


def plot_run(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str], *,
             title: str = "") -> list[Path]:
    """Write ``accuracy.png`` (against steps, and simulated seconds where the records have
    them), ``loss.png`` and ``consensus.png`` (those with data; no consensus plot when every
    distance is 0, one global model) into ``out_dir`` from ``records`` (read once, in
    ``metrics.jsonl`` order); returns the paths written."""
    curves = _Curves(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written: list[Path] = []

    if curves.stats["accuracy"]:
        axes = [("step", None)] + ([("simulated seconds", curves.sim_seconds)]
                                   if curves.sim_seconds else [])
        fig = _sized_figure(5.5 * len(axes), 4)
        for i, (xlabel, x) in enumerate(axes):
            ax = fig.add_subplot(1, len(axes), i + 1)
            _draw_eval(ax, curves, "accuracy", "test accuracy", "tab:green", x=x)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize="small")
        fig.suptitle(f"{prefix}test accuracy")
        _margins(fig, left=0.08 if len(axes) > 1 else 0.12, wspace=0.22)
        written.append(out / "accuracy.png")
        _save(fig, written[-1])

    if curves.train or curves.stats["loss"]:
        fig = _sized_figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        steps = sorted(curves.train)
        if steps:
            ax.plot(steps, [sum(curves.train[s]) / len(curves.train[s]) for s in steps],
                    color="tab:blue", label="train loss")
        if curves.stats["loss"]:
            _draw_eval(ax, curves, "loss", "test loss", "tab:orange", linestyle="--")
        values = [v for vs in curves.train.values() for v in vs] + \
            [s[2] for s in curves.stats["loss"].values()]
        if all(v > 0 for v in values):
            _log_scale(ax, "y")
        written.append(_finish(fig, ax, out / "loss.png", title=f"{prefix}loss", xlabel="step",
                               ylabel="loss", left=0.13))

    steps = sorted(curves.consensus)
    ys = [curves.consensus[s] for s in steps]
    if any(y > 0 for y in ys):  # all zero: one model (FedAvg; DiLoCo, F = 1), nothing to draw
        fig = _sized_figure(6, 4)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(steps, [max(y, 1e-30) for y in ys], color="tab:red", label="consensus distance")
        _log_scale(ax, "y")
        written.append(_finish(fig, ax, out / "consensus.png",
                               title=f"{prefix}consensus distance", xlabel="step",
                               ylabel="(1/n) Σ‖x_i − x̄‖²", left=0.15))
    return written


def _round_series(records: Sequence[Mapping[str, Any]], key: str, x: str = "round"
                  ) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if rec.get(x) is not None and _ok(v):
            xs.append(rec[x])
            ys.append(v)
    return xs, ys


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
    _log_scale(axes[1], "x")
    axes[0].legend(fontsize="small", loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        _save(fig, path.with_suffix(f".{fmt}"), fmt)
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
    _save(fig, path)


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
    _save(fig, path)


def _class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    if num_classes <= 20:
        return [cmap(i) for i in range(num_classes)]
    return [cmap(i / max(num_classes - 1, 1)) for i in range(num_classes)]
