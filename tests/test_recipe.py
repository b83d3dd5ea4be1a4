"""The recipe inside ``fit`` (docs/model-and-recipe.md): learning-rate cycle, SWA average, early stop, precision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import crabnet.training.evaluate
from crabnet.data import load_dataset
from crabnet.training.evaluate import predict
from crabnet.training.loop import fit
from crabnet.training.recipe import Scaler, build_model, make_recipe, resolve_precision
from crabnet.utils import seed_everything

SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


def _setup(tiny_data, seed=0):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    seed_everything(seed)
    return splits, build_model("onehot", **SMALL), Scaler.fit(splits["train"].target)


def test_learning_rate_of_every_step_follows_the_triangle(tiny_data):
    splits, model, scaler = _setup(tiny_data)
    recipe = make_recipe("immi", epochs=5, batch_size=16, early_stop=0)  # 64/16 = 4 batches, half-cycle 4
    hist = fit(model, splits["train"], splits["val"], scaler, recipe, progress=False, precision="fp32")
    assert len(hist.lr) == hist.steps == 20
    # independently: up from 1e-4 to 6e-3 over 4 steps, down over 4, ...
    lo, hi = 1e-4, 6e-3
    expected = [lo + (hi - lo) * (1 - abs((i % 8) / 4 - 1)) for i in range(20)]
    np.testing.assert_allclose(hist.lr, expected, rtol=1e-12, atol=1e-15)
    assert hist.epoch_lr == [hist.lr[4 * e + 3] for e in range(5)]


def test_final_weights_are_the_swa_average_of_the_rule(tiny_data):
    """Re-derive the CrabNet SWA average from the weights and validation MAEs seen after each step."""
    splits, model, scaler = _setup(tiny_data)
    recipe = make_recipe("immi", epochs=6, batch_size=16, early_stop=0)  # SWA epochs 1, 3, 5
    params = [p for p in model.parameters() if p.requires_grad]
    seen = []

    def callback(event, epoch, step):
        if event == "step" and (epoch + 1) % 2 == 0 and epoch >= 1:
            val_pred, _ = predict(model, splits["val"], scaler)  # fp32, as fit's validation below
            m = float(np.mean(np.abs(val_pred - splits["val"].target)))
            seen.append((m, [p.detach().clone() for p in params]))

    hist = fit(
        model, splits["train"], splits["val"], scaler, recipe, progress=False, callback=callback, precision="fp32"
    )
    assert len(seen) == 3 * 4
    minimum = maximum = 1e9
    avg, n, added, resets = None, 0, 0, 0
    for m, w in seen:
        if m < 0.98 * maximum:
            n, maximum, resets = 0, m, resets + 1
        minimum = min(minimum, m)
        if m <= 1.01 * minimum:
            d = (1.0 / (n + 1)) ** (1.0 / 3.0)
            avg = [x.clone() for x in w] if n == 0 else [a + (x - a) * d for a, x in zip(avg, w)]
            n, added = n + 1, added + 1
    assert hist.swapped_swa and hist.swa_updates == added and hist.swa_resets == resets
    assert 0 < added < len(seen)  # the 1 % band let some weights in and kept others out
    for p, a in zip(params, avg):
        torch.testing.assert_close(p.detach(), a, rtol=1e-5, atol=1e-6)
    # the averaged weights differ from the last ones: the swap really happened
    assert any(not torch.allclose(p.detach(), w) for p, w in zip(params, seen[-1][1]))


def test_three_failed_swa_epochs_stop_training(tiny_data, monkeypatch):
    """Validation errors that only grow: the first SWA epoch averages, the next three fail, then stop."""
    splits, model, scaler = _setup(tiny_data)
    errors = itertools.count(1.0)  # 1, 2, 3, ...: never within 1 % of the minimum again
    monkeypatch.setattr(crabnet.training.evaluate.Validator, "__call__", lambda self, model: next(errors))
    recipe = make_recipe("immi", epochs=30, batch_size=16)
    hist = fit(model, splits["train"], splits["val"], scaler, recipe, progress=False, val_every=0, precision="fp32")
    # SWA epochs 1, 3, 5, 7: epoch 1 averages its first batch only, 3, 5 and 7 fail -> stop after epoch 7
    assert hist.stopped_early and hist.epochs_run == 8 and hist.swa_failures == 3
    assert hist.swa_updates == 1 and hist.epoch_swa == [-1, 1, -1, 0, -1, 0, -1, 0]
    assert hist.swapped_swa


def test_npj_recipe_checks_swa_every_20th_epoch_from_epoch_19(tiny_data, monkeypatch):
    splits, model, scaler = _setup(tiny_data)
    monkeypatch.setattr(crabnet.training.evaluate.Validator, "__call__", lambda self, model: 1.0)
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        make_recipe("npj", epochs=40, batch_size=64),
        progress=False,
        val_every=0,
        precision="fp32",
    )
    assert [e for e, a in enumerate(hist.epoch_swa) if a >= 0] == [19, 39]


def test_precision_resolution(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_bf16_training_learns_and_keeps_fp32_weights(tiny_data):
    splits, model, scaler = _setup(tiny_data)
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        make_recipe("immi", epochs=4, batch_size=16),
        progress=False,
        precision="bf16",
    )
    assert hist.precision == "bf16" and hist.train_loss[-1] < hist.train_loss[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    pred, _ = predict(model, splits["test"], scaler)
    assert np.isfinite(pred).all()


def test_short_run_is_saved_beside_a_full_recipe_checkpoint(tiny_data):
    from crabnet.training.checkpoint import load_checkpoint, save_checkpoint, save_trained
    from crabnet.training.state import History

    splits, model, scaler = _setup(tiny_data)
    short = make_recipe("immi", epochs=2)
    hist = History(epochs_run=2, precision="fp32")
    path, meta = save_trained(
        tiny_data,
        "tiny",
        "onehot",
        short,
        model,
        scaler,
        hist,
        splits["test"],
        seed=0,
        written_by="test",
        beside_full=True,
    )
    assert path.name == "tiny__onehot.pt" and meta["full_recipe"] is None and np.isfinite(meta["test_mae"])
    save_checkpoint(path, model, scaler, {"full_recipe": "immi"})  # now a full-recipe checkpoint is there
    path2, _ = save_trained(
        tiny_data,
        "tiny",
        "onehot",
        short,
        model,
        scaler,
        hist,
        splits["test"],
        seed=0,
        written_by="test",
        beside_full=True,
    )
    assert path2.name == "tiny__onehot__attention.pt"
    assert load_checkpoint(path)[2]["full_recipe"] == "immi"  # kept
    path3, _ = save_trained(
        tiny_data,
        "tiny",
        "onehot",
        make_recipe("npj", epochs=2),
        model,
        scaler,
        hist,
        splits["test"],
        seed=0,
        written_by="test",
    )
    assert path3.name == "tiny__onehot__npj.pt"
