"""Element embeddings learned by CrabNet (step 4) and the published accuracy reference.

Every element is fed to a trained model as a single-element compound (fraction 1, no target
scaling involved: only the encoder is read). At each encoder layer ``l`` the layer's input
``x_l`` goes through that layer's attention in-projection,

    [Q | K | V] = x_l · W_in^T + b_in        (d_model columns each, not split by head, not scaled)

giving one query, key and value vector per element and layer. They are written as
``embeddings/<features>/<dataset>__layer<L>__<Q|K|V>.csv``: 118 rows (H…Og, index column
``element``), d_model columns; elements missing from the model's feature table are blank rows.

Functions here are split into compute (``element_qkv``, ``embedding_frames``) and write
(``write_embeddings``, ``write_predictions``) so that tests and other steps can use the arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crabnet.elements import FEATURE_NAMES, N_ELEMENTS, SYMBOLS, feature_table
from crabnet.layout import BENCHMARK_DATASETS, Layout
from crabnet.progress import say
from crabnet.training.model import CrabNet
from crabnet.utils import atomic_path

KINDS = ("Q", "K", "V")


# --------------------------------------------------------------------------------------------
# compute


def present_elements(model: CrabNet) -> np.ndarray:
    """(118,) bool: which elements H…Og the model's feature table covers.

    For a known table name the table's own coverage is used; otherwise an element counts as
    present when its row of the model's (frozen) feature table is not all zero.
    """
    if model.cfg.features in FEATURE_NAMES:
        return feature_table(model.cfg.features)[1][1:].copy()
    table = model.feature_table.detach().cpu().numpy()
    return np.abs(table[1:]).sum(axis=1) > 0


@torch.no_grad()
def element_qkv(model: CrabNet, elements: np.ndarray | list[int] | None = None, *, batch_size: int = 128) -> np.ndarray:
    """Q, K and V vectors of single-element compounds at every encoder layer.

    Args:
        model: a CrabNet (put in eval mode for the duration; dropout off).
        elements: atomic numbers to feed (default all 1…118), each as a compound of fraction 1.
        batch_size: compounds per forward pass.

    Returns:
        float32 array (L, 3, n, d_model): ``[l, 0]`` = Q, ``[l, 1]`` = K, ``[l, 2]`` = V of layer
        ``l`` for the n elements in the order given.
    """
    z = np.arange(1, N_ELEMENTS + 1) if elements is None else np.asarray(elements, dtype=np.int64)
    if z.ndim != 1 or (z.size and (z.min() < 1 or z.max() > N_ELEMENTS)):
        raise ValueError(f"elements must be a 1-d list of atomic numbers 1..{N_ELEMENTS}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    L, D = model.cfg.n_layers, model.cfg.d_model
    out = np.zeros((L, 3, len(z), D), dtype=np.float32)
    try:
        for i in range(0, len(z), batch_size):
            el = torch.as_tensor(z[i : i + batch_size], dtype=torch.long, device=device).unsqueeze(1)  # (b, 1)
            fr = torch.ones(el.shape, dtype=torch.float32, device=device)
            hidden = model.forward_internals(el, fr, hidden=True).hidden  # L+1 x (b, 1, D)
            for layer in range(L):
                qkv = model.layers[layer].self_attn.qkv(hidden[layer])[:, 0]  # (b, 3D)
                out[layer, :, i : i + len(el)] = qkv.view(len(el), 3, D).transpose(0, 1).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def embedding_frames(model: CrabNet, *, batch_size: int = 128) -> dict[tuple[int, str], pd.DataFrame]:
    """Q/K/V element embeddings of every layer as DataFrames of 118 rows (H…Og).

    Elements missing from the model's feature table are rows of NaN (written as blanks).

    Returns:
        ``{(layer, kind): frame}`` with ``kind`` in ``Q``, ``K``, ``V``; each frame is indexed by
        element symbol (index name ``element``) with columns ``0 … d_model-1``.
    """
    qkv = element_qkv(model, batch_size=batch_size).astype(np.float64)  # (L, 3, 118, D)
    absent = ~present_elements(model)
    qkv[:, :, absent, :] = np.nan
    index = pd.Index(SYMBOLS, name="element")
    columns = [str(c) for c in range(qkv.shape[-1])]
    return {
        (layer, kind): pd.DataFrame(qkv[layer, k], index=index, columns=columns)
        for layer in range(qkv.shape[0])
        for k, kind in enumerate(KINDS)
    }


# --------------------------------------------------------------------------------------------
# write / read


def embedding_path(data_dir: Path | str, features: str, dataset: str, layer: int, kind: str) -> Path:
    """``<data_dir>/embeddings/<features>/<dataset>__layer<L>__<kind>.csv``."""
    return Layout(data_dir).embedding(features, dataset, layer, kind)


def write_frame(frame: pd.DataFrame, path: Path | str, **to_csv) -> Path:
    """Write a DataFrame as CSV via a temporary file renamed into place."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **to_csv)
    return path


def write_embeddings(
    frames: dict[tuple[int, str], pd.DataFrame], data_dir: Path | str, features: str, dataset: str
) -> list[Path]:
    """Write every (layer, kind) frame to ``embedding_path``; NaN rows become blank cells.

    Returns:
        The paths written, in (layer, kind) order.
    """
    paths = []
    for (layer, kind), frame in sorted(frames.items()):
        paths.append(
            write_frame(frame, embedding_path(data_dir, features, dataset, layer, kind), float_format="%.7g", na_rep="")
        )
    return paths


def read_embedding_csv(path: Path | str) -> pd.DataFrame:
    """Read an embedding CSV back: index = element symbols, blank rows as NaN."""
    return pd.read_csv(path, index_col=0)


def predictions_path(data_dir: Path | str, dataset: str, features: str, split: str = "test") -> Path:
    """``<data_dir>/predictions/<dataset>__<features>__<split>.csv``."""
    return Layout(data_dir).predictions(dataset, features, split)


def predictions_frame(formula, target, prediction, uncertainty) -> pd.DataFrame:
    """Columns formula, target, prediction, uncertainty (one row per compound)."""
    return pd.DataFrame(
        {
            "formula": np.asarray(formula, dtype=object),
            "target": np.asarray(target, np.float64),
            "prediction": np.asarray(prediction, np.float64),
            "uncertainty": np.asarray(uncertainty, np.float64),
        }
    )


def write_predictions(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write a predictions frame (no index) atomically."""
    return write_frame(frame, path, index=False, float_format="%.8g")


# --------------------------------------------------------------------------------------------
# the job of step 4 (one model): run by crabnet.jobs.engine here or on a Dask worker


def model_job(
    data_dir: Path, dataset: str, features: str, recipe, device: str, seed: int, force: bool, precision: str
) -> dict:
    """Train or load one model (``crabnet.training.checkpoint.ensure_model``), write its embeddings and test
    predictions; return the result row of step 4's table (small and picklable).

    Under torchrun (docs/distributed.md) every rank runs this job and they train the model together;
    rank 0 writes the files and returns the row, the other ranks return ``{"dataset", "features", "rank"}``.
    """
    from crabnet.data import load_dataset
    from crabnet.jobs import distributed
    from crabnet.training.checkpoint import ensure_model
    from crabnet.training.evaluate import predict
    from crabnet.utils import resolve_device

    dev = distributed.init(resolve_device(device))  # under torchrun: the process group; this rank's GPU
    with distributed.main_first():  # rank 0 fetches the datasets if they are missing
        test = load_dataset(data_dir, dataset, splits=("test",), verbose=False)["test"]
    model, scaler, meta = ensure_model(
        data_dir,
        dataset,
        features,
        recipe,
        device=dev,
        seed=seed,
        force=force,
        written_by="get_crabnet_embeddings.py",
        precision=precision,
    )
    if not distributed.is_main():
        return {"dataset": dataset, "features": features, "rank": distributed.rank()}
    paths = write_embeddings(embedding_frames(model), data_dir, features, dataset)
    pred, unc = predict(model, test, scaler)
    pred_path = write_predictions(
        predictions_frame(test.formula, test.target, pred, unc), predictions_path(data_dir, dataset, features)
    )
    return model_row(data_dir, dataset, features, meta, pred_path, len(paths))


def model_row(data_dir: Path, dataset: str, features: str, meta: dict, pred_path: Path, n_csv: int) -> dict:
    """Step 4's result row from a checkpoint's metadata and its written test predictions."""
    from crabnet.reference import published_mae

    pred = pd.read_csv(pred_path)
    rec = meta.get("recipe", {})
    return {
        "dataset": dataset,
        "features": features,
        "n_test": len(pred),
        "test_mae": float(np.mean(np.abs(pred.prediction - pred.target))),
        "published": published_mae(dataset, features),
        "recipe": (
            f"full {meta['full_recipe']}"
            if meta.get("full_recipe")
            else f"short ({meta.get('epochs_run', rec.get('epochs', '?'))} epochs)"
        ),
        "embeddings": str(embedding_path(data_dir, features, dataset, 0, "Q").parent),
        "n_csv": n_csv,
        "predictions": str(pred_path),
    }


def model_outputs_current(data_dir: Path, dataset: str, features: str, recipe) -> dict | None:
    """Step 4's result row when the checkpoint suits ``recipe`` and its embeddings and predictions
    are newer than it (nothing to do); else None. Reads the checkpoint's metadata only."""
    from crabnet.training.checkpoint import checkpoint_path, checkpoint_suits
    from crabnet.utils import read_checkpoint_meta

    ckpt = checkpoint_path(data_dir, dataset, features, recipe.name)
    pred = predictions_path(data_dir, dataset, features)
    embeddings = sorted(embedding_path(data_dir, features, dataset, 0, "Q").parent.glob(f"{dataset}__layer*__*.csv"))
    if not (ckpt.exists() and pred.exists() and embeddings):
        return None
    newer = min(p.stat().st_mtime for p in [pred, *embeddings]) >= ckpt.stat().st_mtime
    meta = read_checkpoint_meta(ckpt) if newer else None
    if meta is None or not checkpoint_suits(meta, recipe):
        return None
    return model_row(data_dir, dataset, features, meta, pred, len(embeddings))


def print_results(rows: list[dict]) -> None:
    """Where each model's outputs went, then its test MAE beside the published one."""
    for r in rows:
        say(
            f"{r['dataset']} {r['features']}: {r['n_csv']} embedding CSVs -> {r['embeddings']}/; "
            f"test predictions -> {r['predictions']}"
        )
    head = f"{'dataset':30s} {'features':8s} {'model':22s} {'n_test':>6s}"
    say(f"\n{head} {'test MAE':>9s} {'published':>9s} {'ratio':>6s}")
    for r in rows:
        ref = f"{r['published']:.4g}" if r["published"] else "-"
        ratio = f"{r['test_mae'] / r['published']:.2f}" if r["published"] else "-"
        mae = f"{r['n_test']:6d} {r['test_mae']:9.4g} {ref:>9s} {ratio:>6s}"
        say(f"{r['dataset']:30s} {r['features']:8s} {r['recipe']:22s} {mae}")


__all__ = [
    "KINDS",
    "model_job",
    "model_row",
    "model_outputs_current",
    "BENCHMARK_DATASETS",
    "present_elements",
    "element_qkv",
    "embedding_frames",
    "embedding_path",
    "write_embeddings",
    "read_embedding_csv",
    "predictions_path",
    "predictions_frame",
    "write_predictions",
    "print_results",
]
