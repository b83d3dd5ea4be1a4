"""Periodic tables per element: where the data are, where attention goes, what pushes the prediction, the errors.

Step 2 (``generate_attention_videos.py``, after the faithfulness table) aggregates, per element,
over the compounds that contain it:

- **prevalence**: the share of the training compounds that contain the element (the training
  split as the model saw it: read with :func:`crabnet.data.load_dataset` and the store's
  ``drop_unary``, duplicates merged);
- **attention**: the attention the element receives at the final capture, fraction-weighted over
  the query rows and averaged over layers and heads (:func:`crabnet.explain.faithfulness.attention_importance`;
  it sums to 1 over a compound's elements), averaged over the captured split's compounds that
  contain the element;
- **shapley**: the element's mean Shapley value at the final capture (target units; > 0: the
  element raises the prediction above the baseline, the training mean), stores with Shapley values only;
- **mae**: the mean absolute error of the captured split's compounds that contain the element, from
  the store's target and prediction at the final capture;
- **test_mae**: the same from step 4's test predictions (``predictions/<dataset>__<features>__test.csv``
  of the store's features, a model of its own) when that file exists.

Outputs (paths from :class:`crabnet.layout.Layout`): the per-element table
``attention/<dataset>/per_element.csv`` (columns ``Z``, ``symbol``, ``n_train``, ``prevalence``,
``n_captured``, ``attention``, ``shapley``, ``mae``, ``n_test``, ``test_mae``; a column the inputs do not
give is left out, an element no source holds has no row) and per quantity
``figures/ptable/<dataset>/<quantity>.png`` (matplotlib) with its interactive twin ``<quantity>.html``
(pymatviz's plotly ``ptable_heatmap``, plotly.js once beside them as ``plotly.min.js``). The tiles use
pymatviz's periodic-table layout (``pymatviz.df_ptable``); pymatviz is imported only when a figure is drawn.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.elements import N_ELEMENTS, SYMBOLS
from crabnet.explain.faithfulness import BLOCK_BYTES, attention_importance, refresh_faithfulness
from crabnet.layout import Layout
from crabnet.progress import say

EMPTY = "#eef1f5"  # tiles of elements without a value


@dataclass(frozen=True)
class Quantity:
    """A periodic table: its column, colour scale (matplotlib name, plotly name), the tiles' number format."""

    column: str
    label: str  # colour-bar title
    cmap: str
    colorscale: str
    digits: int = 2  # significant digits on the tiles
    percent: bool = False  # a share, shown in %
    diverging: bool = False  # colours symmetric about 0


QUANTITIES = {
    "prevalence": Quantity("prevalence", "share of training compounds", "viridis", "Viridis", percent=True),
    "attention": Quantity("attention", "attention received", "plasma", "Plasma"),
    "shapley": Quantity("shapley", "mean Shapley value", "RdBu_r", "RdBu_r", diverging=True),
    "mae": Quantity("mae", "MAE", "YlOrRd", "YlOrRd"),
    "test_mae": Quantity("test_mae", "test MAE", "YlOrRd", "YlOrRd"),
}


# --------------------------------------------------------------------------------------------
# per-element aggregates


def per_element(values: Any, elements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count and mean of ``values`` per element over the compounds that contain it.

    Args:
        values: (n, E) a value per element slot, or (n,) one per compound (given to each of its
            elements); non-finite values are left out.
        elements: (n, E) atomic numbers, 0 = padding.

    Returns:
        ``(count, mean)``, each (119,) indexed by atomic number (index 0 unused); mean NaN where
        the count is 0.
    """
    elements = np.asarray(elements, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = np.broadcast_to(v[:, None], elements.shape)
    keep = elements > 0
    z, x = elements[keep], v[keep]
    ok = np.isfinite(x)
    count = np.bincount(z[ok], minlength=N_ELEMENTS + 1)
    total = np.bincount(z[ok], weights=x[ok], minlength=N_ELEMENTS + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def final_importance(store: Any, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """(n, E) raw attention importance of every element at the store's final capture (read in blocks)."""
    att = store.group["attention"]
    n = att.shape[0]
    block = int(np.clip(block_bytes // max(1, int(np.prod(att.shape[1:])) * 4), 1, max(n, 1)))
    fractions = np.asarray(store.fractions, dtype=np.float64)
    out = np.zeros(fractions.shape)
    for i in range(0, n, block):
        out[i : i + block] = attention_importance(att[i : i + block, -1], fractions[i : i + block])
    return out


def training_elements(data_dir: Path | str, dataset: str, drop_unary: bool = True) -> np.ndarray | None:
    """(n, E) elements of the training split as step 1 reads it, or None when it cannot be read."""
    from crabnet.data import load_dataset
    from crabnet.errors import DataError

    try:
        splits = load_dataset(
            data_dir, dataset, ("train",), drop_unary=drop_unary, skip_invalid=True, fetch=False, verbose=False
        )
    except (DataError, OSError, ValueError):
        return None
    return splits["train"].elements


def test_predictions(path: Path | str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(elements (n, E), |prediction − target| (n,))`` of a predictions CSV, or None if it is absent or unreadable."""
    import pandas as pd

    from crabnet.data import compositions_from_formulas
    from crabnet.errors import DataError

    try:
        frame = pd.read_csv(path)
        data = compositions_from_formulas([str(f) for f in frame["formula"]])
        error = np.abs(frame["prediction"].to_numpy(np.float64) - frame["target"].to_numpy(np.float64))
    except (OSError, KeyError, ValueError, DataError):
        return None
    return data.elements, error


def element_table(
    store: Any,
    train: np.ndarray | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    block_bytes: int = BLOCK_BYTES,
):
    """The per-element table of a store (columns in the module docstring), one row per element that
    the training split, the store or the test predictions hold, by atomic number.

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        train: (n, E) elements of the training compounds (no prevalence without).
        test: ``(elements, absolute errors)`` of the test predictions (no test MAE without).
        block_bytes: attention read at once.
    """
    import pandas as pd

    elements = np.asarray(store.elements)
    out: dict[str, np.ndarray] = {}
    if train is not None:
        count, _ = per_element(np.ones(len(train)), train)
        out["n_train"], out["prevalence"] = count, count / max(len(train), 1)
    out["n_captured"], out["attention"] = per_element(final_importance(store, block_bytes), elements)
    if getattr(store, "has_shapley", False):
        out["shapley"] = per_element(store.group["shapley"][:, -1], elements)[1]
    error = np.abs(np.asarray(store.group["prediction"][:, -1], np.float64) - np.asarray(store.targets, np.float64))
    out["mae"] = per_element(error, elements)[1]
    if test is not None:
        out["n_test"], out["test_mae"] = per_element(test[1], test[0])
    counts = sum(out[k] for k in ("n_train", "n_captured", "n_test") if k in out)
    z = np.flatnonzero(counts[1:] > 0) + 1
    frame = pd.DataFrame({"Z": z, "symbol": [SYMBOLS[i - 1] for i in z]})
    for name, values in out.items():
        frame[name] = values[z].astype(np.int64) if name.startswith("n_") else values[z]
    return frame


# --------------------------------------------------------------------------------------------
# figures


def tile_text(value: float, digits: int = 2, percent: bool = False) -> str:
    """A tile's number: ``digits`` significant digits without an exponent (140, 6.9, 0.14, 0.0033), integers
    as such; a share in % (0.097 -> 9.7%); empty for NaN."""
    if not np.isfinite(value):
        return ""
    v = float(f"{100 * value if percent else value:.{digits - 1}e}")  # rounded first: 9.96 -> 10, not 10.0
    if v == 0:
        text = "0"
    elif abs(v) < 1e-4:
        text = f"{v:.{digits - 1}e}"
    else:
        text = f"{v:.{max(0, digits - 1 - int(np.floor(np.log10(abs(v)))))}f}"
    return text + ("%" if percent else "")


def _formatter(quantity: Quantity) -> Callable[[float], str]:
    return lambda v: tile_text(v, quantity.digits, quantity.percent)


def _range(values: np.ndarray, diverging: bool) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if diverging:
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5) if lo == 0 else (lo - abs(lo) / 2, hi + abs(hi) / 2)


def plot_ptable_png(values, path: Path | str, title: str, quantity: Quantity) -> Path:
    """A static periodic-table heatmap (matplotlib) of ``values`` (a Series by element symbol; NaN = no value).

    The tiles sit where ``pymatviz.df_ptable`` puts them (periods 1–7, lanthanides and actinides
    below); each shows its symbol and value, dark text on light tiles and light on dark.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter
    from pymatviz import df_ptable

    from crabnet.plotting import save_png

    cmap, fmt = colormaps[quantity.cmap], _formatter(quantity)
    norm = Normalize(*_range(values.to_numpy(np.float64), quantity.diverging))
    fig = Figure(figsize=(13, 7.6))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.88))
    for symbol, row, column in zip(df_ptable.index, df_ptable["row"], df_ptable["column"]):
        v = float(values.get(symbol, np.nan))
        face = cmap(norm(v)) if np.isfinite(v) else EMPTY
        r, g, b = face[:3] if not isinstance(face, str) else (0.93, 0.94, 0.96)
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
        ax.add_patch(Rectangle((column - 0.46, -row - 0.46), 0.92, 0.92, facecolor=face, edgecolor="#9aa3ad", lw=0.5))
        ax.text(column, -row + 0.13, symbol, ha="center", va="center", fontsize=10.5, weight="bold", color=ink)
        ax.text(column, -row - 0.24, fmt(v), ha="center", va="center", fontsize=6.8, color=ink)
    ax.set_xlim(0.4, 18.6)
    ax.set_ylim(-10.6, -0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    cax = ax.inset_axes((3.3, -1.55, 8.4, 0.32), transform=ax.transData)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    if quantity.percent:
        bar.ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    cax.set_title(quantity.label, fontsize=10)
    cax.tick_params(labelsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=11)
    return save_png(fig, path, dpi=90)


def _annotated_heatmap(z, annotation_text=None, colorscale="Viridis", font_colors=None, showscale=False, **kwargs):
    """The part of plotly < 7's ``figure_factory.create_annotated_heatmap`` that pymatviz 0.18's
    ``ptable_heatmap`` calls (plotly 7 removed it): a heatmap with each cell's text as an annotation,
    dark on light cells and light on dark ones (``font_colors``: [low, high] colours instead)."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale, unlabel_rgb

    z = np.asarray(z, dtype=np.float64)
    lo = kwargs.get("zmin", np.nanmin(z) if np.isfinite(z).any() else 0.0)
    hi = kwargs.get("zmax", np.nanmax(z) if np.isfinite(z).any() else 1.0)
    annotations = []
    for (r, c), value in np.ndenumerate(z):
        text = annotation_text[r][c] if annotation_text is not None else ""
        if not text:
            continue
        t = float(np.clip((value - lo) / (hi - lo), 0, 1)) if np.isfinite(value) and hi > lo else 0.0
        if font_colors:
            ink = font_colors[0] if t < 0.5 else font_colors[-1]
        elif np.isfinite(value):
            red, green, blue = unlabel_rgb(sample_colorscale(colorscale, [t])[0])
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"
        else:
            ink = "black"
        annotations.append(dict(x=c, y=r, text=text, showarrow=False, font=dict(color=ink)))
    heat = go.Heatmap(z=z, colorscale=colorscale, showscale=showscale, **kwargs)
    axis = dict(ticks="", showticklabels=False)
    return go.Figure(data=[heat], layout=dict(annotations=annotations, xaxis=axis, yaxis=axis))


@contextmanager
def _plotly_compat() -> Iterator[None]:
    """While inside, ``plotly.figure_factory.create_annotated_heatmap`` exists (plotly 7 lacks it)."""
    import plotly.figure_factory as ff

    if hasattr(ff, "create_annotated_heatmap"):
        yield
        return
    ff.create_annotated_heatmap = _annotated_heatmap
    try:
        yield
    finally:
        del ff.create_annotated_heatmap


def plot_ptable_html(values, path: Path | str, title: str, quantity: Quantity, hover: dict[str, str] | None = None):
    """The interactive twin (pymatviz's plotly ``ptable_heatmap``), offline with plotly.js beside it."""
    import pymatviz

    from crabnet.plotting import save_html

    lo, hi = _range(values.to_numpy(np.float64), quantity.diverging)
    with _plotly_compat():
        fig = pymatviz.ptable_heatmap(
            values.rename(quantity.label),
            fill_value=None,
            colorscale=quantity.colorscale,
            fmt=_formatter(quantity),
            hover_data=hover,
            nan_color=EMPTY,
            cscale_range=(lo, hi),
            colorbar=dict(tickformat=".0%" if quantity.percent else "~g"),  # not SI prefixes (200m = 0.2)
        )
    lines = textwrap.wrap(title, 110)
    fig.update_layout(title=dict(text="<br>".join(lines), x=0.5, font_size=13), margin=dict(t=30 + 20 * len(lines)))
    return save_html(fig, path, js="shared")


# --------------------------------------------------------------------------------------------
# outputs of step 2


def ptable_titles(dataset: str, store: Any, n_train: int | None, test_path: Path | None) -> dict[str, str]:
    """The title of each table: what is averaged, over which compounds and which split."""
    split = str(store.attrs.get("split", "captured"))
    last = f"{store.attrs.get('capture', 'epoch')} {int(store.steps[-1])}, the final capture"
    over = f"over the {split} compounds containing the element ({last})"
    baseline = store.attrs.get("shapley_baseline")
    base = f" {float(baseline):.4g}" if isinstance(baseline, (int, float)) else ""
    return {
        "prevalence": f"{dataset}: share of the {n_train or 0} training compounds that contain the element",
        "attention": f"{dataset}: attention received (fraction-weighted over queries, mean over layers and heads), "
        f"mean {over}",
        "shapley": f"{dataset}: mean Shapley value (target units; > 0 raises the prediction above the training "
        f"mean{base}) {over}",
        "mae": f"{dataset}: MAE of the {split} compounds containing the element (the store's model, {last})",
        "test_mae": f"{dataset}: MAE of the test compounds containing the element (step 4's model, "
        f"{test_path.name if test_path else 'test predictions'})",
    }


def ptable_outputs(data_dir: Path | str, dataset: str, table=None) -> tuple[Path, dict[str, Path]]:
    """The per-element CSV and the PNG of each quantity (of ``table``'s columns; all without one)."""
    layout = Layout(data_dir)
    names = [q for q, spec in QUANTITIES.items() if table is None or spec.column in table]
    return layout.ptable_csv(dataset), {q: layout.ptable_figure(dataset, q) for q in names}


def write_ptables(store: Any, data_dir: Path | str, dataset: str, block_bytes: int = BLOCK_BYTES):
    """Compute the per-element table of a store and write it with a periodic table (PNG + HTML) per quantity.

    Returns:
        ``(table, csv_path, {quantity: png_path})``; a quantity with no finite value gets no figure (and
        loses the one of an earlier run).
    """
    from crabnet.utils import atomic_path

    train = training_elements(data_dir, dataset, bool(store.attrs.get("drop_unary", True)))
    test_path = Layout(data_dir).predictions(dataset, str(store.attrs.get("features", "mat2vec")))
    test = test_predictions(test_path) if test_path.is_file() else None
    table = element_table(store, train=train, test=test, block_bytes=block_bytes)
    csv, pngs = ptable_outputs(data_dir, dataset, table)
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    titles = ptable_titles(dataset, store, None if train is None else len(train), test_path if test else None)
    written = {}
    for name, png in ptable_outputs(data_dir, dataset)[1].items():
        quantity = QUANTITIES[name]
        values = table.set_index("symbol")[quantity.column] if name in pngs else None
        if values is None or not np.isfinite(values.to_numpy(np.float64)).any():
            png.unlink(missing_ok=True)  # of an earlier run with other inputs
            png.with_suffix(".html").unlink(missing_ok=True)
            continue
        hover = _hover(table, str(store.attrs.get("split", "captured")))
        plot_ptable_png(values, png, titles[name], quantity)
        plot_ptable_html(values, png.with_suffix(".html"), titles[name], quantity, hover=hover)
        written[name] = png
    return table, csv, written


def _hover(table, split: str) -> dict[str, str]:
    """Per element symbol: how many compounds of each source hold it (the tooltip's last line)."""
    names = {"n_train": "training", "n_captured": split, "n_test": "test"}
    counts = table.set_index("symbol")[[c for c in names if c in table]]
    return {
        symbol: "compounds: " + " · ".join(f"{int(v)} {names[c]}" for c, v in row.items())
        for symbol, row in counts.iterrows()
    }


def _inputs_time(store_time: float, data_dir: Path | str, dataset: str, store: Any) -> float:
    """The newest of the store and the test predictions it reads (a training set is fixed)."""
    test = Layout(data_dir).predictions(dataset, str(store.attrs.get("features", "mat2vec")))
    return max(store_time, test.stat().st_mtime if test.is_file() else 0.0)


def _up_to_date(data_dir: Path | str, dataset: str, inputs_time: float) -> bool:
    """The CSV and the PNG + HTML of each quantity it holds are newer than the inputs."""
    import pandas as pd

    csv, _ = ptable_outputs(data_dir, dataset)
    if not csv.is_file() or csv.stat().st_mtime <= inputs_time:
        return False
    try:
        table = pd.read_csv(csv)
    except (OSError, ValueError):
        return False
    for name, png in ptable_outputs(data_dir, dataset, table)[1].items():
        if not np.isfinite(table[QUANTITIES[name].column].to_numpy(np.float64)).any():
            continue
        for path in (png, png.with_suffix(".html")):
            if not path.is_file() or path.stat().st_mtime <= inputs_time:
                return False
    return True


def refresh_ptables(
    store: Any, data_dir: Path | str, dataset: str, force: bool = False, store_time: float | None = None
) -> None:
    """Step 2: write the per-element table and its periodic tables unless they are newer than the
    store and the test predictions (``store_time``: the store's modification time; ``force`` recomputes);
    prints what it did."""
    csv, _ = ptable_outputs(data_dir, dataset)
    fresh = store_time is not None and _up_to_date(
        data_dir, dataset, _inputs_time(store_time, data_dir, dataset, store)
    )
    if fresh and not force:
        say(f"periodic tables: {csv} and the figures are newer than their inputs, kept (--force recomputes)")
        return
    t0 = time.perf_counter()
    table, csv, pngs = write_ptables(store, data_dir, dataset)
    layout = Layout(data_dir)
    why = {
        "prevalence": f"no training split {layout.split_csv(dataset, 'train')}",
        "shapley": "no Shapley values in the store",
        "test_mae": f"no {layout.predictions(dataset, str(store.attrs.get('features', 'mat2vec')))} (step 4)",
    }
    missing = [f"{q}: {why.get(q, 'no data')}" for q in QUANTITIES if q not in pngs]
    say(
        f"periodic tables ({time.perf_counter() - t0:.1f} s, {len(table)} elements) -> {csv}, "
        f"{layout.ptable_figures(dataset)}/: {', '.join(pngs)}" + "".join(f"\n  no {m}" for m in missing)
    )


def refresh_analyses(
    store: Any, data_dir: Path | str, dataset: str, seed: int = 0, force: bool = False, store_time: float | None = None
) -> None:
    """Step 2's tables of a store: :func:`crabnet.explain.faithfulness.refresh_faithfulness`, then the periodic
    tables (:func:`refresh_ptables`), each skipped when newer than its inputs unless ``force``."""
    refresh_faithfulness(store, data_dir, dataset, seed=seed, force=force, store_time=store_time)
    refresh_ptables(store, data_dir, dataset, force=force, store_time=store_time)
