"""Predictions of a model over a split in batches, the MAE, and the validator the training loop calls."""

from __future__ import annotations

import numpy as np
import torch

from crabnet.data import CompositionData
from crabnet.jobs import distributed
from crabnet.training.model import CrabNet, real_slots
from crabnet.training.recipe import Scaler, autocast, resolve_precision


def to_tensors(data: CompositionData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(elements, fractions, target) of a split as tensors on ``device``."""
    return (
        torch.as_tensor(data.elements, dtype=torch.long, device=device),
        torch.as_tensor(data.fractions, dtype=torch.float32, device=device),
        torch.as_tensor(data.target, dtype=torch.float32, device=device),
    )


@torch.no_grad()
def forward_batches(
    model: CrabNet,
    el: torch.Tensor,
    fr: torch.Tensor,
    batch_size: int,
    precision: str,
    real: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Raw outputs (n, 3) in float32 for tensors already on the model's device (eval mode).

    ``real``: the real slots of each batch (:func:`crabnet.training.model.real_slots`), if known.
    """
    was_training = model.training
    model.eval()
    with autocast(precision, el.device):
        out = (
            torch.cat(
                [
                    model(
                        el[i : i + batch_size],
                        fr[i : i + batch_size],
                        real=None if real is None else real[i // batch_size],
                    )
                    for i in range(0, len(el), batch_size)
                ]
            )
            if len(el)
            else torch.empty(0, 3)
        )
    model.train(was_training)
    return out.float()


def predict(
    model: CrabNet,
    data: CompositionData,
    scaler: Scaler,
    *,
    batch_size: int = 4096,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and uncertainties (in target units) for every compound of ``data``.

    ``precision`` "fp32" (default, the same answer on every machine) or "bf16"/"auto".
    """
    device = device or next(model.parameters()).device
    el, fr, _ = to_tensors(data, device)
    out = forward_batches(model, el, fr, batch_size, resolve_precision(precision, device)).double().cpu()
    pred = scaler.unscale(out[:, 0].numpy())
    unc = torch.exp(out[:, 2]).numpy() * scaler.std
    return pred, unc


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))))


class Validator:
    """Validation MAE of the current weights, as fast as the recipe allows.

    SWA epochs evaluate the validation split after every batch, so the split is moved to the
    device once and evaluated in large batches without autograd at the training precision.
    Under torchrun (:mod:`crabnet.jobs.distributed`) each rank evaluates a contiguous share of the split
    and the absolute errors are summed over the ranks: every rank gets the same MAE.
    """

    def __init__(self, data: CompositionData, scaler: Scaler, device: torch.device, batch_size: int, precision: str):
        self.n, self.world = len(data), distributed.world_size()
        if self.world > 1:  # this rank's rows [lo, hi) of the split
            r = distributed.rank()
            data = data.subset(np.arange(self.n * r // self.world, self.n * (r + 1) // self.world))
        self.el, self.fr, _ = to_tensors(data, device)
        self.target = np.asarray(data.target, np.float64)
        self.scaler, self.batch_size, self.precision = scaler, batch_size, precision
        # off the CPU each batch's real slots are found once, here, so the passes need no host synchronisation
        self.real = (
            None
            if torch.device(device).type == "cpu"
            else [real_slots(data.elements[i : i + batch_size], device) for i in range(0, len(data), batch_size)]
        )

    def __call__(self, model: CrabNet) -> float:
        out = forward_batches(model, self.el, self.fr, self.batch_size, self.precision, self.real)
        pred = self.scaler.unscale(out[:, 0].double().cpu().numpy())
        if self.world == 1:
            return mae(pred, self.target)
        error = torch.tensor([float(np.abs(pred - self.target).sum())], dtype=torch.float64)
        return float(distributed.all_reduce(error)[0]) / self.n if self.n else float("nan")
