"""Shared helpers of the benchmark scripts: mean and std over seeds, and figures written as PNG
and SVG (matplotlib's Agg canvas, no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gossip.configs import parse_seeds

__all__ = ["band", "figure", "mean_std", "parse_seeds", "save"]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof 1; 0 for one value) of the values that are not None, and how
    many there were."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return None, None, 0
    m = sum(got) / len(got)
    sd = math.sqrt(sum((v - m) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else 0.0
    return m, sd, len(got)


def figure(width: float = 8.0, height: float = 5.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def band(ax: Any, xs: Sequence[float], runs: Sequence[Sequence[float]], *, label: str,
         color: str | None = None) -> None:
    """The mean over ``runs`` (one series per seed, same ``xs``) as a line, +-1 std shaded."""
    n = min(len(r) for r in runs)
    cols = [[r[i] for r in runs] for i in range(n)]
    stats = [mean_std(c) for c in cols]
    mean = [s[0] for s in stats]
    sd = [s[1] or 0.0 for s in stats]
    ax.plot(xs[:n], mean, label=label, color=color)
    if len(runs) > 1:
        ax.fill_between(xs[:n], [m - s for m, s in zip(mean, sd, strict=True)],
                        [m + s for m, s in zip(mean, sd, strict=True)], color=color,
                        alpha=0.2, lw=0)


def save(fig: Any, out: Path, name: str, dpi: int = 150) -> list[Path]:
    """Write ``out/name.png`` and ``out/name.svg``; returns both paths."""
    fig.tight_layout()
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    return paths
