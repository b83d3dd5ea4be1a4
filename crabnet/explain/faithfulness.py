"""Is the attention an explanation? Leave-one-element-out attribution and its agreement with attention.

Attribution (computed during capture, stored as ``attribution (n, c, E)`` in ``attention.zarr``):
for every real element j of a compound with at least two elements, the prediction of the compound
with j removed and the remaining fractions renormalised to sum 1, minus the prediction of the full
compound, in target units. 0 at padding and for single-element compounds; computed with the Shapley
values from the same sub-compounds (:func:`crabnet.explain.attribution.coalition_attribution`), in eval
mode without autograd, drawing no random numbers, so it never changes training.

Attention-based importance of element j (k real elements, fractions f, L layers, H heads):

- **attention** (raw): attention received by j as a key, averaged over the query rows weighted by
  the query fraction, then over heads and layers: ``(1/LH) Σ_l Σ_h Σ_q f_q A[l,h,q,j]``;
- **rollout** (Abnar & Zuidema 2020): per layer the heads are averaged, the identity is added and
  the rows renormalised (``Â_l = (Ā_l + I) / 2`` on the real elements), and the layers are
  multiplied in the order they act, ``R = Â_{L-1} ⋯ Â_1 Â_0``, so ``R[q, j]`` is how much
  position q after the last layer draws from input element j; the importance is the rollout
  received as a key, fraction-weighted over the queries: ``Σ_q f_q R[q, j]``. (The model itself
  pools its output with an unweighted mean over the elements; the fraction weighting is the
  specified choice and is the same for both importances.)

Controls: **fraction** (the element's fraction itself: what the composition alone says) and
**shuffled** (the raw attention importance permuted at random within each compound; the
permutation comes from a hash of (seed, row, capture), so it does not depend on how the store is
read).

Agreement per capture (:func:`faithfulness_table`): Kendall τ-b between |attribution| and each
importance, per compound with ≥ 3 elements, averaged over compounds; top-1 agreement (the element
with the largest |attribution| is the most important one; ties count as the chance of agreeing
under a random tie break), per compound with ≥ 2 elements, averaged; and the paired difference of
each attention importance from the fraction-only control (the same compounds, so its standard
error is the one that decides whether attention tells more than the composition).

**Shapley values as the reference** (stores with ``shapley``; older ones get none of these
columns): the same τ and top-1 with |Shapley| in place of |attribution|, for raw attention,
rollout, |leave-one-out attribution|, |contribution| (each element's share of the output; stores
without it leave its columns out), the shuffled control and the fraction-only importance. Leave-one-out
measures one coalition (all but the element); the Shapley value averages the element's marginal
effect over every sub-compound, so it is the reference that the other measures approximate.

**Sign test**: per compound with ≥ 2 elements, is the Shapley value of the most-attended element
(largest raw attention importance) positive, i.e. does the element attention points to push the
prediction up from the baseline (the training mean)? The share of compounds where it does, beside
the same share for a random element (seeded hash of (seed, row, capture), independent of the
shuffled control) and for the element with the largest fraction; ties of the picking value count
as a fair tie break. Attention that marks "what raises the prediction" would sit above the random
share; attention that marks "what matters" in either direction would not.

Columns of ``faithfulness.csv`` (one row per capture; every measure with ``_se``, the standard error of
the mean over compounds; undefined or non-finite values left out): docs/faithfulness.md.

Step 2 (``generate_attention_videos.py``) writes ``attention/<dataset>/faithfulness.csv`` and
``figures/faithfulness/<dataset>.png``::

    from crabnet.explain.store import AttentionStore
    from crabnet.explain.faithfulness import faithfulness_table
    table = faithfulness_table(AttentionStore("data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr"))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.layout import Layout
from crabnet.progress import say

IMPORTANCES = ("attention", "rollout", "shuffled", "fraction")  # the columns of the table, in this order
PAIRED = ("attention", "rollout")  # compared with the fraction-only control compound by compound
# measured against |Shapley| (stores with Shapley values), in this order
SHAPLEY_MEASURES = ("attention", "rollout", "attribution", "contribution", "shuffled", "fraction")
SIGN_PICKS = ("attention", "random", "fraction")  # whose Shapley sign the sign test reads
LABELS = {
    "attention": "attention (raw)",
    "rollout": "attention rollout",
    "attribution": "|leave-one-out|",
    "contribution": "|contribution|",
    "shuffled": "shuffled (control)",
    "fraction": "fraction only (control)",
    "random": "random element (control)",
}
BLOCK_BYTES = 64 << 20  # faithfulness_table reads about this many bytes of attention at once


# --------------------------------------------------------------------------------------------
# attribution


# --------------------------------------------------------------------------------------------
# importance


def attention_importance(attention: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Raw attention received as a key: fraction-weighted over queries, averaged over heads and layers.

    Args:
        attention: (..., L, H, E, E) maps, row q = query q's distribution over the keys.
        fractions: (..., E) fractions (0 at padding), broadcastable to the leading axes.

    Returns:
        (..., E) importance; sums to 1 over the real elements of a compound.
    """
    a = np.asarray(attention, dtype=np.float64)
    f = np.asarray(fractions, dtype=np.float64)
    received = np.einsum("...q,...qk->...k", f[..., None, None, :], a)  # (..., L, H, E)
    return received.mean(axis=(-3, -2))


def rollout(attention: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Attention rollout R = Â_{L-1} ⋯ Â_0 with Â_l = row-normalised (mean over heads + identity).

    Args:
        attention: (..., L, H, E, E) maps.
        keep: (..., E) True at real elements (the identity is added on them only).

    Returns:
        (..., E, E) rollout; row q is query q's distribution over the input elements.
    """
    a = np.asarray(attention, dtype=np.float64).mean(axis=-3)  # (..., L, E, E)
    E = a.shape[-1]
    eye = np.eye(E) * np.asarray(keep, dtype=np.float64)[..., None, :]  # (..., E, E) identity on real slots
    aug = a + eye[..., None, :, :]
    aug = aug / np.maximum(aug.sum(axis=-1, keepdims=True), 1e-12)
    out = aug[..., 0, :, :]
    for layer in range(1, aug.shape[-3]):
        out = aug[..., layer, :, :] @ out
    return out


def rollout_importance(attention: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Rollout received as a key, fraction-weighted over the queries: (..., L, H, E, E) -> (..., E)."""
    f = np.asarray(fractions, dtype=np.float64)
    keep = np.broadcast_to(f > 0, np.asarray(attention).shape[:-4] + f.shape[-1:])
    return np.einsum("...q,...qk->...k", f, rollout(attention, keep))


def _hash_uniform(seed: int, row: np.ndarray, capture: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers from a SplitMix64 hash of (seed, row, capture, slot) (broadcast)."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
            + np.asarray(row, np.uint64) * np.uint64(0xD1B54A32D192ED03)
            + np.asarray(capture, np.uint64) * np.uint64(0x8CB92BA72F3D8DD7)
            + np.asarray(slot, np.uint64)
            + np.uint64(1)
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def shuffled(values: np.ndarray, keep: np.ndarray, seed: int, rows: np.ndarray, captures: np.ndarray) -> np.ndarray:
    """``values`` (b, c, E) permuted at random among the real slots of each compound and capture.

    Real slots come first in every row (the store's layout); the permutation of compound ``rows[i]``
    at capture ``captures[t]`` depends only on (seed, row, capture).
    """
    b, c, E = values.shape
    keys = _hash_uniform(
        seed, np.asarray(rows)[:, None, None], np.asarray(captures)[None, :, None], np.arange(E)[None, None, :]
    )
    keys = np.where(np.broadcast_to(keep[:, None, :], (b, c, E)), keys, np.inf)  # padding sorts last
    order = np.argsort(keys, axis=-1, kind="stable")
    return np.take_along_axis(values, order, axis=-1)


# --------------------------------------------------------------------------------------------
# agreement


def ranking(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Slots ordered from the most to the least important (padding after every real slot)."""
    v = np.where(keep, np.asarray(values, dtype=np.float64), -np.inf)
    return np.argsort(-v, axis=-1, kind="stable")


def kendall_tau(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kendall τ-b between x and y over the real slots, for every leading index.

    Args:
        x, y: (..., E).
        keep: (..., E) True at real slots.

    Returns:
        (...,) τ-b in [-1, 1]; NaN where it is undefined (fewer than 2 real slots, or x or y
        constant over them).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    E = x.shape[-1]
    upper = np.triu(np.ones((E, E), dtype=bool), k=1)
    pair = keep[..., :, None] & keep[..., None, :] & upper  # (..., E, E) pairs i < j of real slots
    sx = np.sign(x[..., :, None] - x[..., None, :]) * pair
    sy = np.sign(y[..., :, None] - y[..., None, :]) * pair
    num = (sx * sy).sum(axis=(-2, -1))
    den = np.sqrt((sx != 0).sum(axis=(-2, -1)) * (sy != 0).sum(axis=(-2, -1)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _maxima(values: np.ndarray, keep: np.ndarray, rtol: float) -> np.ndarray:
    """(..., E) True at the real slots whose value ties with the largest (within rtol)."""
    v = np.where(keep, values, -np.inf)
    top = v.max(axis=-1, keepdims=True)
    return keep & (v >= top - rtol * np.abs(top))


def top1_agreement(x: np.ndarray, y: np.ndarray, keep: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Whether the slot with the largest x is the slot with the largest y, over the real slots.

    Ties (within ``rtol``) count as the probability that random tie breaks agree:
    |Sx ∩ Sy| / (|Sx|·|Sy|) with Sx, Sy the sets of maxima. NaN where there is no real slot.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = _maxima(x, keep, rtol), _maxima(y, keep, rtol)
    both = (mx & my).sum(axis=-1)
    size = mx.sum(axis=-1) * my.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, both / np.where(size > 0, size, 1), np.nan)


def block_importances(
    attention: np.ndarray, fractions: np.ndarray, keep: np.ndarray, seed: int, rows: np.ndarray, captures: np.ndarray
) -> dict[str, np.ndarray]:
    """The four importances of a block of compounds at every capture.

    Args:
        attention: (b, c, L, H, E, E).
        fractions: (b, E).
        keep: (b, E).
        seed, rows, captures: for the shuffled control (rows of the store, capture numbers).

    Returns:
        {name: (b, c, E)} for :data:`IMPORTANCES`.
    """
    f = np.asarray(fractions, dtype=np.float64)[:, None, :]
    raw = attention_importance(attention, f)
    return {
        "attention": raw,
        "rollout": rollout_importance(attention, f),
        "shuffled": shuffled(raw, keep, seed, rows, captures),
        "fraction": np.broadcast_to(f, raw.shape),
    }


def _agreement(reference: np.ndarray, measures: dict[str, np.ndarray], keep: np.ndarray, prefix: str = ""):
    """Per compound and capture: τ and top-1 of each measure with the reference, NaN where left out.

    Args:
        reference: (b, c, E) |attribution| or |Shapley|.
        measures: {name: (b, c, E)}.
        keep: (b, E) True at real slots.
        prefix: put before the column names (``shapley_``).

    Returns:
        {``<prefix>tau_<name>``, ``<prefix>top1_<name>``: (b, c)} and the paired differences
        ``…_<name>_vs_fraction`` for :data:`PAIRED`.
    """
    k = keep.sum(axis=1)
    keep_c = np.broadcast_to(keep[:, None, :], reference.shape)
    per: dict[str, np.ndarray] = {}
    for metric, agree, need in (("tau", kendall_tau, 3), ("top1", top1_agreement, 2)):
        for name, imp in measures.items():
            per[f"{prefix}{metric}_{name}"] = np.where((k >= need)[:, None], agree(reference, imp, keep_c), np.nan)
    for metric in ("tau", "top1"):
        for name in PAIRED:
            diff = per[f"{prefix}{metric}_{name}"] - per[f"{prefix}{metric}_fraction"]
            per[f"{prefix}{metric}_{name}_vs_fraction"] = diff
    return per


def positive_share(shapley: np.ndarray, pick: np.ndarray, keep: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Whether the element with the largest ``pick`` value has a positive Shapley value.

    Ties of ``pick`` (within ``rtol``) count as a fair tie break: the share of the tied elements
    with Shapley > 0.

    Args:
        shapley, pick: (..., E).
        keep: (..., E) True at real slots.

    Returns:
        (...,) in [0, 1]; NaN where there is no real slot.
    """
    top = _maxima(np.asarray(pick, dtype=np.float64), keep, rtol)
    n = top.sum(axis=-1)
    up = (top & (np.asarray(shapley) > 0)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, up / np.where(n > 0, n, 1), np.nan)


def random_pick(keep: np.ndarray, seed: int, rows: np.ndarray, captures: np.ndarray) -> np.ndarray:
    """(b, c, E) values whose largest is a uniformly random real slot of each compound and capture.

    The values come from a hash of (seed, row, capture, slot), on other slot numbers than the
    shuffled control's, so the pick is independent of it; -inf at padding.
    """
    E = keep.shape[-1]
    rows, captures = np.asarray(rows)[:, None, None], np.asarray(captures)[None, :, None]
    keys = _hash_uniform(seed, rows, captures, np.arange(E) + (1 << 32))
    return np.where(keep[:, None, :], keys, -np.inf)


def _sign_test(shapley, imps: dict[str, np.ndarray], keep: np.ndarray, seed: int, rows, captures):
    """{``shapley_positive_<pick>``: (b, c)} for :data:`SIGN_PICKS`; NaN for compounds with < 2 elements."""
    keep_c = np.broadcast_to(keep[:, None, :], shapley.shape)
    picks = {"attention": imps["attention"], "random": random_pick(keep, seed, rows, captures)}
    picks["fraction"] = imps["fraction"]
    multi = (keep.sum(axis=1) >= 2)[:, None]
    return {
        f"shapley_positive_{name}": np.where(multi, positive_share(shapley, picks[name], keep_c), np.nan)
        for name in SIGN_PICKS
    }


def _block_values(arrays: dict[str, Any], i: int, block: int, elements, fractions, seed: int, captures):
    """Per-compound values (b, c) of every column for the compounds ``i … i + block`` of the store."""
    rows = np.arange(i, min(i + block, len(elements)))
    keep = elements[rows] > 0
    read = lambda name: np.asarray(arrays[name][i : i + block], dtype=np.float64)  # noqa: E731
    imps = block_importances(read("attention"), fractions[rows], keep, seed, rows, captures)
    attribution = np.abs(read("attribution"))
    per = _agreement(attribution, imps, keep)
    if "shapley" in arrays:
        shapley = read("shapley")
        measures = {**imps, "attribution": attribution}
        if "contribution" in arrays:
            measures["contribution"] = np.abs(read("contribution"))
        measures = {name: measures[name] for name in SHAPLEY_MEASURES if name in measures}
        per |= _agreement(np.abs(shapley), measures, keep, prefix="shapley_")
        per |= _sign_test(shapley, imps, keep, seed, rows, captures)
    return per


def faithfulness_table(store: Any, seed: int = 0, block_bytes: int = BLOCK_BYTES):
    """Agreement of attention with attribution (and with Shapley values) at every capture of a store.

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore` holding ``attribution`` (and, in newer
            stores, ``shapley`` and ``contribution``).
        seed: seed of the shuffled control and of the random element of the sign test.
        block_bytes: read about this many bytes of attention at a time (compound-major blocks).

    Returns:
        a ``pandas.DataFrame``, one row per capture, with the columns of the module docstring:
        ``capture``, ``step``, ``n_tau``, ``n_top1``; ``tau_<name>``, ``top1_<name>`` for each
        importance of :data:`IMPORTANCES` against |attribution| and the paired differences
        ``…_vs_fraction``; for a store with Shapley values ``shapley_tau_<name>``,
        ``shapley_top1_<name>`` for :data:`SHAPLEY_MEASURES` (those the store has), their paired
        differences, and the sign test ``shapley_positive_<pick>`` for :data:`SIGN_PICKS`. Each
        value is a mean over compounds with ``_se`` its standard error.

    Raises:
        ValueError: if the store has no attribution.
    """
    import pandas as pd

    if not getattr(store, "has_attribution", False):
        raise ValueError(
            f"{getattr(store, 'path', 'the store')} holds no attribution "
            "(made before attribution was captured); run get_training_attention.py again"
        )
    group = store.group
    names = set(group.array_keys())
    wanted = ["attention", "attribution"] + (["shapley", "contribution"] if "shapley" in names else [])
    arrays = {name: group[name] for name in wanted if name in names}
    n, c = arrays["attention"].shape[:2]
    per_compound = max(1, int(np.prod(arrays["attention"].shape[1:])) * 8)
    block = int(np.clip(block_bytes // per_compound, 1, max(n, 1)))
    elements = np.asarray(store.elements)
    fractions = np.asarray(store.fractions, dtype=np.float64)
    captures = np.arange(c)
    sums: dict[str, np.ndarray] = {}  # count, sum, sum of squares per capture
    for i in range(0, n, block):
        for name, values in _block_values(arrays, i, block, elements, fractions, seed, captures).items():
            ok = np.isfinite(values)
            v = np.where(ok, values, 0.0)
            acc = sums.setdefault(name, np.zeros((3, c)))
            acc[0] += ok.sum(axis=0)
            acc[1] += v.sum(axis=0)
            acc[2] += (v * v).sum(axis=0)
    n_real = (elements > 0).sum(axis=1)
    out: dict[str, Any] = {"capture": captures, "step": np.asarray(store.steps, dtype=np.int64)}
    out["n_tau"] = np.full(c, int((n_real >= 3).sum()), dtype=np.int64)
    out["n_top1"] = np.full(c, int((n_real >= 2).sum()), dtype=np.int64)
    for name, (cnt, s, ss) in sums.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)
            var = np.where(cnt > 1, (ss - cnt * mean**2) / np.maximum(cnt - 1, 1), np.nan)
            out[name] = mean
            out[f"{name}_se"] = np.sqrt(np.maximum(var, 0.0) / np.maximum(cnt, 1))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------
# outputs of step 2

COLOURS = {
    "attention": "#1f77b4",
    "rollout": "#d62728",
    "attribution": "#9467bd",
    "contribution": "#ff7f0e",
    "shuffled": "#7f7f7f",
    "fraction": "#2ca02c",
    "random": "#7f7f7f",
}
STYLES = {"shuffled": ":", "random": ":", "fraction": "--"}  # else solid
PICK_LABELS = {"attention": "most attended", "random": "random (control)", "fraction": "largest fraction (control)"}


def faithfulness_paths(data_dir: Path | str, dataset: str) -> tuple[Path, Path]:
    """``attention/<dataset>/faithfulness.csv`` and ``figures/faithfulness/<dataset>.png``."""
    layout = Layout(data_dir)
    return layout.faithfulness_csv(dataset), layout.faithfulness_figure(dataset)


def has_shapley_columns(table) -> bool:
    """Whether a faithfulness table holds the Shapley-referenced columns."""
    return "shapley_tau_attention" in table


def _panel(ax, table, columns: dict[str, str], ylabel: str, capture: str, labels: dict[str, str] = LABELS) -> None:
    """Lines of ``table[column]`` ±1 SE against the step, one per {name: column} (skipping absent ones)."""
    x = np.asarray(table["step"])
    for name, column in columns.items():
        if column not in table:
            continue
        y = np.asarray(table[column], dtype=np.float64)
        se = np.asarray(table[f"{column}_se"], dtype=np.float64)
        colour = COLOURS[name]
        ax.plot(x, y, STYLES.get(name, "-"), color=colour, marker="o", ms=3, lw=1.6, label=labels[name])
        ax.fill_between(x, y - se, y + se, color=colour, alpha=0.15, lw=0)
    ax.set_xlabel(f"{capture} (0 = untrained)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_faithfulness(table, path: Path | str, title: str = "", capture: str = "epoch") -> Path:
    """Kendall τ and top-1 agreement against the capture's epoch/step, one line per importance (±1 SE).

    With Shapley columns a second row shows the agreement with |Shapley| of every measure and the
    sign test (share of compounds whose picked element has a positive Shapley value); the legend
    then has a panel of its own.
    """
    from matplotlib.figure import Figure

    from crabnet.plotting import save_png

    shap = has_shapley_columns(table)
    fig = Figure(figsize=(15, 8.4) if shap else (11, 4.2))
    axes = fig.subplots(2, 3) if shap else fig.subplots(1, 2)[None, :]
    tau, top1 = (
        "Kendall τ({}, importance)\ncompounds with ≥ 3 elements",
        "top-1 agreement with {}\ncompounds with ≥ 2 elements",
    )
    loo = {name: name for name in IMPORTANCES}
    _panel(axes[0, 0], table, {k: f"tau_{v}" for k, v in loo.items()}, tau.format("|attribution|"), capture)
    _panel(axes[0, 1], table, {k: f"top1_{v}" for k, v in loo.items()}, top1.format("|attribution|"), capture)
    axes[0, 0].axhline(0.0, color="black", lw=0.8)
    n_tau = int(np.max(table["n_tau"])) if len(table) else 0
    n_top1 = int(np.max(table["n_top1"])) if len(table) else 0
    question = "does attention rank elements as leave-one-out attribution does?"
    if shap:
        measures = {name: name for name in SHAPLEY_MEASURES}
        _panel(axes[1, 0], table, {k: f"shapley_tau_{k}" for k in measures}, tau.format("|Shapley|"), capture)
        _panel(axes[1, 1], table, {k: f"shapley_top1_{k}" for k in measures}, top1.format("|Shapley|"), capture)
        axes[1, 0].axhline(0.0, color="black", lw=0.8)
        picks = {k: f"shapley_positive_{k}" for k in SIGN_PICKS}
        ylabel = "share of compounds whose picked element\nhas Shapley value > 0 (≥ 2 elements)"
        _panel(axes[1, 2], table, picks, ylabel, capture, labels=PICK_LABELS)
        axes[1, 2].set_ylim(-0.02, 1.02)
        axes[1, 2].legend(fontsize=8, loc="best", title="sign test: element picked", title_fontsize=8)
        lines = [h for ax in axes[1, :2] for h in ax.get_lines() if not h.get_label().startswith("_")]
        handles = {h.get_label(): h for h in lines}  # every measure once
        axes[0, 2].axis("off")
        axes[0, 2].legend(list(handles.values()), list(handles), loc="center", fontsize=9, title="importance")
        question = "does attention rank elements as leave-one-out attribution / Shapley values do?"
    else:
        axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: {question} ({n_tau} / {n_top1} compounds; bands ±1 SE)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def summary_rows(table, captures: tuple[int, ...] = (0, -1)) -> str:
    """A plain-text table of τ and top-1 (mean ± SE) for every importance at the given captures, with the
    paired difference of attention and rollout from the fraction-only control (for the console)."""
    cell = "{:>+19.3f} ±{:.3f}"
    lines = [f"{'capture (step)':16s}{'':16s}" + "".join(f"{LABELS[k]:>26s}" for k in IMPORTANCES)]
    for c in captures:
        row = table.iloc[c]
        label = f"{int(row['capture'])} ({int(row['step'])})"
        for metric in ("tau", "top1"):
            cells = "".join(
                cell.format(row[f"{metric}_{k}"], row[f"{metric}_{k}_se"]).replace("+", " ") for k in IMPORTANCES
            )
            lines.append(f"{label:16s}{metric:16s}{cells}")
            if f"{metric}_attention_vs_fraction" in row:
                cells = "".join(
                    cell.format(row[f"{metric}_{k}_vs_fraction"], row[f"{metric}_{k}_vs_fraction_se"]) for k in PAIRED
                )
                lines.append(f"{'':16s}{'  minus fraction':16s}{cells}")
            label = ""
    return "\n".join(lines)


def shapley_summary_rows(table, captures: tuple[int, ...] = (0, -1)) -> str:
    """The Shapley-referenced τ and top-1 of every measure and the sign test at the given captures (console)."""
    if not has_shapley_columns(table):
        return ""
    measures = [k for k in SHAPLEY_MEASURES if f"shapley_tau_{k}" in table]
    lines = [f"{'capture (step)':16s}{'':10s}" + "".join(f"{LABELS[k]:>25s}" for k in measures)]
    for c in captures:
        row = table.iloc[c]
        label = f"{int(row['capture'])} ({int(row['step'])})"
        for metric in ("tau", "top1"):
            col = [f"shapley_{metric}_{k}" for k in measures]
            cells = "".join(f"{row[n]:>18.3f} ±{row[n + '_se']:.3f}" for n in col)
            lines.append(f"{label:16s}{metric:10s}{cells}")
            label = ""
        signs = ", ".join(
            f"{PICK_LABELS[k]} {row[f'shapley_positive_{k}']:.3f} ±{row[f'shapley_positive_{k}_se']:.3f}"
            for k in SIGN_PICKS
        )
        lines.append(f"{'':16s}{'Shapley>0':10s}  {signs}")
    return "\n".join(lines)


def write_faithfulness(store: Any, data_dir: Path | str, dataset: str, seed: int = 0):
    """Compute the table of a store and write its CSV and figure (atomically).

    Returns:
        ``(table, csv_path, png_path)``.
    """
    from crabnet.utils import atomic_path

    table = faithfulness_table(store, seed=seed)
    csv, png = faithfulness_paths(data_dir, dataset)
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plot_faithfulness(table, png, title=dataset, capture=str(store.attrs.get("capture", "epoch")))
    return table, csv, png


def _up_to_date(store: Any, csv: Path, png: Path, store_time: float | None) -> bool:
    """Both files newer than the store, and the CSV holds the Shapley columns when the store has Shapley values."""
    if store_time is None or not (csv.is_file() and png.is_file()):
        return False
    if min(csv.stat().st_mtime, png.stat().st_mtime) <= store_time:
        return False
    if getattr(store, "has_shapley", False):
        with open(csv, encoding="utf-8") as f:
            return "shapley_tau_attention" in f.readline().split(",")
    return True


def refresh_faithfulness(
    store: Any, data_dir: Path | str, dataset: str, seed: int = 0, force: bool = False, store_time: float | None = None
) -> None:
    """Step 2: write faithfulness.csv and its figure unless the store has no attribution or they
    are newer than the store (``store_time``, its modification time; ``force`` recomputes; a CSV
    written before the Shapley columns existed is redone for a store with Shapley values); prints
    what it did and the table's first and last capture."""
    csv, png = faithfulness_paths(data_dir, dataset)
    if not store.has_attribution:
        say(
            f"faithfulness: {store.path} has no attribution (made before it was captured); "
            f"run get_training_attention.py --force for {csv.name}"
        )
        return
    if not force and _up_to_date(store, csv, png, store_time):
        say(f"faithfulness: {csv} is up to date (--force recomputes)")
        return
    t0 = time.perf_counter()
    table, csv, png = write_faithfulness(store, data_dir, dataset, seed=seed)
    say(
        f"faithfulness ({time.perf_counter() - t0:.1f} s) -> {csv}, {png}\n"
        f"  Kendall tau(|attribution|, importance) over {int(table['n_tau'].iloc[0])} compounds with >= 3 "
        f"elements, top-1 agreement over {int(table['n_top1'].iloc[0])} with >= 2 (mean ± SE):\n"
        + "\n".join("  " + line for line in summary_rows(table).splitlines())
    )
    if has_shapley_columns(table):
        say(
            "  with |Shapley| as the reference, and the sign test (share of compounds whose picked element "
            "has Shapley value > 0):\n" + "\n".join("  " + line for line in shapley_summary_rows(table).splitlines())
        )
    elif not getattr(store, "has_shapley", False):
        say("  (no Shapley values in this store, made before they were captured: no Shapley-referenced columns)")
