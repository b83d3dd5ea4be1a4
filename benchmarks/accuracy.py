"""Accuracy against the published CrabNet / HotCrab test MAE.

Trains with a full recipe (default npj: up to 300 epochs, epochs_step 10, CrabNet SWA with early
stop; the recipe of the published MAEs) and prints the test MAE beside the published one from
``crabnet/reference/published_test_mae.csv`` (or --reference).

    python benchmarks/accuracy.py --dataset aflow__ael_bulk_modulus_vrh --features mat2vec onehot
    python benchmarks/accuracy.py --recipe immi --features mat2vec --precision fp32

Writes ``<data-dir>/benchmarks/accuracy__<dataset>__<features>.json`` with the figures and saves
the checkpoint to ``<data-dir>/models/`` (reused by later steps, since it follows the recipe).

Under torchrun (``torchrun --nproc_per_node N benchmarks/accuracy.py …``; docs/distributed.md) the N
processes train each model together and rank 0 writes and prints the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crabnet.data import load_dataset
from crabnet.jobs import distributed
from crabnet.reference import PUBLISHED_MAE, published_mae
from crabnet.training.checkpoint import train_and_save
from crabnet.training.recipe import make_recipe
from crabnet.utils import atomic_path, resolve_device


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="dataset (default: %(default)s)")
    p.add_argument("--features", nargs="+", default=["mat2vec", "onehot"], help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=300, help="maximum epochs (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument(
        "--reference",
        type=Path,
        default=PUBLISHED_MAE,
        help="published MAE table (default: the one shipped in crabnet/reference/)",
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default")
    p.add_argument("--recipe", default="npj", choices=["npj", "immi"], help="default: %(default)s")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="default: %(default)s")
    return p.parse_args()


def main(
    dataset: str,
    features: list[str],
    epochs: int,
    data_dir: Path,
    reference: Path,
    device: str,
    seed: int,
    threads: int,
    recipe: str,
    precision: str,
) -> int:
    if threads:
        torch.set_num_threads(threads)
    elif distributed.requested():  # under torchrun: this machine's cores / its ranks
        torch.set_num_threads(distributed.threads_per_rank())
    dev = distributed.init(resolve_device(device))  # under torchrun: the process group; this rank's GPU
    with distributed.main_first():  # rank 0 fetches the datasets if they are missing
        splits = load_dataset(data_dir, dataset)
    rows = []
    for feat in features:
        _, _, meta = train_and_save(
            data_dir,
            dataset,
            feat,
            make_recipe(recipe, epochs=epochs),
            device=dev,
            seed=seed,
            splits=splits,
            written_by="benchmarks/accuracy.py",
            progress=True,
            precision=precision,
        )  # a bar in logs too: runs take long
        if not distributed.is_main():  # under torchrun rank 0 writes the figures
            continue
        ref = published_mae(dataset, feat, reference)
        row = {
            "dataset": dataset,
            "features": feat,
            "n_test": len(splits["test"]),
            "test_mae": meta["test_mae"],
            "published_mae": ref,
            "ratio": meta["test_mae"] / ref if ref else None,
            "recipe": recipe,
            "precision": meta["precision"],
            "seed": seed,
            "epochs_run": meta["epochs_run"],
            "stopped_early": meta["stopped_early"],
            "train_seconds": meta["train_seconds"],
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "ranks": distributed.world_size(),  # torchrun processes that trained the model together
        }
        rows.append(row)
        out = data_dir / "benchmarks" / f"accuracy__{dataset}__{feat}__{recipe}__{meta['precision']}__seed{seed}.json"
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        print(json.dumps(row), flush=True)
    print(
        f"\n{'dataset':32s} {'features':9s} {'recipe':6s} {'prec':5s} {'n_test':>6s} {'test MAE':>10s} "
        f"{'published':>10s} {'ratio':>6s} {'epochs':>6s} {'seconds':>8s}"
    )
    for r in rows:
        ref = f"{r['published_mae']:.4g}" if r["published_mae"] else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        print(
            f"{r['dataset']:32s} {r['features']:9s} {r['recipe']:6s} {r['precision']:5s} {r['n_test']:6d} "
            f"{r['test_mae']:10.4g} {ref:>10s} {ratio:>6s} {r['epochs_run']:6d} {r['train_seconds']:8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
