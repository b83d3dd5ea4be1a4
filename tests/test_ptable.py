"""Periodic tables per element (crabnet/explain/ptable.py): the aggregates by hand, the files, the up-to-date check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_faithfulness import FORMULAS, IgnoresSodium, capture_store

from crabnet.data import compositions_from_formulas
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.explain.faithfulness import attention_importance
from crabnet.explain.ptable import QUANTITIES, element_table, per_element, refresh_ptables, write_ptables
from crabnet.layout import Layout
from crabnet.training.recipe import Scaler

TRAIN = ["Na1Cl1", "Fe2O3", "Na2S1O4", "Ti1O2"]  # Na in 2 of 4, O in 3 of 4, Cl/Fe/S/Ti in 1 of 4


def test_per_element_counts_and_means_by_hand():
    z = lambda s: ATOMIC_NUMBER[s]  # noqa: E731
    elements = np.array([[z("Na"), z("Cl"), 0], [z("Fe"), z("O"), 0], [z("Na"), z("S"), z("O")], [z("Ti"), z("O"), 0]])
    count, _ = per_element(np.ones(4), elements)
    assert count[z("Na")] == 2 and count[z("O")] == 3 and count[z("Cl")] == 1 and count[z("H")] == 0
    assert count[0] == 0  # padding is no element
    # a value per slot: the mean over the compounds holding the element; NaN values are left out
    values = np.array([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0], [5.0, 6.0, np.nan], [7.0, 8.0, 9.0]])
    count, mean = per_element(values, elements)
    assert mean[z("Na")] == pytest.approx((1 + 5) / 2) and mean[z("O")] == pytest.approx((4 + 8) / 2)
    assert count[z("O")] == 2 and np.isnan(mean[z("H")])
    # a value per compound goes to each of its elements
    _, mean = per_element(np.array([10.0, 20.0, 30.0, 40.0]), elements)
    assert mean[z("O")] == pytest.approx(30.0) and mean[z("Na")] == pytest.approx(20.0)


@pytest.fixture
def store(tmp_path):
    """The stub's store (3 captures) with Shapley values, and a training split of TRAIN under benchmark_data/."""
    data = compositions_from_formulas(FORMULAS, np.arange(len(FORMULAS), dtype=np.float32))
    store = capture_store(
        tmp_path, IgnoresSodium(), data, Scaler(1.0, 2.0), steps=(0, 1, 2), attribution=("attribution", "shapley")
    )
    train = Layout(tmp_path).split_csv("synth", "train")
    train.parent.mkdir(parents=True)
    train.write_text("formula,target\n" + "".join(f"{f},{i}\n" for i, f in enumerate(TRAIN)))
    return store


def test_element_table_equals_a_hand_computation(store):
    train = compositions_from_formulas(TRAIN).elements
    test = compositions_from_formulas(["Na1Cl1", "K1Na1", "Fe2O3"]).elements, np.array([1.0, 3.0, 0.5])
    table = element_table(store, train=train, test=test, block_bytes=1).set_index("symbol")
    assert table.loc["Na", "prevalence"] == 0.5 and table.loc["O", "prevalence"] == 0.75
    assert table.loc["Na", "n_train"] == 2 and table.loc["Cl", "prevalence"] == 0.25
    assert table.loc["Cu", "n_train"] == 0 and table.loc["Cu", "n_captured"] == 1  # only in the store
    assert "H" not in table.index  # no source holds it
    # the captured split at its final capture, by hand over the compounds holding the element
    g = store.group
    shapley, attention, errors = {}, {}, {}
    for i in range(len(store)):
        k = int((store.elements[i] > 0).sum())
        imp = attention_importance(g["attention"][i, -1], store.fractions[i])
        for j in range(k):
            symbol = SYMBOLS[store.elements[i, j] - 1]
            shapley.setdefault(symbol, []).append(g["shapley"][i, -1, j])
            attention.setdefault(symbol, []).append(imp[j])
            errors.setdefault(symbol, []).append(abs(g["prediction"][i, -1] - store.targets[i]))
    for symbol in shapley:
        assert table.loc[symbol, "n_captured"] == len(shapley[symbol])
        assert table.loc[symbol, "shapley"] == pytest.approx(np.mean(shapley[symbol]), abs=1e-6)
        assert table.loc[symbol, "attention"] == pytest.approx(np.mean(attention[symbol]), abs=1e-6)
        assert table.loc[symbol, "mae"] == pytest.approx(np.mean(errors[symbol]), abs=1e-5)
    assert table.loc["Na", "n_captured"] == 6 and abs(table.loc["Na", "shapley"]) < 1e-4  # the stub ignores Na
    assert table.loc["Na", "test_mae"] == pytest.approx(2.0) and table.loc["Fe", "test_mae"] == 0.5
    assert np.isnan(table.loc["Cu", "test_mae"]) and table.loc["K", "n_test"] == 1


def test_step2_writes_the_tables_and_skips_them_when_up_to_date(store, tmp_path, capsys):
    layout = Layout(tmp_path)
    pred = layout.predictions("synth", "mat2vec")  # the store's features (none given: mat2vec)
    pred.parent.mkdir(parents=True)
    pd.DataFrame({"formula": ["Na1Cl1", "Fe2O3"], "target": [1.0, 2.0], "prediction": [1.5, 1.0]}).to_csv(pred)
    table, csv, pngs = write_ptables(store, tmp_path, "synth")
    assert csv == layout.ptable_csv("synth") and csv.is_file()
    assert list(pngs) == list(QUANTITIES)  # prevalence, attention, shapley, mae, test_mae
    for name, png in pngs.items():
        assert png == layout.ptable_figure("synth", name) and png.read_bytes()[:4] == b"\x89PNG"
        html = png.with_suffix(".html").read_text()
        assert "plotly.min.js" in html and "Plotly.newPlot" in html and QUANTITIES[name].label in html
    assert (layout.ptable_figures("synth") / "plotly.min.js").is_file()  # once, beside the pages
    written = pd.read_csv(csv).set_index("symbol")
    assert written.loc["Na", "prevalence"] == 0.5 and written.loc["Fe", "test_mae"] == pytest.approx(1.0)
    assert written.loc["Cl", "test_mae"] == pytest.approx(0.5)
    # up to date: newer than the store and the predictions; --force and newer predictions recompute
    store_time = (store.path / "zarr.json").stat().st_mtime
    refresh_ptables(store, tmp_path, "synth", store_time=store_time)
    assert "are newer than their inputs, kept" in capsys.readouterr().out
    refresh_ptables(store, tmp_path, "synth", force=True, store_time=store_time)
    assert "periodic tables (" in capsys.readouterr().out
    pred.touch()
    refresh_ptables(store, tmp_path, "synth", store_time=store_time)
    assert "periodic tables (" in capsys.readouterr().out
    # without predictions the test table goes (also its figure of the earlier run)
    pred.unlink()
    _, _, pngs = write_ptables(store, tmp_path, "synth")
    assert "test_mae" not in pngs and not layout.ptable_figure("synth", "test_mae").exists()


def test_a_store_without_shapley_values_gets_the_other_tables(tmp_path, capsys):
    data = compositions_from_formulas(FORMULAS)
    store = capture_store(tmp_path, IgnoresSodium(), data, Scaler(0.0, 1.0), attribution=("attribution",))
    assert not store.has_shapley
    refresh_ptables(store, tmp_path, "synth")
    out = capsys.readouterr().out
    assert "no shapley: no Shapley values" in out and "no prevalence: no training split" in out
    layout = Layout(tmp_path)
    assert layout.ptable_figure("synth", "attention").is_file() and layout.ptable_figure("synth", "mae").is_file()
    assert not layout.ptable_figure("synth", "shapley").exists()
    assert "shapley" not in pd.read_csv(layout.ptable_csv("synth")).columns
