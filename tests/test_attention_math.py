"""Captured attention maps are the weights the layers really use (run: pytest tests/test_attention_math.py).

The capture (``forward_internals(..., attention=True)``) computes the weights beside the fused
attention, so a wrong scale, mask or head split there would not change any prediction. Here
every layer's captured weights are checked, head by head, against

- ``torch.nn.MultiheadAttention(average_attn_weights=False)`` carrying the layer's own
  in-projection and out-projection (an independent implementation of the same attention), and
- the layer's attention output itself: captured weights @ V, heads concatenated, through the
  out-projection, equals what the layer's ``self_attn`` returned in that forward pass.

Everything runs in eval mode in float32 on compounds of 1-4 elements padded to a common width.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from crabnet.data import compositions_from_formulas
from crabnet.training.recipe import build_model

FORMULAS = ["Fe2O3", "NaCl", "Li0.5Co0.5O2", "Al2MgO4", "K", "BaTiO3", "LiFePO4", "Cu3Zn"]
CONFIGS = {"small, 4 heads": dict(d_model=32, n_heads=4, d_ff=64, head_dims=(32, 16)), "published size": {}}
ATOL = 2e-6


def _model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("onehot", **config).eval()
    with torch.no_grad():  # sharper attention than at initialisation, so a wrong scale cannot hide
        for layer in model.layers:
            d = layer.self_attn.in_proj_weight.shape[1]
            layer.self_attn.in_proj_weight[: 2 * d] *= 4.0
            layer.self_attn.in_proj_bias.normal_(0.0, 0.5)
            layer.self_attn.out_proj.bias.normal_(0.0, 0.5)
    return model


def _inputs(width: int = 5):
    d = compositions_from_formulas(FORMULAS).padded(width)
    return torch.as_tensor(d.elements), torch.as_tensor(d.fractions, dtype=torch.float32)


def _run(model, el, fr):
    """forward_internals with the output of every layer's self_attn recorded by a hook."""
    outputs: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args, out):
            outputs[i] = (out[0] if isinstance(out, tuple) else out).detach()

        return record

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            internals = model.forward_internals(el, fr, attention=True, hidden=True)
    finally:
        for h in handles:
            h.remove()
    return internals, outputs


def _reference_mha(sa, n_heads: int) -> nn.MultiheadAttention:
    d = sa.in_proj_weight.shape[1]
    mha = nn.MultiheadAttention(d, n_heads, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(sa.in_proj_weight)
        mha.in_proj_bias.copy_(sa.in_proj_bias)
        mha.out_proj.weight.copy_(sa.out_proj.weight)
        mha.out_proj.bias.copy_(sa.out_proj.bias)
    return mha


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_captured_weights_equal_multihead_attention_per_head(config):
    model = _model(config)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    el, fr = _inputs()
    keep = el > 0
    internals, attn_out = _run(model, el, fr)
    att = internals.attention  # (B, L, H, E, E)
    assert att.shape == (len(FORMULAS), n_layers, n_heads, 5, 5) and att.dtype == torch.float32
    assert len(internals.hidden) == n_layers + 1
    q_real = keep[:, None, :, None]  # (B, 1, E, 1): rows of real query elements
    for i in range(n_layers):
        x = internals.hidden[i]  # input of layer i
        mha = _reference_mha(model.layers[i].self_attn, n_heads)
        with torch.no_grad():
            ref_out, ref_w = mha(x, x, x, key_padding_mask=~keep, need_weights=True, average_attn_weights=False)
        got = att[:, i]  # (B, H, E, E)
        # real query rows: the same distribution over the keys, head by head
        torch.testing.assert_close(torch.where(q_real, got, 0.0), torch.where(q_real, ref_w, 0.0), rtol=0, atol=ATOL)
        # padding: no weight on padding keys, padding query rows empty
        assert (got[~keep[:, None, :, None].expand_as(got)] == 0).all()
        assert (got.masked_select(~keep[:, None, None, :]) == 0).all()
        # the layer's attention output equals the reference output at the real elements
        torch.testing.assert_close(attn_out[i][keep], ref_out[keep], rtol=0, atol=5 * ATOL)

        # the check has power: heads differ from each other and are far from uniform
        real = got[keep.sum(1) >= 3]  # compounds of 3+ elements
        for h in range(1, n_heads):
            assert (real[:, h] - real[:, 0]).abs().max() > 0.05, f"layer {i}: heads 0 and {h} look alike"
        k3 = (keep.sum(1) == 3).nonzero()[0, 0]
        assert (got[k3, :, :3, :3] - 1 / 3).abs().max() > 0.1, f"layer {i}: attention is nearly uniform"


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_weights_times_values_give_the_layer_output(config):
    """Per head: softmax weights @ V_h, heads concatenated in order, then out_proj = self_attn output."""
    model = _model(config, seed=1)
    n_layers, n_heads, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    dh = d // n_heads
    el, fr = _inputs(width=6)
    keep = el > 0
    internals, attn_out = _run(model, el, fr)
    for i in range(n_layers):
        sa = model.layers[i].self_attn
        x = internals.hidden[i].double()
        w_v = sa.in_proj_weight[2 * d :].detach().double()
        b_v = sa.in_proj_bias[2 * d :].detach().double()
        v = x @ w_v.T + b_v  # (B, E, D), not yet split by head
        weights = internals.attention[:, i].double()  # (B, H, E, E)
        heads = [weights[:, h] @ v[..., h * dh : (h + 1) * dh] for h in range(n_heads)]  # H x (B, E, Dh)
        mixed = torch.cat(heads, dim=-1)  # (B, E, D)
        w_o, b_o = sa.out_proj.weight.detach().double(), sa.out_proj.bias.detach().double()
        out = mixed @ w_o.T + b_o
        np.testing.assert_allclose(out[keep].numpy(), attn_out[i][keep].double().numpy(), rtol=0, atol=1e-5)
        # padding query rows carry no weight: only the out-projection bias is left there
        if (~keep).any():
            np.testing.assert_allclose(out[~keep].numpy(), b_o.expand(int((~keep).sum()), d).numpy(), atol=1e-12)


def test_capture_is_independent_of_the_batch():
    """A compound's maps do not depend on its neighbours in the batch nor on the padding width."""
    model = _model(CONFIGS["small, 4 heads"], seed=2)
    el, fr = _inputs(width=4)
    with torch.no_grad():
        batch = model.forward_internals(el, fr, attention=True).attention
        for b in (0, 3, 6):
            k = int((el[b] > 0).sum())
            alone = model.forward_internals(el[b : b + 1, :k], fr[b : b + 1, :k], attention=True).attention[0]
            torch.testing.assert_close(batch[b, :, :, :k, :k], alone, rtol=0, atol=ATOL)
