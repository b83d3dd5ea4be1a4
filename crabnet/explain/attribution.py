"""Beyond attention: exact Shapley values, the output decomposition and head ablation.

Three attributions that do not read the attention maps:

- **Shapley values** (:func:`shapley`, :func:`coalition_attribution`): the game of a compound with
  k real elements gives a coalition S (a subset of its elements) the model's prediction, in target
  units, for the sub-compound made of S's elements with their fractions renormalised to sum 1; the
  full coalition is the compound exactly as given, the empty one is worth ``baseline`` (the
  training-mean target). Shapley value of element i::

      φ_i = Σ_{S ⊆ N∖{i}} |S|! (k − |S| − 1)! / k! · (v(S ∪ {i}) − v(S))

  so Σ_i φ_i = v(N) − v(∅) = prediction − baseline. Exact (all 2^k − 1 non-empty sub-compounds)
  for k ≤ ``max_exact`` (default :data:`MAX_EXACT` = 8: at most 255 sub-compounds per compound);
  above, a permutation-sampling estimate (``n_samples`` random orders, seeded per compound), which
  keeps Σ_i φ_i = prediction − baseline exactly, since each order's marginal contributions
  telescope. Every sub-compound of a batch is predicted once, however many compounds (or repeats
  of one compound) share it. The leave-one-element-out attribution (times the scaler's std) is
  v(N ∖ {i}) − v(N), one of the same coalitions: :func:`coalition_attribution` returns it too at no extra forward pass.
- **Contribution** (:func:`contribution`): the exact decomposition of the prediction over the
  elements, read from the output head (see :func:`contribution_from_head` for the derivation).
- **Head ablation** (:func:`head_ablation`): for every layer l and head h, the predictions of the
  whole set with that head's output zeroed before the attention output projection
  (:func:`ablate_heads`), against the unablated ones: change of the MAE and mean |Δ prediction|;
  the layers before the ablated one are replayed from the unablated pass (:func:`replay_layers`).

Everything runs without autograd in float32 (autocast disabled) in eval mode (the model's mode is
restored afterwards) and draws no random numbers from PyTorch, so it can run during training.

Shapes: n compounds, E element slots (0-padded), L layers, H heads, D = d_model, k real elements.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crabnet.explain.store import MAX_EXACT, N_SAMPLES

BATCH_SIZE = 4096  # rows of one forward pass
Array = np.ndarray | torch.Tensor  # (n, E) elements or fractions, on the host or the model's device
MAX_EXACT_LIMIT = 20  # largest max_exact accepted (2^20 coalitions per compound)


# --------------------------------------------------------------------------------------------
# Shapley values from coalition values (any game)


def _bits(masks: np.ndarray, k: int) -> np.ndarray:
    """Coalition bit masks (m,) int64 -> membership (m, k) bool (bit j = element j)."""
    return ((np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(k)) & 1).astype(bool)


def exact_from_table(values: np.ndarray) -> np.ndarray:
    """Exact Shapley values from the values of every coalition of k players.

    Args:
        values: (c, 2^k) value of coalition ``m`` in column m (bit j of m = player j; column 0 is
            the empty coalition).

    Returns:
        (c, k) float64 Shapley values; each row sums to ``values[:, -1] - values[:, 0]``.
    """
    values = np.asarray(values, dtype=np.float64)  # (c, 2^k)
    k = int(values.shape[1]).bit_length() - 1
    if values.shape[1] != 1 << k:
        raise ValueError(f"values need 2^k columns, got {values.shape[1]}")
    masks = np.arange(1 << k, dtype=np.int64)  # (2^k,)
    size = _bits(masks, k).sum(1)  # (2^k,) |S|
    # weight of a coalition S without i: |S|! (k - |S| - 1)! / k!  (|S| = k is never used)
    weight = np.array([math.factorial(s) * math.factorial(max(k - s - 1, 0)) / math.factorial(k) for s in range(k + 1)])
    phi = np.zeros((values.shape[0], k))
    for i in range(k):
        without = masks[(masks >> i) & 1 == 0]  # (2^(k-1),) coalitions without i
        phi[:, i] = (values[:, without | (1 << i)] - values[:, without]) @ weight[size[without]]
    return phi


def _orders(rng: np.random.Generator, n_samples: int, k: int) -> np.ndarray:
    """``n_samples`` random orders of k players: (P, k) int64."""
    return rng.permuted(np.tile(np.arange(k, dtype=np.int64), (n_samples, 1)), axis=1)


def _prefix_masks(orders: np.ndarray) -> np.ndarray:
    """Coalitions S_0 = ∅, S_1, ..., S_k = N met along each order: (P, k) -> (P, k + 1) int64 bit masks."""
    prefixes = np.cumsum(np.int64(1) << orders, axis=1)  # (P, k): the bits are distinct, so sum = or
    return np.concatenate([np.zeros((len(orders), 1), dtype=np.int64), prefixes], axis=1)


def permutation_estimate(orders: np.ndarray, prefix_values: np.ndarray) -> np.ndarray:
    """Shapley values estimated from random orders: the mean marginal contribution of each player.

    Args:
        orders: (P, k) the players in the order they join.
        prefix_values: (P, k + 1) value of the coalition formed by the first j players of each
            order (column 0 the empty coalition, column k all players).

    Returns:
        (k,) float64 estimate; sums to the mean of ``prefix_values[:, -1] - prefix_values[:, 0]``
        (the marginal contributions of one order telescope).
    """
    marginal = np.diff(np.asarray(prefix_values, dtype=np.float64), axis=1)  # (P, k)
    phi = np.zeros(orders.shape[1])
    np.add.at(phi, orders, marginal)
    return phi / len(orders)


# --------------------------------------------------------------------------------------------
# sub-compounds and their predictions


def _as_numpy(elements: Array, fractions: Array) -> tuple[np.ndarray, np.ndarray]:
    """(n, E) int64 atomic numbers and (n, E) float32 fractions on the host."""
    if isinstance(elements, torch.Tensor):
        elements = elements.detach().cpu().numpy()
    if isinstance(fractions, torch.Tensor):
        fractions = fractions.detach().float().cpu().numpy()
    return np.asarray(elements, dtype=np.int64), np.asarray(fractions, dtype=np.float32)


def _compact(elements: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real elements first, in their order: (el (n, E), fr (n, E), slot (n, E) original slot of each column, k (n,))."""
    slot = np.argsort(elements <= 0, axis=1, kind="stable")  # (n, E)
    el = np.take_along_axis(elements, slot, axis=1)
    fr = np.take_along_axis(fractions, slot, axis=1)
    k = (el > 0).sum(1)
    return np.where(el > 0, el, 0), np.where(el > 0, fr, 0).astype(np.float32), slot, k


def sub_compounds(
    elements: np.ndarray, fractions: np.ndarray, compound: np.ndarray, masks: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of coalitions: the members of ``masks`` of compounds ``compound``, real first.

    Args:
        elements, fractions: (n, K) compounds with their real elements first (``_compact``).
        compound: (R,) which compound each coalition belongs to.
        masks: (R,) int64 coalitions (bit j = real element j), not empty.
        k: (n,) real elements of each compound.

    Returns:
        (R, K) elements and (R, K) float32 fractions: members in their order, then padding; the
        fractions renormalised to sum 1 in float32, except for the full coalition, which is the
        compound exactly as given.
    """
    K = elements.shape[1]
    member = _bits(masks, K)  # (R, K)
    el = np.where(member, elements[compound], 0)
    fr = np.where(member, fractions[compound], np.float32(0))
    full = masks == (np.int64(1) << k[compound]) - 1  # (R,)
    total = fr.sum(1, keepdims=True, dtype=np.float32)
    fr = np.where(full[:, None], fr, fr / np.maximum(total, np.float32(1e-30))).astype(np.float32)
    order = np.argsort(~member, axis=1, kind="stable")  # (R, K) members first, in order
    return np.take_along_axis(el, order, axis=1), np.take_along_axis(fr, order, axis=1)


def unique_rows(elements: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identical model inputs (same elements, bit-identical fractions) found once.

    Returns:
        ``first`` (u,) index of one row of each distinct input and ``inverse`` (R,) the distinct
        input of every row.
    """
    key = np.ascontiguousarray(np.concatenate([elements.astype(np.int64), fractions.view(np.int32)], axis=1))
    void = key.view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    return first, inverse.ravel()


def _device(model: Any) -> torch.device:
    """Where the model's parameters (or buffers) live; the CPU for a model with neither."""
    if isinstance(model, torch.nn.Module):
        t = next(itertools.chain(model.parameters(), model.buffers()), None)
        if t is not None:
            return t.device
    return torch.device("cpu")


@contextmanager
def _inference(model: Any) -> Iterator[torch.device]:
    """Eval mode (restored afterwards, even on error), no autograd, float32 (autocast disabled)."""
    device = _device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield device
    finally:
        if hasattr(model, "train"):
            model.train(was_training)


def predict_rows(model: Any, elements: np.ndarray, fractions: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Raw output column 0 (scaled units) of rows whose real elements come first.

    Rows run in groups of equal width trimmed to it (padding costs as much as a real slot), in
    chunks of ``batch_size``, through ``model(elements, fractions)``; call it under ``_inference``.

    Returns:
        (R,) float64.
    """
    device = _device(model)
    width = (elements > 0).sum(1)  # (R,)
    out = np.zeros(len(elements))
    for w in np.unique(width[width > 0]).tolist():
        idx = np.flatnonzero(width == w)
        for a in range(0, len(idx), batch_size):
            part = idx[a : a + batch_size]
            el = torch.as_tensor(elements[part, :w], dtype=torch.long, device=device)
            fr = torch.as_tensor(fractions[part, :w], dtype=torch.float32, device=device)
            out[part] = model(el, fr)[:, 0].double().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Shapley values of compounds


@dataclass
class CoalitionAttribution:
    """Attributions of a batch of compounds from the values of their sub-compounds (target units).

    Attributes:
        shapley: (n, E) Shapley values; Σ over a compound = prediction − baseline; 0 at padding.
        leave_one_out: (n, E) v(N ∖ {i}) − v(N): the prediction without the element (other
            fractions renormalised) minus the full one, times the scaler's std; 0 at padding and for
            single-element compounds.
        exact: (n,) True where the Shapley values are exact (k ≤ max_exact), False where sampled.
        prediction: (n,) v(N), the prediction of each compound.
        rows: distinct sub-compounds that went through the model (the full compounds included
            unless ``full`` was given).
    """

    shapley: np.ndarray
    leave_one_out: np.ndarray
    exact: np.ndarray
    prediction: np.ndarray
    rows: int


def sampled_orders(seed: int, elements: np.ndarray, fractions: np.ndarray, n_samples: int) -> np.ndarray:
    """Random orders of a compound's k real elements for the permutation estimate: (P, k) slot indices.

    Drawn over the elements sorted by atomic number from a generator seeded by ``seed`` and the
    compound itself, so a compound gets the same orders whatever its position in a batch and the
    order of its slots.

    Args:
        seed: the estimate's seed.
        elements: (k,) the real elements' atomic numbers (distinct).
        fractions: (k,) their fractions.
        n_samples: P.
    """
    canon = np.argsort(elements, kind="stable")  # (k,) slots by atomic number
    entropy = [
        int(seed) % 2**63,
        *elements[canon].tolist(),
        *fractions[canon].astype(np.float32).view(np.uint32).tolist(),
    ]
    return canon[_orders(np.random.default_rng(np.random.SeedSequence(entropy)), n_samples, len(elements))]


def _coalitions(
    el: np.ndarray, fr: np.ndarray, k: np.ndarray, exact: np.ndarray, n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """The coalitions to evaluate: every non-empty one of exact compounds; along the sampled orders,
    and every N ∖ {i}, of the others.

    Returns:
        ``compound`` (R,), ``masks`` (R,) int64, and the orders (P, k) of each sampled compound.
    """
    compound, masks, orders = [], [], {}
    for kk in np.unique(k[exact & (k > 0)]).tolist():
        idx = np.flatnonzero(exact & (k == kk))
        m = np.arange(1, 1 << kk, dtype=np.int64)  # (2^k - 1,) in order: column m - 1 of the table
        compound.append(np.repeat(idx, len(m)))
        masks.append(np.tile(m, len(idx)))
    for i in np.flatnonzero(~exact & (k > 0)).tolist():
        kk = int(k[i])
        if kk > 62:
            raise ValueError(f"compound {i} has {kk} elements; coalitions are 63-bit masks")
        orders[i] = sampled_orders(seed, el[i, :kk], fr[i, :kk], n_samples)  # (P, k)
        full = (np.int64(1) << kk) - 1
        m = np.unique(np.concatenate([_prefix_masks(orders[i])[:, 1:].ravel(), full ^ (np.int64(1) << np.arange(kk))]))
        m = m[m > 0]
        compound.append(np.full(len(m), i))
        masks.append(m)
    if not compound:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), orders
    return np.concatenate(compound), np.concatenate(masks), orders


def _values_of(
    model: Any,
    el: np.ndarray,
    fr: np.ndarray,
    k: np.ndarray,
    compound: np.ndarray,
    masks: np.ndarray,
    full: np.ndarray | None,
    batch_size: int,
) -> tuple[np.ndarray, int]:
    """Raw output (scaled units) of every coalition (R,), each distinct sub-compound run once; and how many ran."""
    values = np.zeros(len(masks))
    run = np.ones(len(masks), dtype=bool)
    if full is not None:  # the full compounds' outputs are known
        is_full = masks == (np.int64(1) << k[compound]) - 1
        values[is_full] = full[compound[is_full]]
        run = ~is_full
    if not run.any():
        return values, 0
    sub_el, sub_fr = sub_compounds(el, fr, compound[run], masks[run], k)
    first, inverse = unique_rows(sub_el, sub_fr)
    values[run] = predict_rows(model, sub_el[first], sub_fr[first], batch_size)[inverse]
    return values, len(first)


@torch.no_grad()
def coalition_attribution(
    model: Any,
    elements: Array,
    fractions: Array,
    scaler: Any,
    baseline: float | np.ndarray,
    *,
    max_exact: int = MAX_EXACT,
    n_samples: int = N_SAMPLES,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    full: Array | None = None,
) -> CoalitionAttribution:
    """Shapley values and leave-one-out attribution of a batch of compounds from one set of forward passes.

    See :func:`shapley` for the game and the arguments.

    Args:
        full: (n,) raw output column 0 of the compounds (scaled units) if already computed (the
            capture's attention pass); else the full compounds run with the sub-compounds.

    Returns:
        a :class:`CoalitionAttribution`.
    """
    if max_exact > MAX_EXACT_LIMIT:
        raise ValueError(f"max_exact={max_exact}: at most {MAX_EXACT_LIMIT} (2^k coalitions per compound)")
    el0, fr0 = _as_numpy(elements, fractions)
    n, E = el0.shape
    el, fr, slot, k = _compact(el0, fr0)
    exact = k <= max_exact
    v0 = np.broadcast_to(np.asarray(baseline, dtype=np.float64), (n,))  # (n,) value of the empty coalition
    if full is not None:
        full = (full.detach().cpu().numpy() if isinstance(full, torch.Tensor) else np.asarray(full)).astype(np.float64)
    compound, masks, orders = _coalitions(el, fr, k, exact, n_samples, seed)
    with _inference(model):
        raw, rows = _values_of(model, el, fr, k, compound, masks, full, batch_size)
    values = np.asarray(scaler.unscale(raw), dtype=np.float64)  # (R,) target units
    phi, loo, pred = np.zeros((n, E)), np.zeros((n, E)), np.zeros(n)  # compact slot order for now
    start = 0
    for kk in np.unique(k[exact & (k > 0)]).tolist():  # exact: a table of all 2^k coalitions
        idx = np.flatnonzero(exact & (k == kk))
        size = len(idx) * ((1 << kk) - 1)
        table = np.concatenate([v0[idx, None], values[start : start + size].reshape(len(idx), -1)], axis=1)
        start += size
        phi[idx, :kk] = exact_from_table(table)
        whole = (1 << kk) - 1
        pred[idx] = table[:, whole]
        loo[idx, :kk] = table[:, whole ^ (1 << np.arange(kk))] - table[:, [whole]] if kk >= 2 else 0.0
    for i, order in orders.items():  # sampled: this compound's coalitions follow, sorted by mask
        stop = start + int(np.searchsorted(compound[start:], i, side="right"))
        kk = int(k[i])
        phi[i, :kk], loo[i, :kk], pred[i] = _sampled(order, masks[start:stop], values[start:stop], v0[i])
        start = stop
    out_phi, out_loo = np.zeros((n, E)), np.zeros((n, E))
    out_phi[np.arange(n)[:, None], slot] = phi  # back to the original slots (padding columns hold 0)
    out_loo[np.arange(n)[:, None], slot] = loo
    return CoalitionAttribution(out_phi, out_loo, exact, pred, rows)


def _sampled(
    order: np.ndarray, masks: np.ndarray, values: np.ndarray, empty: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Permutation estimate, leave-one-out and prediction of one sampled compound.

    Args:
        order: (P, k) the sampled element orders.
        masks: (m,) sorted coalitions evaluated for the compound (along the orders, and N ∖ {i}).
        values: (m,) their values.
        empty: the value of the empty coalition.

    Returns:
        (k,) Shapley estimate, (k,) leave-one-out, the full compound's value.
    """
    k = order.shape[1]

    def lookup(m: np.ndarray) -> np.ndarray:
        return np.where(m == 0, empty, values[np.searchsorted(masks, np.maximum(m, 1))])

    whole = (np.int64(1) << k) - 1
    pred = float(lookup(np.array([whole]))[0])
    loo = lookup(whole ^ (np.int64(1) << np.arange(k))) - pred if k >= 2 else np.zeros(k)
    return permutation_estimate(order, lookup(_prefix_masks(order))), loo, pred


def shapley(
    model: Any,
    elements: Array,
    fractions: Array,
    scaler: Any,
    baseline: float | np.ndarray,
    *,
    max_exact: int = MAX_EXACT,
    n_samples: int = N_SAMPLES,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """Shapley values of the real elements of each compound, in target units.

    The value of a coalition S of a compound's real elements is the prediction (``scaler.unscale``
    of the model's output column 0) for the sub-compound made of S's elements with their fractions
    renormalised to sum 1 (float32; the full coalition is the compound as given), and the empty
    coalition is worth ``baseline``. Compounds with k ≤ ``max_exact`` real elements (default 8:
    at most 2^8 − 1 = 255 sub-compounds each) get the exact values over all coalitions; larger ones
    a permutation-sampling estimate from ``n_samples`` random element orders (seeded by ``seed``
    and the compound's own elements and fractions, so a compound gets the same estimate in any
    batch), which also sums exactly to prediction − baseline. :func:`is_exact` says which
    compounds were exact. Identical sub-compounds of the batch (across compounds, or repeated
    compounds) run once; they run in eval mode, float32, without autograd, in groups of equal
    width of at most ``batch_size`` rows.

    Args:
        model: a :class:`crabnet.training.model.CrabNet` (or anything called as ``model(elements, fractions)``
            returning (B, ≥1) raw outputs in scaled units).
        elements: (n, E) atomic numbers, 0 = padding (array or tensor).
        fractions: (n, E) fractions, 0 at padding.
        scaler: has ``unscale`` (scaled output -> target units), e.g. :class:`crabnet.training.recipe.Scaler`.
        baseline: value of the empty coalition in target units (the training-mean target, e.g.
            ``scaler.mean``); a float or (n,) per compound.
        max_exact: exact up to this many real elements.
        n_samples: random orders of the sampled estimate.
        seed: seed of the sampled estimate.
        batch_size: rows of one forward pass.

    Returns:
        (n, E) float64 Shapley values; 0 at padding; each compound's sum is its prediction minus
        ``baseline``.
    """
    return coalition_attribution(
        model,
        elements,
        fractions,
        scaler,
        baseline,
        max_exact=max_exact,
        n_samples=n_samples,
        seed=seed,
        batch_size=batch_size,
    ).shapley


def is_exact(elements: Array, max_exact: int = MAX_EXACT) -> np.ndarray:
    """(n,) True for the compounds whose :func:`shapley` values are exact (≤ ``max_exact`` real elements)."""
    if isinstance(elements, torch.Tensor):
        elements = elements.detach().cpu().numpy()
    return (np.asarray(elements) > 0).sum(1) <= max_exact


# --------------------------------------------------------------------------------------------
# the output decomposition


@torch.no_grad()
def contribution_from_head(head_out: torch.Tensor, keep: torch.Tensor, scaler: Any) -> np.ndarray:
    """Each real element's share of the prediction, in target units, from the head's per-element outputs.

    The model pools the head's per-element outputs (value_i, logit_i) with an unweighted mean over
    the k real elements and predicts ``ŷ = mean(value) · σ(mean(logit))`` (the sigmoid is taken of
    the mean logit, one gate per compound). In scaled units the share of element i is therefore
    ``s_i = value_i / k · σ(mean(logit))``, and Σ_i s_i = ŷ exactly. ``scaler.unscale`` is affine,
    ``y ↦ y·std + mean``; the target-unit share adds the offset evenly, as the pooling weighs the
    elements: ``c_i = s_i·std + mean / k``, so Σ_i c_i = ŷ·std + mean, the prediction in target
    units. (The gate is shared: an element's share also depends, through σ, on the others' logits.)

    Args:
        head_out: (B, E, ≥2) output of ``model.head`` on the encoder output (``hidden[-1]``).
        keep: (B, E) True at real elements.
        scaler: has ``mean`` and ``std`` (:class:`crabnet.training.recipe.Scaler`).

    Returns:
        (B, E) float64 shares; 0 at padding.
    """
    keep = keep.to(torch.float64)
    k = keep.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    value = head_out[..., 0].double() * keep  # (B, E)
    gate = torch.sigmoid((head_out[..., 1].double() * keep).sum(1, keepdim=True) / k)  # (B, 1)
    share = value / k * gate  # (B, E) scaled units
    return ((share * scaler.std + scaler.mean / k) * keep).cpu().numpy()


@torch.no_grad()
def contribution(
    model: Any, elements: Array, fractions: Array, scaler: Any, *, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Exact decomposition of each compound's prediction (target units) over its real elements.

    Runs the encoder, then the output head on its output (:func:`contribution_from_head` has the
    derivation); the shares sum to the prediction in target units to float tolerance. A capture
    that already ran ``forward_internals(..., hidden=True)`` can call
    :func:`contribution_from_head` on ``model.head(hidden[-1])`` instead.

    Args:
        model: a :class:`crabnet.training.model.CrabNet`.
        elements: (n, E) atomic numbers, 0 = padding.
        fractions: (n, E) fractions.
        scaler: :class:`crabnet.training.recipe.Scaler`.
        batch_size: compounds of one forward pass.

    Returns:
        (n, E) float64 shares; 0 at padding.
    """
    el, fr = _as_numpy(elements, fractions)
    out = np.zeros(el.shape)
    with _inference(model) as device:
        for a in range(0, len(el), batch_size):
            el_t, fr_t, real = _batch(el[a : a + batch_size], fr[a : a + batch_size], device)
            hidden = model.forward_internals(el_t, fr_t, hidden=True, real=real).hidden
            out[a : a + batch_size] = contribution_from_head(model.head(hidden[-1]).float(), el_t > 0, scaler)
    return out


# --------------------------------------------------------------------------------------------
# head ablation


def _batch(el: np.ndarray, fr: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Tensors of a batch on ``device`` and, off the CPU, its real slots found on the host (so the
    model takes its gathered path without waiting for the device; on the CPU it finds them itself)."""
    from crabnet.training.model import real_slots

    el_t = torch.as_tensor(el, dtype=torch.long, device=device)
    fr_t = torch.as_tensor(fr, dtype=torch.float32, device=device)
    return el_t, fr_t, None if device.type == "cpu" else real_slots(el, device)


@contextmanager
def ablate_heads(model: Any, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Zero the output of attention heads ``(layer, head)`` inside the ``with`` block.

    A forward pre-hook on each such layer's ``self_attn.out_proj`` multiplies its input, the heads'
    outputs concatenated as (B, E, H·Dh) with head h in columns [h·Dh, (h+1)·Dh), by a mask that is
    0 on the ablated heads' columns: the same as zeroing those columns of the projection's weight
    (its bias stays). The attention itself runs in the padded (B, E) layout on every device, so the
    hook acts the same on the gathered and the padded per-element paths. The hooks are removed on
    leaving the block, also on error.

    Raises:
        IndexError: a layer or head out of range.
    """
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    handles = []
    try:
        for l, hs in by_layer.items():
            if not 0 <= l < len(model.layers):
                raise IndexError(f"layer {l} out of range (the model has {len(model.layers)})")
            attn = model.layers[l].self_attn
            H, D = attn.n_heads, attn.out_proj.in_features
            mask = torch.ones(D, device=attn.out_proj.weight.device)  # (D,)
            for h in hs:
                if not 0 <= h < H:
                    raise IndexError(f"head {h} out of range (layer {l} has {H})")
                mask[h * (D // H) : (h + 1) * (D // H)] = 0.0

            def hook(module, args, mask=mask):
                return (args[0] * mask.to(args[0].dtype), *args[1:])

            handles.append(attn.out_proj.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _mask_heads_by_row(model: Any, layer: int, b: int) -> Iterator[None]:
    """Inside the block, rows [h·b, (h+1)·b) of a batch repeated H + 1 times have head h of ``layer`` zeroed
    (a forward pre-hook on its ``out_proj``, as :func:`ablate_heads`), the last copy none: all H ablations
    and their reference in one pass."""
    attn = model.layers[layer].self_attn
    H, D = attn.n_heads, attn.out_proj.in_features
    mask = torch.ones(H, b, 1, D, device=attn.out_proj.weight.device)  # (H, b, 1, D)
    for h in range(H):
        mask[h, :, :, h * (D // H) : (h + 1) * (D // H)] = 0.0
    mask = torch.cat([mask.reshape(H * b, 1, D), torch.ones(b, 1, D, device=mask.device)])  # ((H+1)·b, 1, D)

    def hook(module, args):
        return (args[0] * mask.to(args[0].dtype), *args[1:])  # the reference copy (rows past H·b) is kept

    handle = attn.out_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Replay(torch.nn.Module):
    """Stands in for an encoder layer: returns that layer's recorded output (and no attention weights)."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.output, None


@contextmanager
def replay_layers(model: Any, outputs: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block, layers 0..len(outputs)-1 of ``model.layers`` return ``outputs`` instead of running.

    ``outputs[i]`` is what layer i returned for the batch about to run (``hidden[i + 1]`` of
    ``forward_internals(..., hidden=True)`` on the same inputs); the layers are put back on leaving
    the block, also on error. Only valid for that batch.
    """
    saved = [model.layers[i] for i in range(len(outputs))]
    try:
        for i, out in enumerate(outputs):
            model.layers[i] = _Replay(out)
        yield
    finally:
        for i, layer in enumerate(saved):
            model.layers[i] = layer


@torch.no_grad()
def head_ablation(
    model: Any, elements: Array, fractions: Array, targets: np.ndarray, scaler: Any, *, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """Effect of zeroing each attention head on the predictions of a set of compounds.

    For every layer l and head h the set runs once with that head ablated (as :func:`ablate_heads`),
    in eval mode, float32, without autograd; the H ablations of a layer run as one pass of the batch
    repeated H times, copy h with head h zeroed. Layers before l are not run again: their outputs are
    replayed from the unablated pass (:func:`replay_layers`), so the ablations cost H·(L + 1)/2 passes
    of the encoder and H·L of the output head, besides the unablated pass. Each is compared with an
    unablated copy run in the same pass, so a head whose output the model does not read (zero columns of
    ``out_proj``) gives exactly 0 in both results.

    Args:
        model: a :class:`crabnet.training.model.CrabNet`.
        elements: (n, E) atomic numbers, 0 = padding.
        fractions: (n, E) fractions.
        targets: (n,) targets in target units.
        scaler: :class:`crabnet.training.recipe.Scaler` (``unscale``).
        batch_size: compounds of one forward pass.

    Returns:
        ``mae_change`` (L, H): MAE of the ablated predictions against ``targets`` minus the
        unablated MAE (target units; > 0: the head helps); ``mean_abs_change`` (L, H): mean
        |ablated − unablated prediction|; ``mae``: the unablated MAE; ``prediction`` (n,): the
        unablated predictions (target units).
    """
    el, fr = _as_numpy(elements, fractions)
    y = np.asarray(targets, dtype=np.float64).reshape(len(el))
    L, H = len(model.layers), model.layers[0].self_attn.n_heads
    clean = np.zeros(len(el))
    ablated = np.zeros((L, H, len(el)))
    reference = np.zeros((L, len(el)))  # unablated, computed beside the ablations of each layer
    with _inference(model) as device:
        for a in range(0, len(el), batch_size):
            part = slice(a, a + batch_size)
            el_t, fr_t, real = _batch(el[part], fr[part], device)
            internals = model.forward_internals(el_t, fr_t, hidden=True, real=real)
            clean[part] = internals.output[:, 0].double().cpu().numpy()
            b, r = len(el_t), H + 1  # copy h < H ablates head h, copy H is the unablated reference
            el_r, fr_r = el_t.repeat(r, 1), fr_t.repeat(r, 1)  # (r·b, E)
            real_r = None if real is None else _batch(np.tile(el[part], (r, 1)), fr[part], device)[2]
            for l in range(L):
                replayed = [x.repeat(r, 1, 1) for x in internals.hidden[1 : l + 1]]  # outputs of layers 0..l-1
                with replay_layers(model, replayed), _mask_heads_by_row(model, l, b):
                    out = model(el_r, fr_r, real=real_r)[:, 0].double().cpu().numpy().reshape(r, b)
                ablated[l, :, part] = out[:H]
                reference[l, part] = out[H]
    clean = np.asarray(scaler.unscale(clean), dtype=np.float64)
    ablated = np.asarray(scaler.unscale(ablated), dtype=np.float64)  # (L, H, n)
    reference = np.asarray(scaler.unscale(reference), dtype=np.float64)[:, None]  # (L, 1, n)
    mae = float(np.abs(clean - y).mean()) if len(y) else float("nan")
    return {  # against the reference of the same pass, so a head the model does not read gives exactly 0
        "mae_change": np.abs(ablated - y).mean(-1) - np.abs(reference - y).mean(-1),
        "mean_abs_change": np.abs(ablated - reference).mean(-1),
        "mae": mae,
        "prediction": clean,
    }
