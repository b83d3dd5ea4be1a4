"""Steps 6 and 7: representation collection, pooling, oxidation alignment, UMAP settings, metrics, scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_dataset

import plot_global_edm_umap as pg
import plot_local_edm_umap as pl
from crabnet import oxidation as oxm
from crabnet.data import compositions_from_formulas, load_dataset
from crabnet.maps import figures as up
from crabnet.maps import projection as proj
from crabnet.maps import steps as em
from crabnet.maps.vectors import collect, open_store, pool_elements, value_vectors
from crabnet.training.checkpoint import checkpoint_path, save_checkpoint
from crabnet.training.evaluate import predict
from crabnet.training.recipe import Scaler, build_model
from crabnet.utils import available_cpus, seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


def tiny_model(seed: int = 0):
    seed_everything(seed)
    return build_model("onehot", **SMALL).eval()


# --------------------------------------------------------------------------------------------
# pooling and local vectors


def test_pooling_ignores_padding():
    model = tiny_model()
    data = compositions_from_formulas(["Fe2O3", "NaCl", "LiCoO2", "Al2MgO4"])
    outs = []
    for width in (4, 8):
        d = data.padded(width)
        el = torch.as_tensor(d.elements)
        fr = torch.as_tensor(d.fractions)
        with torch.no_grad():
            hidden = model.forward_internals(el, fr, hidden=True).hidden
        outs.append([pool_elements(h, el > 0) for h in hidden])
        # padding rows of the layer inputs are not zero, so a naive pooling would differ
        naive = hidden[0].mean(1)
        assert not torch.allclose(naive, outs[-1][0][:, : SMALL["d_model"]], atol=1e-4)
    for a, b in zip(*outs):
        assert a.shape == (4, 5 * SMALL["d_model"])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pooling_statistics_by_hand():
    h = torch.tensor([[[1.0, 10.0], [3.0, -2.0], [99.0, 99.0]]])  # third row is padding
    keep = torch.tensor([[True, True, False]])
    got = pool_elements(h, keep)[0].tolist()
    # mean, range, variance (population), max, min for each of the 2 channels
    assert got == pytest.approx([2.0, 4.0, 2.0, 12.0, 1.0, 36.0, 3.0, 10.0, 1.0, -2.0])


def test_local_vectors_come_from_the_atoms_own_position(tmp_path):
    model = tiny_model()
    formulas = ["Fe2O3", "FeO3", "Fe3O", "NaFeO2", "Li2Fe1Cl5", "NaCl"]  # Fe at positions 1, 1, 0, 2, 2, absent
    data = compositions_from_formulas(formulas, np.arange(len(formulas), dtype=float)).padded(5)
    store = collect(model, data, Scaler(0.0, 1.0), tmp_path / "c", local={0: [26], 2: [26, 8]}, batch_size=2)
    idx, pos = store.compounds.rows_with(26)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert pos.tolist() == [1, 1, 0, 2, 2]  # descending amount, ties in order of appearance
    for layer in (0, 2):
        vec = store.local(26, layer)
        assert vec.shape == (5, SMALL["d_model"])
        for r, (i, p) in enumerate(zip(idx, pos)):
            # the same compound alone, without padding
            k = int((data.elements[i] > 0).sum())
            el = torch.as_tensor(data.elements[i : i + 1, :k])
            fr = torch.as_tensor(data.fractions[i : i + 1, :k])
            with torch.no_grad():
                h = model.forward_internals(el, fr, hidden=True).hidden[layer]
                v = value_vectors(model, h, layer)[0]
            np.testing.assert_allclose(vec[r], v[p].numpy(), rtol=1e-4, atol=1e-5)
            other = [q for q in range(k) if q != p]
            assert not np.allclose(vec[r], v[other[0]].numpy(), atol=1e-3)
    assert store.local(8, 2).shape == (4, SMALL["d_model"])  # O in the first four


def test_collect_global_cached_and_predictions(tiny_data):
    model = tiny_model()
    data = load_dataset(tiny_data, "tiny", splits=("test",), fetch=False)["test"]
    scaler = Scaler(2.0, 3.0)
    folder = tiny_data / "cache"
    store = collect(model, data, scaler, folder, global_layers=[0, 3], batch_size=7)
    assert store.global_(0).shape == (len(data), 5 * SMALL["d_model"])
    assert store.global_(3).shape == (len(data), 5 * SMALL["d_model"])
    pred, _ = predict(model, data, scaler)
    np.testing.assert_allclose(store.compounds.prediction, pred, rtol=1e-5)
    assert store.compounds.formula.dtype.kind == "U"
    mtime = store.path("global__layer0").stat().st_mtime_ns
    collect(model, data, scaler, folder, global_layers=[0, 1])
    assert store.path("global__layer0").stat().st_mtime_ns == mtime  # reused, not recomputed
    assert store.has("global__layer1")
    assert not list(folder.glob(".*partial*"))
    with pytest.raises(ValueError, match="0..3"):
        collect(model, data, scaler, folder, global_layers=[4])
    with pytest.raises(ValueError, match="0..2"):
        collect(model, data, scaler, folder, local={3: [8]})


def test_store_key_follows_checkpoint(tiny_data):
    model = tiny_model()
    ckpt = save_checkpoint(checkpoint_path(tiny_data, "tiny", "onehot"), model, Scaler(0, 1))
    csv = tiny_data / "benchmark_data" / "tiny" / "test.csv"
    a = open_store(tiny_data, "tiny", "onehot", "test", ckpt, csv)
    assert open_store(tiny_data, "tiny", "onehot", "test", ckpt, csv).folder == a.folder
    save_checkpoint(ckpt, tiny_model(seed=1), Scaler(0, 1))
    b = open_store(tiny_data, "tiny", "onehot", "test", ckpt, csv)
    assert b.folder != a.folder and not a.folder.exists()  # the stale cache is removed


# --------------------------------------------------------------------------------------------
# oxidation states, electronegativity, colourings


def test_oxidation_alignment_by_formula(tmp_path):
    path = oxm.oxidation_path(tmp_path, "tiny", "test")
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"Hf1O2": {"Hf": 4.0, "O": -2.0}, "Fe2O3": {"Fe": 3.0, "O": -2.0}, "CuZn": None, "Zz": {"Zz": 1}})
    )
    guesses = oxm.load_oxidation(path)
    formulas = ["NaCl", "HfO2", "O3Fe2", "Fe4O6", "ZnCu"]  # reordered, differently written, absent
    np.testing.assert_array_equal(oxm.oxidation_states(guesses, formulas, "O"), [np.nan, -2, -2, -2, np.nan])
    np.testing.assert_array_equal(oxm.oxidation_states(guesses, formulas, "Fe"), [np.nan, np.nan, 3, 3, np.nan])
    assert oxm.load_oxidation(tmp_path / "missing.json") is None
    assert np.isnan(oxm.oxidation_states(None, formulas, "O")).all()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="guess_oxidation"):
        oxm.load_oxidation(path)


def test_pauling_deviation():
    d = compositions_from_formulas(["NaCl", "Fe2O3", "ArO", "Fe"]).padded(4)
    en = up.pauling_en_mad(d.elements, d.fractions)
    assert en[0] == pytest.approx(abs(3.16 - 0.93) / 2)  # two elements, half each: |χ - χ̄| = Δ/2
    chi_fe, chi_o = 1.83, 3.44
    mean = 0.4 * chi_fe + 0.6 * chi_o
    assert en[1] == pytest.approx(0.4 * abs(chi_fe - mean) + 0.6 * abs(chi_o - mean))
    assert np.isnan(en[2])  # argon has no Pauling value
    assert en[3] == 0.0


def test_oxidation_colouring_is_centred_and_greys_unknown():
    c = up.make_colouring("ox", "ox", np.array([-2.2, 3.0, np.nan, 0.4]), style="discrete_diverging")
    assert c.ticks == [-3, -2, -1, 0, 1, 2, 3] and c.vmin == -3.5 and c.vmax == 3.5
    assert np.isnan(c.values[2]) and c.values[0] == -2 and c.values[3] == 0
    spec = up._plotly_colour(c)
    assert spec["colorbar"]["ticktext"][0] == "unknown" and spec["color"][2] == -4
    assert spec["colorscale"][0][1] == up.UNKNOWN_COLOUR


# --------------------------------------------------------------------------------------------
# UMAP settings and metrics


@pytest.mark.parametrize(
    "kwargs, n, match",
    [
        ({"n_neighbors": 1}, None, "n_neighbors must be an integer >= 2"),
        ({"n_neighbors": 4.5}, None, "n_neighbors must be an integer >= 2"),
        ({"min_dist": -0.1}, None, r"min_dist must be a number in \[0, 1\]"),
        ({"min_dist": 1.5}, None, r"min_dist must be a number in \[0, 1\]"),
        ({"min_dist": float("nan")}, None, r"min_dist must be a number in \[0, 1\]"),
        ({"metric": "cosinus"}, None, "metric must be one of"),
        ({"seed": -1}, None, "seed must be a non-negative integer"),
        ({"n_epochs": 0}, None, "n_epochs must be a positive integer"),
        ({"n_neighbors": 15}, 15, "more points than n_neighbors"),
    ],
)
def test_umap_parameters_rejected(kwargs, n, match):
    with pytest.raises(proj.UmapParamError, match=match):
        proj.validate_umap(proj.UmapParams(**kwargs), n)


def test_umap_input_rejected():
    with pytest.raises(proj.UmapParamError, match="NaN"):
        proj.fit_umap(np.full((30, 3), np.nan), proj.UmapParams(n_neighbors=5))
    with pytest.raises(proj.UmapParamError, match="2-D"):
        proj.fit_umap(np.zeros(30), proj.UmapParams(n_neighbors=5))


def test_paper_settings():
    assert proj.local_params(0) == proj.UmapParams(5, 0.8, "euclidean", 0)
    assert proj.local_params(2) == proj.UmapParams(5, 0.3, "euclidean", 0)
    # the paper's global min_dist: 0.2, 0.4 above 4,000 compounds, 0.5 above 100,000; cosine
    sizes = {30: 0.2, 700: 0.2, 4000: 0.2, 4001: 0.4, 51000: 0.4, 100_000: 0.4, 100_001: 0.5, 500_000: 0.5}
    assert {n: proj.global_min_dist(n) for n in sizes} == sizes
    assert proj.GLOBAL_METRIC == "cosine"
    assert proj.marker_style(700)[0] > proj.marker_style(51000)[0]


def test_project_is_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(proj, "fit_umap", lambda x, p: calls.append(1) or np.asarray(x[:, :2], np.float32))
    x = np.random.default_rng(0).normal(size=(40, 6))
    p = proj.UmapParams(n_neighbors=5)
    a, cached_a = proj.project(x, p, tmp_path, "local__O__layer0")
    b, cached_b = proj.project(x, p, tmp_path, "local__O__layer0")
    assert (cached_a, cached_b) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(a, b)
    proj.project(x, proj.UmapParams(n_neighbors=5, min_dist=0.5), tmp_path, "local__O__layer0")
    assert len(calls) == 2  # other settings, other file


def test_knn_metrics_separate_structure_from_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat([-2, 0, 3], 40)
    x = rng.normal(size=(120, 8)) + labels[:, None] * 5.0  # three well separated clusters
    nb = proj.knn_indices(x, 10, "euclidean")
    assert (nb != np.arange(120)[:, None]).all()  # never itself
    q = np.arange(120)
    assert proj.vote_accuracy(nb, labels, q) == 1.0
    assert proj.vote_accuracy(nb, rng.permutation(labels), q) < 0.7
    assert proj.knn_r2(nb, labels.astype(float), q) > 0.95
    m = proj.local_metrics(x, x[:, :2], np.where(np.arange(120) % 7 == 0, np.nan, labels))
    assert m["knn_acc_repr"] == 1.0 and m["knn_acc_shuffled"] < 0.6 and m["n_known_ox"] == 102
    assert 0 < m["trustworthiness"] <= 1
    few = proj.local_metrics(x[:25], x[:25, :2], labels[:25].astype(float))  # < 3k known: no vote
    assert np.isnan(few["knn_acc_repr"]) and few["n_known_ox"] == 25


def test_knn_with_duplicates_still_excludes_self():
    x = np.zeros((12, 3))
    nb = proj.knn_indices(x, 3, "euclidean")
    assert nb.shape == (12, 3) and (nb != np.arange(12)[:, None]).all()


def test_summary_replaces_rows(tmp_path):
    path = tmp_path / "summary.csv"
    em.update_summary(
        path, [{"atom": "O", "layer": 0, "v": 1.0}, {"atom": "Fe", "layer": 0, "v": 2.0}], ["atom", "layer"]
    )
    df = em.update_summary(path, [{"atom": "O", "layer": 0, "v": 3.0}], ["atom", "layer"])
    assert len(df) == 2 and df.set_index("atom").loc["O", "v"] == 3.0
    assert len(pd.read_csv(path)) == 2


# --------------------------------------------------------------------------------------------
# the scripts, end to end (UMAP replaced by a projection so that no numba compilation is needed)


@pytest.fixture
def script_data(tmp_path, monkeypatch):
    write_dataset(tmp_path, sizes=(40, 16, 90))
    save_checkpoint(
        checkpoint_path(tmp_path, "tiny", "mat2vec"),
        build_model("mat2vec", **SMALL),
        Scaler(4.0, 1.5),
        {"published_recipe": False},
    )
    monkeypatch.setattr(proj, "fit_umap", lambda x, p: np.asarray(x, np.float32)[:, :2] * (1 + p.min_dist))
    return tmp_path


def _main(script, args: dict) -> int:
    """The script's main as its command line runs it (usage errors: one line, exit code 2)."""
    from argparse import Namespace

    from crabnet.jobs.cli import run

    return run(script.main, Namespace(**args))


def test_local_script(script_data, capsys, monkeypatch):
    ox = oxm.oxidation_path(script_data, "tiny", "test")
    ox.parent.mkdir(parents=True)
    formulas = pd.read_csv(script_data / "benchmark_data" / "tiny" / "test.csv")["formula"]
    ox.write_text(json.dumps({f: ({"O": -2.0, "Fe": 8 / 3} if i % 2 else None) for i, f in enumerate(formulas)}))
    drawn = {}
    draw = em.plot_png
    monkeypatch.setattr(
        em,
        "plot_png",
        lambda coords, colourings, path, **kw: (
            drawn.update({path.stem: colourings}) or draw(coords, colourings, path, **kw)
        ),
    )
    args = dict(
        data_dir=script_data,
        dataset=["tiny"],
        device="cpu",
        seed=0,
        quick=True,
        force=False,
        features="mat2vec",
        split="test",
        layers=[0, 2],
        atom=["O", "Fe", "Ne"],
        n_neighbors=3,
        min_dist=0.3,
        min_dist_layer0=0.8,
        umap_parallel=False,
        batch_size=32,
        scheduler="sequential",
    )  # the atom jobs run here, where UMAP and plot_png are patched
    assert _main(pl, args) == 0
    out = capsys.readouterr().out
    assert "skipping Ne: in 0 test compound(s)" in out
    assert "running 2 atom maps in this process" in out  # one job per dataset and kept atom
    csv = pd.read_csv(script_data / "umap" / "local" / "tiny" / "mat2vec__test__O__layer2.csv")
    assert list(csv.columns) == [
        "row",
        "formula",
        "fraction",
        "target",
        "prediction",
        "oxidation_state",
        "umap_x",
        "umap_y",
    ]
    assert csv["formula"].str.contains("O").all() and (csv["oxidation_state"].dropna() == -2).all()
    assert csv["oxidation_state"].notna().any() and csv["oxidation_state"].isna().any()
    summary = pd.read_csv(script_data / "umap" / "local" / "tiny" / "summary.csv")
    assert set(summary["atom"]) == {"O", "Fe"} and set(summary["layer"]) == {0, 2}
    o = summary[(summary["atom"] == "O") & (summary["layer"] == 0)].iloc[0]
    assert o["n_compounds"] == len(csv) and o["min_dist"] == 0.8
    figs = script_data / "figures" / "umap_local" / "tiny"
    assert (figs / "mat2vec__test__O.png").stat().st_size > 10_000
    html = (figs / "mat2vec__test__O.html").read_text()
    assert '<script src="https://cdn' not in html and "mean oxidation state of O" in html
    # coloured by the continuous mean state (Fe 8/3 stays 8/3), the legend saying the kNN vote rounds it
    fe = {c.name: c for c in drawn["mat2vec__test__Fe"]}["oxidation_state"]
    assert fe.style == "diverging" and "rounded" in fe.label and fe.vmin < 0 < fe.vmax
    assert np.nanmax(fe.values) == pytest.approx(8 / 3) and np.isnan(fe.values).any()
    fe_csv = pd.read_csv(script_data / "umap" / "local" / "tiny" / "mat2vec__test__Fe__layer2.csv")
    known = fe_csv["oxidation_state"].dropna()
    assert len(known) and np.allclose(known, 8 / 3, atol=1e-6)
    assert _main(pl, {**args, "atom": ["Xx"]}) == 2
    assert "unknown element symbol" in capsys.readouterr().err


def test_global_script(script_data, capsys):
    args = dict(
        data_dir=script_data,
        dataset=["tiny"],
        device="cpu",
        seed=0,
        quick=True,
        force=False,
        features="mat2vec",
        split="test",
        layers=None,
        n_neighbors=15,
        min_dist=None,
        umap_parallel=False,
        batch_size=32,
        scheduler="sequential",
    )  # the layer jobs run here, where UMAP is patched
    assert _main(pg, args) == 0
    out_dir = script_data / "umap" / "global" / "tiny"
    summary = pd.read_csv(out_dir / "summary.csv")
    assert summary["layer"].tolist() == [0, 1, 2, 3] and summary["layer_is"].iloc[-1] == "encoder output"
    assert summary["knn_r2_repr"].notna().all()
    csv = pd.read_csv(out_dir / "mat2vec__test__layer3.csv")
    n_test = len(load_dataset(script_data, "tiny", splits=("test",), verbose=False)["test"])  # duplicates merged
    assert 85 <= n_test <= 90 and len(csv) == n_test
    assert np.allclose(csv["error"], csv["prediction"] - csv["target"], atol=1e-5)
    assert (csv["n_elements"] >= 2).all() and csv["en_pauling_mad"].notna().all()
    assert (script_data / "figures" / "umap_global" / "tiny" / "mat2vec__test.png").is_file()
    assert (summary["min_dist"] == 0.2).all() and (summary["metric"] == "cosine").all()  # 90 compounds
    out = capsys.readouterr().out
    assert "kNN (k=10) R²" in out and "running 4 layer maps in this process" in out  # one job per layer input
    assert _main(pg, {**args, "layers": [7]}) == 2
    assert "--layers must be in 0..3" in capsys.readouterr().err
    assert _main(pg, {**args, "n_neighbors": 1}) == 2
    assert _main(pg, {**args, "epochs": 0}) == 2 and "--epochs must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the map jobs on the embedded Dask LocalCluster (real UMAP in fresh worker processes: minutes)


def _cluster_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two data dirs holding the same split and the same small checkpoint."""
    first = tmp_path / "sequential"
    write_dataset(first, sizes=(40, 16, 90))
    seed_everything(0)
    save_checkpoint(
        checkpoint_path(first, "tiny", "mat2vec"),
        build_model("mat2vec", **SMALL),
        Scaler(4.0, 1.5),
        {"published_recipe": False},
    )
    return first, Path(shutil.copytree(first, tmp_path / "cluster"))


def _run(script: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            "--data-dir",
            str(data_dir),
            "--dataset",
            "tiny",
            "--device",
            "cpu",
            "--quick",
            "--threads-per-job",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _assert_same_maps(a: Path, b: Path, kind: str) -> None:
    """Coordinates, summaries (but the UMAP seconds) and PNG figures are equal."""
    files = sorted(
        p.relative_to(a)
        for folder in (f"umap/{kind}", f"figures/umap_{kind}")
        for p in (a / folder).rglob("*")
        if p.suffix in (".csv", ".png")
    )
    assert len(files) >= 4
    for rel in files:
        if rel.name == "summary.csv":
            sa, sb = (pd.read_csv(d / rel).drop(columns="umap_seconds") for d in (a, b))
            pd.testing.assert_frame_equal(sa, sb)
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


TWO_CORES = pytest.mark.skipif(available_cpus() < 2, reason="the embedded LocalCluster needs two cores for two jobs")


@pytest.mark.cluster
@TWO_CORES
def test_local_atom_jobs_on_a_local_cluster_equal_sequential(tmp_path):
    seq, clu = _cluster_pair(tmp_path)
    args = ("--atom", "O", "--atom", "Fe", "--layers", "0", "2", "--n-neighbors", "3")
    assert (
        "running 2 atom maps in this process"
        in _run("plot_local_edm_umap.py", seq, *args, "--scheduler", "sequential").stdout
    )
    out = _run("plot_local_edm_umap.py", clu, *args, "--scheduler", "local").stdout  # --quick alone: in-process
    assert "submitted 2 atom maps" in out and "LocalCluster: 2 worker process(es)" in out
    _assert_same_maps(seq, clu, "local")


@pytest.mark.cluster
@TWO_CORES
def test_global_layer_jobs_on_a_local_cluster_equal_sequential(tmp_path):
    seq, clu = _cluster_pair(tmp_path)
    assert (
        "running 2 layer maps in this process"
        in _run("plot_global_edm_umap.py", seq, "--layers", "0", "3", "--scheduler", "sequential").stdout
    )
    out = _run("plot_global_edm_umap.py", clu, "--layers", "0", "3", "--scheduler", "local").stdout
    assert "submitted 2 layer maps" in out and "LocalCluster: 2 worker process(es)" in out
    _assert_same_maps(seq, clu, "global")


# --------------------------------------------------------------------------------------------
# real UMAP


@pytest.mark.slow
def test_umap_smoke_seeded():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 8]
    p = proj.UmapParams(n_neighbors=5, min_dist=0.3, seed=0, n_epochs=50)
    a, b = proj.fit_umap(x, p), proj.fit_umap(x, p)
    assert a.shape == (60, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # seeded: reproducible
    m = proj.global_metrics(x, a, np.r_[np.zeros(30), np.ones(30)], metric="euclidean")
    assert m["knn_r2_umap"] > 0.9 and m["trustworthiness"] > 0.8


def test_balanced_accuracy_is_not_fooled_by_the_majority():
    labels = np.array([0] * 18 + [1] * 2)
    nb = np.zeros((20, 3), dtype=int)  # every query's neighbours are class-0 points
    q = np.arange(20)
    assert proj.vote_accuracy(nb, labels, q) == 0.9
    assert proj.vote_accuracy(nb, labels, q, balanced=True) == 0.5


def test_summary_without_rows_writes_nothing(tmp_path):
    df = em.update_summary(tmp_path / "summary.csv", [], ["atom", "layer"])
    assert len(df) == 0 and not (tmp_path / "summary.csv").exists()
