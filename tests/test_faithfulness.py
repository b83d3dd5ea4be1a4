"""Leave-one-element-out attribution in the capture store, attention importances and their agreement.

The known-answer test uses a stub model with CrabNet's ``forward_internals`` interface whose
prediction ignores one element entirely: its attribution must be 0 and every ranking must put it last.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from reference_attribution import leave_one_out
from scipy.stats import kendalltau
from torch import nn

import generate_attention_videos as gav
from crabnet.data import compositions_from_formulas, load_dataset
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.explain.capture import AttentionRecorder, capture_split
from crabnet.explain.faithfulness import (
    IMPORTANCES,
    attention_importance,
    faithfulness_paths,
    faithfulness_table,
    kendall_tau,
    plot_faithfulness,
    positive_share,
    random_pick,
    ranking,
    refresh_faithfulness,
    rollout,
    rollout_importance,
    shuffled,
    top1_agreement,
)
from crabnet.explain.store import AttentionStore, AttentionWriter
from crabnet.training.evaluate import predict
from crabnet.training.loop import fit
from crabnet.training.model import Internals
from crabnet.training.recipe import Recipe, Scaler, build_model
from crabnet.utils import seed_everything

SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))
NA = SYMBOLS.index("Na") + 1
FORMULAS = ["Na1Cl1", "Fe2O3", "Na2S1O4", "Li1Na1Fe1P1O4", "Cu1", "Na3Al1F6", "Ti1O2", "Na1", "Mg2Si1O4", "K1Na1"]


class IgnoresSodium(nn.Module):
    """A stub with CrabNet's interface whose prediction ignores sodium entirely.

    prediction = Σ w[Z] f / Σ f over the real elements other than Na (0 if there are none), so
    removing Na (and renormalising the other fractions) leaves it unchanged. Attention: every query
    spreads its weight over the non-Na keys in proportion to w[Z] (uniformly over all keys when a
    compound is only Na), so raw attention and rollout give Na the least importance too.
    """

    def __init__(self, n_layers: int = 2, n_heads: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(1.0, 3.0, 119))  # any weights, positive
        self.n_layers, self.n_heads = n_layers, n_heads

    def forward_internals(self, elements, fractions, *, attention: bool = False, hidden: bool = False) -> Internals:
        keep = elements > 0
        used = keep & (elements != NA)
        f = fractions * used
        value = (self.w[elements] * f).sum(1) / f.sum(1).clamp_min(1e-12)
        out = torch.stack([value, torch.zeros_like(value), torch.zeros_like(value)], dim=1)
        maps = None
        if attention:
            score = torch.where(used, self.w[elements], torch.zeros_like(fractions))
            only_na = ~used.any(1, keepdim=True)
            score = torch.where(only_na & keep, torch.ones_like(score), score)  # (B, E) weight of each key
            rows = (score / score.sum(1, keepdim=True))[:, None, :] * keep[:, :, None]  # (B, E, E)
            maps = rows[:, None, None].expand(-1, self.n_layers, self.n_heads, -1, -1).contiguous()
        return Internals(out, maps)

    def forward(self, elements, fractions):
        return self.forward_internals(elements, fractions).output


def capture_store(tmp_path, model, data, scaler, steps=(0,), attribution=True):
    writer = AttentionWriter(
        tmp_path / "attention" / "synth" / "attention.zarr",
        data,
        model.n_layers if hasattr(model, "n_layers") else model.cfg.n_layers,
        model.n_heads if hasattr(model, "n_heads") else model.cfg.n_heads,
        {"dataset": "synth", "capture": "epoch"},
        attribution=attribution,
    )
    for s in steps:
        capture_split(model, data, scaler, writer, s)
    writer.finalize(progress=False)
    return AttentionStore(writer.path)


def test_element_the_prediction_ignores_has_zero_attribution_and_ranks_last(tmp_path):
    data = compositions_from_formulas(FORMULAS)
    scaler = Scaler(mean=10.0, std=2.5)
    # the stub has no heads nor CrabNet's output head: leave-one-out and Shapley values only
    store = capture_store(tmp_path, IgnoresSodium(), data, scaler, attribution=("attribution", "shapley"))
    attr = store.group["attribution"][:, 0]  # (n, E)
    shap = store.group["shapley"][:, 0]  # (n, E)
    pred = store.group["prediction"][:, 0]  # (n,)
    assert store.attrs["shapley_baseline"] == scaler.mean
    np.testing.assert_allclose(shap.sum(1), pred - scaler.mean, rtol=1e-5, atol=1e-4)  # efficiency
    assert np.abs(shap[data.elements == NA]).max() <= 1e-4  # the ignored element has Shapley value 0
    assert (shap[data.elements == 0] == 0).all()
    keep = data.elements > 0
    n_real = keep.sum(1)
    is_na = data.elements == NA
    multi = (n_real >= 2)[:, None]
    assert np.abs(attr[is_na]).max() <= 1e-5  # Na never matters (float32 rounding of the renormalised fractions)
    assert (attr[~keep] == 0).all() and (attr[n_real == 1] == 0).all()  # padding, Cu1 and Na1
    others = keep & ~is_na & multi
    # the other elements matter, except where removing one leaves only Na (prediction 0 either way
    # would need w = 0): all of them move the prediction here
    assert (np.abs(attr[others]) > 1e-3).all()
    # target units: the stub's own leave-one-out difference times the scaler's std
    i = FORMULAS.index("Li1Na1Fe1P1O4")
    z, f = data.elements[i], data.fractions[i]
    w = np.linspace(1.0, 3.0, 119)

    def value(mask):
        m = mask & (z > 0) & (z != NA)
        return (w[z[m]] * f[m]).sum() / f[m].sum()

    full = value(np.ones_like(z, bool))
    for j in np.flatnonzero((z > 0) & (z != NA)):
        expected = (value(np.arange(len(z)) != j) - full) * scaler.std
        assert attr[i, j] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # the agreement code ranks Na last by |attribution|, by raw attention and by rollout
    h_maps = store.group["attention"][:, 0]
    imps = {
        "attribution": np.abs(attr),
        "attention": attention_importance(h_maps, data.fractions),
        "rollout": rollout_importance(h_maps, data.fractions),
    }
    for row in np.flatnonzero(is_na.any(1) & (n_real >= 2)):
        last = int(np.flatnonzero(keep[row])[-1])
        for name, imp in imps.items():
            order = ranking(imp[row], keep[row])
            assert data.elements[row, order[n_real[row] - 1]] == NA, (name, FORMULAS[row], imp[row])
            assert order[n_real[row] - 1] <= last  # padding after the real slots
    # where the other element is the only one that counts, attention and attribution agree on it
    for formula in ("Na1Cl1", "K1Na1"):
        row = FORMULAS.index(formula)
        for name in ("attention", "rollout"):
            assert top1_agreement(imps["attribution"][row], imps[name][row], keep[row]) == 1.0
    table = faithfulness_table(store)
    assert table.loc[0, "n_top1"] == int((n_real >= 2).sum()) and table.loc[0, "n_tau"] == int((n_real >= 3).sum())


def test_attribution_of_a_real_crabnet_equals_removing_the_element_by_hand(tmp_path):
    seed_everything(3)
    model = build_model("onehot", **SMALL).eval()
    data = compositions_from_formulas(FORMULAS)
    scaler = Scaler(mean=5.0, std=3.0)
    store = capture_store(tmp_path, model, data, scaler)
    attr = store.group["attribution"][:, 0]
    pred = store.group["prediction"][:, 0]
    np.testing.assert_allclose(pred, predict(model, data, scaler)[0], rtol=1e-5, atol=1e-5)
    for i, formula in enumerate(FORMULAS):
        k = int((data.elements[i] > 0).sum())
        h = store.compound(i)
        assert h.attribution.shape == (1, k)
        if k == 1:
            assert (attr[i] == 0).all()
            continue
        assert (attr[i, k:] == 0).all()
        for j in range(k):
            z = np.delete(data.elements[i, :k], j)
            x = np.delete(data.fractions[i, :k], j)
            el = torch.as_tensor(z[None], dtype=torch.long)
            fr = torch.as_tensor((x / x.sum())[None], dtype=torch.float32)
            with torch.no_grad():
                alone = scaler.unscale(float(model(el, fr)[0, 0]))
            assert attr[i, j] == pytest.approx(alone - pred[i], abs=2e-4), (formula, j)
    assert np.abs(attr).max() > 1e-3  # an untrained model still depends on its inputs
    # the capture's other attributions: Shapley values sum to prediction - baseline, contributions to the
    # prediction, both 0 at padding; the head ablation has one figure per layer and head
    shap, contrib = store.group["shapley"][:, 0], store.group["contribution"][:, 0]
    np.testing.assert_allclose(shap.sum(1), pred - scaler.mean, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(contrib.sum(1), pred, rtol=1e-4, atol=1e-3)
    assert (shap[data.elements == 0] == 0).all() and (contrib[data.elements == 0] == 0).all()
    h = store.compound(FORMULAS.index("Li1Na1Fe1P1O4"))
    assert h.shapley.shape == h.contribution.shape == (1, 5)
    effect, change = store.head_effects()
    assert effect.shape == change.shape == (1, model.cfg.n_layers, model.cfg.n_heads)
    assert (change > 0).all()  # every head of an untrained model moves some prediction


def test_leave_one_out_draws_no_random_numbers_and_ignores_autocast():
    seed_everything(0)
    model = build_model("onehot", **SMALL)  # training mode: capture must switch to eval itself
    data = compositions_from_formulas(FORMULAS)
    el = torch.as_tensor(data.elements)
    fr = torch.as_tensor(data.fractions)
    state = torch.get_rng_state()
    model.eval()
    plain = leave_one_out(model, el, fr, max_rows=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = leave_one_out(model, el, fr)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_allclose(plain.numpy(), under.numpy(), rtol=1e-6, atol=1e-6)  # fp32 inside autocast
    assert plain.dtype == torch.float64 and plain.shape == el.shape


def test_capture_with_attribution_does_not_change_training(tiny_data, tmp_path):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    recipe = Recipe(epochs=3, epochs_step=1, batch_size=16)
    scaler = Scaler.fit(splits["train"].target)
    seed_everything(0)
    m1 = build_model("onehot", **SMALL)
    h1 = fit(m1, splits["train"], splits["val"], scaler, recipe, seed=0, progress=False)

    seed_everything(0)
    m2 = build_model("onehot", **SMALL)
    writer = AttentionWriter(tmp_path / "a.zarr", splits["val"], m2.cfg.n_layers, m2.cfg.n_heads, {"dataset": "tiny"})
    rec = AttentionRecorder(m2, splits["val"], scaler, writer, mode="epoch")
    h2 = fit(m2, splits["train"], splits["val"], scaler, recipe, seed=0, callback=rec, progress=False)
    np.testing.assert_array_equal(predict(m1, splits["test"], scaler)[0], predict(m2, splits["test"], scaler)[0])
    assert h1.train_loss == h2.train_loss
    writer.finalize(progress=False)
    store = AttentionStore(writer.path)
    assert store.has_attribution and store.attrs["attribution"] is True
    attr = store.group["attribution"]
    assert attr.shape == (len(splits["val"]), 4, splits["val"].width)
    assert attr.chunks[1:] == (4, splits["val"].width)  # compound-major: whole histories per chunk
    values = attr[:]
    pad = np.broadcast_to(~(splits["val"].elements > 0)[:, None, :], values.shape)
    assert np.isfinite(values).all() and (values[pad] == 0).all() and (values[~pad] != 0).mean() > 0.9
    assert not np.array_equal(values[:, 0], values[:, -1])  # the attribution changes with training


def test_store_without_attribution_still_reads_and_step2_says_so(tmp_path, capsys):
    data = compositions_from_formulas(FORMULAS)
    store = capture_store(tmp_path, IgnoresSodium(), data, Scaler(0.0, 1.0), steps=(0, 1), attribution=False)
    assert not store.has_attribution and store.attrs["attribution"] is False
    h = store.compound("NaCl")
    assert h.attribution is None and h.attention.shape == (2, 2, 3, 2, 2)
    with pytest.raises(ValueError, match="no attribution"):
        faithfulness_table(store)
    # an old store (no attribution attribute, no array) reads the same way
    g = zarr.open_group(store.path, mode="r+")
    del g.attrs["attribution"]
    assert not AttentionStore(store.path).has_attribution
    argv = [
        "--data-dir",
        str(tmp_path),
        "--dataset",
        "synth",
        "--scheduler",
        "sequential",
        "--dpi",
        "40",
        "--formula",
        "NaCl",
        "--explore",
        "0",
    ]
    assert gav.main(**vars(gav.parse_args(argv))) == 0
    assert "no attribution" in capsys.readouterr().out
    csv, png = faithfulness_paths(tmp_path, "synth")
    assert not csv.exists() and not png.exists()


def test_resumed_writer_keeps_attribution_of_kept_captures(tmp_path):
    data = compositions_from_formulas(FORMULAS)
    model, scaler = IgnoresSodium(), Scaler(1.0, 2.0)
    path = tmp_path / "a.zarr"
    kinds = ("attribution", "shapley")  # the stub has no heads nor output head
    writer = AttentionWriter(path, data, 2, 3, {"dataset": "synth"}, attribution=kinds)
    for s in range(3):
        capture_split(model, data, scaler, writer, s)
    first = writer.attr[:, :2]
    first_shapley = writer.extra["shapley"][:, :2]
    again = AttentionWriter(path, data, 2, 3, {"dataset": "synth"}, resume=True, attribution=kinds)
    assert again.resumed
    again.restore([0, 1])
    assert again.attr.shape == (len(data), 2, data.width)
    capture_split(model, data, scaler, again, 2)
    again.finalize(progress=False)
    store = AttentionStore(path)
    np.testing.assert_array_equal(store.group["attribution"][:, :2], first)
    np.testing.assert_array_equal(store.group["shapley"][:, :2], first_shapley)
    # a writer with other attribution settings does not reuse the staging store
    AttentionWriter(path, data, 2, 3, {"dataset": "synth"}, attribution=kinds).begin_capture(0)
    assert not AttentionWriter(path, data, 2, 3, {"dataset": "synth"}, resume=True, attribution=False).resumed
    assert not AttentionWriter(path, data, 2, 3, {"dataset": "synth"}, resume=True).resumed  # all kinds


# --------------------------------------------------------------------------------------------
# importance and agreement


def test_kendall_tau_b_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (200, 6)).astype(float)  # many ties
    y = rng.integers(0, 4, (200, 6)).astype(float)
    keep = np.zeros((200, 6), bool)
    k = rng.integers(2, 7, 200)
    for i, n in enumerate(k):
        keep[i, :n] = True
    ours = kendall_tau(x, y, keep)
    for i, n in enumerate(k):
        ref = kendalltau(x[i, :n], y[i, :n]).statistic
        if np.isnan(ref):
            assert np.isnan(ours[i])
        else:
            assert ours[i] == pytest.approx(ref, abs=1e-12)
    assert kendall_tau(np.array([1.0, 2, 3]), np.array([3.0, 2, 1]), np.ones(3, bool)) == -1.0


def test_top1_agreement_counts_ties_as_a_fair_tie_break():
    keep = np.array([True, True, True, False])
    assert top1_agreement(np.array([1.0, 3, 2, 9]), np.array([0.1, 0.5, 0.2, 0.9]), keep) == 1.0
    assert top1_agreement(np.array([3.0, 1, 2, 0]), np.array([0.1, 0.5, 0.2, 0]), keep) == 0.0
    assert top1_agreement(np.array([3.0, 1, 2, 0]), np.array([0.5, 0.5, 0.2, 0]), keep) == 0.5
    assert top1_agreement(np.array([3.0, 3, 2, 0]), np.array([0.5, 0.5, 0.5, 0]), keep) == pytest.approx(2 / 6)


def test_attention_importance_and_rollout_by_hand():
    rng = np.random.default_rng(1)
    k, E, L, H = 3, 4, 2, 2
    maps = np.zeros((L, H, E, E))
    maps[:, :, :k, :k] = rng.random((L, H, k, k))
    maps /= np.maximum(maps.sum(-1, keepdims=True), 1e-12)
    f = np.array([0.5, 0.3, 0.2, 0.0])
    raw = attention_importance(maps, f)
    by_hand = np.zeros(E)
    for lyr in range(L):
        for h in range(H):
            for q in range(k):
                by_hand += f[q] * maps[lyr, h, q] / (L * H)
    np.testing.assert_allclose(raw, by_hand)
    assert raw.sum() == pytest.approx(1.0) and raw[3] == 0
    a = [(maps[lyr].mean(0)[:k, :k] + np.eye(k)) / 2 for lyr in range(L)]  # rows of maps sum to 1
    r = a[1] @ a[0]
    np.testing.assert_allclose(rollout(maps, f > 0)[:k, :k], r)
    np.testing.assert_allclose(rollout_importance(maps, f)[:k], f[:k] @ r)
    assert rollout_importance(maps, f)[3] == 0


def test_shuffled_is_a_seeded_permutation_within_each_compound():
    rng = np.random.default_rng(2)
    keep = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    v = rng.random((3, 5, 4)) * keep[:, None, :]
    s = shuffled(v, keep, 7, np.arange(3), np.arange(5))
    np.testing.assert_allclose(np.sort(s, -1), np.sort(v, -1))  # the same values
    assert (s[~np.broadcast_to(keep[:, None, :], s.shape)] == 0).all()  # padding stays padding
    np.testing.assert_array_equal(s, shuffled(v, keep, 7, np.arange(3), np.arange(5)))
    assert not np.array_equal(s, shuffled(v, keep, 8, np.arange(3), np.arange(5)))
    np.testing.assert_array_equal(s[1:], shuffled(v[1:], keep[1:], 7, np.arange(1, 3), np.arange(5)))
    assert not np.array_equal(s, v)


def test_table_matches_a_per_compound_computation_and_not_the_block_size(tmp_path):
    seed_everything(1)
    model = build_model("onehot", **SMALL).eval()
    data = compositions_from_formulas(FORMULAS + ["Ca1Ti1O3", "Ba1Ti1O3", "Li1Co1O2", "Na1Nb1O3"])
    store = capture_store(tmp_path, model, data, Scaler(0.0, 1.0), steps=(0, 1, 2))
    table = faithfulness_table(store, seed=3)
    small = faithfulness_table(store, seed=3, block_bytes=1)  # one compound at a time
    pd.testing.assert_frame_equal(table, small)
    assert list(table.columns[:4]) == ["capture", "step", "n_tau", "n_top1"]
    assert {f"tau_{k}" for k in IMPORTANCES} <= set(table.columns)
    # capture 1 by hand: scipy's tau and a plain argmax over the compounds, fraction control
    taus, tops = [], []
    for i in range(len(store)):
        h = store.compound(i)
        k = len(h.elements)
        if k < 2:
            continue
        a = np.abs(h.attribution[1])
        top_a = set(np.flatnonzero(a == a.max()))
        top_f = set(np.flatnonzero(h.fractions == h.fractions.max()))
        tops.append(len(top_a & top_f) / (len(top_a) * len(top_f)))  # a fair tie break (1:1 compounds)
        if k >= 3:
            taus.append(kendalltau(a, h.fractions).statistic)
    assert table.loc[1, "n_top1"] == len(tops) and table.loc[1, "n_tau"] == len(taus)
    assert table.loc[1, "tau_fraction"] == pytest.approx(np.mean(taus), abs=1e-9)
    assert table.loc[1, "top1_fraction"] == pytest.approx(np.mean(tops), abs=1e-9)
    assert table.loc[1, "top1_fraction_se"] == pytest.approx(np.std(tops, ddof=1) / np.sqrt(len(tops)), abs=1e-9)
    # the same table from a new seed differs only in the seeded controls (shuffled, random element)
    other = faithfulness_table(store, seed=4)
    seeded = lambda frame: [c for c in frame if "shuffled" in c or "random" in c]  # noqa: E731
    pd.testing.assert_frame_equal(other.drop(columns=seeded(other)), table.drop(columns=seeded(table)))


def test_step2_writes_faithfulness_csv_and_figure_and_report_shows_them(tmp_path, capsys):
    seed_everything(1)
    model = build_model("onehot", **SMALL).eval()
    data = compositions_from_formulas(FORMULAS)
    capture_store(tmp_path, model, data, Scaler(0.0, 1.0), steps=(0, 1, 2))
    argv = [
        "--data-dir",
        str(tmp_path),
        "--dataset",
        "synth",
        "--scheduler",
        "sequential",
        "--dpi",
        "40",
        "--formula",
        "Fe2O3",
        "--explore",
        "2",
    ]
    assert gav.main(**vars(gav.parse_args(argv))) == 0
    out = capsys.readouterr().out
    csv, png = faithfulness_paths(tmp_path, "synth")
    assert csv.is_file() and png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "faithfulness" in out and "tau" in out
    table = pd.read_csv(csv)
    assert len(table) == 3 and table["step"].tolist() == [0, 1, 2]
    assert table["n_tau"].iloc[0] == sum(len(set(f)) >= 3 for f in [[c for c in x if c.isupper()] for x in FORMULAS])
    report = (tmp_path / "index.html").read_text()
    assert "figures/faithfulness/synth.png" in report and "Faithfulness of attention" in report
    assert "tau_rollout" in report  # the table beside the figure
    # up to date: not recomputed
    assert gav.main(**vars(gav.parse_args(argv))) == 0
    assert "faithfulness.csv is up to date" in capsys.readouterr().out


def test_paired_difference_from_the_fraction_control(tmp_path):
    seed_everything(2)
    model = build_model("onehot", **SMALL).eval()
    data = compositions_from_formulas(FORMULAS + ["Ca1Ti1O3", "Ba1Ti1O3", "Li1Co1O2", "Na1Nb1O3"])
    store = capture_store(tmp_path, model, data, Scaler(0.0, 1.0), steps=(0, 1))
    table = faithfulness_table(store)
    for metric in ("tau", "top1"):
        for name in ("attention", "rollout"):
            # every compound has all four values here, so the mean difference is the difference of means
            diff = table[f"{metric}_{name}"] - table[f"{metric}_fraction"]
            np.testing.assert_allclose(table[f"{metric}_{name}_vs_fraction"], diff, atol=1e-12)
            assert (table[f"{metric}_{name}_vs_fraction_se"] >= 0).all()


# --------------------------------------------------------------------------------------------
# Shapley values as the reference, and the sign test


def stub_store_with_shapley(tmp_path, values):
    """The stub's store (2 captures) with its ``shapley`` array replaced by ``values(elements) -> (n, E)``."""
    data = compositions_from_formulas(FORMULAS)
    store = capture_store(tmp_path, IgnoresSodium(), data, Scaler(0.0, 1.0), steps=(0, 1), attribution=KINDS)
    group = zarr.open_group(store.path, mode="r+")
    group["shapley"][:] = np.broadcast_to(values(group)[:, None, :], group["shapley"].shape).astype(np.float32)
    return AttentionStore(store.path)


KINDS = ("attribution", "shapley")  # the stub has neither heads nor CrabNet's output head: no contribution


def test_shapley_referenced_agreement_of_a_measure_equal_to_abs_shapley_is_one(tmp_path, capsys):
    data = compositions_from_formulas(FORMULAS)
    plain = capture_store(tmp_path / "a", IgnoresSodium(), data, Scaler(0.0, 1.0), steps=(0, 1), attribution=KINDS)
    before = faithfulness_table(plain)  # Shapley values as captured
    store = stub_store_with_shapley(tmp_path, lambda g: -g["attribution"][:, 0])  # |Shapley| = |leave-one-out|
    table = faithfulness_table(store)
    np.testing.assert_allclose(table["shapley_tau_attribution"], 1.0)
    np.testing.assert_allclose(table["shapley_top1_attribution"], 1.0)
    assert (table["shapley_tau_attribution_se"] == 0).all()
    # the other measures against |Shapley| are their agreement with |leave-one-out| here, and those columns are kept
    for metric in ("tau", "top1"):
        for name in ("attention", "rollout", "fraction"):
            np.testing.assert_allclose(table[f"shapley_{metric}_{name}"], table[f"{metric}_{name}"], atol=1e-12)
            np.testing.assert_allclose(table[f"{metric}_{name}"], before[f"{metric}_{name}"], atol=1e-12)
        assert f"shapley_{metric}_attention_vs_fraction" in table
    assert not any("contribution" in c for c in table)  # a store without contributions: no such columns
    # step 2's figure gains the Shapley row; a CSV written before the Shapley columns existed is redone
    csv, png = faithfulness_paths(tmp_path, "synth")
    plot_faithfulness(table, png, title="synth")
    table.drop(columns=[c for c in table if c.startswith("shapley_")]).to_csv(csv, index=False)
    refresh_faithfulness(store, tmp_path, "synth", store_time=0.0)
    out = capsys.readouterr().out
    assert "with |Shapley| as the reference" in out and "most attended" in out
    assert "shapley_tau_attention" in pd.read_csv(csv).columns
    refresh_faithfulness(store, tmp_path, "synth", store_time=0.0)
    assert "is up to date" in capsys.readouterr().out


def test_sign_test_counts_by_hand(tmp_path):
    positive = {ATOMIC_NUMBER["O"], ATOMIC_NUMBER["Cl"]}
    # Shapley value +1 for O and Cl, 0 for Na (and padding), -1 for every other element
    sign = lambda g: np.vectorize(lambda z: 1.0 if z in positive else 0.0 if z in (0, NA) else -1.0)(  # noqa: E731
        g["elements"][:]
    )
    store = stub_store_with_shapley(tmp_path, sign)
    table = faithfulness_table(store, seed=5)
    # compounds with >= 2 elements: NaCl, Fe2O3, Na2SO4, LiNaFePO4, Na3AlF6, TiO2, Mg2SiO4, KNa (Cu, Na alone: out)
    assert (table["n_top1"] == 8).all()
    # the stub's attention goes to the non-Na element of largest Z: Cl, Fe, S, Fe, Al, Ti, Si, K; only Cl is positive
    np.testing.assert_allclose(table["shapley_positive_attention"], 1 / 8)
    np.testing.assert_allclose(table["shapley_positive_attention_se"], np.std([1] + [0] * 7, ddof=1) / np.sqrt(8))
    # largest fraction: NaCl tie (Cl +, Na 0) 1/2, O in Fe2O3, Na2SO4, LiNaFePO4, TiO2, Mg2SiO4, F in Na3AlF6 (-),
    # KNa tie (K -, Na 0) 0
    np.testing.assert_allclose(table["shapley_positive_fraction"], 5.5 / 8)
    # the random element: the seeded pick, by hand
    keep = store.elements > 0
    values = sign(store.group)
    picks = random_pick(keep, 5, np.arange(len(store)), np.arange(store.n_captures)).argmax(-1)  # (n, c)
    multi = keep.sum(1) >= 2
    expected = (np.take_along_axis(values[:, None, :].repeat(2, 1), picks[..., None], -1)[..., 0] > 0)[multi]
    np.testing.assert_allclose(table["shapley_positive_random"], expected.mean(0))
    assert keep[np.arange(len(store))[:, None], picks].all()  # always a real element


def test_random_pick_is_uniform_over_the_real_elements():
    keep = np.zeros((4000, 5), bool)
    keep[:, :4] = True
    picks = random_pick(keep, 0, np.arange(4000), np.arange(3)).argmax(-1)
    share = np.bincount(picks.ravel(), minlength=5) / picks.size
    np.testing.assert_allclose(share[:4], 0.25, atol=0.02)
    assert share[4] == 0
    assert not np.array_equal(picks, random_pick(keep, 1, np.arange(4000), np.arange(3)).argmax(-1))
    # independent of the shuffled control's permutation (another hash stream): the slot it moves first is
    # the random pick about one time in four
    slots = np.broadcast_to(np.arange(5.0) * keep[0], (4000, 3, 5))
    first = shuffled(slots, keep, 0, np.arange(4000), np.arange(3))[..., 0]
    assert abs((first == picks).mean() - 0.25) < 0.02
    assert positive_share(np.array([1.0, -1, 2]), np.array([0.5, 0.5, 0.1]), np.ones(3, bool)) == 0.5


def test_explain_a_checkpoint_on_demand(tiny_data, tmp_path, capsys):
    from crabnet.data import load_dataset
    from crabnet.explain import run as explain
    from crabnet.training.checkpoint import save_checkpoint

    seed_everything(5)
    val = load_dataset(tiny_data, "tiny", ("val",), verbose=False)["val"]
    model = build_model("onehot", n_elements=val.width, **SMALL).eval()
    ckpt = save_checkpoint(tmp_path / "tiny__onehot.pt", model, Scaler(mean=2.0, std=0.5), {"features": "onehot"})
    assert explain.main(ckpt, "tiny", "val", tiny_data, "cpu") == 0
    store = AttentionStore(tiny_data / "attention" / "tiny" / "tiny__onehot.zarr")
    assert store.n_captures == 1 and store.has_shapley and store.attrs["checkpoint"] == "tiny__onehot.pt"
    pred = store.group["prediction"][:, 0]
    np.testing.assert_allclose(pred, predict(model, val, Scaler(2.0, 0.5))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.group["shapley"][:, 0].sum(1), pred - 2.0, rtol=1e-4, atol=1e-4)
    table = pd.read_csv(store.path.with_suffix(".faithfulness.csv"))
    assert len(table) == 1 and "shapley_tau_attention" in table.columns
    assert "Shapley" in capsys.readouterr().out
