"""Shapley values, the output decomposition and head ablation (crabnet.explain.attribution).

Known answers: a brute-force Shapley reference calling the model one sub-compound at a time, games
with closed-form values, a stub model that ignores sodium, and a head whose output projection
reads nothing from it.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from reference_attribution import leave_one_out, shapley_from_values
from torch import nn

import crabnet.training.model
from crabnet.data import compositions_from_formulas
from crabnet.elements import SYMBOLS
from crabnet.explain.attribution import (
    ablate_heads,
    coalition_attribution,
    contribution,
    head_ablation,
    is_exact,
    replay_layers,
    shapley,
)
from crabnet.training.model import EncoderLayer
from crabnet.training.recipe import Scaler, build_model
from crabnet.utils import seed_everything

SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))
NA = SYMBOLS.index("Na") + 1
FORMULAS = ["Cu1", "Na1Cl1", "Fe2O3", "Na2S1O4", "Li1Na1Fe1P1O4", "Na3Al1F6", "Ti1O2", "Mg2Si1O4", "K1Na1"]
SCALER = Scaler(mean=5.0, std=3.0)


@pytest.fixture(scope="module")
def model():
    seed_everything(3)
    return build_model("onehot", **SMALL).eval()


@pytest.fixture(scope="module")
def data():
    return compositions_from_formulas(FORMULAS)


def predict(model, elements, fractions) -> np.ndarray:
    """Predictions in target units, one plain forward pass."""
    with torch.no_grad():
        raw = model(torch.as_tensor(elements, dtype=torch.long), torch.as_tensor(fractions, dtype=torch.float32))
    return SCALER.unscale(raw[:, 0].double().numpy())


def brute_force_shapley(model, z: np.ndarray, f: np.ndarray, baseline: float) -> np.ndarray:
    """φ_i = Σ_{S ⊆ N∖i} |S|!(k−|S|−1)!/k! (v(S∪i) − v(S)), one sub-compound per model call."""
    k = len(z)

    def v(S: tuple[int, ...]) -> float:
        if not S:
            return baseline
        if len(S) == k:
            return float(predict(model, z[None], f[None])[0])  # the compound as given
        idx = list(S)
        x = f[idx] / f[idx].sum(dtype=np.float32)
        return float(predict(model, z[idx][None], x[None].astype(np.float32))[0])

    phi = np.zeros(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for size in range(k):
            w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for S in itertools.combinations(others, size):
                phi[i] += w * (v(tuple(sorted((*S, i)))) - v(S))
    return phi


def test_exact_shapley_equals_brute_force_and_sums_to_prediction_minus_baseline(model, data):
    phi = shapley(model, data.elements, data.fractions, SCALER, SCALER.mean)
    pred = predict(model, data.elements, data.fractions)
    keep = data.elements > 0
    assert phi.shape == data.elements.shape and (phi[~keep] == 0).all()
    np.testing.assert_allclose(phi.sum(1), pred - SCALER.mean, atol=2e-5)
    assert is_exact(data.elements).all()
    for i in range(len(FORMULAS)):
        k = int(keep[i].sum())
        reference = brute_force_shapley(model, data.elements[i, :k], data.fractions[i, :k], SCALER.mean)
        np.testing.assert_allclose(phi[i, :k], reference, atol=5e-5, err_msg=FORMULAS[i])
    assert np.abs(phi[keep.sum(1) >= 2]).max() > 1e-3  # an untrained model still depends on its inputs
    # a baseline per compound shifts only the sums (single elements: prediction − baseline)
    phi2 = shapley(model, data.elements, data.fractions, SCALER, np.arange(len(FORMULAS), dtype=float))
    np.testing.assert_allclose(phi2.sum(1), pred - np.arange(len(FORMULAS)), atol=2e-5)


def test_leave_one_out_comes_from_the_same_coalitions(model, data):
    out = coalition_attribution(model, data.elements, data.fractions, SCALER, SCALER.mean)
    el, fr = torch.as_tensor(data.elements), torch.as_tensor(data.fractions)
    np.testing.assert_allclose(out.leave_one_out, leave_one_out(model, el, fr).numpy() * SCALER.std, atol=2e-5)
    np.testing.assert_allclose(out.prediction, predict(model, data.elements, data.fractions), atol=2e-5)
    with torch.no_grad():
        full = model(el, fr)[:, 0]
    given = coalition_attribution(model, data.elements, data.fractions, SCALER, SCALER.mean, full=full)
    np.testing.assert_allclose(given.shapley, out.shapley, atol=2e-5)
    assert given.rows == out.rows - len(FORMULAS)  # the full compounds did not run again


def test_sampled_shapley_is_efficient_exactly_and_approaches_the_exact_values(model, data):
    exact = shapley(model, data.elements, data.fractions, SCALER, SCALER.mean)
    pred = predict(model, data.elements, data.fractions)
    few = coalition_attribution(model, data.elements, data.fractions, SCALER, 1.5, max_exact=1, n_samples=3)
    assert (few.exact == ((data.elements > 0).sum(1) <= 1)).all()
    np.testing.assert_allclose(few.shapley.sum(1), pred - 1.5, atol=2e-5)  # telescoping: no sampling error
    np.testing.assert_allclose(few.shapley.sum(1), few.prediction - 1.5, rtol=0, atol=1e-12)
    many = shapley(model, data.elements, data.fractions, SCALER, SCALER.mean, max_exact=1, n_samples=4000)
    scale = np.abs(exact).max()
    assert np.abs(many - exact).max() < 0.05 * scale
    assert np.abs(few.shapley - exact).max() > 1e-6  # 3 orders of up to 5 elements are not the exact values
    # the estimate of a compound depends neither on its batch nor on the order of its slots
    batch = shapley(model, data.elements, data.fractions, SCALER, SCALER.mean, max_exact=1)
    for formula in ("Li1Na1Fe1P1O4", "Na2S1O4"):  # reversed: padding first (slots are mapped back)
        i = FORMULAS.index(formula)
        el, fr = data.elements[i : i + 1, ::-1], data.fractions[i : i + 1, ::-1]
        alone = shapley(model, el, fr, SCALER, SCALER.mean, max_exact=1)
        np.testing.assert_allclose(alone[0, ::-1], batch[i], atol=2e-5, err_msg=formula)


def test_shapley_from_values_known_games():
    w = np.array([0.5, -2.0, 0.0, 3.0, 1.25])

    def additive_with_ignored_player(S: np.ndarray) -> np.ndarray:  # player 2 changes nothing
        s = S.astype(float)
        return s @ w + 4.0 * s[:, 0] * s[:, 3] - s[:, 1] * s[:, 4]  # interactions split evenly between the pair

    expected = w + np.array([2.0, -0.5, 0.0, 2.0, -0.5])
    np.testing.assert_allclose(shapley_from_values(additive_with_ignored_player, 5), expected, atol=1e-12)
    est = shapley_from_values(additive_with_ignored_player, 5, max_exact=0, n_samples=5, seed=1)
    assert est[2] == 0.0  # the ignored player's marginal contribution is exactly 0 in every order
    assert est.sum() == pytest.approx(expected.sum(), abs=1e-12)
    converged = shapley_from_values(additive_with_ignored_player, 5, max_exact=0, n_samples=20000, seed=1)
    np.testing.assert_allclose(converged, expected, atol=0.05)
    # majority game of 3 players: symmetric, so 1/3 each
    np.testing.assert_allclose(shapley_from_values(lambda S: (S.sum(1) >= 2).astype(float), 3), [1 / 3] * 3)


class IgnoresSodium(nn.Module):
    """Prediction Σ w[Z] f / Σ f over the real elements other than Na (0 if none): sodium's presence,
    and the renormalisation of the others' fractions, change nothing."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(1.0, 3.0, 119))

    def forward(self, elements, fractions):
        f = fractions * ((elements > 0) & (elements != NA))
        value = (self.w[elements] * f).sum(1) / f.sum(1).clamp_min(1e-12)
        return torch.stack([value, torch.zeros_like(value), torch.zeros_like(value)], dim=1)


def test_element_the_model_ignores_gets_zero_shapley(data):
    stub = IgnoresSodium()
    baseline = SCALER.unscale(0.0)  # the value of no element other than Na: Na alone adds nothing either
    for kwargs in (dict(), dict(max_exact=1, n_samples=7)):
        phi = shapley(stub, data.elements, data.fractions, SCALER, baseline, **kwargs)
        is_na = data.elements == NA
        assert np.abs(phi[is_na]).max() <= 1e-5, kwargs  # float32 renormalisation only
        others = (data.elements > 0) & ~is_na
        assert (np.abs(phi[others]) > 0.1).all(), kwargs


def test_identical_sub_compounds_run_once(model, data):
    rows = []
    handle = model.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    try:
        i = FORMULAS.index("Li1Na1Fe1P1O4")
        once = shapley(model, data.elements[[i]], data.fractions[[i]], SCALER, SCALER.mean)
        n_once, rows[:] = sum(rows), []
        twice = shapley(model, data.elements[[i, i]], data.fractions[[i, i]], SCALER, SCALER.mean)
        n_twice = sum(rows)
    finally:
        handle.remove()
    assert n_once == 2**5 - 1  # every non-empty subset of 5 elements, each distinct
    assert n_twice == n_once
    np.testing.assert_allclose(twice, np.repeat(once, 2, axis=0), rtol=1e-12, atol=1e-15)


def test_contribution_sums_to_the_prediction(model, data, monkeypatch):
    c = contribution(model, data.elements, data.fractions, SCALER, batch_size=4)
    pred = predict(model, data.elements, data.fractions)
    assert (c[data.elements == 0] == 0).all()
    np.testing.assert_allclose(c.sum(1), pred, atol=2e-5)
    assert np.abs(c - c.sum(1, keepdims=True) / (data.elements > 0).sum(1, keepdims=True)).max() > 1e-4  # not flat
    monkeypatch.setattr(crabnet.training.model, "_slots_on_host", lambda device: False)  # the padded path of GPUs
    np.testing.assert_allclose(contribution(model, data.elements, data.fractions, SCALER), c, atol=2e-5)


def test_head_ablation_of_a_silent_head_changes_nothing_and_of_a_normal_one_does(model, data, monkeypatch):
    silent = copy.deepcopy(model)
    H, D = silent.cfg.n_heads, silent.cfg.d_model
    with torch.no_grad():
        silent.layers[1].self_attn.out_proj.weight[:, D // H :] = 0.0  # layer 1 reads nothing from head 1
    targets = np.linspace(4.0, 7.0, len(FORMULAS))
    out = head_ablation(silent, data.elements, data.fractions, targets, SCALER, batch_size=4)
    assert out["mae_change"].shape == out["mean_abs_change"].shape == (silent.cfg.n_layers, H)
    assert out["mae_change"][1, 1] == 0.0 and out["mean_abs_change"][1, 1] == 0.0
    others = np.ones((silent.cfg.n_layers, H), dtype=bool)
    others[1, 1] = False
    assert (out["mean_abs_change"][others] > 1e-4).all()
    pred = predict(silent, data.elements, data.fractions)
    np.testing.assert_allclose(out["prediction"], pred, atol=2e-5)
    assert out["mae"] == pytest.approx(np.abs(pred - targets).mean(), abs=2e-5)
    # the hook equals zeroing the projection's columns that read the head (layers before it replayed)
    plain = head_ablation(model, data.elements, data.fractions, targets, SCALER)
    base = predict(model, data.elements, data.fractions)
    for l, h in ((0, 0), (1, 1), (2, 0)):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference.layers[l].self_attn.out_proj.weight[:, h * D // H : (h + 1) * D // H] = 0.0
        ablated_pred = predict(reference, data.elements, data.fractions)
        assert plain["mean_abs_change"][l, h] == pytest.approx(np.abs(ablated_pred - base).mean(), abs=2e-5)
        assert plain["mae_change"][l, h] == pytest.approx(
            np.abs(ablated_pred - targets).mean() - np.abs(base - targets).mean(), abs=2e-5
        )
    assert all(isinstance(layer, EncoderLayer) for layer in model.layers)  # the replayed layers are back
    # the padded per-element path (GPUs) gives the same
    monkeypatch.setattr(crabnet.training.model, "_slots_on_host", lambda device: False)
    padded = head_ablation(model, data.elements, data.fractions, targets, SCALER)
    np.testing.assert_allclose(padded["mae_change"], plain["mae_change"], atol=2e-5)
    np.testing.assert_allclose(padded["mean_abs_change"], plain["mean_abs_change"], atol=2e-5)


def test_ablation_hooks_are_removed_even_on_error(model, data):
    el, fr = torch.as_tensor(data.elements), torch.as_tensor(data.fractions)
    before = predict(model, data.elements, data.fractions)
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(model, [(0, 1), (2, 0)]):
        with torch.no_grad():
            assert not np.allclose(SCALER.unscale(model(el, fr)[:, 0].double().numpy()), before)
        raise RuntimeError("boom")
    np.testing.assert_array_equal(predict(model, data.elements, data.fractions), before)
    with pytest.raises(IndexError), ablate_heads(model, [(0, 0), (0, 5)]):
        pass
    np.testing.assert_array_equal(predict(model, data.elements, data.fractions), before)
    with torch.no_grad():
        hidden = model.forward_internals(el, fr, hidden=True).hidden
    with pytest.raises(RuntimeError, match="boom"), replay_layers(model, hidden[1:3]):
        np.testing.assert_array_equal(predict(model, data.elements, data.fractions), before)  # replayed
        raise RuntimeError("boom")
    assert all(isinstance(layer, EncoderLayer) for layer in model.layers)
    np.testing.assert_array_equal(predict(model, data.elements, data.fractions), before)


def test_model_mode_is_restored_and_no_random_numbers_drawn(data):
    seed_everything(0)
    m = build_model("onehot", **SMALL)  # training mode: dropout must be off inside
    state = torch.get_rng_state()
    a = shapley(m, data.elements, data.fractions, SCALER, SCALER.mean)
    b = shapley(m, data.elements, data.fractions, SCALER, SCALER.mean)
    assert m.training and torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a, b)
