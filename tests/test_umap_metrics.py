"""UMAP metrics against independent computations, a tiny real UMAP, pooled vectors by hand.

Run: pytest tests/test_umap_metrics.py

- The kNN and trustworthiness figures of steps 6 and 7 (``crabnet.maps.figures``) equal values
  derived by hand on a constructed case and values computed here from full distance matrices.
- A tiny seeded UMAP (``fit_umap``) runs in the default suite: in a subprocess with
  ``NUMBA_DISABLE_JIT=1``, because compiling umap-learn's numba functions costs 20-40 s per
  process while the same Python code runs 60 points in about a second. The compiled path is
  covered by the slow ``test_umap_smoke_seeded`` in ``tests/test_umap.py``.
- The pooled compound vectors cached by ``crabnet.maps.vectors.collect`` equal an independent
  pooling of each compound's own layer inputs, computed without padding in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_formulas

from crabnet.data import compositions_from_formulas
from crabnet.maps import projection as proj
from crabnet.maps.vectors import collect
from crabnet.training.recipe import Scaler, build_model
from crabnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


# --------------------------------------------------------------------------------------------
# independent implementations (full distance matrices)


def distances(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if metric == "euclidean":
        return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    if metric == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - unit @ unit.T
    raise ValueError(metric)


def neighbours(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """(n, k) nearest other points, nearest first."""
    d = distances(x, metric)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def r2_by_neighbours(x: np.ndarray, y: np.ndarray, k: int, metric: str) -> float:
    pred = y[neighbours(x, k, metric)].mean(1)
    return 1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def trustworthiness_by_ranks(x: np.ndarray, coords: np.ndarray, k: int, metric: str) -> float:
    """Venna & Kaski: 1 - 2/(n k (2n - 3k - 1)) * sum over embedding neighbours j of i that are not
    input-space neighbours of (rank of j among i's input-space neighbours - k)."""
    n = len(x)
    d = distances(x, metric)
    np.fill_diagonal(d, np.inf)
    rank = np.empty((n, n), dtype=np.int64)
    rank[np.arange(n)[:, None], np.argsort(d, axis=1)] = np.arange(1, n + 1)  # 1 = nearest
    near_embedding = neighbours(coords, k, "euclidean")
    penalty = sum(max(0, rank[i, j] - k) for i in range(n) for j in near_embedding[i])
    return 1.0 - 2.0 / (n * k * (2 * n - 3 * k - 1)) * penalty


def vote_by_neighbours(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    nb = labels[neighbours(x, k, "euclidean")]
    votes = [min(v for v in set(row) if list(row).count(v) == max(list(row).count(u) for u in row)) for row in nb]
    return float(np.mean(np.asarray(votes) == labels))


# --------------------------------------------------------------------------------------------
# constructed cases with values derived by hand


def test_knn_r2_on_a_line_by_hand():
    """10 points on a line, target = position, k = 2: inner points are predicted exactly (mean of
    both sides), the two ends by the mean of the next two (error 1.5 each):
    R² = 1 - 2·1.5² / Σ(i - 4.5)² = 1 - 4.5/82.5."""
    pos = np.arange(10.0)
    x = np.c_[pos, np.zeros(10), np.zeros(10)]
    coords = np.c_[pos, np.zeros(10)].astype(np.float32)
    expected = 1 - 4.5 / 82.5
    q = np.arange(10)
    assert proj.knn_r2(proj.knn_indices(x, 2, "euclidean"), pos, q) == pytest.approx(expected, abs=1e-12)
    m = proj.global_metrics(x, coords, pos, k=2, metric="euclidean")
    assert m["knn_r2_repr"] == pytest.approx(expected, abs=1e-12)
    assert m["knn_r2_umap"] == pytest.approx(expected, abs=1e-12)
    # the embedding is an isometric copy: perfectly trustworthy; k lowered to (10 - 1) // 2 = 4
    assert (m["trustworthiness"], m["trust_k"]) == (1.0, 4)
    # a mirrored map keeps every neighbourhood, a shuffled one does not
    assert proj.trustworthiness_of(x, -coords, "euclidean", k=4)[0] == 1.0  # even k: no ties at the cut
    shuffled = coords[np.random.default_rng(0).permutation(10)]
    assert proj.trustworthiness_of(x, shuffled, "euclidean", k=4)[0] < 0.9


def test_trustworthiness_swap_by_hand():
    """8 points at 0, 1, 3, 6, 10, 15, 21, 28 (no ties), k = 1, embedded in place except that points 0
    and 7 trade places. Embedding neighbours outside the input neighbourhood: point 0 -> 6 (input
    rank 6, penalty 5), point 1 -> 7 (rank 7, penalty 6), point 7 -> 1 (rank 6, penalty 5); the
    others keep their nearest. T = 1 - 2/(n k (2n - 3k - 1)) * 16 = 1 - 32/96."""
    pos = np.array([0.0, 1, 3, 6, 10, 15, 21, 28])
    x = pos[:, None] * np.ones((1, 3))
    emb = pos.copy()
    emb[[0, 7]] = emb[[7, 0]]
    coords = np.c_[emb, np.zeros(8)]
    expected = 1 - 32 / 96
    assert trustworthiness_by_ranks(x, coords, 1, "euclidean") == pytest.approx(expected, abs=1e-12)
    assert proj.trustworthiness_of(x, coords, "euclidean", k=1)[0] == pytest.approx(expected, abs=1e-12)
    assert proj.trustworthiness_of(x, np.c_[pos, np.zeros(8)], "euclidean", k=1)[0] == 1.0


def test_metrics_equal_full_distance_matrices():
    """global_metrics (cosine vectors, Euclidean map) and local_metrics on random data, recomputed here."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(70, 6)) + np.repeat(rng.normal(scale=2.0, size=(5, 6)), 14, axis=0)
    y = x[:, 0] * 2 + rng.normal(scale=0.3, size=70)
    coords = (x[:, :2] + rng.normal(scale=0.5, size=(70, 2))).astype(np.float32)
    m = proj.global_metrics(x, coords, y)  # k = 10, cosine
    assert m["n_eval"] == 70
    assert m["knn_r2_repr"] == pytest.approx(r2_by_neighbours(x, y, 10, "cosine"), abs=1e-9)
    assert m["knn_r2_umap"] == pytest.approx(r2_by_neighbours(coords, y, 10, "euclidean"), abs=1e-9)
    assert m["trust_k"] == 10
    assert m["trustworthiness"] == pytest.approx(trustworthiness_by_ranks(x, coords, 10, "cosine"), abs=1e-9)
    assert m["knn_r2_shuffled"] < m["knn_r2_repr"] - 0.3

    ox = np.repeat([-2.0, -1.0, 0.0, 2.0, 3.0], 14)
    ox[::9] = np.nan  # unknown states are left out of the vote
    known = np.isfinite(ox)
    lm = proj.local_metrics(x, coords, ox)
    assert lm["n_known_ox"] == int(known.sum()) and lm["n_ox_classes"] == 5
    labels = ox[known].astype(int)
    assert lm["knn_acc_repr"] == pytest.approx(vote_by_neighbours(x[known], labels, 10))
    assert lm["knn_acc_umap"] == pytest.approx(vote_by_neighbours(coords[known], labels, 10))
    assert lm["trustworthiness"] == pytest.approx(trustworthiness_by_ranks(x, coords, 10, "euclidean"), abs=1e-9)


# --------------------------------------------------------------------------------------------
# a tiny real UMAP

UMAP_RUN = """
import sys
import numpy as np
from crabnet.maps.projection import UmapParams, fit_umap
x = np.load(sys.argv[1], allow_pickle=False)
p = UmapParams(n_neighbors=5, min_dist=0.3, metric=sys.argv[2], seed=0, n_epochs=60)
np.save(sys.argv[3], np.stack([fit_umap(x, p), fit_umap(x, p)]))
"""


def test_tiny_seeded_umap_keeps_the_clusters(tmp_path):
    """Three clusters in 8-D (target = cluster, plus noise); a seeded 2-D UMAP keeps them apart."""
    rng = np.random.default_rng(0)
    cluster = np.repeat([0, 1, 2], 20)
    centres = rng.normal(scale=6.0, size=(3, 8))
    x = centres[cluster] + rng.normal(size=(60, 8))
    target = cluster * 10.0 + rng.normal(scale=0.5, size=60)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", UMAP_RUN, str(tmp_path / "x.npy"), "euclidean", str(tmp_path / "xy.npy")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    a, b = np.load(tmp_path / "xy.npy", allow_pickle=False)
    assert a.shape == (60, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # seeded: the same layout twice
    m = proj.global_metrics(x, a, target, metric="euclidean")
    assert m["knn_r2_repr"] > 0.95 and m["knn_r2_umap"] > 0.95 and m["knn_r2_shuffled"] < 0.3
    assert m["trustworthiness"] > 0.9
    assert m["trustworthiness"] == pytest.approx(trustworthiness_by_ranks(x, a, 10, "euclidean"), abs=1e-9)
    assert m["knn_r2_umap"] == pytest.approx(r2_by_neighbours(a, target, 10, "euclidean"), abs=1e-9)
    lm = proj.local_metrics(x, a, cluster.astype(float))
    assert lm["knn_acc_repr"] == 1.0 and lm["knn_acc_umap"] == 1.0 and lm["knn_acc_shuffled"] < 0.6


# --------------------------------------------------------------------------------------------
# pooled compound vectors


def test_pooled_vectors_equal_an_independent_pooling(tmp_path):
    seed_everything(0)
    model = build_model("onehot", **SMALL).eval()
    formulas = make_formulas(23, np.random.default_rng(2)) + ["Fe", "Li7La3Zr2O12Al"]
    data = compositions_from_formulas(formulas, np.linspace(0.0, 1.0, len(formulas))).padded(7)
    layers = list(range(model.cfg.n_layers + 1))
    store = collect(model, data, Scaler(0.0, 1.0), tmp_path / "cache", global_layers=layers, batch_size=4)
    n_real = (data.elements > 0).sum(1)
    for k in np.unique(n_real):  # compounds of k elements together, without padding
        rows = np.flatnonzero(n_real == k)
        el = torch.as_tensor(data.elements[rows, :k])
        fr = torch.as_tensor(data.fractions[rows, :k])
        with torch.no_grad():
            hidden = model.forward_internals(el, fr, hidden=True).hidden
        for layer in layers:
            h = hidden[layer].double().numpy()  # (b, k, D)
            expected = np.concatenate([h.mean(1), h.max(1) - h.min(1), h.var(1), h.max(1), h.min(1)], axis=1)
            got = np.asarray(store.global_(layer))[rows]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    single = formulas.index("Fe")
    d = SMALL["d_model"]
    assert (np.asarray(store.global_(0))[single, d : 3 * d] == 0).all()  # range and variance of one element
