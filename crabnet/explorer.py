"""Attention explorer: one self-contained, offline HTML page per attention store.

Written by ``generate_attention_videos.py`` (step 2) to ``<data-dir>/explorer/<dataset>.html``
(``--no-explorer`` skips it, ``--explore N`` sets how many compounds besides the paper's and the
chosen ones are embedded). The page needs no server and nothing from the network: the data sit in
the page as JSON, each compound's maps quantised to 16 bits and base64-encoded, and plain
JavaScript draws them (HTML tables for the heatmaps, SVG for the prediction chart).

What the page offers:

- a formula search box (formulas are matched after normalising, as ``AttentionStore.find`` does:
  ``HfO2``, ``Hf1O2`` and ``O2Hf`` are one compound) and the list of embedded compounds, the
  paper's first;
- layer and head selectors (plus "all heads" as a grid), a slider over the captures (capture 0 =
  the untrained model) with play/pause;
- the attention map of the chosen head with element symbols and fractions on both axes and the
  weights written in the cells; the prediction at every capture with the target as a line and the
  current capture marked;
- where the store holds attribution (:mod:`crabnet.faithfulness`), the leave-one-element-out
  effect of every element at the current capture as signed bars beside the map (rows carry
  ``data-element`` and ``data-value``, the store's value), with the attention each element
  receives (fraction-weighted queries, all layers and heads) beside it for comparison;
- the view in the URL hash (``#compound=Hf1O2&layer=0&head=2&capture=8``; ``head=all`` for the
  grid), so a link opens exactly that view.

Every heatmap cell carries ``data-query`` and ``data-key`` (element symbols) and ``data-value``
(the weight with 4 decimals), which the browser tests compare with the store.

Example::

    from crabnet.capture import AttentionStore
    from crabnet.explorer import write_explorer
    store = AttentionStore("data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr")
    info = write_explorer(store, "data/explorer/aflow__ael_bulk_modulus_vrh.html",
                          dataset="aflow__ael_bulk_modulus_vrh")
"""

from __future__ import annotations

import base64
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
from crabnet.data import normalise_formula
from crabnet.errors import DataError
from crabnet.faithfulness import attention_importance
from crabnet.layout import Layout
from crabnet.utils import atomic_path
from crabnet.video import PAPER_COMPOUNDS, final_errors

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


def choose_compounds(
    store: Any,
    dataset: str = "",
    rows: Sequence[int] = (),
    n_others: int = DEFAULT_EXPLORE,
) -> list[tuple[int, str]]:
    """Rows of a store to embed in the explorer, each with its group, in the order of the page's list.

    First the paper's compounds of ``dataset`` that the store holds (group ``paper``), then
    ``rows`` (group ``chosen``), then ``n_others`` more (group ``sample``) spread evenly over the
    numbers of elements and, within each number, over the error of the last capture (the best,
    the worst and evenly spaced ranks between). A formula is embedded once (the first row that
    holds it, as ``AttentionStore.find`` returns).

    Args:
        store: a :class:`crabnet.capture.AttentionStore`.
        dataset: selects the paper's compounds (``crabnet.video.PAPER_COMPOUNDS``).
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
        try:
            add(store.find(f), "paper")
        except KeyError:
            pass
    for i in rows:
        add(int(i), "chosen")
    if n_others <= 0:
        return chosen
    n_elements = (np.asarray(store.elements) > 0).sum(axis=1)
    err = final_errors(store)
    first_row: dict[str, int] = {}
    for i in range(len(store)):
        first_row.setdefault(key_of(i), i)
    candidates = [i for key, i in first_row.items() if key not in seen]
    groups: dict[int, list[int]] = {}
    for i in candidates:
        groups.setdefault(int(n_elements[i]), []).append(i)
    quota = _spread({k: len(v) for k, v in groups.items()}, n_others)
    picked: list[int] = []
    for k, members in groups.items():
        q = quota[k]
        if q == 0:
            continue
        ranked = sorted(members, key=lambda i: (err[i], i))
        picks = np.unique(np.rint(np.linspace(0, len(ranked) - 1, q)).astype(int))
        picked.extend(ranked[p] for p in picks)
    picked.sort(key=lambda i: (int(n_elements[i]), store.formulas[i], i))
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


def explorer_payload(store: Any, chosen: Sequence[tuple[int, str]], dataset: str, n_others: int) -> dict:
    """The JSON the page reads: store facts and every embedded compound (maps encoded)."""
    attrs = store.attrs
    compounds = []
    for i, group in chosen:
        h = store.compound(i)
        try:
            key = normalise_formula(h.formula)
        except DataError:
            key = h.formula
        compounds.append(
            {
                "formula": h.formula,
                "key": key,
                "row": int(i),
                "group": group,
                "symbols": list(h.symbols),
                "fractions": _round(h.fractions, 4),
                "target": _round([h.target])[0],
                "prediction": _round(h.prediction),
                "attention": encode_weights(h.attention),
            }
        )
        if h.attribution is not None:  # (c, k), row-major like the maps
            compounds[-1]["attribution"] = _round(h.attribution)
            compounds[-1]["importance"] = _round(attention_importance(h.attention, h.fractions), 4)
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
        "store": f"attention/{dataset}/attention.zarr",
        "quant_max": QUANT_MAX,
        "quant_nan": QUANT_NAN,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "version": crabnet.__version__,
        "compounds": compounds,
    }


def render_explorer(payload: dict) -> str:
    """The HTML page for a payload (all data, styles and scripts inline)."""
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = f"Attention explorer · {payload['dataset']}"
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__DATASET__", html.escape(payload["dataset"]))
        .replace("__DATA__", data)
    )


def write_explorer(
    store: Any, path: Path | str, dataset: str, rows: Sequence[int] = (), n_others: int = DEFAULT_EXPLORE
) -> ExplorerInfo:
    """Choose compounds (:func:`choose_compounds`), embed them and write the page atomically.

    Args:
        store: a :class:`crabnet.capture.AttentionStore`.
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


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#d8dde5; --bg:#f5f7fa; --card:#fff; --accent:#1f77b4; --hl:#d62728; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#17324d; color:#fff; padding:14px 22px; display:flex; align-items:baseline; gap:18px; flex-wrap:wrap; }
header h1 { font-size:20px; margin:0; font-weight:600; }
header .facts { color:#c9d6e3; font-size:13px; }
header a { color:#c9d6e3; }
main { display:grid; grid-template-columns: 270px 1fr; gap:16px; padding:16px 22px; align-items:start; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
aside { position:sticky; top:12px; max-height:calc(100vh - 24px); display:flex; flex-direction:column; }
aside label { font-weight:600; font-size:13px; }
#search { width:100%; padding:7px 9px; font-size:14px; border:1px solid #b8c2cf; border-radius:6px; margin:6px 0 4px; }
#search-msg { min-height:18px; font-size:12px; color:var(--muted); }
#search-msg.bad { color:var(--hl); }
#compound-list { list-style:none; margin:6px 0 0; padding:0; overflow-y:auto; flex:1; border-top:1px solid var(--line); }
#compound-list li.group { font-size:11px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted);
                          padding:8px 4px 3px; cursor:default; }
#compound-list li.item { display:flex; justify-content:space-between; gap:6px; padding:4px 6px; border-radius:5px; cursor:pointer; }
#compound-list li.item:hover { background:#eef3f9; }
#compound-list li.item.selected { background:var(--accent); color:#fff; }
#compound-list li.item .meta { font-size:11px; color:var(--muted); white-space:nowrap; }
#compound-list li.item.selected .meta { color:#dce9f5; }
#compound-list li.hidden { display:none; }
.controls { display:flex; flex-wrap:wrap; gap:14px 22px; align-items:center; }
.controls label { font-weight:600; font-size:13px; margin-right:6px; }
select, button { font:inherit; padding:4px 8px; border:1px solid #b8c2cf; border-radius:6px; background:#fff; }
button { cursor:pointer; min-width:74px; }
button:hover { background:#eef3f9; }
.slider { display:flex; align-items:center; gap:10px; flex:1; min-width:320px; }
#capture { flex:1; }
#capture-label { font-variant-numeric:tabular-nums; min-width:170px; font-weight:600; }
#title { font-size:18px; font-weight:600; margin:2px 0 0; }
#subtitle { color:var(--muted); font-size:13px; }
.views { display:grid; grid-template-columns: auto minmax(440px, 1fr); gap:16px; margin-top:14px; align-items:start; }
.views h2 { font-size:14px; margin:0 0 8px; font-weight:600; }
#maps { display:flex; flex-wrap:wrap; gap:14px; }
table.heatmap { border-collapse:separate; border-spacing:2px; }
.big caption { display:none; }
table.heatmap caption { font-weight:600; font-size:13px; padding-bottom:3px; caption-side:top; }
table.heatmap th { font-weight:600; padding:2px 4px; text-align:center; }
table.heatmap th small { display:block; font-weight:400; color:var(--muted); font-size:11px; }
table.heatmap th.query { text-align:right; }
table.heatmap th.query small { display:inline; margin-left:4px; }
table.heatmap th.corner { font-size:10px; font-weight:400; color:var(--muted); text-align:right; vertical-align:bottom; }
table.heatmap td { text-align:center; border-radius:3px; font-variant-numeric:tabular-nums; }
.big td { min-width:72px; height:56px; font-size:15px; }
.small td { width:44px; height:34px; font-size:11px; }
.legend { display:flex; align-items:center; gap:8px; margin-top:10px; font-size:12px; color:var(--muted); }
.legend .bar { width:200px; height:12px; border-radius:3px;
  background:linear-gradient(90deg,#440154,#472d7b,#3b528b,#2c728e,#21918c,#28ae80,#5ec962,#addc30,#fde725); }
#progress svg { width:100%; height:auto; display:block; }
#progress .axis { stroke:#8894a3; stroke-width:1; }
#progress .grid { stroke:#e7ebf0; stroke-width:1; }
#progress text { font-size:13px; fill:#4d5968; }
.facts-table { border-collapse:collapse; margin-top:10px; font-size:13px; }
.facts-table td { padding:2px 10px 2px 0; }
.facts-table td:first-child { color:var(--muted); }
#attribution-box { margin-top:16px; border-top:1px solid var(--line); padding-top:10px; }
#attribution-box[hidden] { display:none; }
table.bars { border-collapse:collapse; font-size:13px; font-variant-numeric:tabular-nums; }
table.bars th { font-weight:400; color:var(--muted); font-size:11.5px; text-align:left; padding:0 8px 3px 0; }
table.bars td { padding:2px 8px 2px 0; }
table.bars td.sym { font-weight:600; text-align:right; }
table.bars td.num { text-align:right; min-width:64px; }
.track { position:relative; width:240px; height:16px; background:#f1f3f6; border-radius:3px; }
.track .zero { position:absolute; left:50%; top:-2px; bottom:-2px; width:1px; background:#8894a3; }
.track .fill { position:absolute; top:2px; bottom:2px; border-radius:2px; }
.track.imp { width:120px; }
.note { color:var(--muted); font-size:12px; margin:6px 0 0; max-width:640px; }
#notice { display:none; margin:0 0 10px; padding:8px 12px; border-radius:6px; background:#fdecea; color:#8a1c14; }
footer { padding:0 22px 22px; color:var(--muted); font-size:12.5px; }
footer code, .card code { background:#eef1f5; padding:1px 4px; border-radius:4px; }
@media (max-width: 980px) { main { grid-template-columns: 1fr; } aside { position:static; max-height:360px; }
                            .views { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1>Attention explorer · __DATASET__</h1>
  <span class="facts" id="facts"></span>
</header>
<noscript><p style="padding:16px">This page draws its maps with JavaScript; please enable it.</p></noscript>
<main>
  <aside class="card">
    <label for="search">Find a compound</label>
    <input id="search" type="search" placeholder="e.g. HfO2, Ga N, Al2O3" autocomplete="off" spellcheck="false">
    <div id="search-msg"></div>
    <ul id="compound-list"></ul>
  </aside>
  <section>
    <div class="card">
      <div id="notice"></div>
      <div id="title"></div>
      <div id="subtitle"></div>
      <div class="controls" style="margin-top:10px">
        <span><label for="layer">Layer</label><select id="layer"></select></span>
        <span><label for="head">Head</label><select id="head"></select></span>
        <span class="slider"><button id="play" type="button">▶ Play</button>
          <input id="capture" type="range" min="0" max="0" step="1" value="0" aria-label="capture">
          <span id="capture-label"></span></span>
      </div>
    </div>
    <div class="views">
      <div class="card">
        <h2 id="maps-title">Attention</h2>
        <div id="maps"></div>
        <div class="legend"><span>0</span><span class="bar"></span><span>1</span>
          <span>· row = query element, its weights over the key elements (columns) sum to 1</span></div>
        <div id="attribution-box" hidden>
          <h2 id="attribution-title">Leave-one-element-out effect</h2>
          <table class="bars" id="attribution"></table>
          <p class="note">Bar: the prediction with the element removed (the other fractions renormalised) minus
            the full prediction, in target units, scaled to the largest effect on this compound over all
            captures. Grey: the attention the element receives as a key (queries weighted by fraction,
            averaged over all layers and heads). If attention explained the prediction, the two would rank
            the elements alike; <code>figures/faithfulness/</code> measures this over the whole split.</p>
        </div>
      </div>
      <div class="card" id="progress">
        <h2>Prediction through training</h2>
        <div id="chart"></div>
        <table class="facts-table" id="compound-facts"></table>
      </div>
    </div>
  </section>
</main>
<footer id="about"></footer>
<script type="application/json" id="explorer-data">__DATA__</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const $ = (id) => document.getElementById(id);
  const C = D.steps.length, L = D.n_layers, H = D.n_heads;
  const state = { compound: null, layer: 0, head: 0, capture: C - 1 };
  let timer = null;

  // ---------------------------------------------------------------- formulas (as crabnet.data.normalise_formula)
  const ELEMENTS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr " +
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re " +
    "Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh " +
    "Fl Mc Lv Ts Og").split(" ");
  const KNOWN = new Set(ELEMENTS);
  function parseFormula(s) {
    let i = 0;
    const space = () => { while (i < s.length && /\s/.test(s[i])) i++; };
    function amount() {
      space();
      const m = /^[0-9.]+(?:[eE][+-]?[0-9]+)?/.exec(s.slice(i));
      if (!m) return 1;
      const v = Number(m[0]);
      if (!isFinite(v)) throw new Error("bad amount " + m[0]);
      i += m[0].length;
      return v;
    }
    function seq(closing) {
      const out = new Map();
      const add = (el, n) => out.set(el, (out.get(el) || 0) + n);
      for (;;) {
        space();
        if (i >= s.length) { if (closing) throw new Error("missing " + closing); return out; }
        const c = s[i];
        if (c === ")" || c === "]") { if (closing !== c) throw new Error("unexpected " + c); i++; return out; }
        if (c === "(" || c === "[") {
          i++;
          const inner = seq(c === "(" ? ")" : "]");
          const mult = amount();
          inner.forEach((n, el) => add(el, n * mult));
        } else if (/[A-Z]/.test(c)) {
          let j = i + 1;
          while (j < s.length && /[a-z]/.test(s[j])) j++;
          const sym = s.slice(i, j);
          if (!KNOWN.has(sym)) throw new Error("unknown element " + sym);
          i = j;
          add(sym, amount());
        } else throw new Error("unexpected " + c);
      }
    }
    if (!s || !s.trim()) throw new Error("empty");
    const out = seq(null);
    for (const [el, n] of out) if (n === 0) out.delete(el);
    if (!out.size) throw new Error("empty");
    return out;
  }
  function fmtG(v) {  // Python's "%g"
    if (v === 0) return "0";
    const e = Number(v.toPrecision(6)).toExponential().split("e");
    const x = Number(e[1]);
    if (x < -4 || x >= 6) {
      const m = Number(Number(e[0]).toPrecision(6)).toString();
      return m + "e" + (x < 0 ? "-" : "+") + String(Math.abs(x)).padStart(2, "0");
    }
    return Number(v.toPrecision(6)).toString();
  }
  function normalise(s) {
    const amounts = parseFormula(s);
    return [...amounts.keys()].sort().map((el) => el + fmtG(amounts.get(el))).join("");
  }

  // ---------------------------------------------------------------- data
  const byKey = new Map();
  D.compounds.forEach((c, n) => { c.n = n; byKey.set(c.key, c); });
  function weights(c) {
    if (!c.w) {
      const bin = atob(c.attention);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      const q = new Uint16Array(bytes.length / 2);
      const dv = new DataView(bytes.buffer);
      for (let i = 0; i < q.length; i++) q[i] = dv.getUint16(2 * i, true);
      c.w = q;
    }
    return c.w;
  }
  function weight(c, k, l, h, p, q) {  // attention[k, l, h, p, q]
    const n = c.symbols.length;
    const v = weights(c)[((((k * L + l) * H + h) * n + p) * n + q)];
    return v === D.quant_nan ? NaN : v / D.quant_max;
  }
  function findCompound(text) {
    if (!text) return null;
    try { const c = byKey.get(normalise(text)); if (c) return c; } catch (e) { /* not a formula */ }
    return D.compounds.find((c) => c.formula === text) || null;
  }

  // ---------------------------------------------------------------- colours (viridis, as the videos)
  const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
    .map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  function colour(v) {
    const x = Math.min(1, Math.max(0, v)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), t = x - i;
    return VIRIDIS[i].map((a, j) => Math.round(a + (VIRIDIS[i + 1][j] - a) * t));
  }
  function textColour(rgb) { return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 ? "#111" : "#fff"; }

  // ---------------------------------------------------------------- labels
  const fmtNum = (v) => v === null || !isFinite(v) ? "–" : Math.abs(v) >= 1000 ? v.toFixed(0)
    : Number(v.toPrecision(4)).toString();
  const fmtFrac = (f) => Number(f.toPrecision(3)).toString();
  function captureLabel(k) { return D.capture + " " + D.steps[k] + (k === 0 ? " (untrained)" : ""); }

  // ---------------------------------------------------------------- heatmaps
  function heatmap(c, l, h, size) {
    const n = c.symbols.length, k = state.capture;
    const table = document.createElement("table");
    table.className = "heatmap " + size;
    table.dataset.layer = l; table.dataset.head = h;
    const cap = table.createCaption();
    cap.textContent = "head " + h;
    const head = table.createTHead().insertRow();
    const corner = document.createElement("th");
    corner.className = "corner"; corner.innerHTML = "query ↓ · key →";
    head.appendChild(corner);
    for (let q = 0; q < n; q++) {
      const th = document.createElement("th");
      th.className = "key";
      th.innerHTML = c.symbols[q] + "<small>" + fmtFrac(c.fractions[q]) + "</small>";
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (let p = 0; p < n; p++) {
      const tr = body.insertRow();
      const th = document.createElement("th");
      th.className = "query";
      th.innerHTML = c.symbols[p] + "<small>" + fmtFrac(c.fractions[p]) + "</small>";
      tr.appendChild(th);
      for (let q = 0; q < n; q++) {
        const v = weight(c, k, l, h, p, q);
        const td = tr.insertCell();
        td.dataset.query = c.symbols[p];
        td.dataset.key = c.symbols[q];
        if (isFinite(v)) {
          const rgb = colour(v);
          td.dataset.value = v.toFixed(4);
          td.style.background = "rgb(" + rgb.join(",") + ")";
          td.style.color = textColour(rgb);
          td.textContent = v.toFixed(size === "big" ? 3 : 2);
          td.title = c.symbols[p] + " → " + c.symbols[q] + ": " + v.toFixed(4);
        } else {
          td.dataset.value = "nan";
          td.style.background = "#d9d9d9";
          td.textContent = "–";
        }
      }
    }
    return table;
  }

  // ---------------------------------------------------------------- attribution bars
  function attributionPanel(c) {
    const box = $("attribution-box");
    if (!c.attribution) { box.hidden = true; return; }
    box.hidden = false;
    const n = c.symbols.length, k = state.capture;
    const scale = Math.max(1e-12, ...c.attribution.filter((v) => v !== null).map(Math.abs));
    $("attribution-title").textContent = "Leave-one-element-out effect · " + captureLabel(k);
    const t = $("attribution");
    t.replaceChildren();
    const head = t.createTHead().insertRow();
    for (const s of ["element", "effect on the prediction (−" + fmtNum(scale) + " … +" + fmtNum(scale) + ")", "",
                     "attention received", ""]) {
      const th = document.createElement("th"); th.textContent = s; head.appendChild(th);
    }
    const body = t.createTBody();
    for (let j = 0; j < n; j++) {
      const v = c.attribution[k * n + j], imp = c.importance[k * n + j];
      const tr = body.insertRow();
      tr.dataset.element = c.symbols[j];
      tr.dataset.value = v === null ? "nan" : String(v);
      tr.dataset.importance = imp === null ? "nan" : String(imp);
      const sym = tr.insertCell(); sym.className = "sym"; sym.textContent = c.symbols[j];
      const track = document.createElement("div"); track.className = "track";
      track.innerHTML = "<span class='zero'></span>";
      if (v !== null) {
        const bar = document.createElement("span"); bar.className = "fill";
        const w = Math.min(50, Math.abs(v) / scale * 50);
        bar.style.left = (v >= 0 ? 50 : 50 - w) + "%"; bar.style.width = w + "%";
        bar.style.background = v >= 0 ? "#d62728" : "#1f77b4";
        track.appendChild(bar);
      }
      tr.insertCell().appendChild(track);
      const num = tr.insertCell(); num.className = "num";
      num.textContent = v === null ? "–" : (v > 0 ? "+" : "") + fmtNum(v);
      const itrack = document.createElement("div"); itrack.className = "track imp";
      if (imp !== null) {
        const bar = document.createElement("span"); bar.className = "fill";
        bar.style.left = "0"; bar.style.width = Math.min(100, imp * 100) + "%"; bar.style.background = "#8894a3";
        itrack.appendChild(bar);
      }
      tr.insertCell().appendChild(itrack);
      const inum = tr.insertCell(); inum.className = "num"; inum.textContent = imp === null ? "–" : imp.toFixed(3);
    }
  }

  // ---------------------------------------------------------------- progress chart (SVG)
  function niceTicks(lo, hi, n) {
    const span = hi - lo || Math.abs(hi) || 1;
    const raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
    return out;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const a in attrs) e.setAttribute(a, attrs[a]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function chart(c) {
    const W = 600, Hh = 340, m = { l: 70, r: 18, t: 16, b: 46 };
    const k = state.capture, xs = D.steps;
    const ys = c.prediction.filter((v) => v !== null);
    let lo = Math.min(c.target, ...ys), hi = Math.max(c.target, ...ys);
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
    lo -= pad; hi += pad;
    const x0 = xs[0], x1 = xs[C - 1] === xs[0] ? xs[0] + 1 : xs[C - 1];
    const X = (v) => m.l + (v - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = (v) => m.t + (hi - v) / (hi - lo) * (Hh - m.t - m.b);
    const svg = svgEl("svg", { viewBox: "0 0 " + W + " " + Hh, role: "img", "aria-label": "prediction by capture" });
    for (const t of niceTicks(lo, hi, 5)) {
      svg.appendChild(svgEl("line", { class: "grid", x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
      svg.appendChild(svgEl("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end" }, fmtNum(t)));
    }
    for (const t of niceTicks(x0, x1, Math.min(10, C))) {
      if (t !== Math.round(t)) continue;
      svg.appendChild(svgEl("line", { class: "axis", x1: X(t), x2: X(t), y1: Hh - m.b, y2: Hh - m.b + 4 }));
      svg.appendChild(svgEl("text", { x: X(t), y: Hh - m.b + 16, "text-anchor": "middle" }, String(t)));
    }
    svg.appendChild(svgEl("line", { class: "axis", x1: m.l, x2: W - m.r, y1: Hh - m.b, y2: Hh - m.b }));
    svg.appendChild(svgEl("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: Hh - m.b }));
    svg.appendChild(svgEl("text", { x: (m.l + W - m.r) / 2, y: Hh - 6, "text-anchor": "middle" }, D.capture));
    svg.appendChild(svgEl("text", { x: 14, y: (m.t + Hh - m.b) / 2, "text-anchor": "middle",
      transform: "rotate(-90 14 " + (m.t + Hh - m.b) / 2 + ")" }, "prediction (target units)"));
    svg.appendChild(svgEl("line", { x1: m.l, x2: W - m.r, y1: Y(c.target), y2: Y(c.target), stroke: "#2ca02c",
      "stroke-width": 2, "stroke-dasharray": "6 4" }));
    svg.appendChild(svgEl("text", { x: W - m.r - 4, y: Y(c.target) - 6, "text-anchor": "end", fill: "#2ca02c" },
      "target " + fmtNum(c.target)));
    const pts = (upto) => xs.slice(0, upto + 1).map((s, i) => c.prediction[i] === null ? null
      : X(s).toFixed(1) + "," + Y(c.prediction[i]).toFixed(1)).filter((p) => p).join(" ");
    svg.appendChild(svgEl("polyline", { points: pts(C - 1), fill: "none", stroke: "#b9c6d4", "stroke-width": 1.5 }));
    svg.appendChild(svgEl("polyline", { points: pts(k), fill: "none", stroke: "#1f77b4", "stroke-width": 2.5 }));
    xs.forEach((s, i) => { if (c.prediction[i] !== null && i <= k)
      svg.appendChild(svgEl("circle", { cx: X(s), cy: Y(c.prediction[i]), r: 3, fill: "#1f77b4" })); });
    svg.appendChild(svgEl("line", { x1: X(xs[k]), x2: X(xs[k]), y1: m.t, y2: Hh - m.b, stroke: "#d62728",
      "stroke-width": 1, "stroke-dasharray": "3 3" }));
    if (c.prediction[k] !== null) {
      const cur = svgEl("circle", { id: "current-point", cx: X(xs[k]), cy: Y(c.prediction[k]), r: 6, fill: "#d62728",
        stroke: "#fff", "stroke-width": 1.5 });
      cur.dataset.capture = k;
      cur.dataset.prediction = c.prediction[k];
      svg.appendChild(cur);
    }
    return svg;
  }

  // ---------------------------------------------------------------- drawing and state
  function setHash() {
    if (!state.compound) return;
    const h = "#compound=" + encodeURIComponent(state.compound.formula) + "&layer=" + state.layer + "&head=" +
      state.head + "&capture=" + state.capture;
    if (location.hash !== h) history.replaceState(null, "", h);
  }
  function notice(text) { const n = $("notice"); n.textContent = text || ""; n.style.display = text ? "block" : "none"; }
  function draw() {
    const c = state.compound;
    if (!c) return;
    document.querySelectorAll("#compound-list li.item").forEach((li) =>
      li.classList.toggle("selected", Number(li.dataset.n) === c.n));
    $("layer").value = state.layer; $("head").value = state.head;
    $("capture").value = state.capture;
    const k = state.capture;
    $("capture-label").textContent = captureLabel(k) + " · " + (k + 1) + "/" + C;
    $("title").textContent = c.formula;
    $("subtitle").textContent = c.symbols.length + " elements · row " + c.row + " of the " + D.split +
      " split" + (c.group === "paper" ? " · one of the paper's compounds" : "");
    const maps = $("maps");
    maps.replaceChildren();
    if (state.head === "all") {
      for (let h = 0; h < H; h++) maps.appendChild(heatmap(c, state.layer, h, "small"));
      $("maps-title").textContent = "Attention · layer " + state.layer + " · all heads · " + captureLabel(k);
    } else {
      maps.appendChild(heatmap(c, state.layer, state.head, "big"));
      $("maps-title").textContent = "Attention · layer " + state.layer + " · head " + state.head + " · " + captureLabel(k);
    }
    attributionPanel(c);
    $("chart").replaceChildren(chart(c));
    const p = c.prediction[k];
    const rows = [["target", fmtNum(c.target)], ["prediction at " + captureLabel(k), fmtNum(p)],
      ["absolute error", p === null ? "–" : fmtNum(Math.abs(p - c.target))],
      ["prediction at the last capture", fmtNum(c.prediction[C - 1])],
      ["elements (fraction)", c.symbols.map((s, i) => s + " " + fmtFrac(c.fractions[i])).join(", ")]];
    const t = $("compound-facts");
    t.replaceChildren();
    for (const [a, b] of rows) { const tr = t.insertRow(); tr.insertCell().textContent = a; tr.insertCell().textContent = b; }
    setHash();
  }
  function select(c) { state.compound = c; notice(""); draw(); }
  function applyHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (params.has("layer")) { const l = parseInt(params.get("layer"), 10); if (l >= 0 && l < L) state.layer = l; }
    if (params.has("head")) {
      const h = params.get("head");
      if (h === "all") state.head = "all"; else { const v = parseInt(h, 10); if (v >= 0 && v < H) state.head = v; }
    }
    if (params.has("capture")) {
      const v = parseInt(params.get("capture"), 10);
      if (v >= 0 && v < C) state.capture = v; else if (params.get("capture") === "last") state.capture = C - 1;
    }
    let missing = null;
    if (params.has("compound")) {
      const c = findCompound(params.get("compound"));
      if (c) state.compound = c; else missing = params.get("compound");
    }
    if (!state.compound) state.compound = D.compounds[0] || null;
    draw();
    notice(missing ? missing + " is not embedded in this page; " + addHint(missing) : "");
  }
  function addHint(f) {
    return "add it with: python generate_attention_videos.py --dataset " + D.dataset + " --formula '" + f + "'";
  }

  // ---------------------------------------------------------------- list and search
  function buildList() {
    const ul = $("compound-list");
    const names = { paper: "The paper's compounds", chosen: "Chosen compounds", sample: "More compounds (by elements, error)" };
    let group = null;
    for (const c of D.compounds) {
      if (c.group !== group) {
        group = c.group;
        const li = document.createElement("li");
        li.className = "group"; li.dataset.group = group; li.textContent = names[group] || group;
        ul.appendChild(li);
      }
      const li = document.createElement("li");
      li.className = "item"; li.dataset.n = c.n; li.dataset.formula = c.formula; li.dataset.group = c.group;
      const last = c.prediction[C - 1];
      const err = last === null ? "–" : fmtNum(Math.abs(last - c.target));
      li.innerHTML = "<span></span><span class='meta'></span>";
      li.firstChild.textContent = c.formula;
      li.lastChild.textContent = c.symbols.length + " el · err " + err;
      li.title = "target " + fmtNum(c.target) + ", final prediction " + fmtNum(last);
      li.addEventListener("click", () => select(c));
      ul.appendChild(li);
    }
  }
  function filterList() {
    const text = $("search").value.trim();
    const msg = $("search-msg");
    msg.classList.remove("bad");
    let els = null;
    let exact = null;
    if (text) {
      try { const a = parseFormula(text); els = [...a.keys()]; exact = byKey.get(normalise(text)) || null; }
      catch (e) { els = null; }
    }
    let shown = 0;
    const items = document.querySelectorAll("#compound-list li.item");
    items.forEach((li) => {
      const c = D.compounds[Number(li.dataset.n)];
      let ok = true;
      if (text) ok = els ? els.every((e) => c.symbols.includes(e)) : c.formula.toLowerCase().includes(text.toLowerCase());
      li.classList.toggle("hidden", !ok);
      if (ok) shown++;
    });
    document.querySelectorAll("#compound-list li.group").forEach((g) => {
      const any = [...items].some((li) => li.dataset.group === g.dataset.group && !li.classList.contains("hidden"));
      g.classList.toggle("hidden", !any);
    });
    if (!text) msg.textContent = D.compounds.length + " compounds embedded";
    else if (exact) { msg.textContent = "found " + exact.formula; if (state.compound !== exact) select(exact); }
    else if (shown) msg.textContent = shown + " compound" + (shown > 1 ? "s" : "") + " with these elements; " +
      "the formula itself is not embedded";
    else { msg.textContent = "not embedded here; " + addHint(text); msg.classList.add("bad"); }
    return exact;
  }

  // ---------------------------------------------------------------- controls
  function setup() {
    $("facts").textContent = D.compounds.length + " of " + D.n_store + " " + D.split + " compounds · " + C +
      " captures (" + D.capture + " " + D.steps[0] + "–" + D.steps[C - 1] + ") · " + L + " layers × " + H +
      " heads · " + D.features + (D.test_mae != null ? " · test MAE " + fmtNum(D.test_mae) : "");
    for (let l = 0; l < L; l++) $("layer").add(new Option("layer " + l, l));
    for (let h = 0; h < H; h++) $("head").add(new Option("head " + h, h));
    $("head").add(new Option("all heads", "all"));
    $("capture").max = C - 1;
    $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
    $("head").addEventListener("change", (e) => { state.head = e.target.value === "all" ? "all" : Number(e.target.value); draw(); });
    $("capture").addEventListener("input", (e) => { state.capture = Number(e.target.value); draw(); });
    $("play").addEventListener("click", togglePlay);
    $("search").addEventListener("input", filterList);
    $("search").addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const exact = filterList();
      const first = document.querySelector("#compound-list li.item:not(.hidden)");
      if (!exact && first) select(D.compounds[Number(first.dataset.n)]);
    });
    window.addEventListener("hashchange", applyHash);
    const paper = D.compounds.filter((c) => c.group === "paper").length;
    $("about").innerHTML = "";
    const p = document.createElement("p");
    p.textContent = "Embedded: " + D.compounds.length + " of the " + D.n_store + " compounds of the " + D.split +
      " split stored in " + D.store + (paper ? " — the " + paper + " paper compounds in the store, " : " — ") +
      "the compounds rendered as videos and " + D.n_others + " more chosen across numbers of elements and errors. " +
      "Weights are stored with 16 bits (within 1e-5 of the store). To add a compound, run " +
      "python generate_attention_videos.py --dataset " + D.dataset + " --formula <formula> (it also renders its " +
      "videos), or embed more with --explore <N>. Written " + D.created + " by crabnet " + D.version + ".";
    $("about").appendChild(p);
    buildList();
    filterList();
  }
  function togglePlay() {
    if (timer) { clearInterval(timer); timer = null; $("play").textContent = "▶ Play"; return; }
    if (state.capture >= C - 1) { state.capture = 0; draw(); }
    $("play").textContent = "❚❚ Pause";
    timer = setInterval(() => {
      if (state.capture >= C - 1) { togglePlay(); return; }
      state.capture++; draw();
    }, Math.max(120, Math.min(600, 6000 / C)));
  }

  setup();
  if (!D.compounds.length) { notice("No compounds are embedded in this page."); return; }
  applyHash();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
