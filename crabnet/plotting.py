"""Saving figures: matplotlib PNGs and offline plotly HTML, written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


def _series(history: dict, name: str) -> list[float]:
    """``history[name]`` as floats (None and text become NaN; a missing list is empty)."""
    out = []
    for v in history.get(name) or []:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _curve_panel(ax: Any, xs: list[float], ys: list[float], label: str, colour: str, kind: str) -> None:
    """One panel of the learning curve: ``kind`` "bars" (counts), "best" (marks the minimum), "sci" or "line"."""
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
    if not ys or all(math.isnan(y) for y in ys):
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
        return
    finite = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
    if kind == "bars":
        ax.bar(xs, [0 if math.isnan(y) else y for y in ys], color=colour, width=0.8)
        total = int(sum(y for _, y in finite))
        ax.text(0.02, 0.92, f"total {total}", ha="left", va="top", transform=ax.transAxes, fontsize=9)
        ax.yaxis.get_major_locator().set_params(integer=True)
        return
    marker = "o" if len(finite) <= 60 else None
    ax.plot([x for x, _ in finite], [y for _, y in finite], color=colour, lw=1.6, marker=marker, ms=3)
    if kind == "best":
        best, at = min((y, x) for x, y in finite)
        ax.axhline(best, color=colour, lw=0.8, ls=":")
        ax.text(0.98, 0.92, f"best {best:.4g} (epoch {at:g})", ha="right", va="top", transform=ax.transAxes, fontsize=9)
    elif kind == "sci":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def write_learning_curve(history: dict, path: Path | str) -> Path:
    """Plot a training history: train loss, validation MAE, learning rate and SWA updates per epoch.

    Args:
        history: equal-length per-epoch lists under ``epoch``, ``train_loss``, ``val_mae`` (may
            hold NaN or None), ``lr`` (learning rate at the end of the epoch) and ``swa_updates``
            (SWA averaging additions during the epoch); an optional ``recipe`` (str) goes in the
            title. Missing lists leave their panel saying so.
        path: the PNG to write (folders are created; written atomically).

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    loss, val, lr, swa = (_series(history, k) for k in ("train_loss", "val_mae", "lr", "swa_updates"))
    epochs = _series(history, "epoch") or list(range(1, max(len(loss), len(val), len(lr), len(swa)) + 1))
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = [
        (axes[0, 0], loss, "train loss (RobustL1, scaled)", "#1f77b4", "line"),
        (axes[0, 1], val, "validation MAE (target units)", "#d62728", "best"),
        (axes[1, 0], lr, "learning rate (end of epoch)", "#2ca02c", "sci"),
        (axes[1, 1], swa, "SWA updates in the epoch", "#9467bd", "bars"),
    ]
    for ax, ys, label, colour, kind in panels:
        _curve_panel(ax, epochs[: len(ys)], ys, label, colour, kind)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    recipe = history.get("recipe")
    fig.suptitle("Training history" + (f" · {recipe}" if isinstance(recipe, str) and recipe else ""), fontsize=12)
    return save_png(fig, path, dpi=110)
