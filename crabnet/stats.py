"""Dataset statistics (step 8): sample counts, element presence and the diversity index.

Two kinds of dataset live under ``--data-dir``:

- benchmark sets, ``benchmark_data/<name>/{train,val,test}.csv``;
- matbench sets with cross-validation folds, ``matbench_cv/<name>/{train,val,test}<fold>.csv``.

For each split we count the samples (every row of the file: single-element compounds are *not*
dropped here, which is how the published tables were counted), the largest number of elements in
one formula, how many compounds contain each element ("presence": an element counts once per
compound whatever its amount), and the diversity index of those presence counts,

    H2(p) / log2(S),  p_i = c_i / sum(c),  S = number of elements present,

the Shannon entropy in bits normalised by its maximum (Pielou's evenness): 1 when every element
occurs equally often, near 0 when a few elements dominate.

The published tables (``crabnet/reference/published_stats_*.csv``, shipped with the package) list
val and test diversity swapped; :func:`compare_with_published` accounts for that.

``get_dataset_stats.py`` runs :func:`stats_job` once per dataset through ``crabnet.jobs.engine`` (in this
process, or in parallel on a Dask cluster) and merges the returned :class:`DatasetStats` into the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.data import read_split, split_files
from crabnet.elements import N_ELEMENTS, SYMBOLS
from crabnet.layout import BENCHMARK, MATBENCH, SPLITS, Layout, SplitFile
from crabnet.plotting import save_png
from crabnet.progress import say
from crabnet.reference import REFERENCE_DIR
from crabnet.utils import atomic_path

PUBLISHED = {BENCHMARK: "published_stats_benchmark.csv", MATBENCH: "published_stats_matbench_cv.csv"}
TABLE_NAME = {BENCHMARK: "benchmark", MATBENCH: "matbench_cv"}
COLUMNS = [
    "n_elements",
    "samples_total",
    "samples_train",
    "samples_val",
    "samples_test",
    "prop_train",
    "prop_val",
    "prop_test",
    "train_diversity",
    "val_diversity",
    "test_diversity",
    "log2_samples_train",
]


# --------------------------------------------------------------------------------------------
# statistics


def presence_counts(elements: np.ndarray) -> np.ndarray:
    """How many compounds contain each element.

    Args:
        elements: (n, E) atomic numbers, 0 = padding; an element appears at most once per row.

    Returns:
        (119,) int64 counts indexed by atomic number (index 0 unused, always 0).
    """
    z = np.asarray(elements)
    z = z[z > 0]
    return np.bincount(z.astype(np.int64), minlength=N_ELEMENTS + 1)[: N_ELEMENTS + 1]


def diversity_index(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of the counts normalised by log2 of the number of non-zero counts.

    Returns:
        A value in [0, 1]; NaN when fewer than two categories are present (undefined).
    """
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if len(c) < 2:
        return math.nan
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(len(c)))


@dataclass
class SplitStats:
    """Statistics of one split file.

    Attributes:
        samples: number of rows.
        max_elements: largest number of elements in one formula.
        counts: (119,) element presence counts by atomic number.
    """

    samples: int
    max_elements: int
    counts: np.ndarray

    @property
    def diversity(self) -> float:
        """Diversity index of the presence counts."""
        return diversity_index(self.counts)


def split_stats(path: Path | str, *, skip_invalid: bool = False) -> SplitStats:
    """Read one ``formula,target`` CSV (keeping single-element compounds) and count.

    Raises:
        DataError: a bad row (file, row and formula named) unless ``skip_invalid``.
    """
    # the file's rows as they are: single-element compounds kept, duplicates not merged
    data = read_split(path, drop_unary=False, skip_invalid=skip_invalid, merge_duplicates=False, verbose=skip_invalid)
    n_real = data.n_real
    return SplitStats(
        samples=len(data), max_elements=int(n_real.max()) if len(data) else 0, counts=presence_counts(data.elements)
    )


def table_row(stats: dict[str, SplitStats]) -> dict[str, float]:
    """One row of the statistics table from the stats of train, val and test."""
    n = {s: stats[s].samples for s in SPLITS}
    total = sum(n.values())
    row: dict[str, float] = {
        "n_elements": max(stats[s].max_elements for s in SPLITS),
        "samples_total": total,
        **{f"samples_{s}": n[s] for s in SPLITS},
        **{f"prop_{s}": n[s] / total for s in SPLITS},
        **{f"{s}_diversity": stats[s].diversity for s in SPLITS},
        "log2_samples_train": math.log2(n["train"]) if n["train"] > 0 else math.nan,
    }
    return row


@dataclass
class DatasetStats:
    """Statistics of one dataset (one fold for matbench sets)."""

    kind: str
    dataset: str
    fold: int | None
    splits: dict[str, SplitStats]

    def row(self) -> dict:
        """Table row: mat_prop[, cv] then :data:`COLUMNS`."""
        key: dict = {"mat_prop": self.dataset}
        if self.kind == MATBENCH:
            key["cv"] = self.fold
        return {**key, **table_row(self.splits)}


def dataset_stats(data_dir: Path | str, kind: str, dataset: str, *, skip_invalid: bool = False) -> list[DatasetStats]:
    """Statistics of every split (and fold) of one dataset."""
    files = split_files(data_dir, kind, dataset)
    by_fold: dict[int | None, dict[str, SplitStats]] = {}
    for f in files:
        by_fold.setdefault(f.fold, {})[f.split] = split_stats(f.path, skip_invalid=skip_invalid)
    return [DatasetStats(kind, dataset, fold, splits) for fold, splits in by_fold.items()]


def stats_job(
    data_dir: Path, kind: str, dataset: str, skip_invalid: bool = False, figures: bool = True
) -> list[DatasetStats]:
    """Step 8 for one dataset (a job of ``crabnet.jobs.engine``): its statistics and its prevalence plots.

    Args:
        data_dir: the ``--data-dir`` root.
        kind: ``benchmark_data`` or ``matbench_cv``.
        dataset: the dataset's folder name.
        skip_invalid: skip bad rows (reported) instead of raising.
        figures: also draw its two element-prevalence plots (:func:`plot_dataset_prevalence`).

    Returns:
        One :class:`DatasetStats` per fold (one for a benchmark set): small and picklable.

    Raises:
        DataError: a missing split file or a bad row (unless ``skip_invalid``).
    """
    results = dataset_stats(data_dir, kind, dataset, skip_invalid=skip_invalid)
    if figures and results:
        plot_dataset_prevalence(results[0], Layout(data_dir).prevalence_figures())
    return results


def stats_table(results: list[DatasetStats], kind: str) -> pd.DataFrame:
    """The published-style table for one kind of dataset."""
    rows = [r.row() for r in results if r.kind == kind]
    key = ["mat_prop", "cv"] if kind == MATBENCH else ["mat_prop"]
    return pd.DataFrame(rows, columns=key + COLUMNS)


def counts_table(results: list[DatasetStats], kind: str) -> pd.DataFrame:
    """Element presence counts: one row per dataset[, fold] and split, one column per element."""
    rows = []
    for r in results:
        if r.kind != kind:
            continue
        for split, st in r.splits.items():
            key: dict = {"mat_prop": r.dataset}
            if kind == MATBENCH:
                key["cv"] = r.fold
            rows.append({**key, "split": split, **dict(zip(SYMBOLS, st.counts[1:].tolist()))})
    key_cols = ["mat_prop", "cv", "split"] if kind == MATBENCH else ["mat_prop", "split"]
    return pd.DataFrame(rows, columns=key_cols + list(SYMBOLS))


def merge_table(old: pd.DataFrame | None, new: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Rows of ``new`` replace rows of ``old`` with the same key; the rest of ``old`` is kept.

    Rows are sorted by dataset name (case-insensitive), then by the remaining key columns.
    """
    if old is not None and len(old):
        drop = old.set_index(key).index.isin(new.set_index(key).index)
        new = pd.concat([old[~drop], new], ignore_index=True)
    order = sorted(
        range(len(new)),
        key=lambda i: tuple(str(new.iloc[i][k]).lower() if k == "mat_prop" else new.iloc[i][k] for k in key),
    )
    return new.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# comparison with the published tables


def compare_with_published(
    ours: pd.DataFrame, published: pd.DataFrame, kind: str, tol: float = 1e-9
) -> tuple[int, list[str]]:
    """Compare our table with a published one, allowing for its swapped val/test diversity.

    Every published row whose dataset (and fold) we have is compared column by column: counts,
    proportions and ``log2_samples_train`` directly, ``train_diversity`` directly, our
    ``val_diversity`` with their ``test_diversity`` and our ``test_diversity`` with their
    ``val_diversity`` (the published columns are swapped).

    Args:
        ours: our table (:func:`stats_table`).
        published: the published table.
        kind: ``benchmark_data`` or ``matbench_cv``.
        tol: absolute tolerance.

    Returns:
        (number of rows compared, list of mismatch descriptions).
    """
    key = ["mat_prop", "cv"] if kind == MATBENCH else ["mat_prop"]
    mine = ours.set_index(key)
    pairs = {c: c for c in COLUMNS}
    pairs["val_diversity"], pairs["test_diversity"] = "test_diversity", "val_diversity"
    compared, problems = 0, []
    for _, pub in published.iterrows():
        k = tuple(pub[c] for c in key) if len(key) > 1 else pub[key[0]]
        if k not in mine.index:
            continue
        compared += 1
        row = mine.loc[k]
        for col, pub_col in pairs.items():
            a, b = float(row[col]), float(pub[pub_col])
            if not (abs(a - b) <= tol or (math.isnan(a) and math.isnan(b))):
                problems.append(f"{k} {col}: ours {a!r}, published {pub_col} {b!r}")
    return compared, problems


def read_published(kind: str, reference_dir: Path | str = REFERENCE_DIR) -> pd.DataFrame | None:
    """The published table of one kind, or ``None`` when the file is not there."""
    path = Path(reference_dir) / PUBLISHED[kind]
    return pd.read_csv(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# plots


SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_prevalence(counts: dict[str, np.ndarray], title: str, path: Path | str, order: str = "count") -> None:
    """Write :func:`prevalence_figure` as a PNG (atomically)."""
    save_png(prevalence_figure(counts, title, order), path)


def prevalence_figure(counts: dict[str, np.ndarray], title: str, order: str = "count"):
    """Stacked bar chart of element presence counts per split, for the elements present.

    Args:
        counts: split -> (119,) presence counts by atomic number.
        title: figure title.
        order: ``count`` (most common first) or ``z`` (by atomic number).

    Returns:
        The matplotlib figure; bar i of every split is the element named by tick label i.
    """
    plt = _pyplot()
    total = sum(counts.values())
    z = np.nonzero(total[1:])[0] + 1
    if order == "count":
        z = z[np.argsort(-total[z], kind="stable")]
    elif order != "z":
        raise ValueError(f"order must be 'count' or 'z', got {order!r}")
    x = np.arange(len(z))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(z) + 1.5), 4.0), layout="constrained")
    bottom = np.zeros(len(z))
    for split, c in counts.items():
        ax.bar(x, c[z], bottom=bottom, width=0.85, label=split, color=SPLIT_COLOURS.get(split))
        bottom += c[z]
    ax.set_xticks(x, [SYMBOLS[i - 1] for i in z], rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(z) - 0.3)
    ax.set_ylabel("compounds containing the element")
    ax.set_xlabel("element, by atomic number" if order == "z" else "element, most common first")
    ax.set_title(title)
    ax.legend(frameon=False)
    return fig


def plot_dataset_prevalence(stats: DatasetStats, folder: Path | str) -> None:
    """``<folder>/<dataset>__by_count.png`` and ``…__by_z.png`` of one dataset (matbench sets: pass their
    first fold, whose train, val and test splits together cover the set)."""
    counts = {s: st.counts for s, st in stats.splits.items()}
    what = stats.dataset if stats.fold is None else f"{stats.dataset} (fold {stats.fold})"
    for order, suffix in (("count", "by_count"), ("z", "by_z")):
        plot_prevalence(
            counts,
            f"{what}: compounds containing each element",
            Path(folder) / f"{stats.dataset}__{suffix}.png",
            order=order,
        )


def plot_diversity(groups: list[tuple[str, pd.DataFrame]], title: str, path: Path | str) -> None:
    """Write :func:`diversity_figure` as a PNG (atomically)."""
    save_png(diversity_figure(groups, title), path)


def diversity_figure(groups: list[tuple[str, pd.DataFrame]], title: str):
    """Grouped bar chart of train/val/test diversity per dataset, with error bars when given.

    Args:
        groups: (group label, frame) pairs; each frame is indexed by dataset name with columns
            ``<split>_diversity`` and optionally ``<split>_diversity_std``. Groups are drawn
            one after the other, separated by a dashed line and labelled at the top.
        title: figure title.

    Returns:
        The matplotlib figure; the three bars (train, val, test) around tick i belong to the
        dataset named by tick label i.
    """
    plt = _pyplot()
    names: list[str] = []
    positions: list[float] = []
    spans: list[tuple[str, float, float]] = []
    pos = 0.0
    for label, frame in groups:
        start = pos
        for name in frame.index:
            names.append(str(name))
            positions.append(pos)
            pos += 1.0
        spans.append((label, start, pos - 1.0))
        pos += 1.0
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2.0), 5.0), layout="constrained")
    i = 0
    for g, (_label, frame) in enumerate(groups):
        x = np.asarray(positions[i : i + len(frame)])
        i += len(frame)
        for j, split in enumerate(SPLITS):
            std = f"{split}_diversity_std"
            ax.bar(
                x + (j - 1) * width,
                frame[f"{split}_diversity"].to_numpy(float),
                width=width,
                color=SPLIT_COLOURS[split],
                label=split if g == 0 else None,
                yerr=frame[std].to_numpy(float) if std in frame else None,
                capsize=2,
            )
    ax.set_xticks(positions, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.7, pos - 1.3)
    lo = min((np.nanmin(f[[f"{s}_diversity" for s in SPLITS]].to_numpy(float)) for _, f in groups), default=0.0)
    top = 1.06 if len(groups) > 1 else 1.0
    bottom = max(0.0, np.floor((lo - 0.05) * 20) / 20)
    ax.set_ylim(bottom, top)
    ax.set_yticks(np.round(np.arange(bottom, 1.0 + 1e-9, 0.05), 2))
    ax.set_ylabel("diversity index  H$_2$(p) / log$_2$(S)")
    ax.set_title(title)
    fig.legend(loc="outside right upper", frameon=False)
    if len(groups) > 1:
        for label, a, b in spans:
            ax.text((a + b) / 2, top - 0.005, label, ha="center", va="top", fontsize=9, style="italic")
        for _, a, _b in spans[1:]:
            ax.axvline(a - 1.0, color="0.6", lw=0.8, ls="--")
    return fig


def matbench_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1) over folds of each matbench set's diversity."""
    cols = [f"{s}_diversity" for s in SPLITS]
    g = table.groupby("mat_prop", sort=False)[cols]
    out = g.mean()
    std = g.std(ddof=1).fillna(0.0)
    for c in cols:
        out[f"{c}_std"] = std[c]
    return out.loc[sorted(out.index, key=str.lower)]


# --------------------------------------------------------------------------------------------
# outputs of a run


def write_tables(results: list[DatasetStats], data_dir: Path) -> dict[str, pd.DataFrame]:
    """Write (merging into existing files) the statistics and element-count tables; return the stats tables."""
    tables = {}
    for kind in (BENCHMARK, MATBENCH):
        if not any(r.kind == kind for r in results):
            continue
        key = ["mat_prop", "cv"] if kind == MATBENCH else ["mat_prop"]
        for name, new, k in (
            (f"{TABLE_NAME[kind]}.csv", stats_table(results, kind), key),
            (f"element_counts_{TABLE_NAME[kind]}.csv", counts_table(results, kind), key + ["split"]),
        ):
            path = Layout(data_dir).stats() / name
            old = pd.read_csv(path) if path.is_file() else None
            table = merge_table(old, new, k)
            with atomic_path(path) as tmp:
                table.to_csv(tmp, index=False, float_format="%.17g")
            say(f"wrote {path} ({len(table)} rows)")
            if name == f"{TABLE_NAME[kind]}.csv":
                tables[kind] = table
    return tables


def write_figures(tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    """The diversity bar charts (the prevalence plots of each dataset are drawn by its job)."""
    out = Layout(data_dir).stats_figures()
    groups = []
    if BENCHMARK in tables:
        bench = tables[BENCHMARK].set_index("mat_prop")
        plot_diversity([("benchmark", bench)], "Diversity of the benchmark sets", out / "diversity_benchmark.png")
        groups.append(("benchmark", bench))
    if MATBENCH in tables:
        mb = matbench_summary(tables[MATBENCH])
        plot_diversity(
            [("matbench (mean ± std over folds)", mb)],
            "Diversity of the matbench sets (mean ± std over folds)",
            out / "diversity_matbench_cv.png",
        )
        groups.append(("matbench (mean ± std over folds)", mb))
    if len(groups) == 2:
        plot_diversity(groups, "Diversity of all datasets", out / "diversity_all.png")
    say(f"figures in {out}/")


def check_published(tables: dict[str, pd.DataFrame], reference_dir: Path) -> int:
    """Print the comparison with the published tables; return the number of mismatches."""
    bad = 0
    for kind, table in tables.items():
        published = read_published(kind, reference_dir)
        if published is None:
            say(f"published {TABLE_NAME[kind]} table not found in {reference_dir}/: comparison skipped")
            continue
        n, problems = compare_with_published(table, published, kind)
        bad += len(problems)
        verdict = (
            "all equal (to 1e-9; published val/test diversity swapped)"
            if not problems
            else f"{len(problems)} MISMATCH(ES)"
        )
        say(f"published {TABLE_NAME[kind]} table: {n} rows compared, {verdict}")
        for line in problems[:20]:
            say(f"  {line}")
    return bad


__all__ = [
    "BENCHMARK",
    "MATBENCH",
    "REFERENCE_DIR",
    "COLUMNS",
    "SplitFile",
    "SplitStats",
    "DatasetStats",
    "presence_counts",
    "diversity_index",
    "split_stats",
    "table_row",
    "dataset_stats",
    "stats_job",
    "write_tables",
    "write_figures",
    "check_published",
    "stats_table",
    "counts_table",
    "merge_table",
    "compare_with_published",
    "read_published",
    "plot_prevalence",
    "plot_dataset_prevalence",
    "prevalence_figure",
    "plot_diversity",
    "diversity_figure",
    "matbench_summary",
]
