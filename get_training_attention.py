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

The training is one job (crabnet.capture.attention_job): it runs in this process, or on a Dask cluster
with --scheduler tcp://HOST:PORT, --scheduler-file PATH or --scheduler slurm|pbs|… (see crabnet/engine.py;
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

from dataclasses import replace
from pathlib import Path

from crabnet import distributed
from crabnet.capture import AttentionRecorder, attention_job  # noqa: F401 - tests patch gta.AttentionRecorder
from crabnet.cli import DEMO_DATASET, add_common, add_training, make_parser, run
from crabnet.costs import cached_rates, dataset_training_cost_s
from crabnet.data import SPLITS
from crabnet.engine import Engine, Job, add_engine_args, engine_from_args, run_jobs
from crabnet.errors import UsageError
from crabnet.layout import Layout
from crabnet.train import make_recipe
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
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="maximum epochs, SWA early stopping may end sooner (default 50; --quick 8)",
    )
    p.add_argument(
        "--epochs-step",
        type=int,
        default=None,
        help="half-cycle of the cyclic learning rate in epochs (default: the recipe's, 1 for immi, 10 for npj)",
    )
    add_training(p)
    p.add_argument(
        "--features",
        default="mat2vec",
        choices=["mat2vec", "onehot"],
        help="element features: mat2vec = CrabNet, onehot = HotCrab",
    )
    p.add_argument(
        "--capture",
        default="epoch",
        choices=["epoch", "step"],
        help="capture after every epoch or after optimiser steps",
    )
    p.add_argument("--capture-every", type=int, default=1, help="with --capture step: every k-th step")
    p.add_argument("--split", default="val", choices=list(SPLITS), help="split whose compounds are captured")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help=f"0 = the recipe's 2^round(log2(n_train)-4) clamped to [128, {ATTENTION_MAX_BATCH}]",
    )
    p.add_argument("--keep-unary", action="store_true", help="keep single-element compounds (dropped by default)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (reported) instead of stopping")
    add_engine_args(p)
    return p.parse_args(argv)


def settings_match(store: Path, wanted: dict) -> bool:
    """Whether a complete store exists that was made with the same settings."""
    import zarr

    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception:
        return False
    return bool(attrs.get("complete")) and all(attrs.get(k) == v for k, v in wanted.items())


def local_threads(engine: Engine) -> Engine:
    """The training here (``--scheduler local`` or ``sequential``) keeps torch's thread count, as before
    the engine, unless ``--threads-per-job`` is given; elsewhere the workers' count applies (under
    torchrun: cores / ranks, :func:`crabnet.distributed.threads_per_rank`)."""
    here = engine.scheduler_file is None and engine.scheduler in ("local", "sequential")
    if engine.threads_per_job is None and here and not distributed.requested():
        import torch

        return replace(engine, threads_per_job=torch.get_num_threads())
    return engine


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
    recipe = make_recipe(
        recipe,
        epochs=epochs,
        batch_size=batch_size,
        max_batch_size=ATTENTION_MAX_BATCH,
        **({} if epochs_step is None else {"epochs_step": epochs_step}),
    )
    epochs_step = recipe.epochs_step

    store = Layout(data_dir).attention_store(dataset)
    settings = {
        "dataset": dataset,
        "features": features,
        "split": split,
        "capture": capture,
        "capture_every": capture_every,
        "epochs": epochs,
        "epochs_step": epochs_step,
        "seed": seed,
        "drop_unary": not keep_unary,
        "batch_size": batch_size,
        "recipe_name": recipe.name,
        "precision": precision,
        "attribution": True,
    }  # stores made before attribution are redone
    up_to_date = not force and settings_match(store, settings)
    dev = None if up_to_date else resolve_device(device)  # an up-to-date store needs no device
    eng = local_threads(engine_from_args(engine))
    cost = (
        dataset_training_cost_s(data_dir, dataset, recipe, cached_rates(data_dir, str(dev), precision))
        if eng.plan and dev is not None
        else 0.0
    )
    job = Job(
        f"{dataset} {features}",
        attention_job,
        dict(
            data_dir=data_dir,
            recipe=recipe,
            settings=settings,
            device=str(dev or device),
            force=force,
            skip_invalid=skip_invalid,
        ),
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
    r = results[0]
    if up_to_date:
        print(f"{store} is up to date (same settings); use --force to recompute")
        refresh_report(data_dir)
        return 0
    print(
        f"attention: {r['n_captures']} captures x {r['n_compounds']} compounds -> {r['store']} "
        f"(reorganised in {r['reorganise_s']:.1f} s)"
    )
    print(
        f"model -> {r['checkpoint']}\n{r['epochs_run']} epochs in {r['train_s']:.1f} s; "
        f"val MAE {r['val_mae']:.4g} (last epoch), test MAE {r['test_mae']:.4g} "
        f"({'SWA weights' if r['swa'] else 'last weights'})"
    )
    refresh_report(data_dir)
    print("next: python generate_attention_videos.py" + (" --quick" if quick else f" --dataset {dataset}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
