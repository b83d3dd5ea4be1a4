"""Step 4: Q, K and V element embeddings learned by CrabNet (mat2vec) and HotCrab (onehot).

For each --dataset and --features, the model of --recipe (models/<dataset>__<features>.pt for immi,
…__npj.pt for npj) is reused when it suits the request (a full-recipe request needs a checkpoint
trained with that full recipe; --quick or a shorter --epochs accepts any checkpoint), otherwise it
is trained and saved.
All 118 elements are then fed as single-element compounds (fraction 1) and, at each encoder layer
l, the layer input x_l is passed through the attention in-projection:
[Q|K|V] = x_l W_in^T + b_in (d_model columns each, not split by head, not scaled).

Reads   <data-dir>/benchmark_data/<dataset>/{train,val,test}.csv (fetched on first need)
        <data-dir>/models/<dataset>__<features>[__npj].pt         (reused when suitable)
Writes  <data-dir>/models/<dataset>__<features>[__npj].pt         (only when trained here)
        <data-dir>/embeddings/<features>/<dataset>__layer<L>__<Q|K|V>.csv
            118 rows H…Og (index column "element") x d_model columns; elements missing from
            the feature table are blank rows
        <data-dir>/predictions/<dataset>__<features>__test.csv   formula,target,prediction,uncertainty
            (test split, single-element compounds dropped as for the published MAE)
Prints  test MAE beside the published CrabNet / HotCrab MAE (crabnet/reference/published_test_mae.csv)
Next    plot_element_correlation.py

A model whose checkpoint suits the request and whose embeddings and predictions are newer than it
is not run again; --force retrains. The models are independent jobs: with several, they run on an
embedded Dask LocalCluster (one per core), or anywhere --scheduler says (an existing Dask cluster,
SLURM/PBS through dask-jobqueue; see crabnet/jobs/engine.py). Started by torchrun (docs/distributed.md), all
processes train each model together, one model after the other, and rank 0 writes the outputs.

Examples:
    python get_crabnet_embeddings.py --quick        # CPU demo: aflow__ael_bulk_modulus_vrh, short training if no model
    python get_crabnet_embeddings.py                # aflow__ael_bulk_modulus_vrh and mp_bulk_modulus, immi recipe
    python get_crabnet_embeddings.py --recipe npj   # the recipe of the published MAEs
    python get_crabnet_embeddings.py --dataset all --features onehot
    python get_crabnet_embeddings.py --dataset all --recipe npj --scheduler slurm   # 36 SLURM jobs
"""

from __future__ import annotations

from pathlib import Path

from crabnet.embeddings import model_job, model_outputs_current, print_results
from crabnet.errors import UsageError
from crabnet.jobs import distributed
from crabnet.jobs.cli import DEMO_DATASET, add_common, add_training, make_parser, run
from crabnet.jobs.engine import Job, add_engine_args, engine_from_args, run_jobs
from crabnet.layout import BENCHMARK_DATASETS
from crabnet.training.costs import cached_rates, dataset_training_cost_s
from crabnet.training.recipe import make_recipe
from crabnet.utils import resolve_device
from crabnet.web.report import refresh_report

DEFAULT_DATASETS = ("aflow__ael_bulk_modulus_vrh", "mp_bulk_modulus")
QUICK = {"datasets": (DEMO_DATASET,), "epochs": 2}
FULL = {"datasets": DEFAULT_DATASETS, "epochs": 300}


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        quick_help=f"CPU demo: {QUICK['datasets'][0]}; any existing checkpoint is used, a missing one "
        f"is trained for {QUICK['epochs']} epochs",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="NAME",
        help="dataset folder under <data-dir>/benchmark_data/; repeatable; 'all' = the 18 "
        f"benchmark sets (default: {' and '.join(DEFAULT_DATASETS)}; --quick: {QUICK['datasets'][0]})",
    )
    features = "element features: mat2vec = CrabNet, onehot = HotCrab"
    p.add_argument("--features", nargs="+", default=["mat2vec", "onehot"], choices=["mat2vec", "onehot"], help=features)
    epochs = (
        f"maximum epochs of a model to train (default 300, the full recipe, may stop early; --quick {QUICK['epochs']})"
    )
    p.add_argument("--epochs", type=int, default=None, help=epochs)
    add_training(p, epochs_step=True)
    add_engine_args(p)
    return p.parse_args(argv)


def expand_datasets(names: list[str] | None, quick: bool) -> list[str]:
    """Dataset names from --dataset ('all' expands to the 18 benchmark sets; duplicates removed)."""
    names = names or list(QUICK["datasets"] if quick else FULL["datasets"])
    out: list[str] = []
    for name in names:
        for ds in BENCHMARK_DATASETS if name == "all" else (name,):
            if ds not in out:
                out.append(ds)
    return out


def main(
    data_dir: Path,
    dataset: list[str] | None,
    device: str,
    seed: int,
    quick: bool,
    force: bool,
    features: list[str],
    epochs: int | None,
    epochs_step: int | None,
    recipe: str = "immi",
    precision: str = "auto",
    **engine,
) -> int:
    defaults = QUICK if quick else FULL
    epochs = defaults["epochs"] if epochs is None else epochs
    if epochs < 1 or (epochs_step is not None and epochs_step < 1):
        raise UsageError("--epochs and --epochs-step must be >= 1")
    recipe = make_recipe(recipe, epochs=epochs, **({} if epochs_step is None else {"epochs_step": epochs_step}))
    dev, eng = resolve_device(device), engine_from_args(engine)
    rates = cached_rates(data_dir, str(dev), precision) if eng.plan else None
    common = dict(data_dir=data_dir, recipe=recipe, device=str(dev), seed=seed, force=force, precision=precision)
    jobs = [
        Job(
            f"{ds} {feat}",
            model_job,
            dict(common, dataset=ds, features=feat),
            gpu=dev.type == "cuda",
            cost_s=dataset_training_cost_s(data_dir, ds, recipe, rates) if rates else 0,
            result=None if force else model_outputs_current(data_dir, ds, feat, recipe),
        )
        for ds in expand_datasets(dataset, quick)
        for feat in dict.fromkeys(features)
    ]
    rows = run_jobs(jobs, eng, what="models")
    if rows is None:  # --plan
        return 0
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    print_results(rows)
    refresh_report(data_dir)
    print("next: python plot_element_correlation.py" + (" --quick" if quick else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
