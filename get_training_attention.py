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
saved beside the store about once a minute (<store>.state.pt); the same command started again
goes on from the last save, keeping the captures made until then (--force starts afresh).

The recipe is the explainability paper's attention run (--recipe immi): up to 50 epochs, the
learning rate cycling every 2 epochs, SWA checks every 2nd epoch with early stopping, batch size
2^round(log2(n_train)-4) clamped to [128, 1024]; --recipe npj cycles every 20 epochs instead.

Examples:
    python get_training_attention.py --quick                  # CPU demo, a few minutes
    python get_training_attention.py                          # aflow__Egap, up to 50 epochs (the paper)
    python get_training_attention.py --dataset mp_bulk_modulus --capture step --capture-every 5
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


from crabnet.capture import AttentionRecorder, AttentionWriter
from crabnet.cli import DEMO_DATASET, add_common, add_training, make_parser, run
from crabnet.data import SPLITS, load_dataset
from crabnet.layout import Layout
from crabnet.report import refresh_report
from crabnet.train import fit, make_recipe, new_model, recipe_dict, save_trained
from crabnet.utils import UsageError, resolve_device

DEFAULT_DATASET = "aflow__Egap"
QUICK = {"dataset": DEMO_DATASET, "epochs": 8}
FULL = {"dataset": DEFAULT_DATASET, "epochs": 50}
ATTENTION_MAX_BATCH = 1024  # the attention run clamps the recipe's batch size to [128, 1024]


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=DEFAULT_DATASET,
               quick_help=f"CPU demo: {QUICK['dataset']}, {QUICK['epochs']} epochs (explicit flags still win)")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs, SWA early stopping may end sooner (default 50; --quick 8)")
    p.add_argument("--epochs-step", type=int, default=None,
                   help="half-cycle of the cyclic learning rate in epochs (default: the recipe's, 1 for immi, "
                        "10 for npj)")
    add_training(p)
    p.add_argument("--features", default="mat2vec", choices=["mat2vec", "onehot"],
                   help="element features: mat2vec = CrabNet, onehot = HotCrab")
    p.add_argument("--capture", default="epoch", choices=["epoch", "step"],
                   help="capture after every epoch or after optimiser steps")
    p.add_argument("--capture-every", type=int, default=1, help="with --capture step: every k-th step")
    p.add_argument("--split", default="val", choices=list(SPLITS), help="split whose compounds are captured")
    p.add_argument("--batch-size", type=int, default=0,
                   help=f"0 = the recipe's 2^round(log2(n_train)-4) clamped to [128, {ATTENTION_MAX_BATCH}]")
    p.add_argument("--keep-unary", action="store_true", help="keep single-element compounds (dropped by default)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (reported) instead of stopping")
    return p.parse_args(argv)


def settings_match(store: Path, wanted: dict) -> bool:
    """Whether a complete store exists that was made with the same settings."""
    import zarr

    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception:
        return False
    return bool(attrs.get("complete")) and all(attrs.get(k) == v for k, v in wanted.items())


def main(data_dir: Path, dataset: str | None, device: str, seed: int, quick: bool, force: bool,
         epochs: int | None, epochs_step: int | None, features: str, capture: str, capture_every: int,
         split: str, batch_size: int, keep_unary: bool, skip_invalid: bool, recipe: str = "immi",
         precision: str = "auto") -> int:
    defaults = QUICK if quick else FULL
    dataset = dataset or defaults["dataset"]
    epochs = defaults["epochs"] if epochs is None else epochs
    if epochs < 1 or (epochs_step is not None and epochs_step < 1) or capture_every < 1 or batch_size < 0:
        raise UsageError("--epochs, --epochs-step and --capture-every must be >= 1, --batch-size >= 0")
    recipe = make_recipe(recipe, epochs=epochs, batch_size=batch_size, max_batch_size=ATTENTION_MAX_BATCH,
                         **({} if epochs_step is None else {"epochs_step": epochs_step}))
    epochs_step = recipe.epochs_step

    store = Layout(data_dir).attention_store(dataset)
    settings = {"dataset": dataset, "features": features, "split": split, "capture": capture,
                "capture_every": capture_every, "epochs": epochs, "epochs_step": epochs_step, "seed": seed,
                "drop_unary": not keep_unary, "batch_size": batch_size, "recipe_name": recipe.name,
                "precision": precision, "attribution": True}  # stores made before attribution are redone
    if not force and settings_match(store, settings):
        print(f"{store} is up to date (same settings); use --force to recompute")
        refresh_report(data_dir)
        return 0

    splits = load_dataset(data_dir, dataset, drop_unary=not keep_unary, skip_invalid=skip_invalid)
    dev = resolve_device(device)
    model, scaler = new_model(features, splits, dev, seed)
    print(f"{dataset}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test; "
          f"{features}, {model.n_params():,} parameters, {epochs} epochs on {dev}; capturing {split} "
          f"({len(splits[split])} compounds) every {capture if capture_every == 1 else f'{capture_every} steps'}")

    state_path = store.with_name(store.name + ".state.pt")
    writer = AttentionWriter(store, splits[split], model.cfg.n_layers, model.cfg.n_heads, {
        **settings, "model_config": model.cfg.to_dict(), "recipe": recipe_dict(recipe)}, resume=not force)
    if not writer.resumed:
        state_path.unlink(missing_ok=True)  # a state without its captures cannot be resumed
    recorder = AttentionRecorder(model, splits[split], scaler, writer, mode=capture, every=capture_every)
    try:
        hist = fit(model, splits["train"], splits["val"], scaler, recipe, seed=seed, callback=recorder,
                   desc=f"{dataset} {features}", state_path=state_path, state_key=settings, precision=precision)
    except KeyboardInterrupt:
        print(f"\ninterrupted: captures staged in {writer.staging} (incomplete, not used by later steps); "
              f"the same command goes on from the last saved epoch ({state_path.name})", file=sys.stderr)
        return 130
    ckpt, meta = save_trained(data_dir, dataset, features, recipe, model, scaler, hist, splits["test"], seed=seed,
                              written_by="get_training_attention.py", beside_full=True)
    state_path.unlink(missing_ok=True)
    test_mae = meta["test_mae"]
    t0 = time.perf_counter()
    writer.finalize({"epochs_run": hist.epochs_run, "stopped_early": hist.stopped_early,
                     "swa_updates": hist.swa_updates, "final_weights": "swa" if hist.swapped_swa else "last",
                     "precision_used": hist.precision,
                     "test_mae": test_mae, "train_seconds": round(hist.seconds, 2)})
    print(f"attention: {writer.n_captures} captures x {len(splits[split])} compounds -> {store} "
          f"(reorganised in {time.perf_counter() - t0:.1f} s)")

    last_val = hist.val_mae[-1] if hist.val_mae else float("nan")
    print(f"model -> {ckpt}\n{hist.epochs_run} epochs in {hist.seconds:.1f} s; val MAE {last_val:.4g} "
          f"(last epoch), test MAE {test_mae:.4g} ({'SWA weights' if hist.swapped_swa else 'last weights'})")
    refresh_report(data_dir)
    print("next: python generate_attention_videos.py" + (" --quick" if quick else f" --dataset {dataset}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
