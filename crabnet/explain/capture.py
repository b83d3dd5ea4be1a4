"""Attention captured during training: the capturing callback and step 1's job.

:func:`attention_job` is step 1 (``python get_training_attention.py``) as one job of ``crabnet.jobs.engine``:
the training with its captures, run in that process or sent to a Dask cluster with ``--scheduler``.
The store it writes is described in :mod:`crabnet.explain.store`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crabnet.data import CompositionData, load_dataset
from crabnet.explain.attribution import coalition_attribution, contribution_from_head, head_ablation
from crabnet.explain.store import ATTRIBUTIONS, HEAD_SAMPLE, PER_COMPOUND, AttentionWriter, partial_path
from crabnet.jobs import distributed
from crabnet.layout import Layout
from crabnet.progress import say
from crabnet.training.checkpoint import new_model, save_trained
from crabnet.training.model import CrabNet
from crabnet.training.recipe import Recipe, Scaler
from crabnet.utils import resolve_device


@dataclass(frozen=True)
class CaptureSettings:
    """Step 1's settings: stored as the capture store's attributes (a store made with other settings is
    made again) and the key of its training state (a state saved with other settings is not resumed)."""

    dataset: str
    features: str
    split: str  # the captured split
    capture: str  # "epoch" or "step"
    capture_every: int  # with capture "step": every k-th optimiser step
    epochs: int
    epochs_step: int
    seed: int
    drop_unary: bool
    batch_size: int  # 0: the recipe's rule
    recipe_name: str
    precision: str
    attribution: bool = True
    attributions: tuple[str, ...] = ATTRIBUTIONS

    def as_dict(self) -> dict:
        """The settings as the store's attributes hold them (JSON types)."""
        return {**asdict(self), "attributions": list(self.attributions)}


@torch.no_grad()
def capture_split(
    model: CrabNet,
    data: CompositionData,
    scaler: Scaler,
    writer: AttentionWriter,
    step: int,
    batch_size: int | None = None,
) -> np.ndarray:
    """Run the model on ``data`` with attention capture and store one capture. Returns predictions.

    Eval mode, no autograd, float32 (autocast disabled), no random numbers drawn: training goes on
    exactly as without capture. With ``writer.with_attribution`` the sub-compounds of each batch
    (all 2^k - 1 of a k-element compound, each distinct one once) follow its attention pass, giving
    the Shapley values and the leave-one-element-out attribution, and the head ablation runs on
    :data:`HEAD_SAMPLE` compounds (:func:`head_sample`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bs = batch_size or writer.chunk_n
    c = writer.begin_capture(step)
    n, with_attr = len(data), writer.with_attribution
    preds = np.empty(n, dtype=np.float64)
    extra = {name: np.zeros((n, writer.E), dtype=np.float32) for name in PER_COMPOUND if name in writer.kinds}
    with torch.autocast(device.type, enabled=False):
        for i in range(0, n, bs):
            el = torch.as_tensor(data.elements[i : i + bs], dtype=torch.long, device=device)  # (b, E)
            fr = torch.as_tensor(data.fractions[i : i + bs], dtype=torch.float32, device=device)  # (b, E)
            out = model.forward_internals(el, fr, attention=True, hidden="contribution" in extra)
            writer.write_batch(c, i, out.attention.float().cpu().numpy())  # (b, L, H, E, E)
            preds[i : i + bs] = out.output[:, 0].double().cpu().numpy()
            if with_attr:
                _attribute_batch(model, el, fr, out, scaler, extra, i, bs)
        pred = scaler.unscale(preds)
        writer.write_prediction(c, pred.astype(np.float32))
        if with_attr:
            if "head_effect" in writer.kinds:
                rows = head_sample(n)
                heads = head_ablation(model, data.elements[rows], data.fractions[rows], data.target[rows], scaler)
                extra.update(head_effect=heads["mae_change"], head_change=heads["mean_abs_change"])
            writer.write_attribution(c, **extra)
            writer.final_attrs["shapley_baseline"] = float(scaler.mean)
    model.train(was_training)
    return pred


def head_sample(n: int) -> np.ndarray:
    """The rows of a split of ``n`` compounds whose head ablation is measured: all, or :data:`HEAD_SAMPLE`
    drawn once with a fixed seed (the same at every capture), sorted."""
    if n <= HEAD_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, HEAD_SAMPLE, replace=False))


def _attribute_batch(model, el, fr, out, scaler, extra: dict[str, np.ndarray], i: int, bs: int) -> None:
    """The Shapley values, leave-one-out effects and output contributions of one batch into ``extra``."""
    ca = coalition_attribution(model, el, fr, scaler, float(scaler.mean), full=out.output[:, 0], batch_size=bs)
    extra["attribution"][i : i + bs] = ca.leave_one_out  # (b, E), target units
    if "shapley" in extra:
        extra["shapley"][i : i + bs] = ca.shapley  # (b, E)
    if "contribution" in extra:
        head_out = model.head(out.hidden[-1]).float()  # (b, E, 3), padding rows of no weight
        extra["contribution"][i : i + bs] = contribution_from_head(head_out, el > 0, scaler)  # (b, E)


class AttentionRecorder:
    """Training callback that captures the split before training and after every epoch or k-th step."""

    def __init__(
        self,
        model: CrabNet,
        data: CompositionData,
        scaler: Scaler,
        writer: AttentionWriter,
        mode: str = "epoch",
        every: int = 1,
    ):
        if mode not in ("epoch", "step"):
            raise ValueError(f"capture mode must be 'epoch' or 'step', got {mode!r}")
        if every < 1:
            raise ValueError(f"capture every must be >= 1, got {every}")
        self.model, self.data, self.scaler, self.writer = model, data, scaler, writer
        self.mode, self.every = mode, every
        self.last_prediction: np.ndarray | None = None

    def __call__(self, event: str, epoch: int, step: int) -> None:
        if event == "start":  # a run starting afresh: drop captures of a reopened staging store
            self.writer.restore([])
            value = 0
        elif event == "epoch" and self.mode == "epoch":
            value = epoch + 1
        elif event == "step" and self.mode == "step" and step % self.every == 0:
            value = step
        else:
            return
        self.last_prediction = capture_split(self.model, self.data, self.scaler, self.writer, value)

    def state_dict(self) -> dict:
        """Saved with the training state: which captures exist."""
        return {"steps": list(self.writer.steps)}

    def load_state_dict(self, state: dict) -> None:
        """On resume: keep the captures the saved training state had made."""
        self.writer.restore(state["steps"])


# --------------------------------------------------------------------------------------------
# step 1 as a job of crabnet.jobs.engine


def attention_job(
    data_dir: Path, recipe: Recipe, settings: CaptureSettings, device: str, force: bool, skip_invalid: bool
) -> dict:
    """Step 1 (``get_training_attention.py``) as one job: train a model while capturing attention.

    The model of ``settings.features`` is trained on ``settings.dataset`` with ``recipe``; the
    ``settings.split`` compounds are captured before training and after every epoch (or k-th step)
    into the dataset's attention store, which is then finalised; the model is saved (kept as
    ``…__attention.pt`` beside a full-recipe checkpoint). The training state is saved beside the store
    (``<store>.state.pt``): the same job started again goes on from there (``force`` starts afresh).
    Under torchrun every rank runs this job and they train together; rank 0 alone writes.

    Args:
        data_dir: the ``--data-dir`` root (a shared filesystem when the job runs on a cluster).
        recipe: the training recipe (epochs, batch size and learning-rate cycle already set).
        settings: the store's settings, kept in its attributes and compared by the up-to-date check.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        force: discard staged captures and a saved training state.
        skip_invalid: skip bad rows (reported) instead of raising.

    Returns:
        ``store``, ``checkpoint`` (paths as text), ``epochs_run``, ``train_s``, ``val_mae`` (last epoch),
        ``test_mae``, ``swa`` (SWA weights kept), and on rank 0 ``n_captures``, ``n_compounds``, ``reorganise_s``.

    Raises:
        KeyboardInterrupt: after saying where the captures are staged.
        Preempted: SIGTERM; the training state was saved (the message names the staged captures).
        DataError: a bad row (unless ``skip_invalid``).
    """
    dataset, features, split, seed = settings.dataset, settings.features, settings.split, settings.seed
    capture, capture_every = settings.capture, settings.capture_every
    store = Layout(data_dir).attention_store(dataset)
    dev = distributed.init(resolve_device(device))  # under torchrun: the process group; this rank's GPU
    with distributed.main_first():  # rank 0 fetches the datasets if they are missing
        splits = load_dataset(data_dir, dataset, drop_unary=settings.drop_unary, skip_invalid=skip_invalid)
    model, scaler = new_model(features, splits, dev, seed)
    say(
        f"{dataset}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test; "
        f"{features}, {model.n_params():,} parameters, {settings.epochs} epochs on {dev}; capturing {split} "
        f"({len(splits[split])} compounds) every {capture if capture_every == 1 else f'{capture_every} steps'}"
    )

    state_path = store.with_name(store.name + ".state.pt")
    writer, recorder = _open_capture(store, state_path, splits[split], model, scaler, settings, recipe, force)
    hist = _fit_capturing(model, splits, scaler, recipe, settings, recorder, state_path, partial_path(store))
    by, test = "get_training_attention.py", splits["test"]
    ckpt, meta = save_trained(data_dir, dataset, features, recipe, model, scaler, hist, test, seed=seed, written_by=by,
                              beside_full=True)  # fmt: skip
    result = {
        "store": str(store),
        "checkpoint": str(ckpt),
        "epochs_run": hist.epochs_run,
        "train_s": hist.seconds,
        "val_mae": hist.val_mae[-1] if hist.val_mae else float("nan"),
        "test_mae": meta["test_mae"],
        "swa": bool(hist.swapped_swa),
    }
    if writer is None:  # a rank other than 0: rank 0 writes the store
        return result
    return {**result, **_finish(writer, state_path, hist, meta["test_mae"])}


def _finish(writer: AttentionWriter, state_path: Path, hist: Any, test_mae: float) -> dict:
    """Drop the training state and write the final store; what that took."""
    state_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    writer.finalize(_run_attrs(hist, test_mae))
    return {"n_captures": writer.n_captures, "n_compounds": writer.n, "reorganise_s": time.perf_counter() - t0}


def print_result(r: dict, store: Path) -> None:
    """What :func:`attention_job` made (or that the store was up to date)."""
    if r.get("up_to_date"):
        say(f"{store} is up to date (same settings); use --force to recompute")
        return
    say(
        f"attention: {r['n_captures']} captures x {r['n_compounds']} compounds -> {r['store']} "
        f"(reorganised in {r['reorganise_s']:.1f} s)"
    )
    say(
        f"model -> {r['checkpoint']}\n{r['epochs_run']} epochs in {r['train_s']:.1f} s; "
        f"val MAE {r['val_mae']:.4g} (last epoch), test MAE {r['test_mae']:.4g} "
        f"({'SWA weights' if r['swa'] else 'last weights'})"
    )


def _fit_capturing(model, splits, scaler, recipe, settings: CaptureSettings, recorder, state_path: Path, staged: Path):
    """Train with the capturing callback; an interruption says where the captures are staged."""
    import sys

    from crabnet.jobs.signals import Preempted
    from crabnet.training.loop import fit

    desc = f"{settings.dataset} {settings.features}"
    try:
        return fit(model, splits["train"], splits["val"], scaler, recipe, seed=settings.seed, callback=recorder,
                   precision=settings.precision, desc=desc, state_path=state_path,
                   state_key=settings.as_dict())  # fmt: skip
    except KeyboardInterrupt:
        say(
            f"\ninterrupted: captures staged in {staged} (incomplete, not used by later steps); "
            f"the same command goes on from the last saved epoch ({state_path.name})",
            file=sys.stderr,
        )
        raise
    except Preempted as err:  # SIGTERM: fit saved its state; crabnet.jobs.cli.run prints this and exits 143
        raise Preempted(f"{err}; captures staged in {staged}") from None


def _open_capture(
    store: Path,
    state_path: Path,
    data: CompositionData,
    model,
    scaler,
    settings: CaptureSettings,
    recipe: Recipe,
    force: bool,
) -> tuple[AttentionWriter | None, AttentionRecorder | None]:
    """The store's writer and the training callback that captures into it (on rank 0 only; else None, None)."""
    from crabnet.training.recipe import recipe_dict

    if not distributed.is_main():  # under torchrun rank 0 alone captures (the others wait in the next step)
        return None, None
    cfg = model.cfg
    attrs = {**settings.as_dict(), "model_config": cfg.to_dict(), "recipe": recipe_dict(recipe)}
    writer = AttentionWriter(store, data, cfg.n_layers, cfg.n_heads, attrs, resume=not force)
    if not writer.resumed:
        state_path.unlink(missing_ok=True)  # a state without its captures cannot be resumed
    every = settings.capture_every
    return writer, AttentionRecorder(model, data, scaler, writer, mode=settings.capture, every=every)


def _run_attrs(hist, test_mae: float) -> dict:
    """What the finished store says of the training that made it."""
    return {
        "epochs_run": hist.epochs_run,
        "stopped_early": hist.stopped_early,
        "swa_updates": hist.swa_updates,
        "final_weights": "swa" if hist.swapped_swa else "last",
        "precision_used": hist.precision,
        "test_mae": test_mae,
        "train_seconds": round(hist.seconds, 2),
        **({"ranks": distributed.world_size()} if distributed.world_size() > 1 else {}),  # under torchrun
    }


# --------------------------------------------------------------------------------------------
# reading
