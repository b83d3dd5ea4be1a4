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

Embeddings and predictions are always rewritten (seconds); --force also retrains the models.

Examples:
    python get_crabnet_embeddings.py --quick        # CPU demo: aflow__ael_bulk_modulus_vrh, short training if no model
    python get_crabnet_embeddings.py                # aflow__ael_bulk_modulus_vrh and mp_bulk_modulus, immi recipe
    python get_crabnet_embeddings.py --recipe npj   # the recipe of the published MAEs
    python get_crabnet_embeddings.py --dataset all --features onehot
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from crabnet.cli import DEMO_DATASET, add_common, add_training, make_parser, run
from crabnet.data import load_dataset
from crabnet.embeddings import (embedding_frames, predictions_frame, predictions_path,
                                write_embeddings, write_predictions)
from crabnet.layout import BENCHMARK_DATASETS
from crabnet.reference import published_mae
from crabnet.report import refresh_report
from crabnet.train import Recipe, ensure_model, make_recipe, mae, predict
from crabnet.utils import UsageError, resolve_device

DEFAULT_DATASETS = ("aflow__ael_bulk_modulus_vrh", "mp_bulk_modulus")
QUICK = {"datasets": (DEMO_DATASET,), "epochs": 2}
FULL = {"datasets": DEFAULT_DATASETS, "epochs": 300}


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None,
               quick_help=f"CPU demo: {QUICK['datasets'][0]}; any existing checkpoint is used, a missing one "
                          f"is trained for {QUICK['epochs']} epochs")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="dataset folder under <data-dir>/benchmark_data/; repeatable; 'all' = the 18 "
                        f"benchmark sets (default: {' and '.join(DEFAULT_DATASETS)}; --quick: {QUICK['datasets'][0]})")
    p.add_argument("--features", nargs="+", default=["mat2vec", "onehot"], choices=["mat2vec", "onehot"],
                   help="element features: mat2vec = CrabNet, onehot = HotCrab")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs when a model must be trained (default 300 = the full recipe "
                        f"with SWA early stopping; --quick {QUICK['epochs']})")
    p.add_argument("--epochs-step", type=int, default=None,
                   help="half-cycle of the cyclic learning rate in epochs (default: the recipe's, 1 for immi, "
                        "10 for npj)")
    add_training(p)
    return p.parse_args(argv)


def expand_datasets(names: list[str] | None, quick: bool) -> list[str]:
    """Dataset names from --dataset ('all' expands to the 18 benchmark sets; duplicates removed)."""
    names = names or list(QUICK["datasets"] if quick else FULL["datasets"])
    out: list[str] = []
    for name in names:
        for ds in (BENCHMARK_DATASETS if name == "all" else (name,)):
            if ds not in out:
                out.append(ds)
    return out


def run_one(data_dir: Path, dataset: str, features: str, recipe: Recipe, device, seed: int, force: bool,
            precision: str) -> dict:
    """Train or load one model, write its embeddings and test predictions; return a result row."""
    test = load_dataset(data_dir, dataset, splits=("test",), verbose=False)["test"]
    model, scaler, meta = ensure_model(data_dir, dataset, features, recipe, device=device, seed=seed, force=force,
                                       written_by="get_crabnet_embeddings.py", precision=precision)
    paths = write_embeddings(embedding_frames(model), data_dir, features, dataset)
    pred, unc = predict(model, test, scaler)
    pred_path = write_predictions(predictions_frame(test.formula, test.target, pred, unc),
                                  predictions_path(data_dir, dataset, features))
    rec = meta.get("recipe", {})
    return {"dataset": dataset, "features": features, "n_test": len(test), "test_mae": mae(pred, test.target),
            "published": published_mae(dataset, features),
            "recipe": (f"full {meta['full_recipe']}" if meta.get("full_recipe")
                       else f"short ({meta.get('epochs_run', rec.get('epochs', '?'))} epochs)"),
            "embeddings": paths[0].parent, "n_csv": len(paths), "predictions": pred_path}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'dataset':30s} {'features':8s} {'model':22s} {'n_test':>6s} {'test MAE':>9s} {'published':>9s} {'ratio':>6s}")
    for r in rows:
        ref = f"{r['published']:.4g}" if r["published"] else "-"
        ratio = f"{r['test_mae'] / r['published']:.2f}" if r["published"] else "-"
        print(f"{r['dataset']:30s} {r['features']:8s} {r['recipe']:22s} {r['n_test']:6d} {r['test_mae']:9.4g} "
              f"{ref:>9s} {ratio:>6s}")


def main(data_dir: Path, dataset: list[str] | None, device: str, seed: int, quick: bool, force: bool,
         features: list[str], epochs: int | None, epochs_step: int | None, recipe: str = "immi",
         precision: str = "auto") -> int:
    defaults = QUICK if quick else FULL
    epochs = defaults["epochs"] if epochs is None else epochs
    if epochs < 1 or (epochs_step is not None and epochs_step < 1):
        raise UsageError("--epochs and --epochs-step must be >= 1")
    recipe = make_recipe(recipe, epochs=epochs, **({} if epochs_step is None else {"epochs_step": epochs_step}))
    dev = resolve_device(device)
    rows = []
    jobs = [(ds, feat) for ds in expand_datasets(dataset, quick) for feat in dict.fromkeys(features)]
    for ds, feat in tqdm(jobs, desc="models", unit="model", disable=None):
        row = run_one(data_dir, ds, feat, recipe, dev, seed, force, precision)  # DataError: exit 2 via run()
        print(f"{ds} {feat}: {row['n_csv']} embedding CSVs -> {row['embeddings']}/; "
              f"test predictions -> {row['predictions']}")
        rows.append(row)
    print_table(rows)
    refresh_report(data_dir)
    print("next: python plot_element_correlation.py" + (" --quick" if quick else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
