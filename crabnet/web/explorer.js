"use strict";
(function () {
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const $ = (id) => document.getElementById(id);
  const C = D.steps.length, L = D.n_layers, H = D.n_heads;
  const state = { compound: null, layer: 0, head: 0, capture: C - 1 };
  let timer = null;

  // ---------------------------------------------------------------- formulas (as crabnet.data.normalise_formula)
  const ELEMENTS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As " +
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm " +
    "Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db " +
    "Sg Bh Hs Mt Ds Rg Cn Nh " +
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
  // served (python -m crabnet.web.serve --serve): the listed compounds come without their data, which
  // is fetched when one is opened (api/compound?row=N), and the search covers the store's index (api/index)
  const SERVED = !!D.served;
  const byKey = new Map(), byRow = new Map();
  D.compounds.forEach((c, n) => { c.n = n; byKey.set(c.key, c); byRow.set(c.row, c); });
  let INDEX = null;  // served: { formulas, keys } of every row, rowOf: normalised formula -> first row
  const loaded = (c) => c.attention !== undefined;
  const lastPrediction = (c) => c.prediction ? c.prediction[C - 1] : c.last;
  function compoundAt(row) {  // served: the compound of a store row (its data fetched by show)
    let c = byRow.get(row);
    if (!c) {
      const f = INDEX.formulas[row];
      c = { formula: f, key: INDEX.keys[row] || f, row: row, group: "store" };
      byRow.set(row, c);
    }
    return c;
  }
  function loadIndex() {
    return getJSON("api/index").then((ix) => {
      ix.rowOf = new Map();
      ix.formulas.forEach((f, r) => { const k = ix.keys[r] || f; if (!ix.rowOf.has(k)) ix.rowOf.set(k, r); });
      INDEX = ix;
    });
  }
  function getJSON(url) {
    return fetch(url).then((r) => r.json().catch(() => ({ error: "HTTP " + r.status })).then((d) => {
      if (!r.ok) throw new Error(d.error || "HTTP " + r.status);
      return d;
    }));
  }
  let wanted = 0;  // the latest compound asked for: an older answer arriving later is not shown
  function show(c) {  // make c the current compound (fetching its data first where needed), then draw
    const token = ++wanted;
    if (loaded(c)) { state.compound = c; notice(""); draw(); return Promise.resolve(c); }
    document.body.dataset.loading = "1";
    return getJSON("api/compound?row=" + c.row).then((data) => {
      const group = c.group;
      Object.assign(c, data);
      c.group = group;
      if (token === wanted) { state.compound = c; notice(""); draw(); }
      return c;
    }).catch((e) => {
      if (token === wanted) notice("could not load " + c.formula + ": " + e.message);
      return null;
    }).finally(() => { if (token === wanted) delete document.body.dataset.loading; });
  }
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
  function findCompound(text) {  // embedded (offline) or in the store's index (served); null if neither
    if (!text) return null;
    let key = null;
    try { key = normalise(text); const c = byKey.get(key); if (c) return c; } catch (e) { /* not a formula */ }
    const c = D.compounds.find((d) => d.formula === text);
    if (c || !INDEX) return c || null;
    if (key !== null && INDEX.rowOf.has(key)) return compoundAt(INDEX.rowOf.get(key));
    const row = INDEX.formulas.indexOf(text);
    return row >= 0 ? compoundAt(row) : null;
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
    const fx = headEffect(k, l, h);
    if (fx) {
      const e = document.createElement("span");
      e.className = "effect " + fx.cls;
      e.dataset.effect = String(fx.effect); e.dataset.change = String(fx.change);
      e.textContent = "MAE " + signed(fx.effect);
      e.title = "zeroing this head changes the validation MAE by " + signed(fx.effect) + " (" + fx.word +
        "); mean |Δprediction| " + fmtNum(fx.change);
      cap.appendChild(e);
    }
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
  const signed = (v) => v === null || v === undefined ? "–" : (v > 0 ? "+" : "") + fmtNum(v);
  function headEffect(k, l, h) {  // the head ablation at capture k (null where the store has none)
    if (!D.head_effect) return null;
    const i = (k * L + l) * H + h, effect = D.head_effect[i], change = D.head_change[i];
    const word = effect === null ? "unknown" : effect > 0 ? "helps" : effect < 0 ? "hurts" : "no effect";
    return { effect: effect, change: change, word: word, cls: effect > 0 ? "helps" : effect < 0 ? "hurts" : "" };
  }
  function barTable(t, c, values, label) {  // signed bars of values (c, k) at the current capture; returns the rows
    const n = c.symbols.length, k = state.capture;
    const scale = Math.max(1e-12, ...values.filter((v) => v !== null).map(Math.abs));
    t.replaceChildren();
    const head = t.createTHead().insertRow();
    for (const s of ["element", label + " (−" + fmtNum(scale) + " … +" + fmtNum(scale) + ")", ""]) {
      const th = document.createElement("th"); th.textContent = s; head.appendChild(th);
    }
    const body = t.createTBody(), rows = [];
    for (let j = 0; j < n; j++) {
      const v = values[k * n + j];
      const tr = body.insertRow();
      tr.dataset.element = c.symbols[j];
      tr.dataset.value = v === null ? "nan" : String(v);
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
      const num = tr.insertCell(); num.className = "num"; num.textContent = signed(v);
      rows.push(tr);
    }
    return rows;
  }
  function sumRow(t, text, total) {  // a footer row: what the values add up to
    const tr = t.createTFoot().insertRow();
    tr.insertCell().textContent = "Σ";
    tr.cells[0].className = "sym";
    tr.insertCell().textContent = text;
    const num = tr.insertCell(); num.className = "num"; num.textContent = signed(total);
  }
  function attributionPanel(c) {
    const box = $("attribution-box");
    if (!c.attribution) { box.hidden = true; return; }
    box.hidden = false;
    const n = c.symbols.length, k = state.capture;
    $("attribution-title").textContent = "Leave-one-element-out effect · " + captureLabel(k);
    const t = $("attribution");
    const rows = barTable(t, c, c.attribution, "effect on the prediction");
    for (const s of ["attention received", ""]) {
      const th = document.createElement("th"); th.textContent = s; t.tHead.rows[0].appendChild(th);
    }
    rows.forEach((tr, j) => {
      const imp = c.importance[k * n + j];
      tr.dataset.importance = imp === null ? "nan" : String(imp);
      const itrack = document.createElement("div"); itrack.className = "track imp";
      if (imp !== null) {
        const bar = document.createElement("span"); bar.className = "fill";
        bar.style.left = "0"; bar.style.width = Math.min(100, imp * 100) + "%"; bar.style.background = "#8894a3";
        itrack.appendChild(bar);
      }
      tr.insertCell().appendChild(itrack);
      const inum = tr.insertCell(); inum.className = "num"; inum.textContent = imp === null ? "–" : imp.toFixed(3);
    });
  }
  function shapleyPanel(c) {  // Shapley values and output contributions at the current capture
    const has = { shapley: !!c.shapley, contribution: !!c.contribution };
    $("shapley-box").hidden = !has.shapley && !has.contribution;
    const n = c.symbols.length, k = state.capture, p = c.prediction[k];
    const total = (values) => values.slice(k * n, k * n + n).reduce((a, v) => a + (v === null ? NaN : v), 0);
    $("shapley-part").hidden = !has.shapley;
    if (has.shapley) {
      $("shapley-title").textContent = "Shapley values · " + captureLabel(k);
      const t = $("shapley");
      barTable(t, c, c.shapley, "Shapley value");
      const base = D.shapley_baseline;
      const less = base == null ? " − baseline" : " − mean " + fmtNum(base);
      sumRow(t, "= prediction " + fmtNum(p) + less, total(c.shapley));
    }
    $("contribution-part").hidden = !has.contribution;
    if (has.contribution) {
      $("contribution-title").textContent = "Output contribution · " + captureLabel(k);
      const t = $("contribution");
      barTable(t, c, c.contribution, "share of the output");
      sumRow(t, "= prediction " + fmtNum(p), total(c.contribution));
    }
  }
  function headEffectLabel() {  // beside the head selector: the selected head's ablation at this capture
    const el = $("head-effect");
    if (!D.head_effect) { el.hidden = true; return; }
    el.hidden = false;
    const sample = D.head_sample ? " on " + D.head_sample + " compounds of the " + D.split + " split" : "";
    el.title = "validation MAE" + sample + " with the head's output zeroed minus without, at this capture " +
      "(> 0: the head helps); mean |Δ|: mean absolute change of the prediction";
    el.className = "";
    if (state.head === "all") {
      el.textContent = "zeroing a head: its MAE change is beside its name";
      delete el.dataset.effect; delete el.dataset.change;
      return;
    }
    const fx = headEffect(state.capture, state.layer, state.head);
    el.dataset.effect = String(fx.effect); el.dataset.change = String(fx.change);
    el.replaceChildren("zeroing this head: MAE ");
    const v = document.createElement("span");
    v.className = fx.cls; v.textContent = signed(fx.effect) + " (" + fx.word + ")";
    el.append(v, " · mean |Δ| " + fmtNum(fx.change));
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
  function notice(text) {
    const n = $("notice");
    n.textContent = text || "";
    n.style.display = text ? "block" : "none";
  }
  function draw() {
    const c = state.compound;
    if (!c || !loaded(c)) return;
    document.querySelectorAll("#compound-list li.item").forEach((li) =>
      li.classList.toggle("selected", Number(li.dataset.row) === c.row));
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
      $("maps-title").textContent = "Attention · layer " + state.layer + " · head " + state.head + " · " +
        captureLabel(k);
    }
    headEffectLabel();
    attributionPanel(c);
    shapleyPanel(c);
    $("chart").replaceChildren(chart(c));
    const p = c.prediction[k];
    const rows = [["target", fmtNum(c.target)], ["prediction at " + captureLabel(k), fmtNum(p)],
      ["absolute error", p === null ? "–" : fmtNum(Math.abs(p - c.target))],
      ["prediction at the last capture", fmtNum(c.prediction[C - 1])],
      ["elements (fraction)", c.symbols.map((s, i) => s + " " + fmtFrac(c.fractions[i])).join(", ")]];
    const t = $("compound-facts");
    t.replaceChildren();
    for (const [a, b] of rows) {
      const tr = t.insertRow();
      tr.insertCell().textContent = a;
      tr.insertCell().textContent = b;
    }
    setHash();
  }
  function select(c) { return show(c); }
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
    let missing = null, target = state.compound;
    if (params.has("compound")) {
      const c = findCompound(params.get("compound"));
      if (c) target = c; else missing = params.get("compound");
    }
    if (!target) target = D.compounds[0] || null;
    const shown = target ? show(target) : Promise.resolve(null);
    return shown.then(() => { if (missing) missingNotice(missing); });
  }
  function missingNotice(f) {
    if (!SERVED) { notice(f + " is not embedded in this page; " + addHint(f)); return; }
    // the server says why (not a formula, or not in the store: with close matches)
    getJSON("api/compound?formula=" + encodeURIComponent(f)).then(() => notice(f + " could not be opened"),
      (e) => notice(e.message));
  }
  function addHint(f) {
    return "add it with: python generate_attention_videos.py --dataset " + D.dataset + " --formula '" + f + "'";
  }

  // ---------------------------------------------------------------- list and search
  function listItem(c, meta, title) {
    const li = document.createElement("li");
    li.className = "item"; li.dataset.row = c.row; li.dataset.formula = c.formula; li.dataset.group = c.group;
    if (c.n !== undefined) li.dataset.n = c.n;
    li.innerHTML = "<span></span><span class='meta'></span>";
    li.firstChild.textContent = c.formula;
    li.lastChild.textContent = meta;
    li.title = title;
    li.addEventListener("click", () => select(c));
    return li;
  }
  function groupItem(group, text) {
    const li = document.createElement("li");
    li.className = "group"; li.dataset.group = group; li.textContent = text;
    return li;
  }
  function buildList() {
    const ul = $("compound-list");
    const names = {
      paper: "The paper's compounds", chosen: "Chosen compounds", sample: "More compounds (by elements, error)",
    };
    let group = null;
    for (const c of D.compounds) {
      if (c.group !== group) {
        group = c.group;
        ul.appendChild(groupItem(group, names[group] || group));
      }
      const last = lastPrediction(c);
      const err = last === null ? "–" : fmtNum(Math.abs(last - c.target));
      ul.appendChild(listItem(c, c.symbols.length + " el · err " + err,
        "target " + fmtNum(c.target) + ", final prediction " + fmtNum(last)));
    }
  }
  const MAX_FOUND = 50;  // served: store compounds listed for a search
  function storeSearch(text, els) {  // served: rows of the whole store matching, fewest elements first
    if (!INDEX.symbols) INDEX.symbols = INDEX.formulas.map((f) => f.match(/[A-Z][a-z]*/g) || []);
    const listed = new Set(D.compounds.map((c) => c.row)), low = text.toLowerCase(), out = [];
    INDEX.formulas.forEach((f, r) => {
      if (listed.has(r) || INDEX.rowOf.get(INDEX.keys[r] || f) !== r) return;  // listed, or a repeated formula
      const syms = INDEX.symbols[r];
      if (els ? els.every((e) => syms.includes(e)) : f.toLowerCase().includes(low)) out.push(r);
    });
    out.sort((a, b) => INDEX.symbols[a].length - INDEX.symbols[b].length ||
      (INDEX.formulas[a] < INDEX.formulas[b] ? -1 : INDEX.formulas[a] > INDEX.formulas[b] ? 1 : a - b));
    return out;
  }
  function showFound(rows) {  // served: the store's matches below the listed ones
    const ul = $("compound-list");
    ul.querySelectorAll(".found").forEach((li) => li.remove());
    if (!rows.length) return;
    const more = rows.length > MAX_FOUND ? " (first " + MAX_FOUND + " of " + rows.length + ")" : "";
    const g = groupItem("store", "In the store" + more);
    g.classList.add("found");
    ul.appendChild(g);
    for (const r of rows.slice(0, MAX_FOUND)) {
      const c = compoundAt(r);
      const li = listItem(c, INDEX.symbols[r].length + " el", "row " + r + " of the store: opened from the server");
      li.classList.add("found");
      li.classList.toggle("selected", !!state.compound && state.compound.row === r);
      ul.appendChild(li);
    }
  }
  function filterList() {
    const text = $("search").value.trim();
    const msg = $("search-msg");
    msg.classList.remove("bad");
    let els = null, key = null, exact = null;
    if (text) {
      try { const a = parseFormula(text); els = [...a.keys()]; key = normalise(text); exact = byKey.get(key) || null; }
      catch (e) { els = null; }
    }
    let shown = 0;
    const items = document.querySelectorAll("#compound-list li.item:not(.found)");
    items.forEach((li) => {
      const c = D.compounds[Number(li.dataset.n)];
      let ok = true;
      if (text) {
        ok = els ? els.every((e) => c.symbols.includes(e)) : c.formula.toLowerCase().includes(text.toLowerCase());
      }
      li.classList.toggle("hidden", !ok);
      if (ok) shown++;
    });
    document.querySelectorAll("#compound-list li.group:not(.found)").forEach((g) => {
      const any = [...items].some((li) => li.dataset.group === g.dataset.group && !li.classList.contains("hidden"));
      g.classList.toggle("hidden", !any);
    });
    const found = SERVED && INDEX && text ? storeSearch(text, els) : [];
    if (SERVED && INDEX) showFound(found);
    if (!exact && SERVED && INDEX && key !== null && INDEX.rowOf.has(key)) exact = compoundAt(INDEX.rowOf.get(key));
    if (!text) {
      msg.textContent = SERVED ? D.compounds.length + " listed; the search finds any of the " + D.n_store
        : D.compounds.length + " compounds embedded";
    } else if (exact) { msg.textContent = "found " + exact.formula; if (state.compound !== exact) select(exact); }
    else if (SERVED && shown + found.length) {
      msg.textContent = (shown + found.length) + " compound" + (shown + found.length > 1 ? "s" : "") +
        (els ? " with these elements" : " matching") + "; the formula itself is not in the store";
    } else if (SERVED) {
      msg.textContent = "not in this store (" + D.n_store + " compounds)";
      msg.classList.add("bad");
    }
    else if (shown) msg.textContent = shown + " compound" + (shown > 1 ? "s" : "") + " with these elements; " +
      "the formula itself is not embedded";
    else { msg.textContent = "not embedded here; " + addHint(text); msg.classList.add("bad"); }
    return exact;
  }

  // ---------------------------------------------------------------- controls
  function about() {
    const paper = D.compounds.filter((c) => c.group === "paper").length;
    const listed = (paper ? " — the " + paper + " paper compounds in the store, " : " — ");
    if (SERVED) {
      const list = (paper ? "the " + paper + " paper compounds in the store and " : "") + (D.compounds.length - paper);
      return "Served from " + D.store + " under the data folder (" + D.n_store + " compounds of the " + D.split +
        " split) by python -m crabnet.web.serve --serve: the list holds " + list + " compounds chosen " +
        "across numbers of elements and errors; the search finds any compound of the " +
        "store, whose maps, predictions and attributions are read from the store when it is opened. Weights " +
        "are sent with 16 bits (within 1e-5 of the store). Started " + D.created + " by crabnet " + D.version +
        ". The offline page (step 2, generate_attention_videos.py) embeds a sample for sharing.";
    }
    return "Embedded: " + D.compounds.length + " of the " + D.n_store + " compounds of the " + D.split +
      " split stored in " + D.store + listed +
      "the compounds rendered as videos and " + D.n_others + " more chosen across numbers of elements and errors. " +
      "Weights are stored with 16 bits (within 1e-5 of the store). To add a compound, run " +
      "python generate_attention_videos.py --dataset " + D.dataset + " --formula <formula> (it also renders its " +
      "videos), or embed more with --explore <N>; to search every compound, serve the explorer: python -m " +
      "crabnet.web.serve --serve --dataset " + D.dataset + ". Written " + D.created + " by crabnet " +
      D.version + ".";
  }
  function setup() {
    $("facts").textContent = D.compounds.length + " of " + D.n_store + " " + D.split + " compounds" +
      (SERVED ? " listed, all searchable" : "") + " · " + C +
      " captures (" + D.capture + " " + D.steps[0] + "–" + D.steps[C - 1] + ") · " + L + " layers × " + H +
      " heads · " + D.features + (D.test_mae != null ? " · test MAE " + fmtNum(D.test_mae) : "");
    for (let l = 0; l < L; l++) $("layer").add(new Option("layer " + l, l));
    for (let h = 0; h < H; h++) $("head").add(new Option("head " + h, h));
    $("head").add(new Option("all heads", "all"));
    $("capture").max = C - 1;
    $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); });
    $("head").addEventListener("change", (e) => {
      state.head = e.target.value === "all" ? "all" : Number(e.target.value);
      draw();
    });
    $("capture").addEventListener("input", (e) => { state.capture = Number(e.target.value); draw(); });
    $("play").addEventListener("click", togglePlay);
    $("search").addEventListener("input", filterList);
    $("search").addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const exact = filterList();
      const first = document.querySelector("#compound-list li.item:not(.hidden)");
      if (!exact && first) first.click();
    });
    window.addEventListener("hashchange", applyHash);
    $("about").innerHTML = "";
    const p = document.createElement("p");
    p.textContent = about();
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
  if (!D.compounds.length && !SERVED) { notice("No compounds are embedded in this page."); return; }
  const index = SERVED ? loadIndex().then(filterList, (e) => notice("could not load the index: " + e.message))
    : Promise.resolve();
  index.then(applyHash).then(() => { document.body.dataset.ready = "1"; });
})();
