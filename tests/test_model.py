"""Model: parameter counts, fractional encodings, attention capture, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crabnet.data import compositions_from_formulas
from crabnet.training import model as model_module
from crabnet.training.checkpoint import load_checkpoint, save_checkpoint
from crabnet.training.evaluate import predict
from crabnet.training.model import CrabNetConfig, FractionalEncoder, gather_rows
from crabnet.training.recipe import Scaler, build_model


@pytest.mark.parametrize("features, n", [("mat2vec", 11_987_206), ("onehot", 11_945_222)])
def test_parameter_counts(features, n):
    assert build_model(features).n_params() == n


def test_fractional_encoder_index_and_values():
    lin = FractionalEncoder(256, 5000, 50.0, log=False)
    log = FractionalEncoder(256, 5000, 50.0, log=True)
    x = torch.tensor([1e-6, 0.5, 1.0, 0.0])
    assert lin.index(x).tolist() == [0, 2499, 4999, 0]
    # log: 0.0025*log2(x)^2 -> 0.25: 0.01 -> row 49; 0 -> clamp to 1 -> row 4999; 1 -> 0 -> row 0
    assert log.index(torch.tensor([0.25, 0.0, 1.0])).tolist() == [49, 4999, 0]
    v = lin(torch.tensor([[0.5]]))[0, 0]  # (256,)
    assert v[0].item() == pytest.approx(math.sin(2499), abs=1e-5)
    assert v[1].item() == pytest.approx(math.cos(2499 / 50 ** (2 * 1 / 256)), abs=1e-4)
    assert v[255].item() == pytest.approx(math.cos(2499 / 50 ** (2 * 255 / 256)), abs=1e-5)


def _batch():
    d = compositions_from_formulas(["Fe2O3", "NaCl", "Li0.5Co0.5O2", "Al2O3", "K", "BaTiO3"])
    return torch.as_tensor(d.elements), torch.as_tensor(d.fractions)


def test_attention_rows_sum_to_one_and_padding_zero():
    torch.manual_seed(0)
    model = build_model("mat2vec").eval()
    el, fr = _batch()
    with torch.no_grad():
        att = model.forward_internals(el, fr, attention=True).attention  # (B, L, H, E, E)
    assert att.shape == (6, 3, 4, 3, 3)
    keep = el > 0
    for b in range(len(el)):
        k = int(keep[b].sum())
        np.testing.assert_allclose(att[b, :, :, :k, :k].sum(-1).numpy(), 1.0, rtol=1e-5)
        assert (att[b, :, :, k:, :] == 0).all() and (att[b, :, :, :, k:] == 0).all()


def test_predictions_identical_with_and_without_capture():
    torch.manual_seed(1)
    model = build_model("onehot").eval()
    el, fr = _batch()
    with torch.no_grad():
        plain = model(el, fr)
        internals = model.forward_internals(el, fr, attention=True, hidden=True)
    assert torch.equal(plain, internals.output)
    assert len(internals.hidden) == 4 and internals.hidden[0].shape == (6, 3, 512)


def test_padding_width_does_not_change_output():
    torch.manual_seed(2)
    model = build_model("mat2vec").eval()
    el, fr = _batch()
    wide_el = torch.nn.functional.pad(el, (0, 5))
    wide_fr = torch.nn.functional.pad(fr, (0, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(el, fr), model(wide_el, wide_fr), rtol=1e-5, atol=1e-5)


def test_packed_padded_batch_equals_each_compound_alone():
    """With padding the per-element blocks run on real slots only; alone (no padding) they run on all."""
    torch.manual_seed(3)
    model = build_model("onehot").eval()
    el, fr = _batch()
    with torch.no_grad():
        batch = model.forward_internals(el, fr, hidden=True)
        for b in range(len(el)):
            k = int((el[b] > 0).sum())
            alone = model.forward_internals(el[b : b + 1, :k], fr[b : b + 1, :k], hidden=True)
            torch.testing.assert_close(alone.output[0], batch.output[b], rtol=1e-5, atol=1e-5)
            for h_alone, h_batch in zip(alone.hidden, batch.hidden):
                torch.testing.assert_close(h_alone[0], h_batch[b, :k], rtol=1e-5, atol=1e-5)
    assert (batch.hidden[-1][el == 0] == 0).all()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = build_model("onehot", n_elements=3)
    scaler = Scaler(mean=2.5, std=0.75)
    path = save_checkpoint(tmp_path / "m.pt", model, scaler, {"dataset": "tiny", "features": "onehot"})
    loaded, s2, meta = load_checkpoint(path)
    assert s2 == scaler and meta["dataset"] == "tiny" and "created_with" in meta
    assert loaded.cfg == model.cfg == CrabNetConfig.from_dict(model.cfg.to_dict())
    d = compositions_from_formulas(["Fe2O3", "NaCl"])
    p1, u1 = predict(model.eval(), d, scaler)
    p2, u2 = predict(loaded, d, scaler)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(u1, u2)
    # the file holds only tensors and plain values: loadable with weights_only=True
    torch.load(path, weights_only=True)
    assert not list(tmp_path.glob(".m.pt*"))  # no temporary left behind


def test_checkpoint_suits_recipe():
    from crabnet.training.checkpoint import checkpoint_suits
    from crabnet.training.recipe import make_recipe

    immi, npj = make_recipe("immi"), make_recipe("npj")
    assert immi.is_full() and npj.is_full() and (immi.epochs_step, npj.epochs_step) == (1, 10)
    assert not make_recipe("immi", epochs=8).is_full() and not make_recipe("npj", epochs_step=2).is_full()
    assert make_recipe("npj", eval_batch_size=64).is_full()  # evaluation batch size changes no result
    assert checkpoint_suits({"full_recipe": "immi", "swa_rule": 2}, immi)
    assert not checkpoint_suits({"full_recipe": "immi", "swa_rule": 2}, npj)
    assert not checkpoint_suits({"full_recipe": "immi"}, immi)  # made before the reset added the weights
    assert not checkpoint_suits({"published_recipe": True}, npj)  # made before the exact SWA rule
    assert checkpoint_suits({"full_recipe": None}, make_recipe("immi", epochs=8))
    assert checkpoint_suits({}, make_recipe("npj", epochs=8))
    with pytest.raises(ValueError, match="unknown recipe"):
        make_recipe("adam")


def test_encoder_layers_start_identical():
    """As nn.TransformerEncoder does: one layer initialised, then copied (docs/model-and-recipe.md)."""
    torch.manual_seed(4)
    model = build_model("mat2vec")
    first = model.layers[0].state_dict()
    for layer in model.layers[1:]:
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, first[name]), name
        assert all(p is not q for p, q in zip(layer.parameters(), model.layers[0].parameters()))  # copies, not shared


def test_gather_rows_pads_to_bucket():
    x = torch.arange(20.0).view(10, 2)
    real = torch.tensor([1, 4, 7])
    out = gather_rows(x, real, 4)
    assert out.shape == (4, 2)
    torch.testing.assert_close(out[:3], x[real])
    assert (out[3] == 0).all()
    assert gather_rows(x, real, 1).shape == (3, 2)  # no bucket: the real rows only
    assert gather_rows(x, torch.tensor([0, 1, 2, 3]), 4).shape == (4, 2)  # already a multiple


def test_row_buckets_under_autocast_change_no_real_result(monkeypatch):
    """bf16 autocast pads the real rows to a multiple of ROW_BUCKET; real slots and outputs are as without it."""
    torch.manual_seed(3)
    model = build_model("onehot").eval()
    el, fr = _batch()
    rows, bucket = [], model_module.ROW_BUCKET
    model.layers[0].linear1.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bucketed = model.forward_internals(el, fr, hidden=True)
        monkeypatch.setattr(model_module, "ROW_BUCKET", 1)
        plain = model.forward_internals(el, fr, hidden=True)
    torch.testing.assert_close(bucketed.output, plain.output, rtol=2e-2, atol=2e-2)
    for hb, hp in zip(bucketed.hidden, plain.hidden):
        torch.testing.assert_close(hb.float(), hp.float(), rtol=2e-2, atol=2e-2)
    assert (bucketed.hidden[-1][el == 0] == 0).all()  # padding rows still 0
    assert rows == [bucket, int((el > 0).sum())]  # 13 real slots -> 64 rows, then 13


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_rate_scale_and_seeding(dtype):
    """The CPU dropout drops ~p of the elements, scales the rest by 1/(1-p) and follows torch's seed."""
    x = torch.ones(400_000, dtype=dtype)
    torch.manual_seed(3)
    a = model_module.dropout(x, 0.1, training=True)
    torch.manual_seed(3)
    b = model_module.dropout(x, 0.1, training=True)
    assert torch.equal(a, b)  # reproducible from torch's generator alone
    dropped = float((a == 0).float().mean())
    assert abs(dropped - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(x))  # 5 standard errors
    kept = a[a != 0].float()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.9), rtol=4e-3, atol=0)  # bf16 rounds 1/0.9
    assert not torch.equal(a, model_module.dropout(x, 0.1, training=True))  # a new mask per call
    assert model_module.dropout(x, 0.1, training=False) is x


def test_written_out_attention_equals_the_fused_kernel():
    """The CPU's written-out attention and F.scaled_dot_product_attention (used off the CPU) agree."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(5, 4, 6, 8, generator=g) for _ in range(3))  # (B, H, E, Dh)
    keep = torch.ones(5, 6, dtype=torch.bool)
    keep[1, 4:] = False
    keep[3, 2:] = False
    mask = keep[:, None, None, :]
    written = model_module.attend(q, k, v, mask, 0.0, fused=False)
    fused = model_module.attend(q, k, v, mask, 0.0, fused=True)
    torch.testing.assert_close(written, fused, rtol=1e-5, atol=1e-6)
    # a masked key gets no weight: changing its value changes nothing
    v2 = v.clone()
    v2[3, :, 2:] = 100.0
    torch.testing.assert_close(model_module.attend(q, k, v2, mask, 0.0, fused=False), written)
