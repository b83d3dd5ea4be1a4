"""Optimiser pieces of the recipe."""

from __future__ import annotations

import pytest
import torch

from crabnet.optim import SWA, Lamb, Lookahead, triangular_lr
from crabnet.train import jitter_fractions, robust_l1


def test_triangular_lr():
    lr = [triangular_lr(i, 1e-4, 6e-3, 10) for i in range(41)]
    assert lr[0] == pytest.approx(1e-4)
    assert lr[10] == pytest.approx(6e-3)
    assert lr[5] == pytest.approx(1e-4 + 0.5 * (6e-3 - 1e-4))
    assert lr[20] == pytest.approx(1e-4)
    assert lr[30] == pytest.approx(6e-3)
    assert max(lr) <= 6e-3 + 1e-12 and min(lr) >= 1e-4 - 1e-12


def test_lamb_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    w.grad = torch.tensor([1.0, -2.0])
    opt = Lamb([w], lr=0.1, eps=1e-6)
    opt.step()
    m = 0.1 * torch.tensor([1.0, -2.0])
    v = 0.001 * torch.tensor([1.0, 4.0])
    step = m / (v.sqrt() + 1e-6)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5.0 / step.norm()) * step
    torch.testing.assert_close(w.data, expected)


def test_lamb_trust_ratio_clamps_weight_norm():
    w = torch.nn.Parameter(torch.full((4,), 100.0))  # norm 200 -> clamped to 10
    w.grad = torch.ones(4)
    Lamb([w], lr=1.0).step()
    # step direction is ~ones (norm ~2), trust = 10/2 -> each weight moves by ~5
    torch.testing.assert_close(w.data, torch.full((4,), 95.0), rtol=1e-4, atol=1e-3)


def test_lookahead_syncs_every_k():
    w = torch.nn.Parameter(torch.zeros(1))
    base = torch.optim.SGD([w], lr=1.0)
    opt = Lookahead(base, alpha=0.5, k=2)
    for _ in range(2):
        w.grad = torch.tensor([-1.0])
        opt.step()
    # fast went 0 -> 2; slow moves halfway: 1; fast reset to 1
    assert w.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Lookahead(base, alpha=2.0)


def test_swa_averages_only_new_minima():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    swa = SWA([w])
    assert swa.update(5.0)
    w.data.fill_(3.0)
    assert not swa.update(6.0)  # worse: not averaged
    assert swa.update(4.0)  # average of 1 and 3
    w.data.fill_(10.0)
    assert swa.swap()
    assert w.item() == pytest.approx(2.0)
    assert not SWA([torch.nn.Parameter(torch.zeros(1))]).swap()


def test_robust_l1():
    pred, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])
    log_unc = torch.tensor([0.0, 1.0])
    expected = ((2**0.5) * 1.0 * 1.0 + 0.0 + 0.0 + 1.0) / 2
    assert robust_l1(pred, log_unc, target).item() == pytest.approx(expected)


def test_jitter_keeps_padding_and_normalisation():
    g = torch.Generator().manual_seed(0)
    fr = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    out = jitter_fractions(fr, 0.02, g)
    assert (out[fr == 0] == 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert not torch.equal(out[0], fr[0])
