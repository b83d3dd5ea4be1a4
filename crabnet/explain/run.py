"""Attributions of any checkpoint on demand: one capture of a split, and how far attention agrees.

Step 1 stores attention and the attributions at every capture of a training; this module makes the
same for a model that is already trained (a checkpoint of step 1 or 4, ``benchmarks/accuracy.py``,
or your own): one capture of a split's compounds — attention maps, leave-one-element-out effects,
Shapley values, output contributions and the head ablation (:mod:`crabnet.explain.attribution`) — written as
an attention store, and the faithfulness table of that capture (:mod:`crabnet.explain.faithfulness`).

    python -m crabnet.explain --model data/models/mp_bulk_modulus__mat2vec__npj.pt --dataset mp_bulk_modulus

writes ``<data-dir>/attention/<dataset>/<checkpoint stem>.zarr`` (``Layout.checkpoint_store``; read it
with ``crabnet.explain.store.AttentionStore``) and ``<checkpoint stem>.faithfulness.csv`` beside it, and
prints the agreement of attention with leave-one-out and with Shapley values and the sign test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from crabnet.data import load_dataset
from crabnet.explain.capture import capture_split
from crabnet.explain.faithfulness import faithfulness_table, shapley_summary_rows, summary_rows
from crabnet.explain.store import AttentionStore, AttentionWriter
from crabnet.layout import SPLITS, Layout
from crabnet.progress import say
from crabnet.training.checkpoint import load_checkpoint
from crabnet.utils import atomic_path, resolve_device


def explain_checkpoint(
    checkpoint: Path | str, data_dir: Path | str, dataset: str, split: str = "val", device: str = "auto"
) -> tuple[Path, Path, pd.DataFrame]:
    """Capture ``split`` of ``dataset`` with the checkpoint's model into a one-capture store and write
    its faithfulness table.

    Returns:
        ``(store_path, csv_path, table)``.
    """
    model, scaler, meta = load_checkpoint(checkpoint, resolve_device(device))
    data = load_dataset(data_dir, dataset, (split,), verbose=False)[split]
    path = Layout(data_dir).checkpoint_store(dataset, checkpoint)
    attrs = {"dataset": dataset, "split": split, "capture": "checkpoint", "checkpoint": Path(checkpoint).name,
             "features": meta.get("features", ""), "model_config": model.cfg.to_dict()}  # fmt: skip
    writer = AttentionWriter(path, data, model.cfg.n_layers, model.cfg.n_heads, attrs)
    capture_split(model, data, scaler, writer, int(meta.get("epochs_run", 0)))
    writer.finalize({"test_mae": meta.get("test_mae")}, progress=False)
    table = faithfulness_table(AttentionStore(path))
    csv = path.with_suffix(".faithfulness.csv")
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path, csv, table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m crabnet.explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="a checkpoint (.pt) written by any step")
    p.add_argument("--dataset", required=True, help="dataset folder under <data-dir>/benchmark_data/")
    p.add_argument("--split", default="val", choices=list(SPLITS), help="split to capture (default: val)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="root of inputs and outputs (default: data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    return p.parse_args(argv)


def main(model: Path, dataset: str, split: str, data_dir: Path, device: str) -> int:
    store, csv, table = explain_checkpoint(model, data_dir, dataset, split, device)
    say(f"{store} and {csv}\n" + summary_rows(table, captures=(0,)))
    say("with |Shapley| as the reference, and the sign test:\n" + shapley_summary_rows(table, captures=(0,)))
    return 0


if __name__ == "__main__":
    from crabnet.jobs.cli import run

    raise SystemExit(run(main, parse_args()))
