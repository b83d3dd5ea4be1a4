"""Dataset statistics (step 8): counts, diversity index, tables, plots, published tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require_data, write_dataset

import get_dataset_stats as gds
from crabnet.data import parse_formula, resolve_datasets
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.jobs.cli import run as cli_run
from crabnet.stats import (
    BENCHMARK,
    COLUMNS,
    MATBENCH,
    REFERENCE_DIR,
    compare_with_published,
    dataset_stats,
    diversity_figure,
    diversity_index,
    matbench_summary,
    presence_counts,
    prevalence_figure,
    read_published,
    stats_table,
)
from crabnet.utils import available_cpus

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT / "data"


def run(data_dir: Path, *args: str) -> int:
    return cli_run(gds.main, gds.parse_args(["--data-dir", str(data_dir), *args]))


def write_matbench(root: Path, name: str = "tinymb", folds: int = 2, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "matbench_cv" / name
    folder.mkdir(parents=True, exist_ok=True)
    pool = ["Li2O", "NaCl", "MgO", "Al2O3", "SiO2", "TiO2", "Fe2O3", "CuZn", "Ni3Al", "Co", "ZnS", "LiFePO4"]
    for k in range(folds):
        for split, n in (("train", 12), ("val", 4), ("test", 5)):
            rows = rng.choice(pool, size=n)
            text = "formula,target\n" + "".join(f"{f},{i}\n" for i, f in enumerate(rows))
            (folder / f"{split}{k}.csv").write_text(text)


def count_by_hand(path: Path) -> tuple[int, int, dict[str, int]]:
    """Rows, max elements and element presence counts of a CSV, straight from the parser."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    counts: dict[str, int] = {}
    widest = 0
    for f in df.formula:
        amounts = parse_formula(f)
        widest = max(widest, len(amounts))
        for el in amounts:
            counts[el] = counts.get(el, 0) + 1
    return len(df), widest, counts


def test_diversity_index():
    assert diversity_index(np.array([5, 5, 5, 5])) == pytest.approx(1.0)
    assert diversity_index(np.array([1, 1, 2])) == pytest.approx(1.5 / math.log2(3))
    assert diversity_index(np.array([0, 3, 0, 3])) == pytest.approx(1.0)  # zeros are not categories
    assert diversity_index(np.array([1000, 1, 1])) < 0.05
    c = np.array([7, 1, 4, 9, 2])
    assert diversity_index(c) == pytest.approx(diversity_index(c[::-1] * 3))
    assert math.isnan(diversity_index(np.array([4])))


def test_presence_counts_count_each_element_once_per_compound():
    z = np.array([[26, 8, 0], [8, 0, 0], [26, 8, 3]])
    counts = presence_counts(z)
    assert counts.shape == (119,) and counts[0] == 0
    assert counts[8] == 3 and counts[26] == 2 and counts[3] == 1 and counts.sum() == 6


def test_split_and_dataset_statistics(tmp_path):
    folder = write_dataset(tmp_path, "tiny", sizes=(30, 10, 12), seed=5)
    with open(folder / "test.csv", "a") as f:  # a single-element compound and a repeated element
        f.write("Fe,1.0\nFeOFe,2.0\n")
    [ds] = dataset_stats(tmp_path, BENCHMARK, "tiny")
    row = ds.row()
    for split in ("train", "val", "test"):
        n, widest, counts = count_by_hand(folder / f"{split}.csv")
        st = ds.splits[split]
        assert st.samples == n == row[f"samples_{split}"]  # unary rows are counted here
        assert st.max_elements == widest
        assert {SYMBOLS[z - 1]: int(c) for z, c in enumerate(st.counts) if c and z} == counts
        assert row[f"{split}_diversity"] == pytest.approx(diversity_index(np.array(list(counts.values()))))
    assert row["samples_test"] == 14 and row["samples_total"] == 30 + 10 + 14
    assert row["n_elements"] == max(ds.splits[s].max_elements for s in ("train", "val", "test"))
    assert sum(row[f"prop_{s}"] for s in ("train", "val", "test")) == pytest.approx(1.0)
    assert row["log2_samples_train"] == pytest.approx(math.log2(30))
    assert list(stats_table([ds], BENCHMARK).columns) == ["mat_prop", *COLUMNS]


def test_script_writes_tables_and_figures(tmp_path):
    write_dataset(tmp_path, "tiny", sizes=(20, 8, 8), seed=2)
    write_dataset(tmp_path, "other", sizes=(16, 6, 6), seed=4)
    write_matbench(tmp_path)
    assert run(tmp_path, "--dataset", "tiny", "--dataset", "tinymb", "--scheduler", "sequential") == 0
    stats, figs = tmp_path / "stats", tmp_path / "figures" / "stats"
    bench = pd.read_csv(stats / "benchmark.csv")
    mb = pd.read_csv(stats / "matbench_cv.csv")
    assert list(bench.columns) == ["mat_prop", *COLUMNS] and list(bench.mat_prop) == ["tiny"]
    assert list(mb.columns) == ["mat_prop", "cv", *COLUMNS] and list(mb.cv) == [0, 1]
    assert (mb.samples_total == 21).all() and (mb.n_elements == 4).all()  # LiFePO4
    counts = pd.read_csv(stats / "element_counts_matbench_cv.csv")
    assert len(counts) == 6 and counts[list(SYMBOLS)].to_numpy().sum() > 0
    for name in (
        "diversity_benchmark.png",
        "diversity_matbench_cv.png",
        "diversity_all.png",
        "prevalence/tiny__by_count.png",
        "prevalence/tiny__by_z.png",
        "prevalence/tinymb__by_z.png",
    ):
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # a later run for another dataset adds its row and keeps the others
    assert run(tmp_path, "--dataset", "other", "--no-figures") == 0
    assert sorted(pd.read_csv(stats / "benchmark.csv").mat_prop) == ["other", "tiny"]
    assert run(tmp_path, "--dataset", "missing") == 2


@pytest.mark.cluster
@pytest.mark.skipif(available_cpus() < 2, reason="the embedded LocalCluster needs two cores for two jobs")
def test_local_cluster_equals_sequential(tmp_path, capsys):
    """Two datasets are two jobs: one after the other in this process, then on the embedded Dask
    LocalCluster (two worker processes); the tables and figures are the same bytes."""
    for name in ("sequential", "cluster"):
        write_dataset(tmp_path / name, "tiny", sizes=(20, 8, 8), seed=2)
        write_matbench(tmp_path / name)
    assert run(tmp_path / "sequential", "--dataset", "tiny", "--dataset", "tinymb", "--scheduler", "sequential") == 0
    assert "running 2 datasets in this process" in capsys.readouterr().out
    assert run(tmp_path / "cluster", "--dataset", "tiny", "--dataset", "tinymb", "--threads-per-job", "1") == 0
    out = capsys.readouterr().out
    assert "LocalCluster: 2 worker process(es)" in out and "[2/2 done, 0 running, 0 failed" in out
    files = sorted(
        p.relative_to(tmp_path / "sequential")
        for folder in ("stats", "figures")
        for p in (tmp_path / "sequential" / folder).rglob("*")
        if p.is_file()
    )
    assert len(files) == 4 + 3 + 4  # 4 tables, 3 diversity charts, 2 prevalence plots of each dataset
    for rel in files:
        assert (tmp_path / "sequential" / rel).read_bytes() == (tmp_path / "cluster" / rel).read_bytes(), rel


def test_prevalence_labels_match_bars():
    counts = {"train": np.zeros(119, int), "val": np.zeros(119, int), "test": np.zeros(119, int)}
    for el, (a, b, c) in {"O": (9, 2, 1), "Fe": (1, 0, 0), "Li": (3, 3, 3), "Zn": (0, 0, 5)}.items():
        z = ATOMIC_NUMBER[el]
        counts["train"][z], counts["val"][z], counts["test"][z] = a, b, c
    total = sum(counts.values())
    for order, expected in (("count", ["O", "Li", "Zn", "Fe"]), ("z", ["Li", "O", "Fe", "Zn"])):
        fig = prevalence_figure(counts, "t", order=order)
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == expected
        for x, label in zip(ax.get_xticks(), labels):
            stacked = sum(p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - x) < 1e-9)
            assert stacked == total[ATOMIC_NUMBER[label]]
        fig.clf()


def test_diversity_labels_match_bars():
    bench = pd.DataFrame(
        {"train_diversity": [0.9, 0.8], "val_diversity": [0.7, 0.6], "test_diversity": [0.5, 0.4]}, index=["a", "b"]
    )
    table = pd.DataFrame(
        {
            "mat_prop": ["m", "m"],
            "cv": [0, 1],
            "train_diversity": [0.95, 0.85],
            "val_diversity": [0.75, 0.65],
            "test_diversity": [0.55, 0.45],
        }
    )
    mb = matbench_summary(table)
    assert mb.loc["m", "train_diversity"] == pytest.approx(0.9)
    assert mb.loc["m", "train_diversity_std"] == pytest.approx(np.std([0.95, 0.85], ddof=1))
    fig = diversity_figure([("benchmark", bench), ("matbench", mb)], "t")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["a", "b", "m"]
    expected = {"a": bench.loc["a"], "b": bench.loc["b"], "m": mb.loc["m"]}
    for x, label in zip(ax.get_xticks(), labels):
        bars = sorted((p for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - x) < 0.5), key=lambda p: p.get_x())
        heights = [p.get_height() for p in bars]
        assert heights == pytest.approx([expected[label][f"{s}_diversity"] for s in ("train", "val", "test")])
    fig.clf()


def test_comparison_allows_for_the_swapped_columns(tmp_path):
    write_dataset(tmp_path, "tiny", sizes=(20, 8, 8), seed=2)
    ours = stats_table(dataset_stats(tmp_path, BENCHMARK, "tiny"), BENCHMARK)
    published = ours.copy()
    published["val_diversity"], published["test_diversity"] = ours["test_diversity"], ours["val_diversity"]
    assert compare_with_published(ours, published, BENCHMARK) == (1, [])
    n, problems = compare_with_published(ours, ours, BENCHMARK)  # unswapped: val and test differ
    assert n == 1 and {p.split()[1].rstrip(":") for p in problems} == {"val_diversity", "test_diversity"}
    published.loc[0, "samples_train"] += 1
    assert any("samples_train" in p for p in compare_with_published(ours, published, BENCHMARK)[1])


def _real_data_or_skip() -> None:
    """Skip without the real data or the published tables (fail with CRABNET_REQUIRE_DATA=1, as in CI)."""
    if not (REAL_DATA / "benchmark_data" / "aflow__Egap").is_dir() or not (REAL_DATA / "matbench_cv").is_dir():
        require_data(f"the published datasets are not in {REAL_DATA}/ (run `make data` to fetch them)")
    if read_published(BENCHMARK) is None or read_published(MATBENCH) is None:
        require_data(f"the published statistics tables are not in {REFERENCE_DIR}/")


def _compare_real(names: list[str] | None) -> int:
    results = [r for kind, name in resolve_datasets(REAL_DATA, names) for r in dataset_stats(REAL_DATA, kind, name)]
    compared = 0
    for kind in (BENCHMARK, MATBENCH):
        published = read_published(kind)
        ours = stats_table(results, kind)
        published = published[published.mat_prop.isin(ours.mat_prop)]
        n, problems = compare_with_published(ours, published, kind)
        assert problems == [], problems[:10]
        assert n == len(published)
        compared += n
    return compared


def test_published_statistics_small_sets():
    """The real data (when present) against the published tables: four small sets, all folds."""
    _real_data_or_skip()
    assert _compare_real(["aflow__ael_bulk_modulus_vrh", "mp_bulk_modulus", "jdft2d", "steels_yield"]) == 2 + 10


@pytest.mark.slow
def test_published_statistics_everything():
    """Every benchmark set and every matbench fold against the published tables (a few minutes)."""
    _real_data_or_skip()
    assert _compare_real(None) == 18 + 13 * 5
