"""Pearson correlation between element vectors (step 5) and numbers for "meaningful" structure.

A *representation* is a table of element vectors: a static feature table (oliynyk, magpie,
jarvis, mat2vec, onehot) or a learned Q/K/V embedding of step 4. For each one:

1. **z-score each feature over the elements the table covers** (mean 0, std 1 per column, std
   with ddof 0). Columns that are constant over those elements carry no information and have
   no z-score (0/0); they are dropped and counted. Missing entries of covered elements (oliynyk
   has a few) are set to 0 after z-scoring, i.e. to the feature's mean, so they pull the
   correlation neither way.
2. **Pearson correlation between elements** (rows) over the z-scored features.
3. **Reindex by atomic number** 1…118; elements the table does not cover are NaN (blank).
4. Show the **lower triangle without the diagonal**, diverging colour map centred at 0 over
   [−1, 1], ticks every 5 Z, for all elements and for Z ≤ 92.

The paper's claim that CrabNet "learns meaningful element representations" is turned into two
numbers per representation (``summarise``):

- **group separation**: mean correlation of element pairs within the same chemical group minus
  the mean over pairs from different groups, for the groups in ``GROUPS``, with a permutation
  p-value (group labels shuffled among the grouped elements, sizes kept); per-group values too.
- **agreement with domain knowledge**: Spearman correlation of the matrix's lower-triangle
  entries with those of the Oliynyk and Magpie matrices over the elements both cover.

Compute functions return arrays/DataFrames; plotting functions return figures (saved by
``crabnet.plotting``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crabnet.elements import ATOMIC_NUMBER, N_ELEMENTS, SYMBOLS, feature_frame
from crabnet.errors import UsageError
from crabnet.progress import say

STATIC_TABLES = ("oliynyk", "magpie", "jarvis", "mat2vec", "onehot")
REFERENCE_TABLES = ("oliynyk", "magpie")  # Spearman agreement is measured against these

# Chemical groups for the separation score. The radioactive heavy members (Fr, Ra, Po, At and
# the superheavies) are left out: most tables lack them and little chemistry is known for them.
GROUPS: dict[str, tuple[str, ...]] = {
    "alkali": ("Li", "Na", "K", "Rb", "Cs"),
    "alkaline_earth": ("Be", "Mg", "Ca", "Sr", "Ba"),
    "halogen": ("F", "Cl", "Br", "I"),
    "chalcogen": ("O", "S", "Se", "Te"),
    "transition_3d": ("Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"),
    "lanthanide": ("La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu"),
}


@dataclass
class Correlation:
    """A representation's element-by-element correlation matrix.

    Attributes:
        name: representation name (also the figure file stem).
        matrix: (118, 118) Pearson correlations indexed by Z−1 (H…Og); NaN where an element is
            not covered (or its z-scored vector is constant).
        present: (118,) bool, elements the representation covers.
        n_features: features used after dropping constant columns.
        n_dropped: constant columns dropped.
    """

    name: str
    matrix: np.ndarray
    present: np.ndarray
    n_features: int
    n_dropped: int

    def frame(self) -> pd.DataFrame:
        """The matrix as a DataFrame with element symbols on both axes."""
        return pd.DataFrame(self.matrix, index=list(SYMBOLS), columns=list(SYMBOLS))


# --------------------------------------------------------------------------------------------
# representations


def static_representation(name: str) -> pd.DataFrame:
    """A CBFV element table (rows = element symbols it covers, NaN kept)."""
    return feature_frame(name).copy()


def read_representation_csv(path: Path | str) -> pd.DataFrame:
    """An embedding CSV of step 4 (or any CSV with element symbols in the first column).

    Rows that are entirely blank (elements absent from the model's feature table) are dropped,
    so the returned frame covers only the elements that have vectors.

    Raises:
        ValueError: unknown element symbols, or no numeric columns.
    """
    frame = pd.read_csv(path, index_col=0)
    frame.index = frame.index.astype(str).str.strip()
    unknown = [s for s in frame.index if s not in ATOMIC_NUMBER]
    if unknown:
        raise UsageError(f"{path}: unknown element symbol(s) in the first column: {', '.join(unknown[:5])}")
    frame = frame.apply(pd.to_numeric, errors="coerce")
    if frame.shape[1] == 0:
        raise UsageError(f"{path}: no feature columns")
    return frame.dropna(how="all")


def representation_name(path: Path | str) -> str:
    """``embeddings/<features>/<dataset>__layer<L>__<K>.csv`` -> ``<dataset>__<features>__layer<L>__<K>``."""
    path = Path(path)
    stem = path.stem
    if "__layer" in stem:
        dataset, rest = stem.split("__layer", 1)
        return f"{dataset}__{path.parent.name}__layer{rest}"
    return f"{path.parent.name}__{stem}"


def representation_sort_key(name: str) -> tuple:
    """Order learned names by model, then layer, then Q, K, V (others alphabetically)."""
    head, sep, rest = name.partition("__layer")
    layer, _, kind = rest.partition("__")
    if sep and layer.isdigit() and kind in ("Q", "K", "V"):
        return (head, int(layer), "QKV".index(kind), "")
    return (name, -1, -1, name)


def model_of(name: str) -> str:
    """``<dataset>__<features>__layer<L>__<K>`` -> ``<dataset>__<features>``; other names unchanged."""
    return name.partition("__layer")[0]


def find_embedding_csvs(data_dir: Path | str) -> list[Path]:
    """Every ``embeddings/<features>/*.csv`` under ``data_dir``, ordered by representation name."""
    paths = Path(data_dir).glob("embeddings/*/*.csv")
    return sorted(paths, key=lambda p: representation_sort_key(representation_name(p)))


# --------------------------------------------------------------------------------------------
# compute


def zscore_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score each column over the rows, ignoring NaN; drop constant columns.

    Args:
        x: (n, d) values, NaN = missing.

    Returns:
        ``(z, kept)``: ``z`` (n, d_kept) with NaN replaced by 0 (the column mean) and ``kept``
        (d,) bool marking the columns that vary over their non-missing rows. A column counts as
        constant when its std (ddof 0) is at most 1e-12 times its largest absolute value, so
        rounding noise in a stored constant does not turn into a feature.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d table, got shape {x.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nan_to_num(np.nanmean(x, axis=0)) if len(x) else np.zeros(x.shape[1])
        std = np.nan_to_num(np.nanstd(x, axis=0)) if len(x) else np.zeros(x.shape[1])
        scale = np.nan_to_num(np.nanmax(np.abs(x), axis=0)) if len(x) else np.zeros(x.shape[1])
    kept = (std > 0) & (std > 1e-12 * scale)
    z = (x[:, kept] - mean[kept]) / std[kept]
    return np.nan_to_num(z, nan=0.0), kept


def row_pearson(z: np.ndarray) -> np.ndarray:
    """Pearson correlation between the rows of ``z`` (n, d) -> (n, n).

    Rows with zero variance give NaN rows and columns (the correlation is undefined); the
    diagonal of the others is exactly 1.
    """
    z = np.asarray(z, dtype=np.float64)
    c = z - z.mean(axis=1, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=1))
    ok = norm > 1e-12 * (np.abs(z).max(axis=1) + 1e-300)
    u = np.zeros_like(c)
    u[ok] = c[ok] / norm[ok, None]
    r = np.clip(u @ u.T, -1.0, 1.0)
    r[~ok, :] = np.nan
    r[:, ~ok] = np.nan
    idx = np.flatnonzero(ok)
    r[idx, idx] = 1.0
    return r


def reindex_by_z(matrix: np.ndarray, symbols: list[str] | pd.Index) -> np.ndarray:
    """Place an (n, n) matrix over ``symbols`` into a (118, 118) one indexed by Z−1; NaN elsewhere."""
    z = np.array([ATOMIC_NUMBER[s] - 1 for s in symbols], dtype=np.int64)
    out = np.full((N_ELEMENTS, N_ELEMENTS), np.nan)
    out[np.ix_(z, z)] = matrix
    return out


def element_correlation(frame: pd.DataFrame, name: str = "") -> Correlation:
    """z-score features over elements, correlate elements, reindex by Z.

    Args:
        frame: element vectors, index = element symbols (any order, a subset of H…Og), columns =
            features; NaN = missing value. Rows that are entirely NaN count as not covered.
        name: representation name.
    """
    frame = frame.dropna(how="all")
    unknown = [s for s in frame.index if s not in ATOMIC_NUMBER]
    if unknown:
        raise UsageError(f"{name or 'representation'}: unknown element symbol(s) {', '.join(map(str, unknown[:5]))}")
    if frame.index.has_duplicates:
        raise UsageError(f"{name or 'representation'}: duplicate element rows")
    z, kept = zscore_columns(frame.to_numpy(dtype=np.float64))
    matrix = reindex_by_z(row_pearson(z), list(frame.index))
    present = np.zeros(N_ELEMENTS, dtype=bool)
    present[[ATOMIC_NUMBER[s] - 1 for s in frame.index]] = True
    return Correlation(name, matrix, present, int(kept.sum()), int((~kept).sum()))


def lower_triangle(matrix: np.ndarray) -> np.ndarray:
    """Copy with the diagonal and everything above it set to NaN."""
    out = np.array(matrix, dtype=np.float64, copy=True)
    out[np.triu_indices(out.shape[0])] = np.nan
    return out


def restrict_z(matrix: np.ndarray, z_max: int) -> np.ndarray:
    """The block of a (118, 118) matrix for Z ≤ ``z_max``."""
    return matrix[:z_max, :z_max]


def group_labels(groups: dict[str, tuple[str, ...]] = GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """Atomic-number indices (Z−1) of the grouped elements and their group numbers."""
    idx, lab = [], []
    for g, members in enumerate(groups.values()):
        for s in members:
            idx.append(ATOMIC_NUMBER[s] - 1)
            lab.append(g)
    return np.array(idx), np.array(lab)


def _separation(sub: np.ndarray, labels: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Within-minus-between mean of pair correlations for one or more label vectors.

    sub: (m, m) correlations of the grouped elements; labels: (P, m); pairs: i<j indices.
    """
    i, j = pairs
    vals = sub[i, j]  # (n_pairs,)
    same = labels[:, i] == labels[:, j]  # (P, n_pairs)
    n_same = same.sum(1)
    within = (same * vals).sum(1) / np.maximum(n_same, 1)
    between = (~same * vals).sum(1) / np.maximum(len(vals) - n_same, 1)
    return within - between


def group_separation(
    corr: Correlation | np.ndarray, groups: dict[str, tuple[str, ...]] = GROUPS, *, n_perm: int = 9999, seed: int = 0
) -> dict[str, float]:
    """Mean within-group minus mean between-group correlation, with a permutation p-value.

    Only elements the representation covers (finite matrix entries) take part. Pairs are those of
    two grouped elements; "within" = both in the same group, "between" = different groups. The
    p-value is (1 + #permutations with a separation ≥ the observed) / (1 + n_perm), permuting the
    group labels among the covered grouped elements (group sizes kept).

    Returns:
        ``{"separation", "within", "between", "p_value", "n_elements", "sep_<group>"…}`` where
        ``sep_<group>`` is that group's mean within-pair correlation minus the mean correlation
        of its members with the other grouped elements (NaN if fewer than 2 members covered).
    """
    matrix = corr.matrix if isinstance(corr, Correlation) else np.asarray(corr)
    idx, lab = group_labels(groups)
    ok = np.isfinite(matrix[idx, idx])  # the diagonal: finite for covered elements with a defined row
    idx, lab = idx[ok], lab[ok]
    sub = matrix[np.ix_(idx, idx)]
    m = len(idx)
    pairs = np.triu_indices(m, k=1)
    out: dict[str, float] = {"n_elements": float(m)}
    if m < 3 or len(np.unique(lab)) < 2:
        out.update(separation=np.nan, within=np.nan, between=np.nan, p_value=np.nan)
    else:
        observed = float(_separation(sub, lab[None], pairs)[0])
        i, j = pairs
        same = lab[i] == lab[j]
        out["separation"] = observed
        out["within"] = float(sub[i, j][same].mean()) if same.any() else np.nan
        out["between"] = float(sub[i, j][~same].mean())
        rng = np.random.default_rng(seed)
        hits, done = 0, 0
        while done < n_perm:
            k = min(2000, n_perm - done)
            perm = np.argsort(rng.random((k, m)), axis=1)
            hits += int((_separation(sub, lab[perm], pairs) >= observed - 1e-12).sum())
            done += k
        out["p_value"] = (1 + hits) / (1 + n_perm) if n_perm > 0 else np.nan
    for g, name in enumerate(groups):
        members = lab == g
        if members.sum() < 2:
            out[f"sep_{name}"] = np.nan
            continue
        inner = sub[np.ix_(members, members)][np.triu_indices(int(members.sum()), k=1)]
        cross = sub[np.ix_(members, ~members)]
        out[f"sep_{name}"] = float(inner.mean() - cross.mean()) if cross.size else np.nan
    return out


def matrix_spearman(a: Correlation | np.ndarray, b: Correlation | np.ndarray) -> tuple[float, int]:
    """Spearman correlation of two (118, 118) matrices over the elements both cover.

    Uses the strictly-lower-triangle entries (each element pair once, no diagonal) where both
    matrices are finite.

    Returns:
        ``(rho, n_elements)``; rho is NaN when fewer than 3 pairs are shared or either matrix
        is constant over them (to 1e-9).
    """
    from scipy.stats import spearmanr

    ma = a.matrix if isinstance(a, Correlation) else np.asarray(a)
    mb = b.matrix if isinstance(b, Correlation) else np.asarray(b)
    i, j = np.tril_indices(ma.shape[0], k=-1)
    va, vb = ma[i, j], mb[i, j]
    ok = np.isfinite(va) & np.isfinite(vb)
    shared = np.isfinite(np.diag(ma)) & np.isfinite(np.diag(mb))
    if ok.sum() < 3 or np.ptp(va[ok]) <= 1e-9 or np.ptp(vb[ok]) <= 1e-9:
        # too few pairs, or a constant matrix (e.g. one-hot: every pair has r = -1/(n-1), and
        # ranking its rounding noise would be meaningless)
        return float("nan"), int(shared.sum())
    rho = spearmanr(va[ok], vb[ok]).statistic
    return float(rho), int(shared.sum())


def summarise(
    corrs: list[Correlation],
    references: dict[str, Correlation],
    *,
    n_perm: int = 9999,
    seed: int = 0,
    extra: dict[str, dict[str, object]] | None = None,
) -> pd.DataFrame:
    """One row per representation: group separation, p-value, Spearman vs the references.

    Args:
        corrs: the representations' correlations.
        references: e.g. ``{"oliynyk": …, "magpie": …}``; adds ``spearman_<name>`` and
            ``shared_<name>`` (elements shared) columns.
        n_perm: permutations for the p-value.
        seed: seeds the permutations (the same for every representation).
        extra: optional extra columns per representation, ``{name: {column: value}}`` (e.g. kind
            = static / learned / untrained and the model a learned embedding comes from).
    """
    rows = []
    for c in corrs:
        row: dict[str, object] = {"representation": c.name}
        row.update((extra or {}).get(c.name, {}))
        row["n_elements"] = int(c.present.sum())
        row["n_features"] = c.n_features
        row["n_constant_dropped"] = c.n_dropped
        sep = group_separation(c, n_perm=n_perm, seed=seed)
        row["group_elements"] = int(sep.pop("n_elements"))
        row.update(sep)
        for ref_name, ref in references.items():
            rho, shared = matrix_spearman(c, ref)
            row[f"spearman_{ref_name}"] = rho
            row[f"shared_{ref_name}"] = shared
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# plot


def _ticks(n: int, every: int = 5) -> tuple[list[int], list[str]]:
    """Tick positions (0-based index = Z−1) at Z = 1 and every ``every`` Z, labelled "Z Sym"."""
    zs = [1] + list(range(every, n + 1, every))
    return [z - 1 for z in zs], [f"{z} {SYMBOLS[z - 1]}" for z in zs]


def plot_correlation_png(matrix: np.ndarray, title: str = "", *, z_max: int = N_ELEMENTS, cmap: str = "RdBu_r"):
    """Lower-triangle heatmap of a (118, 118) correlation matrix, for Z ≤ ``z_max``.

    Returns:
        A matplotlib Figure (save with ``crabnet.plotting.save_png``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    m = lower_triangle(restrict_z(matrix, z_max))
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(7.6, 6.6), constrained_layout=True)
    cm = plt.get_cmap(cmap).with_extremes(bad="white")
    im = ax.imshow(
        np.ma.masked_invalid(m),
        cmap=cm,
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0),
        interpolation="nearest",
        origin="upper",
    )
    pos, labels = _ticks(n)
    ax.set_xticks(pos, labels, rotation=90, fontsize=7)
    ax.set_yticks(pos, labels, fontsize=7)
    ax.set_xticks(np.arange(n), minor=True)
    ax.set_yticks(np.arange(n), minor=True)
    ax.tick_params(which="minor", length=1.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("element (atomic number Z)")
    ax.set_ylabel("element (atomic number Z)")
    ax.set_title(title, fontsize=9, loc="left")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, ticks=[-1, -0.5, 0, 0.5, 1])
    cb.set_label("Pearson correlation")
    return fig


def _heatmap_trace(go: Any, m: np.ndarray, visible: bool, z_max: int) -> Any:
    """One lower-triangle matrix as a plotly heatmap, both elements and r in the hover text."""
    n = m.shape[0]
    sym = np.array([f"{SYMBOLS[i]} ({i + 1})" for i in range(n)], dtype=object)
    custom = np.stack([np.broadcast_to(sym[:, None], (n, n)), np.broadcast_to(sym[None, :], (n, n))], axis=-1)
    return go.Heatmap(
        z=np.where(np.isfinite(m), m, None),
        x=list(range(1, n + 1)),
        y=list(range(1, n + 1)),
        customdata=custom,
        zmin=-1,
        zmax=1,
        zmid=0,
        colorscale="RdBu",
        reversescale=True,
        hoverongaps=False,
        colorbar={"title": {"text": "Pearson r"}, "tickvals": [-1, -0.5, 0, 0.5, 1]},
        hovertemplate="%{customdata[0]} – %{customdata[1]}<br>r = %{z:.3f}<extra></extra>",
        visible=visible,
        name=f"Z ≤ {z_max}",
    )


def plot_correlation_html(matrix: np.ndarray, title: str = "", *, z_maxes: tuple[int, ...] = (N_ELEMENTS, 92)):
    """Interactive lower-triangle heatmap; hover shows both elements and the value.

    One trace per ``z_max`` with buttons to switch between them (e.g. all elements / Z ≤ 92).

    Returns:
        A plotly Figure (save with ``crabnet.plotting.save_html``, which embeds plotly.js).
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for k, z_max in enumerate(z_maxes):
        fig.add_trace(_heatmap_trace(go, lower_triangle(restrict_z(matrix, z_max)), visible=k == 0, z_max=z_max))
    tick_z = [1] + list(range(5, N_ELEMENTS + 1, 5))
    axis = dict(
        tickmode="array",
        tickvals=tick_z,
        ticktext=[f"{z} {SYMBOLS[z - 1]}" for z in tick_z],
        showgrid=False,
        zeroline=False,
        title="element (atomic number Z)",
    )
    buttons = [
        dict(
            label="all elements" if zm >= N_ELEMENTS else f"Z ≤ {zm}",
            method="update",
            args=[{"visible": [i == k for i in range(len(z_maxes))]}],
        )
        for k, zm in enumerate(z_maxes)
    ]
    fig.update_layout(
        title=title,
        width=820,
        height=760,
        plot_bgcolor="white",
        xaxis={**axis, "constrain": "domain"},
        yaxis={**axis, "autorange": "reversed", "scaleanchor": "x"},
        updatemenus=[dict(type="buttons", direction="right", buttons=buttons, x=0.0, y=1.08, xanchor="left")]
        if len(z_maxes) > 1
        else [],
    )
    return fig


# --------------------------------------------------------------------------------------------
# sources, figures and the printed summary of step 5


def collect_sources(data_dir: Path, sources: list[str] | None) -> dict[str, tuple[str, object]]:
    """{name: (kind, origin)}: origin = table name (static), CSV path (learned) or None (control).

    Raises:
        UsageError: a --source that matches nothing, with what is available.
    """
    found = {representation_name(p): p for p in find_embedding_csvs(data_dir)}
    every = {**{n: ("static", n) for n in STATIC_TABLES}, **{n: ("learned", p) for n, p in found.items()}}
    if sources is None:
        return every
    out = {}
    for s in sources:
        if s in every:
            out[s] = every[s]
        elif s == "control":
            continue
        elif s.endswith(".csv") and Path(s).is_file():
            out[representation_name(s)] = ("learned", Path(s))
        else:
            raise UsageError(
                f"--source {s!r}: not a static table, learned embedding or CSV file. Available: "
                f"{', '.join(list(every)[:12])}{' …' if len(every) > 12 else ''}"
            )
    return out


def control_frames(seed: int, device, features: str = "onehot") -> dict[str, pd.DataFrame]:
    """Q/K/V frames of a freshly initialised model (published architecture, seeded), as step 4 makes them.

    Names: ``untrained_<features>__layer<L>__<Q|K|V>``, layers in order, Q, K, V within a layer.
    """
    from crabnet.embeddings import embedding_frames
    from crabnet.training.recipe import build_model
    from crabnet.utils import seed_everything

    seed_everything(seed)
    model = build_model(features).to(device)
    frames = embedding_frames(model)
    return {
        f"untrained_{features}__layer{layer}__{kind}": frames[(layer, kind)]
        for layer in range(model.cfg.n_layers)
        for kind in "QKV"
    }


def up_to_date(outputs: list[Path], origin) -> bool:
    """Whether every output exists and is newer than the source CSV (static tables: exists)."""
    if not all(p.exists() for p in outputs):
        return False
    if isinstance(origin, Path):
        return min(p.stat().st_mtime for p in outputs) >= origin.stat().st_mtime
    return origin is not None  # static tables do not change; the control is always redrawn


def plot_representation(
    corr: Correlation,
    origin,
    out_dir: Path,
    *,
    z_max: int = 92,
    html: bool = True,
    html_js: str = "inline",
    force: bool = False,
) -> bool:
    """Write ``<name>.png``, ``<name>__z<z_max>.png`` and ``<name>.html`` unless up to date; True if written."""
    from crabnet.plotting import save_html, save_png

    name = corr.name
    outputs = [out_dir / f"{name}.png", out_dir / f"{name}__z{z_max}.png"] + (
        [out_dir / f"{name}.html"] if html else []
    )
    if not force and up_to_date(outputs, origin):
        return False
    title = f"{name}\nPearson r between elements over {corr.n_features} z-scored features" + (
        f" ({corr.n_dropped} constant dropped)" if corr.n_dropped else ""
    )
    save_png(plot_correlation_png(corr.matrix, title), outputs[0])
    save_png(plot_correlation_png(corr.matrix, title, z_max=z_max), outputs[1])
    if html:
        save_html(plot_correlation_html(corr.matrix, title, z_maxes=(N_ELEMENTS, z_max)), outputs[2], js=html_js)
    return True


def print_summary(summary: pd.DataFrame, n_perm: int) -> None:
    """Print the main columns, then the means over each model's 3 layers x Q/K/V."""
    cols = ["representation", "separation", "p_value", "spearman_oliynyk", "spearman_magpie"]
    fmt = {
        "float_format": lambda v: f"{v:.3f}",
        "formatters": {"p_value": lambda v: f"{v:.4f}", "max_p": lambda v: f"{v:.4f}"},
    }
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.max_colwidth", 60):
        say(summary[cols].to_string(index=False, **fmt))
        learned = summary[summary["kind"] != "static"]
        if len(learned):
            by = learned.groupby(["kind", "model"], sort=False)
            means = by[["separation", "spearman_oliynyk", "spearman_magpie"]].mean()
            means.insert(0, "n", by.size())
            means["max_p"] = by["p_value"].max()
            say(
                f"\nmean over each model's layers x Q/K/V (p-values from {n_perm} permutations; "
                "static tables above for scale):"
            )
            say(means.to_string(**fmt))


__all__ = [
    "STATIC_TABLES",
    "REFERENCE_TABLES",
    "GROUPS",
    "Correlation",
    "static_representation",
    "read_representation_csv",
    "representation_name",
    "representation_sort_key",
    "model_of",
    "find_embedding_csvs",
    "zscore_columns",
    "row_pearson",
    "reindex_by_z",
    "element_correlation",
    "lower_triangle",
    "restrict_z",
    "group_labels",
    "group_separation",
    "matrix_spearman",
    "summarise",
    "plot_correlation_png",
    "plot_correlation_html",
    "collect_sources",
    "control_frames",
    "up_to_date",
    "plot_representation",
    "print_summary",
]
