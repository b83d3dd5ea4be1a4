"""UMAP projections of CrabNet representations: parameters, cached projection, metrics and plots.

Used by ``plot_local_edm_umap.py`` (per-atom value vectors) and ``plot_global_edm_umap.py``
(pooled compound vectors). The steps are separate functions: vectors come from
``crabnet.represent``; ``project`` turns them into 2-D coordinates (cached on disk);
``local_metrics`` / ``global_metrics`` turn the paper's visual claims into numbers; ``plot_png`` /
``plot_html`` draw a grid of layers (rows) × colourings (columns).

UMAP, seeds and parallelism: umap-learn (numba) is the only backend, on every OS. With a seed
(the default, from ``--seed``) UMAP fixes its ``random_state``, which forces it to run
single-threaded and makes the coordinates reproducible on a given machine; with ``seed=None``
(``--umap-parallel``) it uses every core but the layout changes from run to run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from crabnet.data import DataError, parse_formula
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS, feature_frame
from crabnet.plotting import save_html, save_png
from crabnet.utils import atomic_path

# The atoms of the paper's local-EDM figures (SPEC §6 step 6).
PAPER_ATOMS = ("Al", "Fe", "O", "C", "B", "N", "Ti", "Cu", "Li", "W", "Na", "Si", "Ag", "Te", "As", "Cr", "Pt",
               "Tl", "Sb")
METRICS = ("euclidean", "cosine", "manhattan", "correlation", "chebyshev")
K_NEIGHBOURS = 10  # k of the kNN metrics
MAX_EVAL = 5000  # query points of the kNN metrics and points of the trustworthiness, at most
UNKNOWN_COLOUR = "#bdbdbd"


# --------------------------------------------------------------------------------------------
# UMAP parameters and projection


class UmapParamError(ValueError):
    """A UMAP setting that cannot work, with a message naming it."""


@dataclass(frozen=True)
class UmapParams:
    """Settings of one 2-D UMAP projection.

    Attributes:
        n_neighbors: size of the local neighbourhood (integer >= 2).
        min_dist: minimum distance of points in the layout, in [0, 1] (UMAP's spread is 1).
        metric: distance in the input space, one of ``METRICS``.
        seed: random state (reproducible, single-threaded) or None (parallel, not reproducible).
        n_epochs: optimisation epochs (None: UMAP's default, 500 below 10,000 points, else 200).
    """

    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "euclidean"
    seed: int | None = 0
    n_epochs: int | None = None

    def key(self) -> str:
        """Short hash of the settings and the umap-learn version (part of the cache file name)."""
        try:
            from importlib.metadata import version

            umap_version = version("umap-learn")
        except Exception:  # pragma: no cover - metadata missing
            umap_version = "?"
        text = json.dumps({**asdict(self), "umap": umap_version}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def validate_umap(params: UmapParams, n_points: int | None = None) -> UmapParams:
    """Check UMAP settings in one place; each bad input raises one clear error.

    Args:
        params: the settings.
        n_points: number of points to project, if known.

    Raises:
        UmapParamError: naming the setting, the value and what is allowed.
    """
    nn_ = params.n_neighbors
    if isinstance(nn_, bool) or not isinstance(nn_, (int, np.integer)) or nn_ < 2:
        raise UmapParamError(f"n_neighbors must be an integer >= 2, got {nn_!r}")
    md = params.min_dist
    if isinstance(md, bool) or not isinstance(md, (int, float, np.floating)) or not math.isfinite(md) \
            or not 0 <= md <= 1:
        raise UmapParamError(f"min_dist must be a number in [0, 1] (UMAP's spread is 1), got {md!r}")
    if params.metric not in METRICS:
        raise UmapParamError(f"metric must be one of {', '.join(METRICS)}, got {params.metric!r}")
    s = params.seed
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0):
        raise UmapParamError(f"seed must be a non-negative integer, or None for parallel (not reproducible) "
                             f"UMAP, got {s!r}")
    e = params.n_epochs
    if e is not None and (isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1):
        raise UmapParamError(f"n_epochs must be a positive integer or None, got {e!r}")
    if n_points is not None and n_points <= nn_:
        raise UmapParamError(f"UMAP needs more points than n_neighbors: got {n_points} points for "
                             f"n_neighbors {nn_}")
    return params


def fit_umap(x: np.ndarray, params: UmapParams) -> np.ndarray:
    """2-D UMAP of the rows of ``x``.

    Args:
        x: (n, d) finite vectors.
        params: the settings (validated here).

    Returns:
        (n, 2) float32 coordinates.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UmapParamError(f"UMAP input must be 2-D (points x features), got shape {x.shape}")
    validate_umap(params, len(x))
    if not np.isfinite(x).all():
        raise UmapParamError("UMAP input holds NaN or infinite values")
    import umap  # slow import (numba); only when projecting

    reducer = umap.UMAP(n_neighbors=int(params.n_neighbors), min_dist=float(params.min_dist), metric=params.metric,
                        n_components=2, random_state=params.seed, n_jobs=1 if params.seed is not None else -1,
                        n_epochs=params.n_epochs, low_memory=True, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coords = reducer.fit_transform(x).astype(np.float32)
    for w in caught:
        text = str(w.message)
        if "Spectral initialisation failed" in text:
            # small or disconnected neighbour graphs (few compounds): UMAP starts from random positions
            print(f"    (UMAP: spectral initialisation failed for {len(x)} points; random initialisation used)")
        elif "gradient function is not yet implemented" not in text:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return coords


def project(x: np.ndarray, params: UmapParams, cache_dir: Path | str, name: str, *,
            force: bool = False) -> tuple[np.ndarray, bool]:
    """``fit_umap`` with the coordinates cached as ``<cache_dir>/<name>__n<rows>__<params key>.npy``.

    The caller names the input (e.g. ``local__O__layer0``) inside a folder whose key already
    covers the checkpoint, the dataset and the split; the file name adds the number of rows and
    the UMAP settings.

    Returns:
        ``(coordinates, from_cache)``.
    """
    validate_umap(params, len(x))
    path = Path(cache_dir) / f"{name}__n{len(x)}__{params.key()}.npy"
    if path.is_file() and not force:
        return np.load(path, allow_pickle=False), True
    coords = fit_umap(np.asarray(x), params)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, coords)
    return coords, False


def local_params(layer: int, n_neighbors: int = 5, min_dist: float = 0.3, min_dist_layer0: float = 0.8,
                 seed: int | None = 0) -> UmapParams:
    """The paper's local settings: n_neighbors 5, min_dist 0.3 (0.8 for layer 0), Euclidean."""
    return UmapParams(n_neighbors, min_dist_layer0 if layer == 0 else min_dist, "euclidean", seed)


GLOBAL_METRIC = "cosine"  # the paper's global maps


def global_min_dist(n: int) -> float:
    """The paper's global min_dist by dataset size: 0.2, 0.4 above 4,000 compounds, 0.5 above 100,000.

    (Larger sets get a larger min_dist, which keeps their dense clusters from collapsing into points.)
    """
    return 0.5 if n > 100_000 else 0.4 if n > 4_000 else 0.2


def marker_style(n: int) -> tuple[float, float]:
    """(matplotlib marker area in pt², alpha) for a scatter of ``n`` points."""
    n = max(int(n), 1)
    return float(np.clip(200 / math.sqrt(n), 1.0, 30.0)), float(np.clip(30 / math.sqrt(n), 0.25, 0.9))


# --------------------------------------------------------------------------------------------
# metrics


def _sample(n: int, max_n: int, seed: int) -> np.ndarray:
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))


def knn_indices(x: np.ndarray, k: int, metric: str, queries: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out k nearest neighbours of the query rows among all rows of ``x``.

    Args:
        x: (n, d) points.
        k: neighbours per query (< n).
        metric: a scikit-learn metric name.
        queries: row indices to query (default all).

    Returns:
        (q, k) indices into ``x``; a query is never its own neighbour (exact duplicates of it
        still count as neighbours).
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float32)
    queries = np.arange(len(x)) if queries is None else np.asarray(queries)
    if not 0 < k < len(x):
        raise ValueError(f"k must be in 1..{len(x) - 1}, got {k}")
    algorithm = "brute" if metric in ("cosine", "correlation") or x.shape[1] > 15 else "auto"
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm=algorithm).fit(x)
    idx = nn.kneighbors(x[queries], return_distance=False)  # (q, k+1), usually self first
    not_self = idx != queries[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]  # first k entries that are not the query
    return np.take_along_axis(idx, order, axis=1)


def vote_accuracy(neighbours: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                  balanced: bool = False) -> float:
    """Share of queries whose label equals the majority label of their neighbours (ties: smallest).

    Args:
        neighbours: (q, k) neighbour indices of the queries.
        labels: (n,) labels of all points.
        queries: (q,) indices of the queries.
        balanced: mean of the per-class shares instead (balanced accuracy; chance = 1/classes),
            which a vote that always says the majority class cannot inflate.
    """
    codes, inv = np.unique(labels, return_inverse=True)
    nb = inv[neighbours]  # (q, k)
    counts = np.zeros((len(nb), len(codes)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(nb)), nb.shape[1]), nb.ravel()), 1)
    truth = inv[queries]
    hit = counts.argmax(1) == truth
    if not balanced:
        return float(np.mean(hit))
    return float(np.mean([hit[truth == c].mean() for c in np.unique(truth)]))


def knn_r2(neighbours: np.ndarray, y: np.ndarray, queries: np.ndarray) -> float:
    """R² of predicting ``y`` at the queries by the mean of their neighbours' ``y``."""
    y = np.asarray(y, dtype=np.float64)
    pred = y[neighbours].mean(1)
    ss_res = np.sum((y[queries] - pred) ** 2)
    ss_tot = np.sum((y[queries] - y.mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def trustworthiness_of(x: np.ndarray, coords: np.ndarray, metric: str, *, k: int = K_NEIGHBOURS,
                       max_points: int = MAX_EVAL, seed: int = 0) -> tuple[float, int]:
    """scikit-learn trustworthiness of a 2-D embedding (on a seeded subsample of ``max_points``).

    Returns:
        ``(trustworthiness, k used)``; k is lowered to fit below half the points.
    """
    from sklearn.manifold import trustworthiness

    idx = _sample(len(x), max_points, seed)
    k = min(k, (len(idx) - 1) // 2)
    if k < 1:
        return float("nan"), 0
    return float(trustworthiness(np.asarray(x[idx], np.float64), np.asarray(coords[idx], np.float64),
                                 n_neighbors=k, metric=metric)), k


def local_metrics(x: np.ndarray, coords: np.ndarray, oxidation: np.ndarray, *, k: int = K_NEIGHBOURS,
                  seed: int = 0, shuffles: int = 10, max_eval: int = MAX_EVAL) -> dict:
    """How well an atom's value vectors and their UMAP separate its rounded oxidation state.

    Leave-one-out kNN (k = 10, Euclidean) vote accuracy among the compounds with a known
    oxidation state, in the representation space and in the 2-D UMAP, against the same vote with
    the labels shuffled (mean of ``shuffles`` permutations) and the majority-class share; the same
    as balanced accuracy (``knn_bacc_*``, mean recall over the states), since one state often
    dominates (O is nearly always −2). The votes are NaN when fewer than ``3·k`` compounds have a
    known state: with leave-one-out and so few points every vote sees nearly all the others and
    returns the majority of the rest, which is systematically wrong for minority states.

    Args:
        x: (n, D) value vectors.
        coords: (n, 2) UMAP coordinates.
        oxidation: (n,) the atom's mean oxidation state, NaN when unknown.

    Returns:
        A dict of figures (NaN where too few states are known).
    """
    known = np.flatnonzero(np.isfinite(oxidation))
    labels = np.rint(oxidation[known]).astype(np.int64)
    out = {"n_compounds": len(x), "n_known_ox": len(known),
           "n_ox_classes": int(len(np.unique(labels))), "majority_share": float("nan"),
           "knn_acc_repr": float("nan"), "knn_acc_umap": float("nan"), "knn_acc_shuffled": float("nan"),
           "knn_bacc_repr": float("nan"), "knn_bacc_umap": float("nan"), "knn_bacc_shuffled": float("nan")}
    if len(known):
        out["majority_share"] = float(np.bincount(labels - labels.min()).max() / len(labels))
    if len(known) >= 3 * k:
        q = _sample(len(known), max_eval, seed)
        nb_repr = knn_indices(np.asarray(x)[known], k, "euclidean", q)
        nb_umap = knn_indices(coords[known], k, "euclidean", q)
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(labels) for _ in range(shuffles)]
        for prefix, balanced in (("knn_acc", False), ("knn_bacc", True)):
            out[f"{prefix}_repr"] = vote_accuracy(nb_repr, labels, q, balanced)
            out[f"{prefix}_umap"] = vote_accuracy(nb_umap, labels, q, balanced)
            out[f"{prefix}_shuffled"] = float(np.mean([vote_accuracy(nb_repr, p, q, balanced) for p in perms]))
    out["trustworthiness"], out["trust_k"] = trustworthiness_of(x, coords, "euclidean", seed=seed)
    return out


def global_metrics(x: np.ndarray, coords: np.ndarray, target: np.ndarray, *, k: int = K_NEIGHBOURS,
                   metric: str = GLOBAL_METRIC, seed: int = 0, max_eval: int = MAX_EVAL) -> dict:
    """How well the pooled compound vectors and their UMAP carry the target.

    Leave-one-out kNN regression (mean of k = 10 neighbours) R² of the target from the vectors
    (``metric``, cosine as the UMAP) and from the 2-D UMAP (Euclidean), against the same with the
    targets shuffled; queries are a seeded sample of at most ``max_eval`` compounds.
    """
    q = _sample(len(x), max_eval, seed)
    nb_repr = knn_indices(x, k, metric, q)
    nb_umap = knn_indices(coords, k, "euclidean", q)
    shuffled = np.random.default_rng(seed).permutation(np.asarray(target))
    out = {"n_compounds": len(x), "n_eval": len(q), "knn_r2_repr": knn_r2(nb_repr, target, q),
           "knn_r2_umap": knn_r2(nb_umap, target, q), "knn_r2_shuffled": knn_r2(nb_repr, shuffled, q)}
    out["trustworthiness"], out["trust_k"] = trustworthiness_of(x, coords, metric, seed=seed)
    return out


# --------------------------------------------------------------------------------------------
# what the points are coloured by


def composition_key(formula: str) -> str | None:
    """Formula-independent key of a composition: elements alphabetical with fractions to 6 digits.

    ``HfO2``, ``Hf1O2``, ``O2Hf`` and ``Hf2O4`` share a key. None for an unparsable formula.
    """
    try:
        amounts = parse_formula(str(formula))
    except DataError:
        return None
    total = sum(amounts.values())
    return "".join(f"{el}{amounts[el] / total:.6f}" for el in sorted(amounts))


def oxidation_path(data_dir: Path | str, dataset: str, split: str) -> Path:
    """``<data_dir>/oxidation/<dataset>__<split>.json`` (written by guess_oxidation.py, step 3)."""
    return Path(data_dir) / "oxidation" / f"{dataset}__{split}.json"


def load_oxidation(path: Path | str) -> dict[str, dict[str, float] | None] | None:
    """Oxidation guesses of step 3 keyed by ``composition_key``; None when the file is absent.

    The file maps formula -> {element: mean oxidation state} or null (no charge-balanced guess).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run guess_oxidation.py") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{formula: {{element: state}} or null}}")
    out: dict[str, dict[str, float] | None] = {}
    for formula, guess in raw.items():
        key = composition_key(formula)
        if key is not None:
            out[key] = guess if isinstance(guess, dict) else None
    return out


def oxidation_states(guesses: dict[str, dict[str, float] | None] | None, formulas, symbol: str) -> np.ndarray:
    """The mean oxidation state of ``symbol`` in each formula; NaN when unknown.

    Args:
        guesses: from ``load_oxidation`` (None: all unknown).
        formulas: the compounds' formulas (matched by composition, not by text).
        symbol: the element.
    """
    out = np.full(len(formulas), np.nan)
    if not guesses:
        return out
    for i, f in enumerate(formulas):
        guess = guesses.get(composition_key(f) or "")
        if guess and guess.get(symbol) is not None:
            try:
                out[i] = float(guess[symbol])
            except (TypeError, ValueError):
                pass
    return out


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


def make_colouring(name: str, label: str, values, style: str = "continuous", cmap: str | None = None,
                   limits: tuple[float, float] | None = None, title: str = "") -> Colouring:
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
        ax.scatter(xy[unknown, 0], xy[unknown, 1], s=size, c=UNKNOWN_COLOUR, alpha=min(alpha, 0.5), lw=0,
                   rasterized=True, label=f"unknown ({int(unknown.sum())})")
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


def plot_png(coords: dict[int, np.ndarray], colourings: list[Colouring], path: Path | str, *, title: str,
             row_label=lambda layer: f"layer {layer}", seed: int = 0) -> Path:
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
    fig, axes = plt.subplots(len(layers), len(colourings), figsize=(3.9 * len(colourings), 3.4 * len(layers)),
                             squeeze=False)
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
        return {"color": values, "colorscale": scale, "cmin": lo, "cmax": c.vmax,
                "colorbar": {"title": {"text": c.label.replace("\n", "<br>"), "side": "right"}, "tickvals": ticks, "ticktext": ticktext}}
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


def plot_html(coords: dict[int, np.ndarray], colourings: list[Colouring], hover: list[str], path: Path | str, *,
              title: str, row_label=lambda layer: f"layer {layer}", js: str = "inline") -> Path:
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
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[row_label(l) for l in layers],
                        horizontal_spacing=0.05, vertical_spacing=0.08)
    for i, layer in enumerate(layers):
        xy = coords[layer]
        first = specs[0]
        fig.add_trace(go.Scattergl(
            x=xy[:, 0], y=xy[:, 1], mode="markers", text=hover, hoverinfo="text", name=row_label(layer),
            marker={"size": size, "opacity": opacity, "color": first["color"], "colorscale": first["colorscale"],
                    "cmin": first["cmin"], "cmax": first["cmax"], "colorbar": first["colorbar"],
                    "showscale": i == len(layers) - 1},
            showlegend=False), row=i // cols + 1, col=i % cols + 1)
    buttons = [{"label": c.title, "method": "restyle",
                "args": [{"marker.color": [s["color"]], "marker.colorscale": [s["colorscale"]],
                          "marker.cmin": [s["cmin"]], "marker.cmax": [s["cmax"]], "marker.colorbar": [s["colorbar"]]}]}
               for c, s in zip(colourings, specs)]
    fig.update_layout(title=title, template="plotly_white", height=420 * rows + 80, width=460 * cols + 120,
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left", "y": 1.0,
                                    "yanchor": "bottom", "pad": {"b": 30}}],
                      margin={"t": 110})
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return save_html(fig, path, js=js)


# --------------------------------------------------------------------------------------------
# tables


def write_csv(df: pd.DataFrame, path: Path | str) -> Path:
    """Write a CSV atomically (no index; floats to 7 significant digits, the precision of float32)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.7g")
    return path


def update_summary(path: Path | str, rows: list[dict], keys: list[str]) -> pd.DataFrame:
    """Merge ``rows`` into the summary CSV at ``path``, replacing rows with the same ``keys``."""
    path = Path(path)
    if not rows:
        return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=keys)
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        if set(keys) <= set(old.columns) and len(new):
            new_keys = set(map(tuple, new[keys].astype(str).to_numpy()))
            old = old[[tuple(r) not in new_keys for r in old[keys].astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    if len(new):
        new = new.sort_values(keys, kind="stable").reset_index(drop=True)
    write_csv(new, path)
    return new


def run_datasets(datasets: list[str], label: str, run: Callable[[str], pd.DataFrame]) -> pd.DataFrame | None:
    """``run(dataset)`` for each dataset in turn, its summary rows tagged with ``dataset``.

    Returns:
        All rows, or None (after printing the error) when a dataset fails on bad input.
    """
    results = []
    for ds in datasets:
        print(f"{ds} ({label}):")
        try:
            results.append(run(ds).assign(dataset=ds))
        except (DataError, ValueError, FileNotFoundError) as err:
            print(f"error: {ds}: {err}", file=sys.stderr)
            return None
    return pd.concat(results, ignore_index=True)
