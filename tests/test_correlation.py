"""Element correlation matrices (crabnet.correlation) and plot_element_correlation.py."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import plot_element_correlation as pec
from crabnet.correlation import (
    GROUPS,
    Correlation,
    collect_sources,
    control_frames,
    element_correlation,
    group_labels,
    group_separation,
    lower_triangle,
    matrix_spearman,
    plot_correlation_html,
    plot_correlation_png,
    read_representation_csv,
    reindex_by_z,
    representation_name,
    restrict_z,
    row_pearson,
    summarise,
    zscore_columns,
)
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.plotting import save_html, save_png

A = np.sqrt(1.5)  # z-score of 1, 2, 3 (population std): -A, 0, A


def test_zscore_known_answer_constant_and_missing():
    x = np.array([[1.0, 10.0, 3.0, 7.0, 1.0], [2.0, 20.0, 2.0, 7.0, np.nan], [3.0, 30.0, 1.0, 7.0, 3.0]])
    z, kept = zscore_columns(x)
    assert kept.tolist() == [True, True, True, False, True]  # the constant column is dropped
    np.testing.assert_allclose(z[:, 0], [-A, 0, A])
    np.testing.assert_allclose(z[:, 1], [-A, 0, A])
    np.testing.assert_allclose(z[:, 2], [A, 0, -A])
    np.testing.assert_allclose(z[:, 3], [-1, 0, 1])  # over the two present values; missing -> 0 (the mean)
    # rounding noise in a stored constant is not a feature
    z2, kept2 = zscore_columns(np.array([[0.1], [0.1 + 1e-17], [0.1]]))
    assert z2.shape == (3, 0) and not kept2.any()


def test_correlation_known_answer():
    frame = pd.DataFrame(
        {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "c": [3.0, 2.0, 1.0], "k": [7.0, 7.0, 7.0]},
        index=["Li", "H", "O"],
    )
    corr = element_correlation(frame, "toy")
    assert (corr.n_features, corr.n_dropped) == (3, 1)
    h, li, o = ATOMIC_NUMBER["H"] - 1, ATOMIC_NUMBER["Li"] - 1, ATOMIC_NUMBER["O"] - 1
    # z rows: Li (-A,-A,A), H (0,0,0) = no variance -> undefined, O (A,A,-A): Li and O anticorrelated
    assert corr.matrix[li, o] == pytest.approx(-1.0) and corr.matrix[o, li] == pytest.approx(-1.0)
    assert corr.matrix[li, li] == 1.0 and corr.matrix[o, o] == 1.0
    assert np.isnan(corr.matrix[h]).all() and np.isnan(corr.matrix[:, h]).all()
    assert corr.present.sum() == 3 and corr.present[h]


def test_row_pearson_matches_pandas_after_zscore():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 12)) * rng.uniform(0.1, 10, size=12) + rng.normal(size=12)
    frame = pd.DataFrame(x, index=["H", "He", "Li", "Be", "B", "C", "N"])
    zs = (frame - frame.mean()) / frame.std(ddof=0)
    expected = zs.T.corr().to_numpy()
    got = element_correlation(frame).matrix[:7, :7]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(row_pearson(zs.to_numpy()), expected, atol=1e-12)


def test_masking_and_reindexing_by_z():
    frame = pd.DataFrame(np.random.default_rng(1).normal(size=(3, 5)), index=["O", "Fe", "H"])
    corr = element_correlation(frame.dropna(), "x")
    m = corr.matrix
    assert m.shape == (118, 118)
    covered = [ATOMIC_NUMBER[s] - 1 for s in ("H", "O", "Fe")]
    assert np.isfinite(m[np.ix_(covered, covered)]).all()
    assert np.isnan(np.delete(np.delete(m, covered, 0), covered, 1)).all()  # everything else blank
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()  # He missing
    np.testing.assert_allclose(m, m.T)
    # the same numbers whatever the row order of the input
    np.testing.assert_allclose(element_correlation(frame.loc[["H", "O", "Fe"]]).matrix, m, rtol=0, atol=1e-12)
    low = lower_triangle(m)
    assert np.isnan(low[np.triu_indices(118)]).all()
    assert low[25, 7] == m[25, 7] and np.isnan(low[7, 25])  # Fe row, O column kept; O row, Fe column masked
    assert restrict_z(m, 92).shape == (92, 92)
    placed = reindex_by_z(np.array([[1.0, 0.5], [0.5, 1.0]]), ["Og", "H"])
    assert placed[117, 0] == 0.5 and placed[117, 117] == 1.0 and np.isnan(placed[1, 1])


def test_rows_all_blank_count_as_missing_and_bad_symbols(tmp_path):
    csv = tmp_path / "emb" / "mat2vec" / "ds__layer1__K.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("element,0,1\nH,1,2\nHe,,\nLi,3,1\nBe,0,5\n")
    frame = read_representation_csv(csv)
    assert list(frame.index) == ["H", "Li", "Be"]
    assert representation_name(csv) == "ds__mat2vec__layer1__K"
    bad = tmp_path / "bad.csv"
    bad.write_text("element,0\nXx,1\n")
    with pytest.raises(ValueError, match="unknown element"):
        read_representation_csv(bad)


def _group_matrix(within: float, between: float) -> np.ndarray:
    m = np.full((118, 118), np.nan)
    idx, lab = group_labels()
    sub = np.where(lab[:, None] == lab[None, :], within, between)
    np.fill_diagonal(sub, 1.0)
    m[np.ix_(idx, idx)] = sub
    return m


def test_group_separation():
    strong = group_separation(_group_matrix(0.9, -0.1), n_perm=999, seed=0)
    assert strong["separation"] == pytest.approx(1.0) and strong["within"] == pytest.approx(0.9)
    assert strong["p_value"] == pytest.approx(1 / 1000)
    assert all(strong[f"sep_{g}"] == pytest.approx(1.0) for g in GROUPS)
    flat = group_separation(_group_matrix(0.2, 0.2), n_perm=99)
    assert flat["separation"] == pytest.approx(0.0) and flat["p_value"] == 1.0
    rng = np.random.default_rng(3)
    noise = rng.uniform(-1, 1, (118, 118))
    noise = (noise + noise.T) / 2
    p = group_separation(noise, n_perm=499, seed=1)["p_value"]
    assert 0.01 < p < 0.99
    # uncovered elements take no part: drop the lanthanides
    partial = _group_matrix(0.9, -0.1)
    for s in GROUPS["lanthanide"]:
        partial[ATOMIC_NUMBER[s] - 1, :] = partial[:, ATOMIC_NUMBER[s] - 1] = np.nan
    res = group_separation(partial, n_perm=9)
    assert res["n_elements"] == len(group_labels()[0]) - 15 and np.isnan(res["sep_lanthanide"])
    assert res["separation"] == pytest.approx(1.0)


def test_matrix_spearman():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 6))
    a = element_correlation(pd.DataFrame(x, index=SYMBOLS[:20]))
    b = Correlation("b", np.tanh(a.matrix * 3), a.present, 6, 0)  # a monotone transform
    rho, shared = matrix_spearman(a, b)
    assert rho == pytest.approx(1.0) and shared == 20
    c = element_correlation(pd.DataFrame(x[:10], index=SYMBOLS[10:20]))
    assert matrix_spearman(a, c)[1] == 10
    onehot = element_correlation(pd.DataFrame(np.eye(20), index=SYMBOLS[:20]))
    assert np.isnan(matrix_spearman(a, onehot)[0])  # a constant matrix has no ranking


def test_summarise_columns():
    rng = np.random.default_rng(4)
    a = element_correlation(pd.DataFrame(rng.normal(size=(60, 8)), index=SYMBOLS[:60]), "a")
    df = summarise([a], {"oliynyk": a}, n_perm=19, extra={"a": {"kind": "learned", "model": "m"}})
    assert df.loc[0, "representation"] == "a" and df.loc[0, "kind"] == "learned"
    assert df.loc[0, "spearman_oliynyk"] == pytest.approx(1.0) and df.loc[0, "shared_oliynyk"] == 60
    for col in ("separation", "p_value", "within", "between", *(f"sep_{g}" for g in GROUPS)):
        assert col in df.columns


def test_png_scale_and_ticks(tmp_path):
    m = element_correlation(pd.DataFrame(np.random.default_rng(5).normal(size=(30, 4)), index=SYMBOLS[:30])).matrix
    fig = plot_correlation_png(m, "t", z_max=92)
    ax = fig.axes[0]
    im = ax.images[0]
    assert (im.norm.vmin, im.norm.vcenter, im.norm.vmax) == (-1.0, 0.0, 1.0)
    assert im.get_array().shape == (92, 92) and im.get_array().mask[0, 0]  # diagonal hidden
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:3] == ["1 H", "5 B", "10 Ne"] and labels[-1] == "90 Th"
    path = save_png(fig, tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_offline_and_hover(tmp_path):
    m = element_correlation(pd.DataFrame(np.random.default_rng(6).normal(size=(10, 4)), index=SYMBOLS[:10])).matrix
    fig = plot_correlation_html(m, "toy")
    assert len(fig.data) == 2 and fig.data[0].visible and not fig.data[1].visible
    assert len(fig.data[0].z) == 118 and len(fig.data[1].z) == 92
    assert list(fig.data[0].customdata[7][0]) == ["O (8)", "H (1)"]
    assert "customdata[0]" in fig.data[0].hovertemplate and "customdata[1]" in fig.data[0].hovertemplate
    assert "%{z" in fig.data[0].hovertemplate
    assert fig.data[0].z[7][0] == pytest.approx(m[7, 0]) and fig.data[0].z[0][7] is None  # lower triangle
    html = save_html(fig, tmp_path / "x.html").read_text()
    scripts = re.findall(r"<script[^>]*>", html, flags=re.I)
    assert scripts and all("src" not in s.lower() for s in scripts)  # plotly.js inline, nothing fetched
    assert not re.search(r"<link[^>]+href=[\"']?(https?:)?//", html, flags=re.I)
    assert "cdn.plot.ly/plotly" not in html.split("</script>", 1)[1]  # no CDN loader after the bundle


def _learned_csv(root, features="mat2vec", dataset="tiny", layer=0, kind="Q", seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(118, 16)), index=pd.Index(SYMBOLS, name="element"))
    frame.loc["Og"] = np.nan
    path = root / "embeddings" / features / f"{dataset}__layer{layer}__{kind}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, na_rep="")
    return path


def test_script_subset_summary_and_up_to_date(tmp_path, capsys):
    _learned_csv(tmp_path)
    kw = dict(
        data_dir=tmp_path,
        device="cpu",
        seed=0,
        quick=True,
        force=False,
        source=["oliynyk", "tiny__mat2vec__layer0__Q"],
        no_control=True,
        permutations=99,
        z_max=92,
        no_html=False,
    )
    assert pec.main(**kw) == 0
    out = capsys.readouterr().out
    fig_dir = tmp_path / "figures" / "correlation"
    for name in ("oliynyk", "tiny__mat2vec__layer0__Q"):
        assert (fig_dir / f"{name}.png").is_file() and (fig_dir / f"{name}__z92.png").is_file()
        assert (fig_dir / f"{name}.html").is_file()
    summary = pd.read_csv(fig_dir / "summary.csv")
    assert summary["representation"].tolist() == ["oliynyk", "tiny__mat2vec__layer0__Q"]
    assert summary["kind"].tolist() == ["static", "learned"]
    assert summary.loc[0, "spearman_oliynyk"] == pytest.approx(1.0)
    assert summary.loc[1, "n_elements"] == 117 and abs(summary.loc[1, "spearman_magpie"]) < 0.2  # random vectors
    assert "2 representation(s) plotted" in out and "summary.csv" in out

    assert pec.main(**kw) == 0
    assert "0 representation(s) plotted (2 up to date" in capsys.readouterr().out
    assert pec.main(**{**kw, "force": True}) == 0
    assert "2 representation(s) plotted" in capsys.readouterr().out


def test_script_finds_all_learned_and_bad_source(tmp_path, capsys):
    for kind in "KQV":
        _learned_csv(tmp_path, kind=kind)
    sources = collect_sources(tmp_path, None)
    names = list(sources)
    assert names[:5] == ["oliynyk", "magpie", "jarvis", "mat2vec", "onehot"]
    assert names[5:] == [f"tiny__mat2vec__layer0__{k}" for k in "QKV"]  # Q, K, V order
    from argparse import Namespace

    from crabnet.jobs.cli import run

    rc = run(
        pec.main,
        Namespace(
            data_dir=tmp_path,
            device="cpu",
            seed=0,
            quick=True,
            force=False,
            source=["nonsense"],
            no_control=True,
            permutations=9,
            z_max=92,
            no_html=True,
        ),
    )
    assert rc == 2 and "--source 'nonsense'" in capsys.readouterr().err


def test_untrained_control_frames():
    a = control_frames(seed=3, device="cpu")
    b = control_frames(seed=3, device="cpu")
    assert (
        list(a)[:4]
        == [
            "untrained_onehot__layer0__Q",
            "untrained_onehot__layer0__K",
            "untrained_onehot__layer0__V",
            "untrained_onehot__layer1__Q",
        ]
        and len(a) == 9
    )
    frame = a["untrained_onehot__layer2__V"]
    assert frame.shape == (118, 512)
    np.testing.assert_array_equal(frame.to_numpy(), b["untrained_onehot__layer2__V"].to_numpy())
    corr = element_correlation(frame)
    assert abs(group_separation(corr, n_perm=0)["separation"]) < 0.1  # no chemistry before training


def test_script_controls_in_summary_not_plotted_with_quick(tmp_path, capsys):
    rc = pec.main(
        data_dir=tmp_path,
        device="cpu",
        seed=0,
        quick=True,
        force=False,
        source=["magpie", "control"],
        no_control=False,
        permutations=49,
        z_max=92,
        no_html=True,
    )
    assert rc == 0
    summary = pd.read_csv(tmp_path / "figures" / "correlation" / "summary.csv")
    assert summary["representation"].tolist()[:3] == [
        "magpie",
        "untrained_onehot__layer0__Q",
        "untrained_onehot__layer0__K",
    ]
    assert (summary["kind"] == "untrained").sum() == 18
    assert set(summary.loc[summary["kind"] == "untrained", "model"]) == {"untrained_onehot", "untrained_mat2vec"}
    hot = summary[summary["model"] == "untrained_onehot"]
    assert (hot["separation"].abs() < 0.1).all()  # random layers on one-hot input: no chemistry
    assert sorted(p.name for p in (tmp_path / "figures" / "correlation").glob("*.png")) == [
        "magpie.png",
        "magpie__z92.png",
    ]
    out = capsys.readouterr().out
    assert "untrained_onehot" in out and "mean over each model" in out
