"""Test-only references for the attribution code: a Shapley value of any small game, and leave-one-element-out
computed directly, one variant per (compound, element). The package computes both inside
:func:`crabnet.explain.attribution.coalition_attribution`; the tests check it against these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from crabnet.explain.attribution import (
    MAX_EXACT_LIMIT,
    _bits,
    _orders,
    _prefix_masks,
    exact_from_table,
    permutation_estimate,
)
from crabnet.explain.store import MAX_EXACT, N_SAMPLES


def shapley_from_values(
    value: Callable[[np.ndarray], np.ndarray],
    k: int,
    *,
    max_exact: int = MAX_EXACT,
    n_samples: int = N_SAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """Shapley values of a k-player game given by a value function (as :func:`crabnet.explain.attribution.shapley`).

    Args:
        value: maps coalitions (m, k) bool (True = member; a row of False is the empty coalition)
            to their values (m,); called once.
        k: number of players.
        max_exact: exact over all 2^k coalitions up to this many players, else sampled.
        n_samples: random orders of the sampled estimate (``numpy.random.default_rng(seed)``).
        seed: seed of the orders.

    Returns:
        (k,) float64 Shapley values (Σ = v(all) − v(∅), exactly in both modes up to rounding).
    """
    if k == 0:
        return np.zeros(0)
    if k > 62 or (k <= max_exact and k > MAX_EXACT_LIMIT):
        raise ValueError(f"{k} players: exact up to {MAX_EXACT_LIMIT}, sampled up to 62 (63-bit masks)")
    if k <= max_exact:
        masks = np.arange(1 << k, dtype=np.int64)  # (2^k,)
        return exact_from_table(np.asarray(value(_bits(masks, k)), dtype=np.float64)[None])[0]
    orders = _orders(np.random.default_rng(seed), n_samples, k)  # (P, k)
    prefixes = _prefix_masks(orders)  # (P, k + 1)
    unique, inverse = np.unique(prefixes, return_inverse=True)
    values = np.asarray(value(_bits(unique, k)), dtype=np.float64)[inverse.reshape(prefixes.shape)]
    return permutation_estimate(orders, values)


def leave_one_out(model: Any, elements, fractions, full=None, max_rows: int = 4096):
    """Leave-one-element-out effect on the raw model output for a batch of compounds.

    Every (compound, real element) pair of a compound with ≥ 2 elements becomes one variant: the
    element is removed, the other fractions are divided by their sum, and the remaining elements
    keep their order. Identical variants (e.g. the single elements left by the binary compounds)
    run once, and variants run in groups of equal size trimmed to their width (padding slots cost
    as much as real ones), in chunks of ``max_rows`` rows, through ``model(elements, fractions)``
    without autograd in float32 (autocast disabled). The model should be in eval mode.

    Args:
        model: a :class:`crabnet.training.model.CrabNet` (or anything with the same ``__call__``).
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
