"""Step 8: dataset statistics, element prevalence and the diversity index.

Reads   <data-dir>/benchmark_data/<dataset>/{train,val,test}.csv and
        <data-dir>/matbench_cv/<dataset>/{train,val,test}<fold>.csv (fetched on first need)
Writes  <data-dir>/stats/benchmark.csv, stats/matbench_cv.csv
            one row per dataset (and fold): mat_prop[, cv], n_elements, samples_total,
            samples_<split>, prop_<split>, <split>_diversity, log2_samples_train
        <data-dir>/stats/element_counts_benchmark.csv, stats/element_counts_matbench_cv.csv
            compounds containing each element, per dataset[, fold] and split
        <data-dir>/figures/stats/prevalence/<dataset>__by_count.png, <dataset>__by_z.png
        <data-dir>/figures/stats/diversity_benchmark.png, diversity_matbench_cv.png, diversity_all.png
Next    this is the last step of the workflow.

Every row of a split file is counted (single-element compounds are kept here, as in the
published tables). The diversity index is the Shannon entropy (bits) of the element presence
counts divided by log2 of the number of distinct elements (Pielou's evenness). With --dataset,
only those datasets are computed and their rows replace the same rows of existing tables.

The result is compared with the published tables (shipped in crabnet/reference/, or
--reference-dir) and the outcome is compared with them and the outcome printed; the published val and
test diversity columns are swapped, so ours are compared with their test and val columns.

Each dataset is an independent job (its statistics and prevalence plots, crabnet.stats.stats_job): with
several, they run on an embedded Dask LocalCluster (one per core), or anywhere --scheduler says (an
existing Dask cluster, SLURM/PBS through dask-jobqueue; see crabnet/engine.py); the tables and the
diversity charts are then written once from all of them.

Examples:
    python get_dataset_stats.py                                         # everything (a few minutes)
    python get_dataset_stats.py --quick                                 # the demo dataset, seconds
    python get_dataset_stats.py --dataset jdft2d --dataset mp_bulk_modulus --no-figures
    python get_dataset_stats.py --scheduler sequential                  # one dataset after the other, here
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from crabnet.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.data import resolve_datasets
from crabnet.engine import Job, add_engine_args, engine_from_args, run_jobs
from crabnet.layout import Layout
from crabnet.report import refresh_report
from crabnet.stats import (
    BENCHMARK,
    MATBENCH,
    REFERENCE_DIR,
    TABLE_NAME,
    DatasetStats,
    compare_with_published,
    counts_table,
    matbench_summary,
    merge_table,
    plot_diversity,
    read_published,
    stats_job,
    stats_table,
)
from crabnet.utils import atomic_path


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        quick_help=f"demo: only {DEMO_DATASET} (unless --dataset is given)",
        device=False,
        seed=False,
        force=False,
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="dataset under benchmark_data/ or matbench_cv/, repeatable; 'all' = every one present "
        "(default: all; with --quick the demo dataset)",
    )
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (reported) instead of stopping")
    p.add_argument(
        "--reference-dir",
        type=Path,
        default=REFERENCE_DIR,
        help="folder of published_stats_benchmark.csv and published_stats_matbench_cv.csv",
    )
    add_engine_args(p)
    return p.parse_args(argv)


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
            print(f"wrote {path} ({len(table)} rows)")
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
    print(f"figures in {out}/")


def check_published(tables: dict[str, pd.DataFrame], reference_dir: Path) -> int:
    """Print the comparison with the published tables; return the number of mismatches."""
    bad = 0
    for kind, table in tables.items():
        published = read_published(kind, reference_dir)
        if published is None:
            print(f"published {TABLE_NAME[kind]} table not found in {reference_dir}/: comparison skipped")
            continue
        n, problems = compare_with_published(table, published, kind)
        bad += len(problems)
        verdict = (
            "all equal (to 1e-9; published val/test diversity swapped)"
            if not problems
            else f"{len(problems)} MISMATCH(ES)"
        )
        print(f"published {TABLE_NAME[kind]} table: {n} rows compared, {verdict}")
        for line in problems[:20]:
            print(f"  {line}")
    return bad


def main(
    data_dir: Path,
    dataset: list[str] | None,
    quick: bool,
    no_figures: bool,
    skip_invalid: bool,
    reference_dir: Path,
    **engine,
) -> int:
    # a DataError (unknown dataset, bad row) ends the script with one error line via crabnet.cli.run
    chosen = resolve_datasets(data_dir, dataset or ([DEMO_DATASET] if quick else None))
    jobs = [
        Job(
            f"{TABLE_NAME[kind]} {name}",
            stats_job,
            dict(data_dir=data_dir, kind=kind, dataset=name, skip_invalid=skip_invalid, figures=not no_figures),
        )
        for kind, name in chosen
    ]
    per_dataset = run_jobs(jobs, engine_from_args(engine, small=quick), what="datasets")
    if per_dataset is None:  # --plan: the jobs were listed
        return 0
    results = [r for rs in per_dataset for r in rs]
    tables = write_tables(results, data_dir)
    if not no_figures:
        write_figures(tables, data_dir)
    check_published(tables, reference_dir)
    refresh_report(data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
