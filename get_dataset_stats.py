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
existing Dask cluster, SLURM/PBS through dask-jobqueue; see crabnet/jobs/engine.py); the tables and the
diversity charts are then written once from all of them.

Examples:
    python get_dataset_stats.py                                         # everything (a few minutes)
    python get_dataset_stats.py --quick                                 # the demo dataset, seconds
    python get_dataset_stats.py --dataset jdft2d --dataset mp_bulk_modulus --no-figures
    python get_dataset_stats.py --scheduler sequential                  # one dataset after the other, here
"""

from __future__ import annotations

from pathlib import Path

from crabnet.data import resolve_datasets
from crabnet.jobs.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.jobs.engine import Job, add_engine_args, engine_from_args, run_jobs
from crabnet.stats import REFERENCE_DIR, TABLE_NAME, check_published, stats_job, write_figures, write_tables
from crabnet.web.report import refresh_report


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


def main(
    data_dir: Path,
    dataset: list[str] | None,
    quick: bool,
    no_figures: bool,
    skip_invalid: bool,
    reference_dir: Path,
    **engine,
) -> int:
    # a DataError (unknown dataset, bad row) ends the script with one error line via crabnet.jobs.cli.run
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
