"""Optimiser pieces of the recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crabnet.training.optim import SWA, Lamb, Lookahead, triangular_lr
from crabnet.training.recipe import jitter_fractions, robust_l1


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


def test_lamb_matches_per_tensor_formula_for_several_tensors():
    """The foreach update equals the per-tensor formula, each tensor with its own trust ratio."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    zero = torch.nn.Parameter(torch.zeros(3))  # zero weight norm -> trust ratio 1
    params = [*ws, zero]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    expected = []
    for p, gr in zip(params, grads):
        m, v = 0.1 * gr, 0.001 * gr * gr
        step = m / (v.sqrt() + 1e-6)
        w_norm = min(float(p.detach().norm()), 10.0)
        trust = w_norm / float(step.norm()) if w_norm > 0 else 1.0
        expected.append(p.detach() - 0.01 * trust * step)
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    Lamb(params, lr=0.01).step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


def test_lamb_several_steps_match_the_formula():
    """Moments carry over between steps and the reused scratch buffers leave nothing behind."""
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(6, generator=g))
    opt = Lamb([w], lr=0.05)
    ref, m, v = w.detach().clone(), torch.zeros(6), torch.zeros(6)
    for _ in range(3):
        grad = torch.randn(6, generator=g)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        step = m / (v.sqrt() + 1e-6)
        ref = ref - 0.05 * (min(float(ref.norm()), 10.0) / float(step.norm())) * step
        w.grad = grad
        opt.step()
        torch.testing.assert_close(w.detach(), ref)


def test_lamb_fused_kernel_equals_the_separate_operations():
    """The fused Adam kernel path (used on CPU/CUDA float32) and the foreach path agree step by step."""
    g = torch.Generator().manual_seed(2)
    shapes = [(7, 5), (300,), (4, 3, 2), (3,)]
    a = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    a[-1].data.zero_()  # zero weight norm -> trust ratio 1
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused, plain = Lamb(a, lr=0.02), Lamb(b, lr=0.02, fused=False)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    assert fused._fused_ok(a, grads[0], 0.9, 0.999) == hasattr(torch, "_fused_adamw_")
    assert not plain._fused_ok(b, grads[0], 0.9, 0.999)
    assert not fused._fused_ok(a, grads[0], 0.9, 1 - 1e-12)  # 1 - beta^1e9 would not be 1
    for gs in grads:
        for pa, pb, gr in zip(a, b, gs):
            pa.grad, pb.grad = gr.clone(), gr.clone()
        fused.step()
        plain.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fused.state[pa]["exp_avg_sq"], plain.state[pb]["exp_avg_sq"])


def test_lookahead_first_sync_is_a_no_op_then_pulls_halfway():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = Lookahead(torch.optim.SGD([w], lr=1.0), alpha=0.5, k=2)
    for _ in range(2):  # fast 0 -> 2; first sync: slow copies fast, nothing moves
        w.grad = torch.tensor([-1.0])
        opt.step()
    assert w.item() == pytest.approx(2.0)
    for _ in range(2):  # fast 2 -> 4; slow moves halfway from 2: 3; fast reset to 3
        w.grad = torch.tensor([-1.0])
        opt.step()
    assert w.item() == pytest.approx(3.0)
    state = opt.state_dict()
    opt2 = Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), alpha=0.5, k=2)
    opt2.load_state_dict(state)
    assert opt2.counter == 4 and opt2.slow[0][0].item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        Lookahead(torch.optim.SGD([w], lr=1.0), alpha=2.0)


def _swa_run(maes, values):
    """Feed SWA one (validation MAE, weight value) pair at a time; return it and the update results."""
    w = torch.nn.Parameter(torch.tensor([0.0]))
    swa = SWA([w])
    added = []
    for m, value in zip(maes, values):
        w.data.fill_(value)
        added.append(swa.update(m))
    return swa, w, added


def test_swa_first_addition_copies_then_decays():
    swa, w, added = _swa_run([1.0, 1.005, 1.009], [4.0, 8.0, 2.0])
    assert added == [True, True, True]  # all within 1 % of the minimum 1.0
    # the first check resets (below 0.98 * 1e9): avg = 4, then the band adds 4 again (n = 2)
    d3, d4 = (1 / 3) ** (1 / 3), (1 / 4) ** (1 / 3)
    avg = 4.0
    avg += (8.0 - avg) * d3
    avg += (2.0 - avg) * d4
    assert swa.n_averaged == 4 and swa.avg[0].item() == pytest.approx(avg)
    assert swa.swap() and w.item() == pytest.approx(avg)


def test_swa_one_percent_band_and_failures():
    # 1.02 and 1.5 are more than 1 % above the minimum 1.0: not averaged
    swa, _, added = _swa_run([1.0, 1.02, 1.5, 1.01], [1.0, 2.0, 3.0, 5.0])
    assert added == [True, False, False, True]
    assert swa.n_averaged == 3 and swa.minimum == 1.0  # the reset's addition, then two in the band


def test_swa_resets_below_98_percent_of_last_reset_level():
    # 1.0 resets (below 0.98 * 1e9): avg = 10, n = 1, then the band adds the same weights (n = 2);
    # 0.99 is not below 0.98 * 1.0: averaged on top with decay (1/3)^(1/3);
    # 0.97 is below 0.98: reset, the average restarts from these weights and they are added twice
    swa, w, added = _swa_run([1.0, 0.99, 0.97], [10.0, 20.0, 7.0])
    assert added == [True, True, True]
    assert swa.resets == 2 and swa.maximum == 0.97 and swa.n_averaged == 2
    assert swa.avg[0].item() == pytest.approx(7.0)
    # a later worse error within the band of the new minimum is averaged with decay (1/3)^(1/3)
    w.data.fill_(9.0)
    assert swa.update(0.975)
    assert swa.avg[0].item() == pytest.approx(7.0 + 2.0 * (1 / 3) ** (1 / 3))
    assert not SWA([torch.nn.Parameter(torch.zeros(1))]).swap()


def test_swa_reset_outside_the_band_holds_the_reset_weights_alone():
    # From a fresh start a reset is always a new minimum (minimum >= 0.98 * maximum holds throughout);
    # from a constructed state whose minimum lies further below, the reset weights are the average alone.
    p = torch.nn.Parameter(torch.tensor([42.0]))
    swa = SWA([p])
    swa.minimum, swa.maximum = 0.5, 1.0
    assert not swa.update(0.9)  # 0.9 < 0.98 resets, but 0.9 > 1.01 * 0.5: no minimum found
    assert swa.resets == 1 and swa.n_averaged == 1 and swa.avg[0].item() == pytest.approx(42.0)
    assert swa.swap() and p.item() == pytest.approx(42.0)


class _DocSWA:
    """The CrabNet SWA rule written out from docs/model-and-recipe.md on numpy vectors, apart from the package."""

    def __init__(self, size: int, minimum: float = 1e9, maximum: float = 1e9):
        self.buffer = np.zeros(size)
        self.n_avg = 0
        self.minimum = minimum
        self.maximum = maximum

    def add(self, w: np.ndarray) -> None:
        d = (1.0 / (self.n_avg + 1)) ** (1.0 / 3.0)
        self.buffer = self.buffer + (w - self.buffer) * d
        self.n_avg += 1

    def update(self, m: float, w: np.ndarray) -> bool:
        if m < 0.98 * self.maximum:  # 1. reset: buffer zeroed, n_avg 0, then one addition
            self.buffer = np.zeros_like(self.buffer)
            self.n_avg = 0
            self.add(w)
            self.maximum = m
        if m < self.minimum:  # 2.
            self.minimum = m
        if m <= 1.01 * self.minimum:  # 3.
            self.add(w)
            return True
        return False


SWA_SEQUENCES = {
    # (validation MAEs after each batch of SWA epochs, starting minimum and maximum)
    "first check only": ([1.0], 1e9, 1e9),
    "band without reset": ([1.0, 1.005, 1.009, 1.02, 1.001], 1e9, 1e9),
    "reset inside the band": ([1.0, 0.97, 0.975, 0.95], 1e9, 1e9),
    "several resets": ([2.0, 1.9, 1.95, 1.5, 1.49, 1.2, 1.21, 1.3, 1.0, 0.99], 1e9, 1e9),
    "ends right after a reset": ([1.0, 1.004, 1.2, 0.9], 1e9, 1e9),
    "worse after resets": ([1.0, 0.5, 1.5, 0.49, 0.6, 0.48, 0.485], 1e9, 1e9),
    "reset outside the band": ([0.9, 0.95, 0.505, 0.8, 0.7], 0.5, 1.0),  # constructed start state
}


@pytest.mark.parametrize("name", list(SWA_SEQUENCES))
def test_swa_equals_the_rule_written_out_from_the_spec(name):
    maes, minimum, maximum = SWA_SEQUENCES[name]
    rng = np.random.default_rng(len(maes))
    ws = rng.normal(size=(len(maes), 5))  # (steps, weights)
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    ours, spec = SWA([p]), _DocSWA(5, minimum, maximum)
    ours.minimum, ours.maximum = minimum, maximum
    for m, w in zip(maes, ws):
        p.data.copy_(torch.from_numpy(w))
        assert ours.update(m) == spec.update(m, w)
        assert (ours.n_averaged, ours.minimum, ours.maximum) == (spec.n_avg, spec.minimum, spec.maximum)
        np.testing.assert_allclose(ours.avg[0].numpy(), spec.buffer, rtol=1e-12, atol=1e-12)
    assert ours.swap()
    np.testing.assert_allclose(p.detach().numpy(), spec.buffer, rtol=1e-12, atol=1e-12)


def test_swa_state_round_trip():
    swa, _, _ = _swa_run([1.0, 0.97, 0.98], [1.0, 2.0, 3.0])
    other = SWA([torch.nn.Parameter(torch.zeros(1))])
    other.load_state_dict(swa.state_dict())
    assert (other.n_averaged, other.minimum, other.maximum, other.resets) == (
        swa.n_averaged,
        swa.minimum,
        swa.maximum,
        swa.resets,
    )
    torch.testing.assert_close(other.avg[0], swa.avg[0])


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
