"""Step 6: the local chemical environment of an atom as CrabNet sees it (per-atom value vectors -> UMAP).

For each --atom and encoder layer l, the value vector V = x_l·W_in^T + b_in of that atom at its own
position inside every compound of the --split that contains it is projected to 2-D with UMAP
(n_neighbors 5, min_dist 0.3, 0.8 for layer 0, Euclidean, seeded), as in the paper (OQMD_Bandgap
test set). Points are coloured by the atom's fraction, the target, the model's prediction and the
atom's guessed mean oxidation state (from step 3, matched by formula; continuous, e.g. 8/3 for Fe
in Fe3O4; grey when unknown). The kNN accuracy of the summary votes on the rounded state.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv
        <data-dir>/models/<dataset>__<features>.pt        (trained here if missing, as step 4 does)
        <data-dir>/oxidation/<dataset>__<split>.json      (optional; guess_oxidation.py, step 3)
Writes  <data-dir>/umap/local/<dataset>/<features>__<split>__<atom>__layer<l>.csv   coordinates
        <data-dir>/umap/local/<dataset>/summary.csv       kNN accuracy of the rounded oxidation state,
                                                          trustworthiness (printed at the end)
        <data-dir>/figures/umap_local/<dataset>/<features>__<split>__<atom>.png / .html
        <data-dir>/umap/cache/<dataset>/…                 cached vectors and UMAP coordinates
Next    plot_global_edm_umap.py

--force recomputes the cached vectors and UMAP coordinates; the checkpoint is kept (it is trained
only when missing: the full --recipe, or a short 8-epoch run with --quick; retrain it with
get_crabnet_embeddings.py --force).

Vectors are collected in one inference pass per dataset and cached with the UMAP coordinates
under a key of the checkpoint content and the split, so re-plotting is instant. Atoms in fewer
than 2·n_neighbors compounds are skipped with a message. With --seed UMAP is reproducible and
single-threaded; --umap-parallel uses all cores but the layout changes between runs.

Jobs (crabnet.maps.steps): one per dataset (the model, trained inside the job if missing, and the vectors),
then one per dataset and atom (its UMAPs, metrics, coordinates and figure). With several, they run on an
embedded Dask LocalCluster (one per core), or anywhere --scheduler says (an existing Dask cluster,
SLURM/PBS through dask-jobqueue; see crabnet/jobs/engine.py); the summaries are merged here at the end.

Examples:
    python plot_local_edm_umap.py --quick                         # CPU demo: 3 atoms, ~730 compounds
    python plot_local_edm_umap.py --dataset OQMD_Bandgap          # the paper's 19 atoms
    python plot_local_edm_umap.py --dataset mp_bulk_modulus --atom O --atom Fe --layers 0 2
    python plot_local_edm_umap.py --dataset OQMD_Bandgap --scheduler sequential   # one job after the other, here
"""

from __future__ import annotations

from pathlib import Path

from crabnet.errors import UsageError
from crabnet.jobs.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.jobs.engine import add_engine_args, engine_from_args
from crabnet.maps.figures import LOCAL_SUMMARY, print_table
from crabnet.maps.steps import add_map_flags, check_local_args, local_maps, map_settings
from crabnet.reference import PAPER_ATOMS
from crabnet.utils import seed_everything
from crabnet.web.report import refresh_report

DEFAULT_DATASET = "OQMD_Bandgap"
QUICK = {"dataset": DEMO_DATASET, "atoms": ("O", "Al", "Si"), "epochs": 8}


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        quick_help=f"CPU demo: {QUICK['dataset']}, atoms {' '.join(QUICK['atoms'])}, "
        f"an {QUICK['epochs']}-epoch model if none exists (explicit flags win)",
    )
    add_map_flags(p, default_dataset=DEFAULT_DATASET, quick_dataset=QUICK["dataset"])
    p.add_argument("--layers", type=int, nargs="+", default=None, help="encoder layers (default all)")
    p.add_argument(
        "--atom",
        action="append",
        default=None,
        help="element symbol, repeatable (default the paper's 19: " + " ".join(PAPER_ATOMS) + ")",
    )
    p.add_argument("--n-neighbors", type=int, default=5, help="UMAP n_neighbors")
    p.add_argument("--min-dist", type=float, default=0.3, help="UMAP min_dist for layers > 0")
    p.add_argument("--min-dist-layer0", type=float, default=0.8, help="UMAP min_dist for layer 0")
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
    atom: list[str] | None,
    n_neighbors: int,
    min_dist: float,
    min_dist_layer0: float,
    umap_parallel: bool,
    batch_size: int,
    html_js: str = "inline",
    recipe: str = "immi",
    precision: str = "auto",
    epochs: int | None = None,
    **engine,
) -> int:
    datasets = dataset or [QUICK["dataset"] if quick else DEFAULT_DATASET]
    atoms = list(dict.fromkeys(atom or (QUICK["atoms"] if quick else PAPER_ATOMS)))
    check_local_args(atoms, n_neighbors, min_dist, min_dist_layer0, seed, batch_size)
    epochs = (QUICK["epochs"] if quick else None) if epochs is None else epochs
    if epochs is not None and epochs < 1:
        raise UsageError("--epochs must be >= 1")
    settings = map_settings(
        data_dir, features, split, recipe, epochs, device, seed, force, batch_size, umap_parallel, html_js, precision
    )
    seed_everything(seed)
    table = local_maps(
        settings, datasets, layers, atoms, n_neighbors, min_dist, min_dist_layer0, engine_from_args(engine, small=quick)
    )
    if table is None:  # --plan: the jobs were listed
        return 0
    print_table(table, *LOCAL_SUMMARY)
    refresh_report(data_dir)
    print(
        "next: python plot_global_edm_umap.py"
        + (" --quick" if quick else " " + " ".join(f"--dataset {d}" for d in datasets))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
