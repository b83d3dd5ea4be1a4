"""The training record (:class:`History`) and the training state that lets an interrupted training resume.

The state (``<checkpoint or store>.state.pt``) holds the weights, the optimiser, SWA and RNG states, the
history and, when stopped inside an epoch, that epoch's batch order and loss so far; it is saved every
``CRABNET_STATE_EVERY_S`` seconds (default 60) and on SIGTERM, and read back only by a run with the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crabnet.errors import UsageError
from crabnet.progress import say
from crabnet.training.model import CrabNet
from crabnet.training.optim import SWA, Lookahead
from crabnet.utils import atomic_path


@dataclass
class History:
    """What happened during ``fit``; the per-epoch lists have one entry per epoch run."""

    epochs_run: int = 0
    steps: int = 0
    precision: str = "fp32"
    train_loss: list[float] = field(default_factory=list)
    val_mae: list[float] = field(default_factory=list)  # NaN where not computed (val_every)
    epoch_lr: list[float] = field(default_factory=list)  # learning rate of the epoch's last batch
    epoch_swa: list[int] = field(default_factory=list)  # SWA additions in the epoch (-1: no SWA check)
    lr: list[float] = field(default_factory=list)  # learning rate of every optimiser step
    swa_updates: int = 0
    swa_failures: int = 0  # SWA epochs in which no batch was averaged
    swa_resets: int = 0
    stopped_early: bool = False
    swapped_swa: bool = False
    seconds: float = 0.0

    def per_epoch(self) -> dict:
        """The per-epoch curves as a dict of lists (for checkpoints and learning-curve figures)."""
        return {
            "epoch": list(range(1, self.epochs_run + 1)),
            "train_loss": self.train_loss,
            "val_mae": self.val_mae,
            "lr": self.epoch_lr,
            "swa_updates": [max(0, a) for a in self.epoch_swa],
            "swa_check": [a >= 0 for a in self.epoch_swa],
        }


# Callback events: ("start", epoch=-1, step=0), ("step", epoch, step), ("epoch", epoch, step).
# A callback with ``state_dict()``/``load_state_dict(state)`` has its state saved with the training
# state and restored on resume (instead of receiving "start" again).
Callback = Callable[[str, int, int], None]

SAVE_EVERY_S = 60.0  # default interval between saves of the training state
STATE_EVERY_ENV = "CRABNET_STATE_EVERY_S"  # environment variable overriding it (seconds; 0 = every epoch)


def state_save_interval() -> float:
    """Seconds between saves of the training state: ``$CRABNET_STATE_EVERY_S`` if set (a float >= 0;
    0 = after every epoch), else :data:`SAVE_EVERY_S` (60 s).

    Raises:
        UsageError: the variable is set but is not a number >= 0.
    """
    raw = os.environ.get(STATE_EVERY_ENV, "").strip()
    if not raw:
        return SAVE_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"{STATE_EVERY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def save_training_state(
    path: Path | str,
    *,
    key: dict,
    epoch: int,
    model: CrabNet,
    optimizer: Lookahead,
    swa: SWA,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    hist: History,
    callback_state: dict | None = None,
    partial: dict | None = None,
    rank_rng: list[dict] | None = None,
) -> None:
    """Everything ``fit`` needs to go on after ``epoch`` exactly as if it had not stopped.

    ``partial``: a stop inside the next epoch (SIGTERM) also saves how far that epoch went (batches
    done, the epoch's order, loss sum and SWA additions so far); ``fit`` goes on from that batch.
    ``rank_rng``: under torchrun, every rank's random-number state (:func:`rng_state`, in rank order;
    the ranks draw their own dropout masks).
    Plain tensors, numbers and strings only (loadable with ``weights_only=True``); written to a
    temporary file and renamed, so an interruption while saving leaves the previous state intact.
    """
    device = next(model.parameters()).device
    state = {
        "key": key,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "swa": swa.state_dict(),
        "gen": gen.get_state(),
        "noise_gen": noise_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "history": asdict(hist),
        "callback": callback_state or {},
        "partial": partial or {},
        **({"rank_rng": rank_rng} if rank_rng else {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path | str, key: dict) -> dict | None:
    """The state saved by :func:`save_training_state` if it was written for ``key``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        say(f"ignoring {path}: it was saved by a run with other settings")
        return None
    return state


def restore_training_state(
    state: dict,
    model: CrabNet,
    optimizer: Lookahead,
    swa: SWA,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    callback=None,
) -> tuple[History, int, dict]:
    """Load a state of :func:`save_training_state` into ``fit``'s objects (``callback``: a stateful one).

    Returns:
        ``(history, first epoch to run, partial)``; ``partial`` is empty unless the state was saved
        inside that epoch (then it holds the batches done, the order, loss sum and SWA additions).
    """
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    swa.load_state_dict(state["swa"])
    gen.set_state(state["gen"])
    noise_gen.set_state(state["noise_gen"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if callback is not None:
        callback.load_state_dict(state["callback"])
    partial = dict(state.get("partial") or {})
    if partial:
        partial["order"], partial["loss_sum"] = partial["order"].to(device), partial["loss_sum"].to(device)
    return History(**state["history"]), int(state["epoch"]) + 1, partial


def rng_state(device: torch.device) -> dict:
    """The random-number state that drives dropout (PyTorch's CPU generator, and the GPU's on CUDA)."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back a state of :func:`rng_state`."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)
