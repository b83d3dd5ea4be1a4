"""Attention stores with many chunks, shards and blocks (run: pytest tests/test_store_layout.py).

With the real byte budgets of ``crabnet.explain.store`` every test store fits in one staging chunk,
one shard and one reorganisation block, so the batched capture and the multi-block
reorganisation would never run. Here the budgets are shrunk (monkeypatched) so that a store of
11 compounds has staging chunks of 2 compounds, shards of 2 compounds and reorganisation blocks
of 4 compounds, and known maps are written and read back exactly, compound by compound.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from conftest import make_formulas

from crabnet.data import compositions_from_formulas
from crabnet.explain import store as capture_store
from crabnet.explain.capture import capture_split
from crabnet.explain.store import AttentionStore, AttentionWriter, partial_path
from crabnet.training.evaluate import predict
from crabnet.training.recipe import Scaler, build_model
from crabnet.utils import seed_everything

N, L, H = 11, 2, 3  # compounds, layers, heads
CHUNK_N, SHARD_N, BLOCK_N = 2, 2, 4  # compounds per staging chunk, per shard, per reorganisation block
ATTRS = {"dataset": "tiny", "features": "onehot", "split": "val", "capture": "epoch"}


def _data(n: int = N, seed: int = 0):
    formulas = make_formulas(n, np.random.default_rng(seed))
    formulas[3] = "Fe"  # one single-element compound among them
    return compositions_from_formulas(formulas, np.linspace(1.0, 2.0, n))


def _tiny_budgets(monkeypatch, width: int, captures: int, n_layers: int = L, n_heads: int = H) -> None:
    """Shrink the byte budgets so the layout has CHUNK_N / SHARD_N / BLOCK_N compounds per piece."""
    per_map = 4 * n_layers * n_heads * width * width
    monkeypatch.setattr(capture_store, "STAGING_CHUNK_BYTES", CHUNK_N * per_map + per_map // 2)
    monkeypatch.setattr(capture_store, "SHARD_BYTES", SHARD_N * captures * per_map + per_map // 2)
    monkeypatch.setattr(capture_store, "BLOCK_BYTES", (BLOCK_N + 1) * captures * per_map)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class _ReadSpy:
    """Stands in for the staging array and records the compound rows of every read."""

    def __init__(self, array):
        self.array, self.rows = array, []

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        self.rows.append(np.arange(self.array.shape[0])[first])
        return self.array[key]

    def __getattr__(self, name):
        return getattr(self.array, name)


def _known_maps(n: int, c: int, width: int, seed: int) -> np.ndarray:
    """(n, c, L, H, E, E) float32, every value distinct and nonzero."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, c, L, H, width, width)) + 0.5).astype(np.float32)


def test_known_maps_through_staging_and_blocked_reorganisation(tmp_path, monkeypatch):
    data = _data()
    E, C = data.width, 4
    _tiny_budgets(monkeypatch, E, C)
    maps = _known_maps(N, C, E, seed=1)
    preds = np.arange(N * C, dtype=np.float32).reshape(N, C) / 8
    path = tmp_path / "attention.zarr"
    writer = AttentionWriter(path, data, L, H, ATTRS)
    assert writer.chunk_n == CHUNK_N
    for c in range(C):
        assert writer.begin_capture(10 * c) == c
        # batches of 3 across the staging chunks of 2, in a different order for each capture
        starts = list(range(0, N, 3))
        for start in starts if c % 2 == 0 else starts[::-1]:
            writer.write_batch(c, start, maps[start : start + 3, c])
        writer.write_prediction(c, preds[:, c])

    # staging: capture-major chunks of 2 compounds, holding exactly what was written
    staging = partial_path(path)
    assert writer.att.chunks == (CHUNK_N, 1, L, H, E, E)
    assert len(_files(staging / "attention" / "c")) == math.ceil(N / CHUNK_N) * C
    np.testing.assert_array_equal(writer.att[:], maps)

    spy = _ReadSpy(writer.att)
    writer.att = spy
    writer.finalize(progress=False)
    assert not staging.exists()
    # reorganised in blocks of at most BLOCK_N compounds that cover every compound once
    assert len(spy.rows) == math.ceil(N / BLOCK_N) and all(len(r) <= BLOCK_N for r in spy.rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(spy.rows)), np.arange(N))

    store = AttentionStore(path)
    att = store.group["attention"]
    assert att.chunks == (1, C, L, H, E, E) and att.shards == (SHARD_N, C, L, H, E, E)
    assert len(_files(path / "attention" / "c")) == math.ceil(N / SHARD_N)  # one file per shard
    assert store.steps.tolist() == [0, 10, 20, 30] and store.n_captures == C
    for i in range(N):
        h = store.compound(i)
        k = int((data.elements[i] > 0).sum())
        assert h.formula == data.formula[i] and h.elements.tolist() == data.elements[i, :k].tolist()
        np.testing.assert_array_equal(h.attention, maps[i, :, :, :, :k, :k])
        np.testing.assert_array_equal(att[i], maps[i])  # padding slots too
        np.testing.assert_array_equal(h.prediction, preds[i])
        assert store.compound(store.formulas[i]).index == store.find(data.formula[i])


def test_resumed_staging_keeps_first_captures(tmp_path, monkeypatch):
    """A reopened multi-chunk staging store keeps the captures the state had and replaces the rest."""
    data = _data(seed=3)
    E, C = data.width, 3
    _tiny_budgets(monkeypatch, E, C)
    old, new = _known_maps(N, C, E, seed=4), _known_maps(N, C, E, seed=5)
    path = tmp_path / "attention.zarr"
    first = AttentionWriter(path, data, L, H, ATTRS)
    for c in range(C):
        first.begin_capture(c)
        for start in range(0, N, CHUNK_N):
            first.write_batch(c, start, old[start : start + CHUNK_N, c])
        first.write_prediction(c, np.full(N, c, np.float32))
    # the run dies; a new writer reopens the staging store and keeps captures 0 and 1
    writer = AttentionWriter(path, data, L, H, ATTRS, resume=True)
    assert writer.resumed
    writer.restore([0, 1])
    assert writer.begin_capture(2) == 2
    for start in range(0, N, 5):
        writer.write_batch(2, start, new[start : start + 5, 2])
    writer.write_prediction(2, np.full(N, 7, np.float32))
    writer.finalize(progress=False)
    store = AttentionStore(path)
    assert store.steps.tolist() == [0, 1, 2] and store.group["attention"].shards[0] == SHARD_N
    for i in range(N):
        got = store.group["attention"][i]
        np.testing.assert_array_equal(got[:2], old[i, :2])
        np.testing.assert_array_equal(got[2], new[i, 2])
        np.testing.assert_array_equal(store.compound(i).prediction, [0, 1, 7])


def test_batched_capture_of_a_model_matches_each_compound_alone(tmp_path, monkeypatch):
    """capture_split in batches of one staging chunk: every compound's maps are its own (computed
    here for the compounds of each size together, without padding)."""
    data = _data(seed=6)
    E, C, n_layers, n_heads = data.width, 3, 3, 2
    _tiny_budgets(monkeypatch, E, C, n_layers, n_heads)
    seed_everything(0)
    model = build_model("onehot", d_model=16, n_heads=n_heads, d_ff=32, head_dims=(16,)).eval()
    scaler = Scaler(1.5, 0.5)
    path = tmp_path / "attention.zarr"
    writer = AttentionWriter(path, data, n_layers, n_heads, ATTRS)
    assert writer.chunk_n == CHUNK_N
    expected = np.zeros((N, C, n_layers, n_heads, E, E), np.float32)
    expected_pred = np.zeros((N, C))
    for c in range(C):
        with torch.no_grad():
            for p in model.parameters():  # another model state for each capture
                p.add_(0.3 * torch.randn_like(p))
            n_real = (data.elements > 0).sum(1)
            for k in np.unique(n_real):  # compounds of k elements together, without padding
                rows = np.flatnonzero(n_real == k)
                el = torch.as_tensor(data.elements[rows, :k])
                fr = torch.as_tensor(data.fractions[rows, :k])
                expected[rows, c, :, :, :k, :k] = model.forward_internals(el, fr, attention=True).attention.numpy()
        expected_pred[:, c] = predict(model, data, scaler)[0]
        pred = capture_split(model, data, scaler, writer, step=c)
        np.testing.assert_allclose(pred, expected_pred[:, c], rtol=1e-5, atol=1e-5)
    writer.finalize(progress=False)
    store = AttentionStore(path)
    assert store.group["attention"].shards[0] == SHARD_N
    for i in range(N):
        h = store.compound(i)
        k = len(h.elements)
        np.testing.assert_allclose(h.attention, expected[i, :, :, :, :k, :k], rtol=0, atol=1e-5)
        np.testing.assert_allclose(h.prediction, expected_pred[i], rtol=1e-5, atol=1e-5)
    # the captures differ from one another, so a capture written into the wrong slot would show
    assert not np.allclose(expected[:, 0], expected[:, 1], atol=1e-3)
