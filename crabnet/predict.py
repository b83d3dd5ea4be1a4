"""Predict new compositions with a trained checkpoint: train once, predict many times.

From Python::

    from crabnet import load_model
    model = load_model("data/models/aflow__ael_bulk_modulus_vrh__mat2vec.pt")
    model.predict(["Fe2O3", "Li0.5Co0.5O2"])   # DataFrame: formula, prediction, uncertainty

From a terminal::

    python -m crabnet.predict --model data/models/mp_bulk_modulus__mat2vec.pt Fe2O3 "Ca(OH)2"
    python -m crabnet.predict --model data/models/mp_bulk_modulus__mat2vec.pt --csv new.csv --out pred.csv

``prediction`` and ``uncertainty`` are in the units of the training target; the uncertainty is the
model's own estimate (exp of its log-uncertainty output, the scale of the RobustL1 loss), not a
calibrated interval. Formulas are parsed as for the datasets; a bad one stops with an error that
names it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from crabnet.data import compositions_from_formulas, read_text_table
from crabnet.errors import DataError
from crabnet.progress import say
from crabnet.training.checkpoint import load_checkpoint
from crabnet.training.evaluate import predict
from crabnet.training.model import CrabNet
from crabnet.training.recipe import Scaler
from crabnet.utils import atomic_path, resolve_device


@dataclass
class TrainedModel:
    """A trained CrabNet with its target scaler and checkpoint metadata."""

    model: CrabNet
    scaler: Scaler
    meta: dict

    def predict(self, formulas: list[str] | str, *, batch_size: int = 4096) -> pd.DataFrame:
        """Predictions for ``formulas`` (in the given order).

        Returns:
            DataFrame with columns ``formula``, ``prediction`` and ``uncertainty``.

        Raises:
            DataError: a formula cannot be parsed (the message names it).
        """
        formulas = [formulas] if isinstance(formulas, str) else list(formulas)
        if not formulas:
            return pd.DataFrame({"formula": [], "prediction": [], "uncertainty": []})
        data = compositions_from_formulas(formulas)
        pred, unc = predict(self.model, data, self.scaler, batch_size=batch_size)
        return pd.DataFrame({"formula": formulas, "prediction": pred, "uncertainty": unc})


def load_model(path: Path | str, device: str = "cpu") -> TrainedModel:
    """Load a checkpoint written by any step (``models/<dataset>__<features>[__npj].pt``)."""
    model, scaler, meta = load_checkpoint(path, resolve_device(device))
    return TrainedModel(model, scaler, meta)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m crabnet.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("formulas", nargs="*", metavar="FORMULA", help="formulas to predict")
    p.add_argument("--model", type=Path, required=True, help="checkpoint (.pt) written by a training step")
    p.add_argument("--csv", type=Path, default=None, help="also predict the 'formula' column of this CSV")
    p.add_argument("--out", type=Path, default=None, help="write the table to this CSV (default: print it)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default: cpu")
    return p.parse_args(argv)


def main(formulas: list[str], model: Path, csv: Path | None, out: Path | None, device: str) -> int:
    try:
        formulas = list(formulas) + (list(read_text_table(csv, ("formula",))["formula"]) if csv else [])
        if not formulas:
            raise DataError("no formulas given (pass FORMULA arguments or --csv)")
        table = load_model(model, device).predict(formulas)
    except (DataError, FileNotFoundError, RuntimeError) as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    if out is None:
        say(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    else:
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
        say(f"{len(table)} predictions -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
