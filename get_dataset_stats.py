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

Examples:
    python get_dataset_stats.py                                         # everything (a few minutes)
    python get_dataset_stats.py --quick                                 # the demo dataset, seconds
    python get_dataset_stats.py --dataset jdft2d --dataset mp_bulk_modulus --no-figures
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm import tqdm

from crabnet.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.layout import Layout
from crabnet.report import refresh_report
from crabnet.stats import (BENCHMARK, MATBENCH, REFERENCE_DIR, TABLE_NAME, compare_with_published, counts_table,
                           dataset_stats, matbench_summary, merge_table, plot_diversity, plot_prevalence,
                           read_published, resolve_datasets, stats_table)
from crabnet.utils import atomic_path

def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None, quick_help=f"demo: only {DEMO_DATASET} (unless --dataset is given)", device=False,
               seed=False, force=False)
    p.add_argument("--dataset", action="append", default=None,
                   help="dataset under benchmark_data/ or matbench_cv/, repeatable; 'all' = every one present "
                        "(default: all; with --quick the demo dataset)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (reported) instead of stopping")
    p.add_argument("--reference-dir", type=Path, default=REFERENCE_DIR,
                   help="folder of published_stats_benchmark.csv and published_stats_matbench_cv.csv")
    return p.parse_args(argv)


def write_tables(results, data_dir: Path) -> dict[str, pd.DataFrame]:
    """Write (merging into existing files) the statistics and element-count tables; return the stats tables."""
    tables = {}
    for kind in (BENCHMARK, MATBENCH):
        if not any(r.kind == kind for r in results):
            continue
        key = ["mat_prop", "cv"] if kind == MATBENCH else ["mat_prop"]
        for name, new, k in ((f"{TABLE_NAME[kind]}.csv", stats_table(results, kind), key),
                             (f"element_counts_{TABLE_NAME[kind]}.csv", counts_table(results, kind), key + ["split"])):
            path = Layout(data_dir).stats() / name
            old = pd.read_csv(path) if path.is_file() else None
            table = merge_table(old, new, k)
            with atomic_path(path) as tmp:
                table.to_csv(tmp, index=False, float_format="%.17g")
            print(f"wrote {path} ({len(table)} rows)")
            if name == f"{TABLE_NAME[kind]}.csv":
                tables[kind] = table
    return tables


def write_figures(results, tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    """Element prevalence per dataset and the diversity bar charts."""
    out = Layout(data_dir).stats_figures()
    first = {}
    for r in results:  # one plot per dataset: matbench sets use their first fold (its splits cover the set)
        first.setdefault((r.kind, r.dataset), r)
    for r in tqdm(list(first.values()), desc="prevalence plots", unit="dataset", disable=None):
        counts = {s: st.counts for s, st in r.splits.items()}
        what = r.dataset if r.fold is None else f"{r.dataset} (fold {r.fold})"
        for order, suffix in (("count", "by_count"), ("z", "by_z")):
            plot_prevalence(counts, f"{what}: compounds containing each element", out / "prevalence" /
                            f"{r.dataset}__{suffix}.png", order=order)
    groups = []
    if BENCHMARK in tables:
        bench = tables[BENCHMARK].set_index("mat_prop")
        plot_diversity([("benchmark", bench)], "Diversity of the benchmark sets", out / "diversity_benchmark.png")
        groups.append(("benchmark", bench))
    if MATBENCH in tables:
        mb = matbench_summary(tables[MATBENCH])
        plot_diversity([("matbench (mean ± std over folds)", mb)],
                       "Diversity of the matbench sets (mean ± std over folds)",
                       out / "diversity_matbench_cv.png")
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
        verdict = "all equal (to 1e-9; published val/test diversity swapped)" if not problems else \
            f"{len(problems)} MISMATCH(ES)"
        print(f"published {TABLE_NAME[kind]} table: {n} rows compared, {verdict}")
        for line in problems[:20]:
            print(f"  {line}")
    return bad


def main(data_dir: Path, dataset: list[str] | None, quick: bool,
         no_figures: bool, skip_invalid: bool, reference_dir: Path) -> int:
    # a DataError (unknown dataset, bad row) ends the script with one error line via crabnet.cli.run
    chosen = resolve_datasets(data_dir, dataset or ([DEMO_DATASET] if quick else None))
    results = []
    for kind, name in tqdm(chosen, desc="datasets", unit="dataset", disable=None):
        results.extend(dataset_stats(data_dir, kind, name, skip_invalid=skip_invalid))
    tables = write_tables(results, data_dir)
    if not no_figures:
        write_figures(results, tables, data_dir)
    check_published(tables, reference_dir)
    refresh_report(data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
