"""Figures of steps 6 and 7: what the UMAP points are coloured by, and the layer × colouring grids.

``plot_png`` / ``plot_html`` draw a grid of layers (rows) × colourings (columns) from the 2-D
coordinates of ``crabnet.maps.projection``; ``make_colouring`` describes one colouring (continuous,
diverging or discrete; grey where unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.elements import ATOMIC_NUMBER, SYMBOLS, feature_frame
from crabnet.maps.projection import marker_style
from crabnet.plotting import save_html, save_png
from crabnet.progress import say

UNKNOWN_COLOUR = "#bdbdbd"


# --------------------------------------------------------------------------------------------
# what the points are coloured by


def pauling_en_mad(elements: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Fraction-weighted mean absolute deviation of Pauling electronegativity per compound.

    χ̄ = Σ f_i χ_i, MAD = Σ f_i |χ_i − χ̄| over real elements, χ from the Oliynyk table (CBFV).
    NaN when an element has no Pauling value (absent from the table, or 0 as for noble gases).
    """
    table = np.full(len(SYMBOLS) + 1, np.nan)
    col = feature_frame("oliynyk")["Pauling_Electronegativity"]
    for sym, chi in col.items():
        if sym in ATOMIC_NUMBER and np.isfinite(chi) and chi > 0:
            table[ATOMIC_NUMBER[sym]] = chi
    el = np.asarray(elements, dtype=np.int64)
    fr = np.asarray(fractions, dtype=np.float64)
    keep = el > 0
    chi = np.where(keep, table[el], 0.0)  # pads -> 0; missing real elements stay NaN
    mean = np.sum(fr * chi, 1, keepdims=True)
    return np.sum(np.where(keep, fr * np.abs(chi - mean), 0.0), 1)


@dataclass
class Colouring:
    """Values the points are coloured by, and how.

    Attributes:
        name: short key (file columns, HTML menu).
        label: colour-bar label.
        values: (n,) float, NaN = unknown (drawn grey).
        style: ``continuous``, ``diverging`` (centred at 0), ``discrete`` (integers) or
            ``discrete_diverging`` (integers centred at 0, e.g. oxidation states).
        cmap: matplotlib colour map name.
        vmin, vmax: colour limits (set by ``make_colouring``).
        ticks: the integers of discrete styles.
        title: panel and menu title (default ``name`` with spaces).
    """

    name: str
    label: str
    values: np.ndarray
    style: str = "continuous"
    cmap: str = "viridis"
    vmin: float = 0.0
    vmax: float = 1.0
    ticks: list[float] = field(default_factory=list)
    title: str = ""

    def __post_init__(self) -> None:
        self.title = self.title or self.name.replace("_", " ")

    def colours(self) -> list:
        """For discrete styles: one RGBA colour per tick."""
        import matplotlib

        cmap = matplotlib.colormaps[self.cmap]
        cols = [cmap(i / max(len(self.ticks) - 1, 1)) for i in range(len(self.ticks))]
        if self.style == "discrete_diverging" and 0 in self.ticks:
            cols[self.ticks.index(0)] = (0.83, 0.69, 0.0, 1.0)  # dark gold: the pale centre is lost on white
        return cols


def make_colouring(
    name: str,
    label: str,
    values,
    style: str = "continuous",
    cmap: str | None = None,
    limits: tuple[float, float] | None = None,
    title: str = "",
) -> Colouring:
    """A colouring with limits: 1st–99th percentile (continuous), symmetric (diverging), integers."""
    v = np.asarray(values, dtype=np.float64)
    fin = v[np.isfinite(v)]
    c = Colouring(name, label, v, style, title=title)
    if style == "continuous":
        c.cmap = cmap or "viridis"
        lo, hi = limits if limits is not None else (np.percentile(fin, [1, 99]) if len(fin) else (0.0, 1.0))
        c.vmin, c.vmax = float(lo), float(hi) if hi > lo else float(lo) + 1.0
    elif style == "diverging":
        c.cmap = cmap or "coolwarm"
        m = float(np.percentile(np.abs(fin), 99)) if len(fin) else 1.0
        c.vmin, c.vmax = -(m or 1.0), (m or 1.0)
    elif style in ("discrete", "discrete_diverging"):
        ints = np.rint(fin).astype(int)
        if style == "discrete":
            c.cmap = cmap or "viridis"
            lo, hi = (int(ints.min()), int(ints.max())) if len(ints) else (0, 1)
        else:
            c.cmap = cmap or "RdYlBu_r"
            m = max(int(np.abs(ints).max()) if len(ints) else 1, 1)
            lo, hi = -m, m
        c.values = np.where(np.isfinite(v), np.rint(v), np.nan)
        c.ticks = list(range(lo, hi + 1))
        c.vmin, c.vmax = lo - 0.5, hi + 0.5
    else:
        raise ValueError(f"unknown colouring style {style!r}")
    return c


# --------------------------------------------------------------------------------------------
# figures


def _mpl_norm(c: Colouring):
    import matplotlib.colors as mcolors

    if c.style.startswith("discrete"):
        cmap = mcolors.ListedColormap(c.colours())
        return cmap, mcolors.BoundaryNorm(np.arange(c.vmin, c.vmax + 1), cmap.N)
    import matplotlib

    return matplotlib.colormaps[c.cmap], mcolors.Normalize(c.vmin, c.vmax)


def _draw_panel(ax, xy: np.ndarray, c: Colouring, size: float, alpha: float, order: np.ndarray) -> None:
    cmap, norm = _mpl_norm(c)
    unknown = ~np.isfinite(c.values)
    if unknown.any():
        ax.scatter(
            xy[unknown, 0],
            xy[unknown, 1],
            s=size,
            c=UNKNOWN_COLOUR,
            alpha=min(alpha, 0.5),
            lw=0,
            rasterized=True,
            label=f"unknown ({int(unknown.sum())})",
        )
        ax.legend(loc="lower right", fontsize=7, frameon=False, markerscale=max(1.0, 6 / math.sqrt(size)))
    o = order[~unknown[order]]
    vals = np.clip(c.values[o], c.vmin, c.vmax) if not c.style.startswith("discrete") else c.values[o]
    sc = ax.scatter(xy[o, 0], xy[o, 1], s=size, c=vals, cmap=cmap, norm=norm, alpha=alpha, lw=0, rasterized=True)
    cb = ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    cb.solids.set_alpha(1)
    if c.style.startswith("discrete"):
        step = max(1, len(c.ticks) // 12)
        cb.set_ticks(c.ticks[::step])
    cb.set_label(c.label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_png(
    coords: dict[int, np.ndarray],
    colourings: list[Colouring],
    path: Path | str,
    *,
    title: str,
    row_label=lambda layer: f"layer {layer}",
    seed: int = 0,
) -> Path:
    """Grid of scatter plots: one row per layer, one column per colouring (grey = unknown).

    Args:
        coords: {layer: (n, 2)} UMAP coordinates of the same n points.
        colourings: the columns.
        path: the PNG.
        title: figure title.
        row_label: text of each row's y label.
        seed: order in which points are drawn (random, so no group hides another systematically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(coords)
    n = len(next(iter(coords.values())))
    size, alpha = marker_style(n)
    order = np.random.default_rng(seed).permutation(n)
    fig, axes = plt.subplots(
        len(layers), len(colourings), figsize=(3.9 * len(colourings), 3.4 * len(layers)), squeeze=False
    )
    for r, layer in enumerate(layers):
        for col, c in enumerate(colourings):
            ax = axes[r, col]
            _draw_panel(ax, coords[layer], c, size, alpha, order)
            if r == 0:
                ax.set_title(c.title, fontsize=10)
            if col == 0:
                ax.set_ylabel(row_label(layer), fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def _rgb(col) -> str:
    r, g, b = (int(round(255 * v)) for v in col[:3])
    return f"rgb({r},{g},{b})"


def _plotly_colour(c: Colouring) -> dict:
    """Marker settings for plotly: unknown values map to a grey band below the colour range."""
    import matplotlib

    unknown = ~np.isfinite(c.values)
    if c.style.startswith("discrete"):
        cols = c.colours()
        ticks = list(c.ticks)
        values = c.values.copy()
        lo = c.vmin
        scale_cols = [_rgb(x) for x in cols]
        ticktext = [str(t) for t in ticks]
        if unknown.any():
            values[unknown] = ticks[0] - 1
            scale_cols = [UNKNOWN_COLOUR] + scale_cols
            ticks = [ticks[0] - 1] + ticks
            ticktext = ["unknown"] + ticktext
            lo -= 1
        nb = len(scale_cols)
        scale = []
        for i, col in enumerate(scale_cols):  # piecewise-constant bands
            scale += [[i / nb, col], [(i + 1) / nb, col]]
        return {
            "color": values,
            "colorscale": scale,
            "cmin": lo,
            "cmax": c.vmax,
            "colorbar": {
                "title": {"text": c.label.replace("\n", "<br>"), "side": "right"},
                "tickvals": ticks,
                "ticktext": ticktext,
            },
        }
    cmap = matplotlib.colormaps[c.cmap]
    values = np.clip(c.values, c.vmin, c.vmax)
    span = c.vmax - c.vmin
    cmin = c.vmin
    scale = [[i / 10, _rgb(cmap(i / 10))] for i in range(11)]
    colorbar = {"title": {"text": c.label.replace("\n", "<br>"), "side": "right"}}
    if unknown.any():
        cmin = c.vmin - 0.08 * span
        values[unknown] = c.vmin - 0.04 * span
        g = (c.vmin - cmin) / (c.vmax - cmin)
        scale = [[0, UNKNOWN_COLOUR], [g * 0.999, UNKNOWN_COLOUR]] + [[g + (1 - g) * p, col] for p, col in scale]
        colorbar["tickvals"] = [c.vmin - 0.04 * span, c.vmin, (c.vmin + c.vmax) / 2, c.vmax]
        colorbar["ticktext"] = ["unknown", f"{c.vmin:.3g}", f"{(c.vmin + c.vmax) / 2:.3g}", f"{c.vmax:.3g}"]
    return {"color": values, "colorscale": scale, "cmin": cmin, "cmax": c.vmax, "colorbar": colorbar}


def hover_text(formula, columns: dict[str, np.ndarray]) -> list[str]:
    """One hover label per point: the formula, then ``name: value`` lines (``unknown`` for NaN)."""

    def fmt(v) -> str:
        return "unknown" if not np.isfinite(v) else f"{v:.4g}"

    cols = [(k, np.asarray(v, dtype=np.float64)) for k, v in columns.items()]
    return [f"<b>{f}</b><br>" + "<br>".join(f"{k}: {fmt(v[i])}" for k, v in cols) for i, f in enumerate(formula)]


def _colouring_buttons(colourings: list[Colouring], specs: list[dict]) -> list[dict]:
    """The plotly menu entries that restyle every panel's markers to one colouring."""
    keys = ("color", "colorscale", "cmin", "cmax", "colorbar")
    return [
        {"label": c.title, "method": "restyle", "args": [{f"marker.{k}": [spec[k]] for k in keys}]}
        for c, spec in zip(colourings, specs)
    ]


def plot_html(
    coords: dict[int, np.ndarray],
    colourings: list[Colouring],
    hover: list[str],
    path: Path | str,
    *,
    title: str,
    row_label=lambda layer: f"layer {layer}",
    js: str = "inline",
) -> Path:
    """Interactive offline HTML: one panel per layer, a menu to switch the colouring, hover labels.
    ``js``: where plotly.js comes from (see :func:`crabnet.plotting.save_html`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(coords)
    n = len(hover)
    size = max(2.0, 1.4 * math.sqrt(marker_style(n)[0]))
    opacity = marker_style(n)[1]
    specs = [_plotly_colour(c) for c in colourings]
    cols = min(len(layers), 2 if len(layers) == 4 else 3)
    rows = math.ceil(len(layers) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[row_label(l) for l in layers],
        horizontal_spacing=0.05,
        vertical_spacing=0.08,
    )
    first = specs[0]
    marker = {"size": size, "opacity": opacity, **{k: first[k] for k in ("color", "colorscale", "cmin", "cmax")},
              "colorbar": first["colorbar"]}  # fmt: skip
    for i, layer in enumerate(layers):
        xy = coords[layer]
        trace = go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", text=hover, hoverinfo="text", showlegend=False,
                             name=row_label(layer), marker={**marker, "showscale": i == len(layers) - 1})  # fmt: skip
        fig.add_trace(trace, row=i // cols + 1, col=i % cols + 1)
    buttons = _colouring_buttons(colourings, specs)
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=420 * rows + 80,
        width=460 * cols + 120,
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 0,
                "xanchor": "left",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 30},
            }
        ],  # fmt: skip
        margin={"t": 110},
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return save_html(fig, path, js=js)


# the columns and heading of the summary table steps 6 and 7 print
LOCAL_SUMMARY = (
    ["dataset", "atom", "layer", "n_compounds", "n_known_ox", "n_ox_classes", "majority_share", "knn_acc_repr",
     "knn_acc_umap", "knn_acc_shuffled", "knn_bacc_repr", "knn_bacc_umap", "knn_bacc_shuffled", "trustworthiness"],
    "kNN (k=10) accuracy (acc) and balanced accuracy (bacc) of the rounded oxidation state in the "
    "value vectors (repr) and the 2-D UMAP; shuffled = labels permuted:",
)  # fmt: skip
GLOBAL_SUMMARY = (
    ["dataset", "layer", "layer_is", "n_compounds", "knn_r2_repr", "knn_r2_umap", "knn_r2_shuffled", "trustworthiness"],
    "kNN (k=10) R² of the target from the pooled vectors (cosine) and from the 2-D UMAP; shuffled = targets permuted:",
)


def print_table(table: Any, columns: list[str], heading: str) -> None:
    """The summary columns of every dataset (a pandas DataFrame), printed at the end of a step."""
    if len(table):
        say(f"\n{heading}")
        say(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
