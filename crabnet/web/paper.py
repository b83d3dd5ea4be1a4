"""The report's "paper vs this run" section: published test MAE and dataset statistics beside ours, and
the checklist of the paper's steps and datasets judged by the outputs under a data folder."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from crabnet.layout import BENCHMARK, BENCHMARK_DATASETS, MATBENCH, RECIPE_NAMES, SPLITS, Layout
from crabnet.reference import PAPER_ATOMS
from crabnet.utils import read_checkpoint_meta
from crabnet.web.pieces import _esc, _part, _store_attrs, data_table


def published_test_mae(dataset: str, features: str) -> float | None:
    """The published test MAE where the package knows it, else None (never raises)."""
    try:
        from crabnet.reference import published_mae

        value = published_mae(dataset, features)
        return float(value) if value is not None and math.isfinite(float(value)) else None
    except Exception:
        return None


MODEL_NAMES = {"mat2vec": "CrabNet", "onehot": "HotCrab"}  # the paper's two models by element features
PAPER_MODELS = [(d, f) for d in BENCHMARK_DATASETS for f in MODEL_NAMES]  # step 4: 18 sets x both models
PAPER_STORE = ("aflow__Egap", 50)  # step 1: dataset and epochs
PAPER_LOCAL = "OQMD_Bandgap"  # step 6, test split
PAPER_GLOBAL = ("OQMD_Bandgap", "OQMD_Energy_per_atom", "OQMD_Formation_Enthalpy", "OQMD_Volume_per_atom")  # step 7


@dataclass
class Check:
    """One line of the paper checklist: which of a step's outputs exist.

    Attributes:
        step: the step number (docs/steps.md).
        what: what the paper did in that step.
        items: output name -> whether it exists here.
    """

    step: int
    what: str
    items: dict[str, bool]

    @property
    def status(self) -> str:
        done = sum(self.items.values())
        if done == len(self.items):
            return "✓ done"
        return f"partly: {done} of {len(self.items)}" if done else "not done"

    def missing(self, shown: int = 3) -> str:
        names = [k for k, ok in self.items.items() if not ok]
        return ", ".join(names[:shown]) + (f" … ({len(names) - shown} more)" if len(names) > shown else "")


def _matbench_folds() -> list[tuple[str, int]]:
    """(dataset, fold) of the paper's matbench statistics table (shipped in ``crabnet/reference``)."""
    from crabnet.reference import REFERENCE_DIR
    from crabnet.stats import PUBLISHED

    try:
        with open(REFERENCE_DIR / PUBLISHED[MATBENCH], newline="", encoding="utf-8") as f:
            return [(r["mat_prop"], int(r["cv"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, csv.Error):
        return []


def _table_keys(path: Path, fold: bool) -> set:
    """``mat_prop`` (and ``cv``) of the rows of a statistics table of step 8; empty when it is not there."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {(r["mat_prop"], int(float(r["cv"]))) if fold else r["mat_prop"] for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError, csv.Error):
        return set()


def full_recipe_models(root: Path, metas: dict[Path, dict] | None = None) -> list[tuple[str, str, str, dict]]:
    """(dataset, features, recipe, meta) of every CrabNet/HotCrab checkpoint trained with a full recipe.

    Looks at :meth:`crabnet.layout.Layout.checkpoint` of the 18 benchmark sets and of every other
    dataset with a checkpoint, for both models and every recipe.

    Args:
        root: the data folder.
        metas: checkpoint metadata already read, by path (the rest is read here).
    """
    layout, metas = Layout(root), metas or {}
    others = sorted({str(m.get("dataset")) for m in metas.values() if m.get("dataset")} - set(BENCHMARK_DATASETS))
    out = []
    for dataset in [*BENCHMARK_DATASETS, *others]:
        for features in MODEL_NAMES:
            for recipe in RECIPE_NAMES:
                path = layout.checkpoint(dataset, features, recipe)
                meta = metas.get(path)
                if meta is None and path.is_file():
                    meta = read_checkpoint_meta(path)
                if meta and meta.get("full_recipe"):
                    out.append((dataset, features, recipe, meta))
    return out


def _learned_correlations(layout: Layout, d: str, f: str) -> bool:
    """Whether every Q/K/V CSV of step 4 for this model (layers 0, 1, …) has its correlation figure of step 5."""
    corr, layer, seen = layout.correlation_figures(), 0, False
    while any(layout.embedding(f, d, layer, k).is_file() for k in "QKV"):
        seen = True
        if not all(
            (corr / f"{d}__{f}__layer{layer}__{k}.png").is_file()
            for k in "QKV"
            if layout.embedding(f, d, layer, k).is_file()
        ):
            return False
        layer += 1
    return seen


def paper_checks(root: Path, metas: dict[Path, dict] | None = None) -> list[Check]:
    """The paper's steps and datasets (docs/steps.md), each judged by whether its outputs exist under ``root``."""
    layout = Layout(root)
    full = {(d, f) for d, f, _, _ in full_recipe_models(root, metas)}
    return _training_checks(layout, full) + _analysis_checks(layout, full)


def _training_checks(layout: Layout, full: set[tuple[str, str]]) -> list[Check]:
    """Steps 1 to 4: the attention run, its videos, the oxidation guesses, the full-recipe models."""
    models = PAPER_MODELS
    dataset, epochs = PAPER_STORE
    store = layout.attention_store(dataset) / "zarr.json"
    attrs = _store_attrs(store) if store.is_file() else {}
    guessed = layout.oxidation_guesses
    done = bool(attrs.get("complete")) and int(attrs.get("epochs") or 0) >= epochs
    videos = {"videos": any(layout.videos(dataset).glob("*.mp4")), "explorer": layout.explorer(dataset).is_file()}
    return [
        Check(1, f"{dataset}: attention captured over {epochs} epochs", {dataset: done}),
        Check(2, f"{dataset}: videos and the attention explorer", videos),
        Check(3, "oxidation guesses: the 18 benchmark sets, all splits",
              {f"{d} {s}": guessed(d, s).is_file() for d in BENCHMARK_DATASETS for s in SPLITS}),
        Check(3, "oxidation guesses: the matbench sets, all folds and splits",
              {f"{d} {s}{k}": guessed(d, f"{s}{k}").is_file() for d, k in _matbench_folds() for s in SPLITS}),
        Check(4, "full-recipe models: the 18 sets × CrabNet (mat2vec) and HotCrab (onehot)",
              {f"{d} {MODEL_NAMES[f]}": (d, f) in full for d, f in models}),
        Check(4, "Q/K/V element embeddings of those models",
              {f"{d} {MODEL_NAMES[f]}": (d, f) in full and layout.embedding(f, d, 0, "Q").is_file()
               for d, f in models}),
    ]  # fmt: skip


def _analysis_checks(layout: Layout, full: set[tuple[str, str]]) -> list[Check]:
    """Steps 5 to 8: correlations, the local and global UMAPs, the statistics."""
    models = PAPER_MODELS
    corr, learned = layout.correlation_figures(), partial(_learned_correlations, layout)
    bench_rows = _table_keys(layout.stats_table(BENCHMARK), fold=False)
    matbench_rows = _table_keys(layout.stats_table(MATBENCH), fold=True)

    def figure(scope: str, d: str, name: str) -> bool:
        return any((layout.umap_figures(scope, d) / f"{f}__test{name}.png").is_file() for f in MODEL_NAMES)

    tables = ("oliynyk", "magpie", "jarvis", "mat2vec", "onehot")
    return [
        Check(5, "correlation of the five element tables", {n: (corr / f"{n}.png").is_file() for n in tables}),
        Check(5, "correlation of every learned Q/K/V embedding",
              {f"{d} {MODEL_NAMES[f]}": learned(d, f) for d, f in models}),
        Check(6, f"local EDM UMAP: {PAPER_LOCAL} test, the paper's {len(PAPER_ATOMS)} atoms",
              {a: figure("local", PAPER_LOCAL, f"__{a}") for a in PAPER_ATOMS}),
        Check(7, "global EDM UMAP: the four OQMD test sets", {d: figure("global", d, "") for d in PAPER_GLOBAL}),
        Check(8, "statistics: the 18 benchmark sets", {d: d in bench_rows for d in BENCHMARK_DATASETS}),
        Check(8, "statistics: the matbench sets, every fold",
              {f"{d} fold {k}": (d, k) in matbench_rows for d, k in _matbench_folds()}),
    ]  # fmt: skip


STATS_HEAD = ["samples", "published", "train diversity", "published", "val diversity", "published (their test column)",
              "test diversity", "published (their val column)", "all 12 columns"]  # fmt: skip


def _stats_rows(ours, published, key: list[str], kind: str) -> list[list]:
    """Rows of ours beside the published statistics (the published val and test columns are swapped)."""
    from crabnet.stats import compare_with_published

    mine, rows = ours.set_index(key), []
    for i, pub in published.iterrows():
        k = tuple(pub[c] for c in key) if len(key) > 1 else pub[key[0]]
        if k not in mine.index:
            continue
        _, problems = compare_with_published(ours[(ours[key] == pub[key]).all(axis=1)], published.loc[[i]], kind)
        row = mine.loc[k]
        rows.append([*(k if isinstance(k, tuple) else (k,)), row["samples_total"], pub["samples_total"],
                     row["train_diversity"], pub["train_diversity"], row["val_diversity"], pub["test_diversity"],
                     row["test_diversity"], pub["val_diversity"],
                     "✓ equal" if not problems else f"{len(problems)} column(s) differ"])  # fmt: skip
    return rows


def _stats_comparison(root: Path) -> str:
    """Our step-8 statistics beside the published ones, for every dataset (and fold) step 8 has written."""
    import pandas as pd

    from crabnet.stats import COLUMNS, read_published

    out = []
    for kind, label in ((BENCHMARK, "benchmark sets"), (MATBENCH, "matbench folds")):
        path = Layout(root).stats_table(kind)
        published = read_published(kind)
        if not path.is_file() or published is None:
            continue
        ours = pd.read_csv(path)
        key = ["mat_prop", "cv"] if kind == MATBENCH else ["mat_prop"]
        if not set(key + COLUMNS) <= set(ours.columns):
            out.append(_part("stats_mismatch", path=_esc(path.relative_to(root).as_posix())))
            continue
        rows = _stats_rows(ours, published, key, kind)
        if rows:
            head = [*(["dataset", "fold"] if kind == MATBENCH else ["dataset"]), *STATS_HEAD]
            n = f"{len(rows)} of {len(published)} written by step 8"
            caption = f"Statistics of the {label}: ours beside the published ({n})"
            out.append(data_table(head, rows, caption))
    return "".join(out)


def paper_section(root: Path, metas: dict[Path, dict]) -> str:
    """The "paper vs this run" card: published test MAE and statistics beside ours, and the paper checklist.

    Args:
        root: the data folder.
        metas: the metadata of the checkpoints found there, by path.
    """
    rows = []
    for dataset, features, recipe, meta in full_recipe_models(root, metas):
        published, ours = published_test_mae(dataset, features), meta.get("test_mae")
        ratio = f"{float(ours) / published:.2f}" if published and isinstance(ours, (int, float)) else "–"
        rows.append(
            [
                dataset,
                f"{MODEL_NAMES[features]} ({features})",
                meta.get("full_recipe") or recipe,
                published if published is not None else "–",
                ours if ours is not None else "–",
                ratio,
            ]
        )
    body = [
        data_table(
            ["dataset", "model", "recipe", "published test MAE", "our test MAE", "ours/published"],
            rows,
            "Test MAE of the full-recipe models (published: Wang et al. 2021, npj recipe)",
        )
        if rows
        else _part("no_full_models")
    ]
    body.append(_stats_comparison(root))
    checks = paper_checks(root, metas)
    body.append(
        data_table(
            ["step", "what the paper did", "here", "missing"],
            [[c.step, c.what, c.status, c.missing()] for c in checks],
            "The paper's steps and datasets (docs/steps.md), judged by the outputs under this folder",
        )
    )
    return _part("section", id="paper", title="The paper vs this run", body="".join(body))
