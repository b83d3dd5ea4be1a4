"""Q/K/V element embeddings (crabnet.embeddings) and get_crabnet_embeddings.py."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

import get_crabnet_embeddings as gce
from crabnet.elements import SYMBOLS, feature_table
from crabnet.embeddings import (
    element_qkv,
    embedding_frames,
    embedding_path,
    predictions_frame,
    read_embedding_csv,
    write_embeddings,
    write_predictions,
)
from crabnet.jobs.cli import run
from crabnet.layout import BENCHMARK_DATASETS
from crabnet.reference import published_mae
from crabnet.training.recipe import build_model
from crabnet.utils import seed_everything

SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


def small_model(features: str = "onehot", seed: int = 0):
    seed_everything(seed)
    return build_model(features, **SMALL).eval()


def test_qkv_shapes_and_frames():
    model = small_model()
    qkv = element_qkv(model)
    assert qkv.shape == (3, 3, 118, 32) and qkv.dtype == np.float32
    frames = embedding_frames(model)
    assert sorted(frames) == [(layer, k) for layer in range(3) for k in ("K", "Q", "V")]
    for (layer, k), frame in frames.items():
        assert frame.shape == (118, 32)
        assert list(frame.index) == list(SYMBOLS) and frame.index.name == "element"
        np.testing.assert_array_equal(frame.to_numpy(), qkv[layer, "QKV".index(k)])
    assert not np.allclose(frames[(0, "Q")], frames[(0, "K")])  # really three different projections


def test_qkv_is_in_projection_of_layer_input():
    """[Q|K|V] = x_l W_in^T + b_in with x_l the input of layer l (fraction 1, single element)."""
    model = small_model()
    z = torch.tensor([[26], [8]])
    frac = torch.ones(2, 1)
    with torch.no_grad():
        x = model.encode_input(z, frac)  # input of layer 0
        w, b = model.layers[0].self_attn.in_proj_weight, model.layers[0].self_attn.in_proj_bias
        expected0 = (x @ w.T + b)[:, 0]  # (2, 96)
        x1, _ = model.layers[0](x, z > 0)  # input of layer 1
        w1, b1 = model.layers[1].self_attn.in_proj_weight, model.layers[1].self_attn.in_proj_bias
        expected1 = (x1 @ w1.T + b1)[:, 0]
    qkv = element_qkv(model, [26, 8])
    for layer, exp in ((0, expected0), (1, expected1)):
        got = np.concatenate([qkv[layer, 0], qkv[layer, 1], qkv[layer, 2]], axis=1)
        np.testing.assert_allclose(got, exp.numpy(), rtol=1e-5, atol=1e-6)


def test_rows_independent_of_batch_position():
    model = small_model()
    ordered = element_qkv(model)
    rng = np.random.default_rng(1)
    order = rng.permutation(118) + 1
    shuffled = element_qkv(model, order)
    # the same element gives the same row wherever it sits in the batch
    np.testing.assert_array_equal(shuffled, ordered[:, :, order - 1])
    # ... and, to rounding, whatever the batch size
    np.testing.assert_allclose(element_qkv(model, [26], batch_size=1)[:, :, 0], ordered[:, :, 25], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(element_qkv(model, batch_size=7), ordered, rtol=1e-5, atol=1e-5)
    assert model.training is False


def test_dropout_off_and_training_mode_restored():
    model = small_model().train()
    a = element_qkv(model)
    b = element_qkv(model)
    np.testing.assert_array_equal(a, b)  # eval mode inside: no dropout noise
    assert model.training is True


def test_absent_elements_are_blank_rows(tmp_path):
    model = small_model("magpie")  # magpie covers 97 elements
    _, present = feature_table("magpie")
    frames = embedding_frames(model)
    frame = frames[(2, "V")]
    absent = [s for z, s in enumerate(SYMBOLS, start=1) if not present[z]]
    assert "Og" in absent and len(absent) == 118 - 97
    assert frame.loc[absent].isna().all().all() and frame.drop(index=absent).notna().all().all()
    paths = write_embeddings(frames, tmp_path, "magpie", "tiny")
    assert len(paths) == 9 and paths[0] == embedding_path(tmp_path, "magpie", "tiny", 0, "K")
    lines = embedding_path(tmp_path, "magpie", "tiny", 2, "V").read_text().splitlines()
    assert lines[0].startswith("element,0,1,") and len(lines) == 119
    assert lines[-1] == "Og" + "," * 32  # blanks, not zeros or NaN text
    back = read_embedding_csv(paths[-1])
    assert back.shape == (118, 32) and back.loc["Og"].isna().all()
    np.testing.assert_allclose(back.loc["Fe"].to_numpy(), frame.loc["Fe"].to_numpy(), rtol=1e-6)


def test_published_mae(tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("dataset,n_test,crabnet,hotcrab,roost\nds_a,10,1.5,2.5,\nds_b,5,0.1,0.2,0.3\n")
    assert published_mae("ds_a", "mat2vec", ref) == 1.5
    assert published_mae("ds_a", "onehot", ref) == 2.5
    assert published_mae("ds_b", "roost", ref) == 0.3
    assert published_mae("ds_a", "roost", ref) is None  # blank cell
    assert published_mae("nope", "mat2vec", ref) is None
    assert published_mae("ds_a", "mat2vec", tmp_path / "missing.csv") is None
    # the shipped table: the published CrabNet / HotCrab MAE of the npj paper
    assert published_mae("aflow__ael_bulk_modulus_vrh", "mat2vec") == pytest.approx(8.6918, abs=1e-4)
    assert published_mae("mp_bulk_modulus", "onehot") == pytest.approx(11.92, abs=0.01)


def test_predictions_frame_roundtrip(tmp_path):
    frame = predictions_frame(["Fe2O3", "NaCl"], [1.0, 2.0], [1.5, 1.75], [0.1, 0.2])
    path = write_predictions(frame, tmp_path / "p" / "x.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == ["formula", "target", "prediction", "uncertainty"]
    assert back["formula"].tolist() == ["Fe2O3", "NaCl"] and back["prediction"].tolist() == [1.5, 1.75]


def test_expand_datasets():
    assert len(BENCHMARK_DATASETS) == 18 == len(set(BENCHMARK_DATASETS))
    assert gce.expand_datasets(["all", "mp_bulk_modulus", "mine"], quick=False) == [*BENCHMARK_DATASETS, "mine"]
    assert gce.expand_datasets(None, quick=True) == ["aflow__ael_bulk_modulus_vrh"]
    assert gce.expand_datasets(None, quick=False) == ["aflow__ael_bulk_modulus_vrh", "mp_bulk_modulus"]


def test_script_trains_writes_and_reuses(tiny_data, capsys):
    kw = dict(
        data_dir=tiny_data,
        dataset=["tiny"],
        device="cpu",
        seed=0,
        quick=False,
        force=False,
        features=["onehot"],
        epochs=1,
        epochs_step=1,
    )
    assert gce.main(**kw) == 0
    out = capsys.readouterr().out
    assert (tiny_data / "models" / "tiny__onehot.pt").is_file()
    for layer in range(3):
        for k in "QKV":
            frame = read_embedding_csv(embedding_path(tiny_data, "onehot", "tiny", layer, k))
            assert frame.shape == (118, 512) and frame.notna().all().all()
    pred = pd.read_csv(tiny_data / "predictions" / "tiny__onehot__test.csv")
    assert list(pred.columns) == ["formula", "target", "prediction", "uncertainty"] and len(pred) == 24
    assert np.isfinite(pred[["prediction", "uncertainty"]].to_numpy()).all() and (pred["uncertainty"] > 0).all()
    assert "test MAE" in out and "tiny" in out and "short (1 epochs)" in out
    mae = float(np.mean(np.abs(pred["prediction"] - pred["target"])))
    assert f"{mae:9.4g}" in out

    before = (tiny_data / "models" / "tiny__onehot.pt").stat().st_mtime_ns
    assert gce.main(**kw) == 0  # outputs up to date: the job is not run again
    assert "1 of 1 models up to date, not scheduled" in capsys.readouterr().out
    (tiny_data / "predictions" / "tiny__onehot__test.csv").unlink()
    assert gce.main(**kw) == 0  # a short request reuses the existing checkpoint to write what is missing
    assert "using" in capsys.readouterr().out
    assert (tiny_data / "models" / "tiny__onehot.pt").stat().st_mtime_ns == before


def test_script_missing_dataset_clear_error(tmp_path, capsys):
    (tmp_path / "benchmark_data" / "aflow__Egap").mkdir(parents=True)  # so nothing is fetched
    rc = run(
        gce.main,
        argparse.Namespace(
            data_dir=tmp_path,
            dataset=["nope"],
            device="cpu",
            seed=0,
            quick=False,
            force=False,
            features=["onehot"],
            epochs=1,
            epochs_step=1,
        ),
    )
    assert rc == 2 and "dataset 'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "embeddings").exists()


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit):
        gce.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "default: data" in out and "'all'" in out and "Next" in out and "published" in out
