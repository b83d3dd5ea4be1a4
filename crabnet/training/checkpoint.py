"""Checkpoints: save and load a trained model, the metadata it carries, and train-or-reuse for whole datasets."""

from __future__ import annotations

from pathlib import Path

import torch

import crabnet
from crabnet.data import CompositionData
from crabnet.jobs import distributed
from crabnet.layout import Layout
from crabnet.progress import say
from crabnet.training.evaluate import mae, predict
from crabnet.training.loop import fit
from crabnet.training.model import CrabNet, CrabNetConfig
from crabnet.training.optim import SWA
from crabnet.training.recipe import Recipe, Scaler, build_model, recipe_dict
from crabnet.training.state import History
from crabnet.utils import atomic_path, write_meta_sidecar


def save_checkpoint(path: Path | str, model: CrabNet, scaler: Scaler, meta: dict | None = None) -> Path:
    """Save weights, model config, scaler and metadata (plain tensors and numbers only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "model": state,
        "config": model.cfg.to_dict(),
        "scaler": {"mean": scaler.mean, "std": scaler.std},
        "meta": {"created_with": crabnet.__version__, **(meta or {})},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    write_meta_sidecar(path, ckpt["meta"])
    return path


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[CrabNet, Scaler, dict]:
    """Load a checkpoint saved by ``save_checkpoint`` (``weights_only=True``).

    Returns:
        ``(model, scaler, meta)`` with the model in eval mode on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = CrabNetConfig.from_dict(ckpt["config"])
    model = CrabNet(cfg, ckpt["model"]["feature_table"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Scaler(**ckpt["scaler"]), dict(ckpt.get("meta", {}))


def checkpoint_path(data_dir: Path | str, dataset: str, features: str, recipe: str = "immi") -> Path:
    """:meth:`crabnet.layout.Layout.checkpoint`: ``models/<dataset>__<features>[__<recipe>].pt``."""
    return Layout(data_dir).checkpoint(dataset, features, recipe)


def training_meta(recipe: Recipe, hist: History, **extra) -> dict:
    """Checkpoint metadata of a training run: recipe, precision, history and ``extra`` fields."""
    return {
        **extra,
        "recipe": recipe_dict(recipe),
        "full_recipe": recipe.name if recipe.is_full() else None,
        "swa_rule": SWA.RULE,
        "precision": hist.precision,
        "epochs_run": hist.epochs_run,
        "stopped_early": hist.stopped_early,
        "swa_updates": hist.swa_updates,
        "swa_resets": hist.swa_resets,
        "final_weights": "swa" if hist.swapped_swa else "last",
        "train_seconds": round(hist.seconds, 1),
        "history": hist.per_epoch(),
        # under torchrun: the ranks that trained together (the dropout masks, and so the weights, depend on it)
        **({"ranks": distributed.world_size()} if distributed.world_size() > 1 else {}),
    }


def new_model(
    features: str, splits: dict[str, CompositionData], device: torch.device | str, seed: int
) -> tuple[CrabNet, Scaler]:
    """A freshly initialised model (seeded) for ``splits`` and the target scaler of its training split."""
    from crabnet.utils import seed_everything

    seed_everything(seed)
    model = build_model(features, n_elements=splits["train"].width).to(device)
    return model, Scaler.fit(splits["train"].target)


def save_trained(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    model: CrabNet,
    scaler: Scaler,
    hist: History,
    test: CompositionData,
    *,
    seed: int,
    written_by: str,
    beside_full: bool = False,
) -> tuple[Path, dict]:
    """Evaluate on ``test`` and save the checkpoint of a finished training at :func:`checkpoint_path`.

    ``beside_full``: if a checkpoint trained with a full recipe is already there, keep it and
    write ``…__attention.pt`` beside it (step 1's shorter attention run). Under torchrun every rank
    gets the metadata, and rank 0 alone writes the checkpoint.

    Returns:
        ``(path, meta)``.
    """
    pred, _ = predict(model, test, scaler)
    meta = training_meta(
        recipe,
        hist,
        dataset=dataset,
        features=features,
        seed=seed,
        test_mae=mae(pred, test.target),
        written_by=written_by,
    )
    path = checkpoint_path(data_dir, dataset, features, recipe.name)
    if beside_full and path.exists():
        try:
            full = bool(load_checkpoint(path)[2].get("full_recipe"))
        except Exception:  # an unreadable file is replaced
            full = False
        if full:
            path = path.with_name(f"{path.stem}__attention.pt")
    if distributed.is_main():
        save_checkpoint(path, model, scaler, meta)
    return path, meta


def train_and_save(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    splits: dict[str, CompositionData] | None = None,
    written_by: str = "",
    progress: bool | None = None,
    precision: str = "auto",
) -> tuple[CrabNet, Scaler, dict]:
    """Train a model on ``dataset`` with ``recipe`` and save it to :func:`checkpoint_path`.

    ``progress``: tqdm bar (None = only on a terminal, plain per-epoch lines elsewhere; True also
    when logging to a file). The training state is kept beside the checkpoint (``….state.pt``) while
    the run goes on (saved about once a minute, ``$CRABNET_STATE_EVERY_S`` seconds if set, and on
    SIGTERM), so an interrupted run started again with the same settings goes on from there (to the
    same result). The state file is removed at the end. Under torchrun (docs/distributed.md) the
    ranks train the model together and rank 0 writes the files.

    Returns:
        ``(model, scaler, meta)``; meta holds the recipe, test MAE and training history.
    """
    from crabnet.data import load_dataset

    device = distributed.init(device)  # under torchrun: join the process group; this rank's GPU
    if splits is None:
        with distributed.main_first():  # rank 0 fetches the datasets if they are missing
            splits = load_dataset(data_dir, dataset)
    model, scaler = new_model(features, splits, device, seed)
    state_path = Layout(data_dir).training_state(dataset, features, recipe.name)
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        seed=seed,
        desc=f"{dataset} {features}",
        progress=progress,
        state_path=state_path,
        state_key={"dataset": dataset, "features": features},
        precision=precision,
    )
    _, meta = save_trained(
        data_dir, dataset, features, recipe, model, scaler, hist, splits["test"], seed=seed, written_by=written_by
    )
    if distributed.is_main():
        state_path.unlink(missing_ok=True)
    return model, scaler, meta


def checkpoint_suits(meta: dict, recipe: Recipe) -> bool:
    """A full-recipe request needs a checkpoint trained with that full recipe and today's SWA rule
    (``SWA.RULE``); a shorter one takes any."""
    return not recipe.is_full() or (meta.get("full_recipe") == recipe.name and meta.get("swa_rule") == SWA.RULE)


def ensure_model(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    force: bool = False,
    written_by: str = "",
    precision: str = "auto",
) -> tuple[CrabNet, Scaler, dict]:
    """Load the checkpoint of ``recipe`` (:func:`checkpoint_path`) if it suits it, else train and save it.

    A checkpoint suits a full-recipe request only if it was itself trained with that full recipe
    and the current SWA rule (older checkpoints, made before the recipe followed the original exactly, do not); any
    checkpoint suits a shorter (e.g. ``--quick``) request. ``force`` always retrains.
    """
    path = checkpoint_path(data_dir, dataset, features, recipe.name)
    if path.exists() and not force:
        model, scaler, meta = load_checkpoint(path, device)
        if checkpoint_suits(meta, recipe):
            kind = f"full {meta['full_recipe']} recipe" if meta.get("full_recipe") else "short run"
            say(f"using {path} ({kind}, test MAE {meta.get('test_mae', float('nan')):.4g})")
            return model, scaler, meta
        say(f"{path} was not trained with the full {recipe.name} recipe: training it again")
    return train_and_save(
        data_dir, dataset, features, recipe, device=device, seed=seed, written_by=written_by, precision=precision
    )
