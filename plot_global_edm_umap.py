"""Step 7: the chemical space of whole compounds as CrabNet sees it (pooled layer inputs -> UMAP).

For each layer input x_l (l = n_layers is the encoder output) every compound of the --split
becomes one vector: [mean, range, variance, max, min] of x_l over its *real* elements (5·d_model,
2560 for the published model; padding never enters). UMAP (cosine, n_neighbors 15, seeded,
min_dist by dataset size as in the paper: 0.2, 0.4 above 4,000 compounds, 0.5 above 100,000)
projects it to 2-D. Points are coloured by the number of elements, the
target, the model's prediction, the error (prediction − target) and the fraction-weighted mean
absolute deviation of Pauling electronegativity (Oliynyk table); marker size and opacity follow
the dataset size.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv
        <data-dir>/models/<dataset>__<features>.pt        (trained here if missing, as step 4 does)
Writes  <data-dir>/umap/global/<dataset>/<features>__<split>__layer<l>.csv   coordinates and colours
        <data-dir>/umap/global/<dataset>/summary.csv      kNN R² of the target per layer,
                                                          trustworthiness (printed at the end)
        <data-dir>/figures/umap_global/<dataset>/<features>__<split>.png / .html
        <data-dir>/umap/cache/<dataset>/…                 cached vectors and UMAP coordinates
Next    get_dataset_stats.py

--force recomputes the cached vectors and UMAP coordinates; the checkpoint is kept (it is trained
only when missing: the full --recipe, or a short 8-epoch run with --quick; retrain it with
get_crabnet_embeddings.py --force).

Vectors are collected in one inference pass per dataset and cached with the UMAP coordinates
under a key of the checkpoint content and the split, so re-plotting is instant. With --seed UMAP
is reproducible and single-threaded; --umap-parallel uses all cores but the layout changes.

Jobs (crabnet.maps.steps): one per dataset (the model, trained inside the job if missing, and the vectors),
then one per dataset and layer input (UMAP, metrics, coordinates), then one per dataset drawing its
figure. With several, they run on an embedded Dask LocalCluster (one per core), or anywhere --scheduler
says (an existing Dask cluster, SLURM/PBS through dask-jobqueue; see crabnet/jobs/engine.py); the summaries are
merged here.

Examples:
    python plot_global_edm_umap.py --quick                              # CPU demo, ~730 compounds
    python plot_global_edm_umap.py --dataset OQMD_Bandgap               # the paper (51k compounds)
    python plot_global_edm_umap.py --dataset mp_bulk_modulus --dataset aflow__ael_bulk_modulus_vrh
    python plot_global_edm_umap.py --dataset OQMD_Bandgap --scheduler slurm   # the layer UMAPs as SLURM jobs
"""

from __future__ import annotations

from pathlib import Path

from crabnet.errors import UsageError
from crabnet.jobs.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.jobs.engine import add_engine_args, engine_from_args
from crabnet.maps.figures import GLOBAL_SUMMARY, print_table
from crabnet.maps.steps import add_map_flags, check_global_args, global_maps, map_settings
from crabnet.utils import seed_everything
from crabnet.web.report import refresh_report

DEFAULT_DATASET = "OQMD_Bandgap"
QUICK = {"dataset": DEMO_DATASET, "epochs": 8}


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        quick_help=f"CPU demo: {QUICK['dataset']}, an {QUICK['epochs']}-epoch model if "
        "none exists (explicit flags win)",
    )
    add_map_flags(p, default_dataset=DEFAULT_DATASET, quick_dataset=QUICK["dataset"])
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="layer inputs, 0..n_layers where n_layers = the encoder output (default all)",
    )
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP n_neighbors")
    p.add_argument(
        "--min-dist",
        type=float,
        default=None,
        help="UMAP min_dist (default by dataset size, as in the paper: 0.2, 0.4 above 4,000 compounds, "
        "0.5 above 100,000)",
    )
    add_engine_args(p)
    return p.parse_args(argv)


def main(
    data_dir: Path,
    dataset: list[str] | None,
    device: str,
    seed: int,
    quick: bool,
    force: bool,
    features: str,
    split: str,
    layers: list[int] | None,
    n_neighbors: int,
    min_dist: float | None,
    umap_parallel: bool,
    batch_size: int,
    html_js: str = "inline",
    recipe: str = "immi",
    precision: str = "auto",
    epochs: int | None = None,
    **engine,
) -> int:
    datasets = dataset or [QUICK["dataset"] if quick else DEFAULT_DATASET]
    check_global_args(n_neighbors, min_dist, seed, batch_size)
    epochs = (QUICK["epochs"] if quick else None) if epochs is None else epochs
    if epochs is not None and epochs < 1:
        raise UsageError("--epochs must be >= 1")
    settings = map_settings(
        data_dir, features, split, recipe, epochs, device, seed, force, batch_size, umap_parallel, html_js, precision
    )
    seed_everything(seed)
    table = global_maps(settings, datasets, layers, n_neighbors, min_dist, engine_from_args(engine, small=quick))
    if table is None:  # --plan: the jobs were listed
        return 0
    print_table(table, *GLOBAL_SUMMARY)
    refresh_report(data_dir)
    print("next: python get_dataset_stats.py" + (" --quick" if quick else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
