"""Is the attention an explanation? Leave-one-element-out attribution and its agreement with attention.

Attribution (computed during capture, stored as ``attribution (n, c, E)`` in ``attention.zarr``):
for every real element j of a compound with at least two elements, the prediction of the compound
with j removed and the remaining fractions renormalised to sum 1, minus the prediction of the full
compound, in target units. 0 at padding and for single-element compounds. :func:`leave_one_out`
builds all variants of a batch at once and runs them in eval mode without autograd, in float32
outside any autocast region, and draws no random numbers, so it never changes training.

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
error is the one that decides whether attention tells more than the composition). Step 2
(``generate_attention_videos.py``) writes ``attention/<dataset>/faithfulness.csv`` and
``figures/faithfulness/<dataset>.png``::

    from crabnet.capture import AttentionStore
    from crabnet.faithfulness import faithfulness_table
    table = faithfulness_table(AttentionStore("data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr"))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.layout import Layout

IMPORTANCES = ("attention", "rollout", "shuffled", "fraction")  # the columns of the table, in this order
PAIRED = ("attention", "rollout")  # compared with the fraction-only control compound by compound
LABELS = {
    "attention": "attention (raw)",
    "rollout": "attention rollout",
    "shuffled": "shuffled (control)",
    "fraction": "fraction only (control)",
}
BLOCK_BYTES = 64 << 20  # faithfulness_table reads about this many bytes of attention at once


# --------------------------------------------------------------------------------------------
# attribution


def leave_one_out(model: Any, elements, fractions, full=None, max_rows: int = 4096):
    """Leave-one-element-out effect on the raw model output for a batch of compounds.

    Every (compound, real element) pair of a compound with ≥ 2 elements becomes one variant: the
    element is removed, the other fractions are divided by their sum, and the remaining elements
    keep their order. Identical variants (e.g. the single elements left by the binary compounds)
    run once, and variants run in groups of equal size trimmed to their width (padding slots cost
    as much as real ones), in chunks of ``max_rows`` rows, through ``model(elements, fractions)``
    without autograd in float32 (autocast disabled). The model should be in eval mode.

    Args:
        model: a :class:`crabnet.model.CrabNet` (or anything with the same ``__call__``).
        elements: (b, E) long tensor of atomic numbers, 0 = padding (real elements first).
        fractions: (b, E) float tensor.
        full: (b,) raw output column 0 of the full compounds if already computed (else computed).
        max_rows: largest number of variants in one forward pass.

    Returns:
        (b, E) float64 tensor on the CPU: output without the element minus the full output, in the
        model's (scaled) units; multiply by the scaler's std for target units. 0 at padding and
        for single-element compounds.
    """
    import torch

    device = elements.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        fractions = fractions.float()
        if full is None:
            full = model(elements, fractions)[:, 0]
        keep = elements > 0
        valid = keep & (keep.sum(1, keepdim=True) >= 2)
        rows, slots = valid.nonzero(as_tuple=True)  # (m,) compound and slot of each variant
        effect = torch.zeros(elements.shape, dtype=torch.float64)
        if len(rows) == 0:
            return effect
        ar = torch.arange(len(rows), device=device)
        el = elements[rows].clone()
        fr = fractions[rows].clone()
        el[ar, slots] = 0
        fr[ar, slots] = 0.0
        fr = fr / fr.sum(1, keepdim=True).clamp_min(1e-12)
        order = torch.argsort((el == 0).to(torch.int8), dim=1, stable=True)  # real elements first, in order
        el, fr = el.gather(1, order), fr.gather(1, order)
        key = torch.cat([el, fr.view(torch.int32).long()], dim=1)  # exact identity of a variant
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        u_el = unique[:, : el.shape[1]]
        u_fr = unique[:, el.shape[1] :].int().view(torch.float32)
        width = (u_el > 0).sum(1)
        out_u = torch.empty(len(unique), dtype=torch.float64)
        for w in torch.unique(width).tolist():
            idx = (width == w).nonzero(as_tuple=True)[0]
            for a in range(0, len(idx), max_rows):
                part = idx[a : a + max_rows]
                out_u[part.cpu()] = model(u_el[part, :w].contiguous(), u_fr[part, :w].contiguous())[:, 0].double().cpu()
        out = out_u[inverse.cpu()]
        effect[rows.cpu(), slots.cpu()] = out - full.double().cpu()[rows.cpu()]
    return effect


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


def faithfulness_table(store: Any, seed: int = 0, block_bytes: int = BLOCK_BYTES):
    """Agreement of attention with attribution at every capture of a store.

    Args:
        store: a :class:`crabnet.capture.AttentionStore` holding ``attribution``.
        seed: seed of the shuffled control.
        block_bytes: read about this many bytes of attention at a time (compound-major blocks).

    Returns:
        a ``pandas.DataFrame``, one row per capture: ``capture``, ``step``, ``n_tau`` (compounds
        with ≥ 3 elements), ``n_top1`` (compounds with ≥ 2 elements), and for each importance of
        :data:`IMPORTANCES` ``tau_<name>``, ``tau_<name>_se``, ``top1_<name>``, ``top1_<name>_se``
        (means over those compounds and their standard errors; a compound where τ is undefined,
        because |attribution| or the importance is constant over its elements, or where a value
        is not finite, is left out of that mean); and for attention and rollout the paired
        difference from the fraction-only control, compound by compound: ``tau_<name>_vs_fraction``,
        ``top1_<name>_vs_fraction`` with ``_se`` (> 0: attention ranks the elements more like the
        attribution than the fractions alone do).

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
    att, attr = group["attention"], group["attribution"]
    n, c = att.shape[0], att.shape[1]
    per_compound = max(1, int(np.prod(att.shape[1:])) * 8)
    block = int(np.clip(block_bytes // per_compound, 1, max(n, 1)))
    elements = np.asarray(store.elements)
    fractions = np.asarray(store.fractions, dtype=np.float64)
    names = [f"{m}_{k}" for m in ("tau", "top1") for k in IMPORTANCES]
    names += [f"{m}_{k}_vs_fraction" for m in ("tau", "top1") for k in PAIRED]
    sums = {name: np.zeros((3, c)) for name in names}  # count, sum, sum of squares per capture
    captures = np.arange(c)
    n_real = (elements > 0).sum(axis=1)
    n_tau, n_top1 = int((n_real >= 3).sum()), int((n_real >= 2).sum())
    for i in range(0, n, block):
        keep = elements[i : i + block] > 0
        k = keep.sum(axis=1)
        maps = np.asarray(att[i : i + block], dtype=np.float64)
        a = np.abs(np.asarray(attr[i : i + block], dtype=np.float64))  # (b, c, E)
        imps = block_importances(maps, fractions[i : i + block], keep, seed, np.arange(i, i + len(keep)), captures)
        keep_c = np.broadcast_to(keep[:, None, :], a.shape)
        per: dict[str, np.ndarray] = {}  # (b, c) per compound, NaN where left out
        for name, imp in imps.items():
            for metric, values, need in (
                ("tau", kendall_tau(a, imp, keep_c), 3),
                ("top1", top1_agreement(a, imp, keep_c), 2),
            ):
                per[f"{metric}_{name}"] = np.where((k >= need)[:, None], values, np.nan)
        for metric in ("tau", "top1"):
            for name in PAIRED:
                per[f"{metric}_{name}_vs_fraction"] = per[f"{metric}_{name}"] - per[f"{metric}_fraction"]
        for name, values in per.items():
            ok = np.isfinite(values)
            v = np.where(ok, values, 0.0)
            acc = sums[name]
            acc[0] += ok.sum(axis=0)
            acc[1] += v.sum(axis=0)
            acc[2] += (v * v).sum(axis=0)
    out: dict[str, Any] = {"capture": captures, "step": np.asarray(store.steps, dtype=np.int64)}
    out["n_tau"] = np.full(c, n_tau, dtype=np.int64)
    out["n_top1"] = np.full(c, n_top1, dtype=np.int64)
    for name in names:
        cnt, s, ss = sums[name]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)
            var = np.where(cnt > 1, (ss - cnt * mean**2) / np.maximum(cnt - 1, 1), np.nan)
            out[name] = mean
            out[f"{name}_se"] = np.sqrt(np.maximum(var, 0.0) / np.maximum(cnt, 1))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------
# outputs of step 2


def faithfulness_paths(data_dir: Path | str, dataset: str) -> tuple[Path, Path]:
    """``attention/<dataset>/faithfulness.csv`` and ``figures/faithfulness/<dataset>.png``."""
    layout = Layout(data_dir)
    return layout.faithfulness_csv(dataset), layout.faithfulness_figure(dataset)


def plot_faithfulness(table, path: Path | str, title: str = "", capture: str = "epoch") -> Path:
    """Kendall τ and top-1 agreement against the capture's epoch/step, one line per importance (±1 SE)."""
    from matplotlib.figure import Figure

    from crabnet.plotting import save_png

    colours = {"attention": "#1f77b4", "rollout": "#d62728", "shuffled": "#7f7f7f", "fraction": "#2ca02c"}
    styles = {"attention": "-", "rollout": "-", "shuffled": ":", "fraction": "--"}
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    x = np.asarray(table["step"])
    for ax, metric, ylabel in (
        (axes[0], "tau", "Kendall τ(|attribution|, importance)\ncompounds with ≥ 3 elements"),
        (axes[1], "top1", "top-1 agreement\ncompounds with ≥ 2 elements"),
    ):
        for name in IMPORTANCES:
            y = np.asarray(table[f"{metric}_{name}"], dtype=np.float64)
            se = np.asarray(table[f"{metric}_{name}_se"], dtype=np.float64)
            ax.plot(x, y, styles[name], color=colours[name], marker="o", ms=3, lw=1.6, label=LABELS[name])
            ax.fill_between(x, y - se, y + se, color=colours[name], alpha=0.15, lw=0)
        ax.set_xlabel(f"{capture} (0 = untrained)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.0, color="black", lw=0.8)
    axes[0].legend(fontsize=8, loc="best")
    n_tau = int(np.max(table["n_tau"])) if len(table) else 0
    n_top1 = int(np.max(table["n_top1"])) if len(table) else 0
    fig.suptitle(
        f"{title}: does attention rank elements as leave-one-out attribution does? "
        f"({n_tau} / {n_top1} compounds; bands ±1 SE)",
        fontsize=10,
    )
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


def refresh_faithfulness(
    store: Any, data_dir: Path | str, dataset: str, seed: int = 0, force: bool = False, store_time: float | None = None
) -> None:
    """Step 2: write faithfulness.csv and its figure unless the store has no attribution or they
    are newer than the store (``store_time``, its modification time; ``force`` recomputes); prints
    what it did and the table's first and last capture."""
    csv, png = faithfulness_paths(data_dir, dataset)
    if not store.has_attribution:
        print(
            f"faithfulness: {store.path} has no attribution (made before it was captured); "
            f"run get_training_attention.py --force for {csv.name}"
        )
        return
    if (
        not force
        and store_time is not None
        and csv.is_file()
        and png.is_file()
        and min(csv.stat().st_mtime, png.stat().st_mtime) > store_time
    ):
        print(f"faithfulness: {csv} is up to date (--force recomputes)")
        return
    t0 = time.perf_counter()
    table, csv, png = write_faithfulness(store, data_dir, dataset, seed=seed)
    print(
        f"faithfulness ({time.perf_counter() - t0:.1f} s) -> {csv}, {png}\n"
        f"  Kendall tau(|attribution|, importance) over {int(table['n_tau'].iloc[0])} compounds with >= 3 "
        f"elements, top-1 agreement over {int(table['n_top1'].iloc[0])} with >= 2 (mean ± SE):\n"
        + "\n".join("  " + line for line in summary_rows(table).splitlines())
    )
