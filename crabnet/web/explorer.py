"""Attention explorer: one self-contained, offline HTML page per attention store.

Written by ``generate_attention_videos.py`` (step 2) to ``<data-dir>/explorer/<dataset>.html``
(``--no-explorer`` skips it, ``--explore N`` sets how many compounds besides the paper's and the
chosen ones are embedded). The page needs no server and nothing from the network: the data sit in
the page as JSON, each compound's maps quantised to 16 bits and base64-encoded, and plain
JavaScript draws them (HTML tables for the heatmaps, SVG for the prediction chart). Its markup,
styles and script are ``explorer.html``, ``theme.css`` + ``explorer.css`` and ``explorer.js`` of
:mod:`crabnet.web`, inlined when the page is written; this module prepares the data.

What the page offers (a formula search, layer, head and capture selectors, the maps, the prediction
through training, the attribution bars, head ablation, the view in the URL hash): docs/report-and-explorer.md.
Every heatmap cell carries ``data-query`` and ``data-key`` (element symbols) and ``data-value``
(the weight with 4 decimals), which the browser tests compare with the store.

``python -m crabnet.web.serve --serve`` serves the same page for any compound of a store
(:mod:`crabnet.web.serve`): the payload then lists the compounds without their data
(:func:`served_payload`), the page fetches the index of every formula (:func:`store_index`) and each
compound it opens (:func:`compound_entry`, the same JSON as embedded) from the server.

Example::

    from crabnet.explain.store import AttentionStore
    from crabnet.web.explorer import write_explorer
    store = AttentionStore("data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr")
    info = write_explorer(store, "data/explorer/aflow__ael_bulk_modulus_vrh.html",
                          dataset="aflow__ael_bulk_modulus_vrh")
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import crabnet
from crabnet import web
from crabnet.data import normalise_formula
from crabnet.elements import SYMBOLS
from crabnet.errors import DataError
from crabnet.explain.faithfulness import attention_importance
from crabnet.explain.video import PAPER_COMPOUNDS, final_errors
from crabnet.layout import Layout
from crabnet.utils import atomic_path

DEFAULT_EXPLORE = 100  # compounds embedded besides the paper's and the chosen ones
QUANT_MAX = 65534  # weights w in [0, 1] are stored as round(w * QUANT_MAX); QUANT_NAN marks non-finite ones
QUANT_NAN = 65535


@dataclass
class ExplorerInfo:
    """What :func:`write_explorer` wrote.

    Attributes:
        path: the HTML file.
        n_compounds: compounds embedded.
        n_paper: of which the paper's compounds.
        size: file size in bytes.
        seconds: time taken.
    """

    path: Path
    n_compounds: int
    n_paper: int
    size: int
    seconds: float


def explorer_path(data_dir: Path | str, dataset: str) -> Path:
    """``<data_dir>/explorer/<dataset>.html``."""
    return Layout(data_dir).explorer(dataset)


# --------------------------------------------------------------------------------------------
# encoding


def encode_weights(weights: np.ndarray) -> str:
    """Attention weights in [0, 1] as base64 of little-endian uint16 (``round(w·65534)``; 65535 = not finite).

    The largest error after decoding is 1/(2·65534) ≈ 7.6e-6; values outside [0, 1] are clipped.
    """
    w = np.asarray(weights, dtype=np.float64)
    finite = np.isfinite(w)
    q = np.where(finite, np.rint(np.clip(np.where(finite, w, 0.0), 0.0, 1.0) * QUANT_MAX), QUANT_NAN)
    return base64.b64encode(q.astype("<u2").tobytes()).decode("ascii")


def decode_weights(text: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`encode_weights` (NaN where the weight was not finite)."""
    q = np.frombuffer(base64.b64decode(text), dtype="<u2").reshape(tuple(shape))
    return np.where(q == QUANT_NAN, np.nan, q / QUANT_MAX)


# --------------------------------------------------------------------------------------------
# choosing compounds


def _spread(n_groups_sizes: dict[int, int], n: int) -> dict[int, int]:
    """Share ``n`` picks among groups as evenly as their sizes allow (water filling)."""
    quota = dict.fromkeys(n_groups_sizes, 0)
    left = n
    active = [g for g, size in n_groups_sizes.items() if size > 0]
    while left > 0 and active:
        share = max(1, left // len(active))
        for g in sorted(active, key=lambda g: n_groups_sizes[g]):
            take = min(share, n_groups_sizes[g] - quota[g], left)
            quota[g] += take
            left -= take
            if left == 0:
                break
        active = [g for g in active if quota[g] < n_groups_sizes[g]]
    return quota


def _sample(store: Any, key_of: Any, seen: set[str], n: int) -> list[int]:
    """``n`` rows not ``seen``, spread over the numbers of elements and, within each, over the final error."""
    n_elements = (np.asarray(store.elements) > 0).sum(axis=1)
    err = final_errors(store)
    first_row: dict[str, int] = {}
    for i in range(len(store)):
        first_row.setdefault(key_of(i), i)
    groups: dict[int, list[int]] = {}
    for key, i in first_row.items():
        if key not in seen:
            groups.setdefault(int(n_elements[i]), []).append(i)
    quota = _spread({k: len(v) for k, v in groups.items()}, n)
    picked: list[int] = []
    for k, members in groups.items():
        if quota[k]:
            ranked = sorted(members, key=lambda i: (err[i], i))
            picks = np.unique(np.rint(np.linspace(0, len(ranked) - 1, quota[k])).astype(int))
            picked.extend(ranked[p] for p in picks)
    return sorted(picked, key=lambda i: (int(n_elements[i]), store.formulas[i], i))


def choose_compounds(
    store: Any, dataset: str = "", rows: Sequence[int] = (), n_others: int = DEFAULT_EXPLORE
) -> list[tuple[int, str]]:
    """Rows of a store to embed in the explorer, each with its group, in the order of the page's list.

    First the paper's compounds of ``dataset`` that the store holds (group ``paper``), then
    ``rows`` (group ``chosen``), then ``n_others`` more (group ``sample``) spread evenly over the
    numbers of elements and, within each number, over the error of the last capture (the best,
    the worst and evenly spaced ranks between). A formula is embedded once (the first row that
    holds it, as ``AttentionStore.find`` returns).

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        dataset: selects the paper's compounds (``crabnet.explain.video.PAPER_COMPOUNDS``).
        rows: further rows to embed (e.g. the compounds rendered as videos).
        n_others: how many more to embed (0 = none).
    """

    chosen: list[tuple[int, str]] = []
    seen: set[str] = set()

    def key_of(i: int) -> str:
        try:
            return normalise_formula(store.formulas[i])
        except DataError:
            return f"row:{i}"

    def add(i: int, group: str) -> None:
        key = key_of(i)
        if key not in seen:
            seen.add(key)
            chosen.append((int(i), group))

    for f in PAPER_COMPOUNDS.get(dataset, []):
        with contextlib.suppress(KeyError):  # not in this store
            add(store.find(f), "paper")
    for i in rows:
        add(int(i), "chosen")
    if n_others <= 0:
        return chosen
    picked = _sample(store, key_of, seen, n_others)
    chosen.extend((i, "sample") for i in picked)
    return chosen


# --------------------------------------------------------------------------------------------
# the page


def _round(values: np.ndarray, digits: int = 6) -> list[float | None]:
    """Plain floats with ``digits`` significant digits (None where not finite) for JSON."""
    out: list[float | None] = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else None)
    return out


def _key(formula: str) -> str:
    """The normalised formula (as ``AttentionStore.find`` matches), or the formula itself where it does not parse."""
    try:
        return normalise_formula(formula)
    except DataError:
        return formula


def compound_entry(store: Any, i: int, group: str) -> dict:
    """One compound as the page reads it (maps encoded, numbers rounded); the served explorer's
    ``/api/compound`` answers the same object."""
    h = store.compound(i)
    entry = {
        "formula": h.formula,
        "key": _key(h.formula),
        "row": int(i),
        "group": group,
        "symbols": list(h.symbols),
        "fractions": _round(h.fractions, 4),
        "target": _round([h.target])[0],
        "prediction": _round(h.prediction),
        "attention": encode_weights(h.attention),
    }
    if h.attribution is not None:  # (c, k), row-major like the maps
        entry["attribution"] = _round(h.attribution)
        entry["importance"] = _round(attention_importance(h.attention, h.fractions), 4)
    for name in ("shapley", "contribution"):  # (c, k); absent in older stores
        values = getattr(h, name, None)
        if values is not None:
            entry[name] = _round(values)
    return entry


def _head_ablation(store: Any) -> dict:
    """``head_effect`` and ``head_change`` (c, L, H) flattened, where the store has them."""
    try:
        effects = store.head_effects() if hasattr(store, "head_effects") else None
    except KeyError:  # a store holding only some kinds of attribution
        effects = None
    if effects is None:
        return {}
    effect, change = effects
    return {"head_effect": _round(effect), "head_change": _round(change)}


def store_facts(store: Any, dataset: str, n_others: int) -> dict:
    """What the page says of the store (everything of the payload but the compounds)."""
    attrs = store.attrs
    config = attrs.get("model_config") or {}
    return {
        "dataset": dataset,
        "split": attrs.get("split", ""),
        "capture": attrs.get("capture", "epoch"),
        "steps": [int(s) for s in store.steps],
        "n_layers": int(attrs["n_layers"]),
        "n_heads": int(attrs["n_heads"]),
        "features": attrs.get("features", config.get("features", "")),
        "n_store": len(store),
        "test_mae": attrs.get("test_mae"),
        "epochs_run": attrs.get("epochs_run"),
        "n_others": int(n_others),
        "attribution": bool(getattr(store, "has_attribution", False)),
        "shapley": bool(getattr(store, "has_shapley", False)),
        "shapley_baseline": attrs.get("shapley_baseline"),
        "head_sample": attrs.get("head_sample"),
        **_head_ablation(store),
        "store": Layout(".").attention_store(dataset).as_posix(),  # under the data folder
        "quant_max": QUANT_MAX,
        "quant_nan": QUANT_NAN,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "version": crabnet.__version__,
    }


def explorer_payload(store: Any, chosen: Sequence[tuple[int, str]], dataset: str, n_others: int) -> dict:
    """The JSON the page reads: store facts and every embedded compound (maps encoded)."""
    return {**store_facts(store, dataset, n_others), "compounds": [compound_entry(store, i, g) for i, g in chosen]}


def served_payload(store: Any, chosen: Sequence[tuple[int, str]], dataset: str, n_others: int) -> dict:
    """The served page's JSON: the store facts and the listed compounds without their data (the page
    fetches a compound's maps, predictions and attributions when it is opened)."""
    last = np.asarray(store.group["prediction"][:, -1], dtype=np.float64) if len(store) else np.zeros(0)
    compounds = []
    for i, group in chosen:
        z = np.asarray(store.elements[i])
        compounds.append(
            {
                "formula": store.formulas[i],
                "key": _key(store.formulas[i]),
                "row": int(i),
                "group": group,
                "symbols": [SYMBOLS[e - 1] for e in z[z > 0]],
                "target": _round([store.targets[i]])[0],
                "last": _round([last[i]])[0],
            }
        )
    return {**store_facts(store, dataset, n_others), "served": True, "compounds": compounds}


def store_index(store: Any) -> dict:
    """Every formula of the store by row, for the served page's search: ``formulas`` and ``keys`` (the
    normalised formula, ``""`` where it is the formula itself)."""
    keys = [_key(f) for f in store.formulas]
    return {"formulas": list(store.formulas), "keys": [k if k != f else "" for k, f in zip(keys, store.formulas)]}


def render_explorer(payload: dict) -> str:
    """The HTML page for a payload: ``explorer.html`` with the theme, styles, script and data inline."""
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return web.fill(
        "explorer.html",
        title=html.escape(f"Attention explorer · {payload['dataset']}"),
        dataset=html.escape(payload["dataset"]),
        css=web.styles("theme.css", "explorer.css"),
        data=data,
        script=web.asset("explorer.js").strip(),
    )


def write_explorer(
    store: Any, path: Path | str, dataset: str, rows: Sequence[int] = (), n_others: int = DEFAULT_EXPLORE
) -> ExplorerInfo:
    """Choose compounds (:func:`choose_compounds`), embed them and write the page atomically.

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        path: the HTML file to write.
        dataset: dataset name (titles, the paper's compounds, the command shown for adding one).
        rows: rows to embed besides the paper's compounds (e.g. those rendered as videos).
        n_others: how many more compounds to embed.
    """
    t0 = time.perf_counter()
    chosen = choose_compounds(store, dataset, rows, n_others)
    text = render_explorer(explorer_payload(store, chosen, dataset, n_others))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return ExplorerInfo(
        path=path,
        n_compounds=len(chosen),
        n_paper=sum(g == "paper" for _, g in chosen),
        size=path.stat().st_size,
        seconds=time.perf_counter() - t0,
    )
