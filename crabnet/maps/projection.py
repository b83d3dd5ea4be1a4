"""UMAP projections and how faithful they are: parameters, cached projection, kNN metrics.

Steps 6 and 7 (``crabnet.maps.steps``) project vectors from ``crabnet.maps.vectors`` with
:func:`project` (2-D coordinates cached on disk) and turn the paper's visual claims into numbers
with :func:`local_metrics` / :func:`global_metrics` (kNN accuracy or R² in the vectors and in the
map, beside a shuffled baseline, and the map's trustworthiness).

UMAP, seeds and parallelism: umap-learn (numba) is the only backend, on every OS. With a seed
(the default, from ``--seed``) UMAP fixes its ``random_state``, which forces it to run
single-threaded and makes the coordinates reproducible on a given machine; with ``seed=None``
(``--umap-parallel``) it uses every core but the layout changes from run to run.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crabnet.errors import UmapParamError
from crabnet.progress import say
from crabnet.utils import atomic_path

METRICS = ("euclidean", "cosine", "manhattan", "correlation", "chebyshev")
K_NEIGHBOURS = 10  # k of the kNN metrics
MAX_EVAL = 5000  # query points of the kNN metrics and points of the trustworthiness, at most


# --------------------------------------------------------------------------------------------
# UMAP parameters and projection


@dataclass(frozen=True)
class UmapParams:
    """Settings of one 2-D UMAP projection.

    Attributes:
        n_neighbors: size of the local neighbourhood (integer >= 2).
        min_dist: minimum distance of points in the layout, in [0, 1] (UMAP's spread is 1).
        metric: distance in the input space, one of ``METRICS``.
        seed: random state (reproducible, single-threaded) or None (parallel, not reproducible).
        n_epochs: optimisation epochs (None: UMAP's default, 500 below 10,000 points, else 200).
    """

    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "euclidean"
    seed: int | None = 0
    n_epochs: int | None = None

    def key(self) -> str:
        """Short hash of the settings and the umap-learn version (part of the cache file name)."""
        try:
            from importlib.metadata import version

            umap_version = version("umap-learn")
        except Exception:  # pragma: no cover - metadata missing
            umap_version = "?"
        text = json.dumps({**asdict(self), "umap": umap_version}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def validate_umap(params: UmapParams, n_points: int | None = None) -> UmapParams:
    """Check UMAP settings in one place; each bad input raises one clear error.

    Args:
        params: the settings.
        n_points: number of points to project, if known.

    Raises:
        UmapParamError: naming the setting, the value and what is allowed.
    """
    nn_ = params.n_neighbors
    if isinstance(nn_, bool) or not isinstance(nn_, (int, np.integer)) or nn_ < 2:
        raise UmapParamError(f"n_neighbors must be an integer >= 2, got {nn_!r}")
    md = params.min_dist
    if (
        isinstance(md, bool)
        or not isinstance(md, (int, float, np.floating))
        or not math.isfinite(md)
        or not 0 <= md <= 1
    ):
        raise UmapParamError(f"min_dist must be a number in [0, 1] (UMAP's spread is 1), got {md!r}")
    if params.metric not in METRICS:
        raise UmapParamError(f"metric must be one of {', '.join(METRICS)}, got {params.metric!r}")
    s = params.seed
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0):
        raise UmapParamError(
            f"seed must be a non-negative integer, or None for parallel (not reproducible) UMAP, got {s!r}"
        )
    e = params.n_epochs
    if e is not None and (isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1):
        raise UmapParamError(f"n_epochs must be a positive integer or None, got {e!r}")
    if n_points is not None and n_points <= nn_:
        raise UmapParamError(f"UMAP needs more points than n_neighbors: got {n_points} points for n_neighbors {nn_}")
    return params


def fit_umap(x: np.ndarray, params: UmapParams) -> np.ndarray:
    """2-D UMAP of the rows of ``x``.

    Args:
        x: (n, d) finite vectors.
        params: the settings (validated here).

    Returns:
        (n, 2) float32 coordinates.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UmapParamError(f"UMAP input must be 2-D (points x features), got shape {x.shape}")
    validate_umap(params, len(x))
    if not np.isfinite(x).all():
        raise UmapParamError("UMAP input holds NaN or infinite values")
    import umap  # slow import (numba); only when projecting

    reducer = umap.UMAP(
        n_neighbors=int(params.n_neighbors),
        min_dist=float(params.min_dist),
        metric=params.metric,
        n_components=2,
        random_state=params.seed,
        n_jobs=1 if params.seed is not None else -1,
        n_epochs=params.n_epochs,
        low_memory=True,
        verbose=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coords = reducer.fit_transform(x).astype(np.float32)
    for w in caught:
        text = str(w.message)
        if "Spectral initialisation failed" in text:
            # small or disconnected neighbour graphs (few compounds): UMAP starts from random positions
            say(f"    (UMAP: spectral initialisation failed for {len(x)} points; random initialisation used)")
        elif "gradient function is not yet implemented" not in text:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return coords


def project(
    x: np.ndarray, params: UmapParams, cache_dir: Path | str, name: str, *, force: bool = False
) -> tuple[np.ndarray, bool]:
    """``fit_umap`` with the coordinates cached as ``<cache_dir>/<name>__n<rows>__<params key>.npy``.

    The caller names the input (e.g. ``local__O__layer0``) inside a folder whose key already
    covers the checkpoint, the dataset and the split; the file name adds the number of rows and
    the UMAP settings.

    Returns:
        ``(coordinates, from_cache)``.
    """
    validate_umap(params, len(x))
    path = Path(cache_dir) / f"{name}__n{len(x)}__{params.key()}.npy"
    if path.is_file() and not force:
        return np.load(path, allow_pickle=False), True
    coords = fit_umap(np.asarray(x), params)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, coords)
    return coords, False


def local_params(
    layer: int, n_neighbors: int = 5, min_dist: float = 0.3, min_dist_layer0: float = 0.8, seed: int | None = 0
) -> UmapParams:
    """The paper's local settings: n_neighbors 5, min_dist 0.3 (0.8 for layer 0), Euclidean."""
    return UmapParams(n_neighbors, min_dist_layer0 if layer == 0 else min_dist, "euclidean", seed)


GLOBAL_METRIC = "cosine"  # the paper's global maps


def global_min_dist(n: int) -> float:
    """The paper's global min_dist by dataset size: 0.2, 0.4 above 4,000 compounds, 0.5 above 100,000.

    (Larger sets get a larger min_dist, which keeps their dense clusters from collapsing into points.)
    """
    return 0.5 if n > 100_000 else 0.4 if n > 4_000 else 0.2


def marker_style(n: int) -> tuple[float, float]:
    """(matplotlib marker area in pt², alpha) for a scatter of ``n`` points."""
    n = max(int(n), 1)
    return float(np.clip(200 / math.sqrt(n), 1.0, 30.0)), float(np.clip(30 / math.sqrt(n), 0.25, 0.9))


# --------------------------------------------------------------------------------------------
# metrics


def _sample(n: int, max_n: int, seed: int) -> np.ndarray:
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))


def knn_indices(x: np.ndarray, k: int, metric: str, queries: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out k nearest neighbours of the query rows among all rows of ``x``.

    Args:
        x: (n, d) points.
        k: neighbours per query (< n).
        metric: a scikit-learn metric name.
        queries: row indices to query (default all).

    Returns:
        (q, k) indices into ``x``; a query is never its own neighbour (exact duplicates of it
        still count as neighbours).
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float32)
    queries = np.arange(len(x)) if queries is None else np.asarray(queries)
    if not 0 < k < len(x):
        raise ValueError(f"k must be in 1..{len(x) - 1}, got {k}")
    algorithm = "brute" if metric in ("cosine", "correlation") or x.shape[1] > 15 else "auto"
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm=algorithm).fit(x)
    idx = nn.kneighbors(x[queries], return_distance=False)  # (q, k+1), usually self first
    not_self = idx != queries[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]  # first k entries that are not the query
    return np.take_along_axis(idx, order, axis=1)


def vote_accuracy(neighbours: np.ndarray, labels: np.ndarray, queries: np.ndarray, balanced: bool = False) -> float:
    """Share of queries whose label equals the majority label of their neighbours (ties: smallest).

    Args:
        neighbours: (q, k) neighbour indices of the queries.
        labels: (n,) labels of all points.
        queries: (q,) indices of the queries.
        balanced: mean of the per-class shares instead (balanced accuracy; chance = 1/classes),
            which a vote that always says the majority class cannot inflate.
    """
    codes, inv = np.unique(labels, return_inverse=True)
    nb = inv[neighbours]  # (q, k)
    counts = np.zeros((len(nb), len(codes)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(nb)), nb.shape[1]), nb.ravel()), 1)
    truth = inv[queries]
    hit = counts.argmax(1) == truth
    if not balanced:
        return float(np.mean(hit))
    return float(np.mean([hit[truth == c].mean() for c in np.unique(truth)]))


def knn_r2(neighbours: np.ndarray, y: np.ndarray, queries: np.ndarray) -> float:
    """R² of predicting ``y`` at the queries by the mean of their neighbours' ``y``."""
    y = np.asarray(y, dtype=np.float64)
    pred = y[neighbours].mean(1)
    ss_res = np.sum((y[queries] - pred) ** 2)
    ss_tot = np.sum((y[queries] - y.mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def trustworthiness_of(
    x: np.ndarray, coords: np.ndarray, metric: str, *, k: int = K_NEIGHBOURS, max_points: int = MAX_EVAL, seed: int = 0
) -> tuple[float, int]:
    """scikit-learn trustworthiness of a 2-D embedding (on a seeded subsample of ``max_points``).

    Returns:
        ``(trustworthiness, k used)``; k is lowered to fit below half the points.
    """
    from sklearn.manifold import trustworthiness

    idx = _sample(len(x), max_points, seed)
    k = min(k, (len(idx) - 1) // 2)
    if k < 1:
        return float("nan"), 0
    return float(
        trustworthiness(
            np.asarray(x[idx], np.float64), np.asarray(coords[idx], np.float64), n_neighbors=k, metric=metric
        )
    ), k


def local_metrics(
    x: np.ndarray,
    coords: np.ndarray,
    oxidation: np.ndarray,
    *,
    k: int = K_NEIGHBOURS,
    seed: int = 0,
    shuffles: int = 10,
    max_eval: int = MAX_EVAL,
) -> dict:
    """How well an atom's value vectors and their UMAP separate its rounded oxidation state.

    Leave-one-out kNN (k = 10, Euclidean) vote accuracy among the compounds with a known
    oxidation state, in the representation space and in the 2-D UMAP, against the same vote with
    the labels shuffled (mean of ``shuffles`` permutations) and the majority-class share; the same
    as balanced accuracy (``knn_bacc_*``, mean recall over the states), since one state often
    dominates (O is nearly always −2). The votes are NaN when fewer than ``3·k`` compounds have a
    known state: with leave-one-out and so few points every vote sees nearly all the others and
    returns the majority of the rest, which is systematically wrong for minority states.

    Args:
        x: (n, D) value vectors.
        coords: (n, 2) UMAP coordinates.
        oxidation: (n,) the atom's mean oxidation state, NaN when unknown.

    Returns:
        A dict of figures (NaN where too few states are known).
    """
    known = np.flatnonzero(np.isfinite(oxidation))
    labels = np.rint(oxidation[known]).astype(np.int64)
    out = {
        "n_compounds": len(x),
        "n_known_ox": len(known),
        "n_ox_classes": int(len(np.unique(labels))),
        "majority_share": float("nan"),
        "knn_acc_repr": float("nan"),
        "knn_acc_umap": float("nan"),
        "knn_acc_shuffled": float("nan"),
        "knn_bacc_repr": float("nan"),
        "knn_bacc_umap": float("nan"),
        "knn_bacc_shuffled": float("nan"),
    }
    if len(known):
        out["majority_share"] = float(np.bincount(labels - labels.min()).max() / len(labels))
    if len(known) >= 3 * k:
        q = _sample(len(known), max_eval, seed)
        nb_repr = knn_indices(np.asarray(x)[known], k, "euclidean", q)
        nb_umap = knn_indices(coords[known], k, "euclidean", q)
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(labels) for _ in range(shuffles)]
        for prefix, balanced in (("knn_acc", False), ("knn_bacc", True)):
            out[f"{prefix}_repr"] = vote_accuracy(nb_repr, labels, q, balanced)
            out[f"{prefix}_umap"] = vote_accuracy(nb_umap, labels, q, balanced)
            out[f"{prefix}_shuffled"] = float(np.mean([vote_accuracy(nb_repr, p, q, balanced) for p in perms]))
    out["trustworthiness"], out["trust_k"] = trustworthiness_of(x, coords, "euclidean", seed=seed)
    return out


def global_metrics(
    x: np.ndarray,
    coords: np.ndarray,
    target: np.ndarray,
    *,
    k: int = K_NEIGHBOURS,
    metric: str = GLOBAL_METRIC,
    seed: int = 0,
    max_eval: int = MAX_EVAL,
) -> dict:
    """How well the pooled compound vectors and their UMAP carry the target.

    Leave-one-out kNN regression (mean of k = 10 neighbours) R² of the target from the vectors
    (``metric``, cosine as the UMAP) and from the 2-D UMAP (Euclidean), against the same with the
    targets shuffled; queries are a seeded sample of at most ``max_eval`` compounds.
    """
    q = _sample(len(x), max_eval, seed)
    nb_repr = knn_indices(x, k, metric, q)
    nb_umap = knn_indices(coords, k, "euclidean", q)
    shuffled = np.random.default_rng(seed).permutation(np.asarray(target))
    out = {
        "n_compounds": len(x),
        "n_eval": len(q),
        "knn_r2_repr": knn_r2(nb_repr, target, q),
        "knn_r2_umap": knn_r2(nb_umap, target, q),
        "knn_r2_shuffled": knn_r2(nb_repr, shuffled, q),
    }
    out["trustworthiness"], out["trust_k"] = trustworthiness_of(x, coords, metric, seed=seed)
    return out
