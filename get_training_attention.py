"""Step 1: train CrabNet and capture the attention of every layer and head during training.

Reads   <data-dir>/benchmark_data/<dataset>/{train,val,test}.csv (fetched on first need)
Writes  <data-dir>/attention/<dataset>/attention.zarr   captures of the --split compounds
        <data-dir>/models/<dataset>__<features>.pt     the trained model (kept as
                                                        …__attention.pt if models/ already holds
                                                        one trained with a full recipe)
Next    generate_attention_videos.py

The split is captured before training (capture 0) and after every epoch, or with --capture step
after every k-th optimiser step. Captures stream to <store>.partial with bounded memory; at the
end the store is rewritten compound-major and sharded and renamed into place, so an interrupted
run never leaves a store that looks complete. Nothing is lost either: the training state is
saved beside the store about once a minute (<store>.state.pt; $CRABNET_STATE_EVERY_S seconds if set)
and on SIGTERM (exit code 143); the same command started again goes on from the last save, keeping
the captures made until then (--force starts afresh).

The recipe is the explainability paper's attention run (--recipe immi): up to 50 epochs, the
learning rate cycling every 2 epochs, SWA checks every 2nd epoch with early stopping, batch size
2^round(log2(n_train)-4) clamped to [128, 1024]; --recipe npj cycles every 20 epochs instead.

The training is one job (crabnet.explain.capture.attention_job): it runs in this process, or on a Dask cluster
with --scheduler tcp://HOST:PORT, --scheduler-file PATH or --scheduler slurm|pbs|… (see crabnet/jobs/engine.py;
--data-dir must then be on a filesystem the workers share). Started by torchrun (torchrun --nproc_per_node N
get_training_attention.py …, also across machines; docs/distributed.md), the N processes train the one model
together, each on its share of every batch, and rank 0 writes the store and the checkpoint.

Examples:
    python get_training_attention.py --quick                  # CPU demo, a few minutes
    python get_training_attention.py                          # aflow__Egap, up to 50 epochs (the paper)
    python get_training_attention.py --dataset mp_bulk_modulus --capture step --capture-every 5
    python get_training_attention.py --device cuda --scheduler slurm   # the training as a SLURM job
"""

from __future__ import annotations

from pathlib import Path

from crabnet.errors import UsageError
from crabnet.explain.capture import CaptureSettings, attention_job, print_result
from crabnet.explain.store import store_matches
from crabnet.jobs import distributed
from crabnet.jobs.cli import DEMO_DATASET, add_common, add_training, make_parser, run
from crabnet.jobs.engine import Job, add_engine_args, engine_from_args, run_jobs
from crabnet.layout import SPLITS, Layout
from crabnet.training.costs import cached_rates, dataset_training_cost_s
from crabnet.training.recipe import make_recipe
from crabnet.utils import resolve_device
from crabnet.web.report import refresh_report

DEFAULT_DATASET = "aflow__Egap"
QUICK = {"dataset": DEMO_DATASET, "epochs": 8}
FULL = {"dataset": DEFAULT_DATASET, "epochs": 50}
ATTENTION_MAX_BATCH = 1024  # the attention run clamps the recipe's batch size to [128, 1024]


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=DEFAULT_DATASET,
        quick_help=f"CPU demo: {QUICK['dataset']}, {QUICK['epochs']} epochs (explicit flags still win)",
    )
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 50; --quick 8); may stop early")
    add_training(p, epochs_step=True)
    features = "element features: mat2vec = CrabNet, onehot = HotCrab"
    p.add_argument("--features", default="mat2vec", choices=["mat2vec", "onehot"], help=features)
    when = "capture after every epoch or after optimiser steps"
    p.add_argument("--capture", default="epoch", choices=["epoch", "step"], help=when)
    p.add_argument("--capture-every", type=int, default=1, help="with --capture step: every k-th step")
    p.add_argument("--split", default="val", choices=list(SPLITS), help="split whose compounds are captured")
    batch = f"0 = the recipe's 2^round(log2(n_train)-4) clamped to [128, {ATTENTION_MAX_BATCH}]"
    p.add_argument("--batch-size", type=int, default=0, help=batch)
    p.add_argument("--keep-unary", action="store_true", help="keep single-element compounds (dropped by default)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (reported) instead of stopping")
    add_engine_args(p)
    return p.parse_args(argv)


def main(
    data_dir: Path,
    dataset: str | None,
    device: str,
    seed: int,
    quick: bool,
    force: bool,
    epochs: int | None,
    epochs_step: int | None,
    features: str,
    capture: str,
    capture_every: int,
    split: str,
    batch_size: int,
    keep_unary: bool,
    skip_invalid: bool,
    recipe: str = "immi",
    precision: str = "auto",
    **engine,
) -> int:
    defaults = QUICK if quick else FULL
    dataset = dataset or defaults["dataset"]
    epochs = defaults["epochs"] if epochs is None else epochs
    if epochs < 1 or (epochs_step is not None and epochs_step < 1) or capture_every < 1 or batch_size < 0:
        raise UsageError("--epochs, --epochs-step and --capture-every must be >= 1, --batch-size >= 0")
    cycle = {} if epochs_step is None else {"epochs_step": epochs_step}
    recipe = make_recipe(recipe, epochs=epochs, batch_size=batch_size, max_batch_size=ATTENTION_MAX_BATCH, **cycle)

    store = Layout(data_dir).attention_store(dataset)
    settings = CaptureSettings(
        dataset=dataset, features=features, split=split, capture=capture, capture_every=capture_every, epochs=epochs,
        epochs_step=recipe.epochs_step, seed=seed, drop_unary=not keep_unary, batch_size=batch_size,
        recipe_name=recipe.name, precision=precision,
    )  # fmt: skip
    up_to_date = not force and store_matches(store, settings.as_dict())
    dev = None if up_to_date else resolve_device(device)  # an up-to-date store needs no device
    eng = engine_from_args(engine, keep_threads=True)
    cost = (
        dataset_training_cost_s(data_dir, dataset, recipe, cached_rates(data_dir, str(dev), precision))
        if eng.plan and dev is not None
        else 0.0
    )
    kwargs = dict(data_dir=data_dir, recipe=recipe, settings=settings, device=str(dev or device), force=force)
    job = Job(
        f"{dataset} {features}",
        attention_job,
        {**kwargs, "skip_invalid": skip_invalid},
        cost_s=cost,
        gpu=dev is not None and dev.type == "cuda",
        result={"up_to_date": True} if up_to_date else None,
    )
    try:
        results = run_jobs([job], eng, what="trainings")
    except KeyboardInterrupt:  # the job said where its captures are staged
        return 130
    if results is None:  # --plan: the job was listed
        return 0
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    print_result(results[0], store)
    refresh_report(data_dir)
    if up_to_date:
        return 0
    print("next: python generate_attention_videos.py" + (" --quick" if quick else f" --dataset {dataset}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
