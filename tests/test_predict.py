"""The predict API and its command line: train once (tiny), predict new formulas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crabnet import load_model
from crabnet.data import compositions_from_formulas, load_dataset
from crabnet.errors import DataError
from crabnet.training.checkpoint import save_checkpoint
from crabnet.training.evaluate import predict
from crabnet.training.loop import fit
from crabnet.training.recipe import Scaler, build_model, make_recipe
from crabnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.conftest import write_dataset

    root = tmp_path_factory.mktemp("predict")
    write_dataset(root)
    splits = load_dataset(root, "tiny", fetch=False, verbose=False)
    seed_everything(0)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    fit(model, splits["train"], splits["val"], scaler, make_recipe("immi", epochs=2, batch_size=16), progress=False)
    return save_checkpoint(root / "models" / "tiny__onehot.pt", model, scaler, {"dataset": "tiny"}), model, scaler


def test_load_model_predicts_like_the_trained_model(checkpoint):
    path, model, scaler = checkpoint
    formulas = ["Fe2O3", "Li0.5Co0.5O2", "NaCl", "Ca(OH)2"]
    table = load_model(path).predict(formulas)
    assert list(table.columns) == ["formula", "prediction", "uncertainty"]
    assert table["formula"].tolist() == formulas
    pred, unc = predict(model, compositions_from_formulas(formulas), scaler)
    np.testing.assert_allclose(table["prediction"], pred, rtol=1e-6)
    np.testing.assert_allclose(table["uncertainty"], unc, rtol=1e-6)
    assert (table["uncertainty"] > 0).all()


def test_bad_formula_names_it(checkpoint):
    with pytest.raises(DataError, match="Xx2"):
        load_model(checkpoint[0]).predict(["Fe2O3", "Xx2"])


def test_command_line(checkpoint, tmp_path):
    path = checkpoint[0]
    (tmp_path / "in.csv").write_text("formula\nAl2O3\nMgO\n")
    out = tmp_path / "out.csv"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "crabnet.predict",
            "--model",
            str(path),
            "Fe2O3",
            "--csv",
            str(tmp_path / "in.csv"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out)
    assert table["formula"].tolist() == ["Fe2O3", "Al2O3", "MgO"]
    expected = load_model(path).predict(["Fe2O3", "Al2O3", "MgO"])
    np.testing.assert_allclose(table["prediction"], expected["prediction"], rtol=1e-5)
    bad = subprocess.run(
        [sys.executable, "-m", "crabnet.predict", "--model", str(path), "fe2o3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "fe2o3" in bad.stderr and "Traceback" not in bad.stderr
