"""PNG plots of a run's metrics records (matplotlib's Agg canvas; no pyplot global state).

Records are the dicts of a run's ``metrics.jsonl``. Each has a ``kind``:

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_PLOTTED_RANKS", "plot_metrics"]

#: Per-rank lines drawn at most (the mean always covers all ranks).
MAX_PLOTTED_RANKS = 32


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
