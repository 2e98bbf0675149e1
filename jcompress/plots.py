"""Matplotlib figures for compression results (matplotlib is imported only when called).

Figures are drawn with matplotlib's object API on an Agg canvas: no ``pyplot`` global state and
no display is needed. Needs the ``demo`` extra (``pip install 'jcompress[demo]'``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jcompress import _fs
from jcompress.report import Summary, format_bytes

__all__ = ["layers", "tradeoff"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'jcompress[demo]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def tradeoff(
    points: Sequence[tuple[str, float, float]],
    path: str | os.PathLike,
    *,
    xlabel: str = "bytes",
    ylabel: str = "accuracy",
) -> None:
    """Accuracy against size, one labelled point per setting, log-scaled size axis.

    Args:
      points: ``(label, size, accuracy)`` per setting.
      path: the image file to write (format from the suffix, e.g. ``.png``).
      xlabel, ylabel: axis labels.

    >>> import tempfile
    >>> tradeoff([("float32", 1e6, 0.97), ("int4", 1e5, 0.96)], tempfile.mktemp(suffix=".png"))
    """
    if not points:
        raise ValueError("tradeoff: no points to plot")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for i, (label, size, acc) in enumerate(points):
        ax.scatter([size], [acc], s=40)
        # Alternate above/below so neighbouring settings (int8 vs int4) do not overprint.
        offset = (6, 4) if i % 2 == 0 else (6, -11)
        ax.annotate(label, (size, acc), textcoords="offset points", xytext=offset, fontsize=8)
    ax.set_xscale("log")
    if xlabel.startswith("bytes"):
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        sizes = [p[1] for p in points]
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.savefig(_fs.resolve(path, what="path"), dpi=120)


def layers(summary: Summary, path: str | os.PathLike) -> None:
    """Per-layer sparsity (bars) and bits per value (markers) of a :class:`Summary`.

    >>> import tempfile, numpy as np
    >>> from jcompress.report import summarize
    >>> layers(summarize({"w": np.zeros((4, 4), np.float32)}), tempfile.mktemp(suffix=".png"))
    """
    if not summary.leaves:
        raise ValueError("layers: the summary has no leaves")
    rows = summary.leaves
    fig = _figure(max(5.0, 0.6 * len(rows) + 2.0), 4.0)
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, [r.sparsity for r in rows], color="tab:blue", alpha=0.7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity", color="tab:blue")
    ax.set_xticks(list(xs), [r.path for r in rows], rotation=45, ha="right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(list(xs), [r.bits for r in rows], "o", color="tab:red")
    ax2.set_ylim(0, max(33, max(r.bits for r in rows) + 1))
    ax2.set_ylabel("bits per value", color="tab:red")
    fig.savefig(_fs.resolve(path, what="path"), dpi=120)
