"""Saving figures: matplotlib PNGs and self-contained (offline) plotly HTML, written atomically."""

from __future__ import annotations

from pathlib import Path

from crabnet.utils import atomic_path


def save_png(fig, path: Path | str, dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG via a temporary file, then close it.

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: output path (folders are created).
        dpi: resolution.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def save_html(fig, path: Path | str) -> Path:
    """Save a plotly figure as one HTML file that works offline (plotly.js embedded, no CDN).

    Args:
        fig: a ``plotly.graph_objects.Figure``.
        path: output path (folders are created).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path
