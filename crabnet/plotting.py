"""Saving figures: matplotlib PNGs and offline plotly HTML, written atomically."""

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


HTML_JS = ("inline", "shared")  # where the HTML files get plotly.js from
PLOTLY_JS = "plotly.min.js"


def save_html(fig, path: Path | str, js: str = "inline") -> Path:
    """Save a plotly figure as an HTML file that works offline (no CDN, nothing fetched).

    Args:
        fig: a ``plotly.graph_objects.Figure``.
        path: output path (folders are created).
        js: ``"inline"`` embeds plotly.js (about 4.8 MB per file; each file stands alone);
            ``"shared"`` writes it once as ``plotly.min.js`` beside the HTML files and refers to
            it by that relative name (small files; keep the folder together).
    """
    if js not in HTML_JS:
        raise ValueError(f"js must be one of {HTML_JS}, got {js!r}")
    path = Path(path)
    include: bool | str = True
    if js == "shared":
        write_plotly_js(path.parent)
        include = PLOTLY_JS
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=include, full_html=True)
    return path


def write_plotly_js(folder: Path | str) -> Path:
    """Write the installed plotly.js bundle to ``folder/plotly.min.js`` unless it is already there."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLY_JS
    text = get_plotlyjs().encode("utf-8")
    if not path.is_file() or path.stat().st_size != len(text):
        with atomic_path(path) as tmp:
            tmp.write_bytes(text)
    return path
