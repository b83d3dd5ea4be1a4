"""The report: ``<data-dir>/index.html``, one browsable page of every output under ``--data-dir``.

Every workflow script calls :func:`refresh_report` at its end; it rebuilds the page from what
exists (cheap: it reads checkpoint metadata memory-mapped, store attributes, small CSVs, and
lists files) and never fails the step that calls it (a problem becomes a warning). All links are
relative, so the folder can be zipped and opened elsewhere, and nothing is fetched from the
network.

First "the paper vs this run" (:func:`paper_checks`): published test MAE and dataset statistics
beside ours where they exist, and the paper's steps and datasets (docs/steps.md) done or not.
Shown per dataset: the training summary of each checkpoint (recipe, epochs, test MAE beside the
published one where known) with its learning curve (``figures/training/<model>.png``, written
from the checkpoint's history when missing), the attention store, the explorer, the videos (HTML5
``<video>``), the faithfulness of attention (figure and tables of step 2) and the periodic tables per
element (prevalence, attention, Shapley value, MAE), test predictions,
oxidation-state guesses, the local and global UMAP figures (thumbnails linking to their
interactive HTML) and summary tables, element-prevalence figures; then the element-correlation
figures, the dataset statistics and anything else found.

Run by hand::

    python -m crabnet.web.report --data-dir data
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import crabnet
from crabnet import web
from crabnet.elements import SYMBOLS
from crabnet.explain.ptable import QUANTITIES
from crabnet.layout import BENCHMARK, CACHE, MATBENCH, Layout
from crabnet.plotting import write_learning_curve
from crabnet.progress import say
from crabnet.utils import atomic_path, meta_sidecar, read_checkpoint_meta
from crabnet.web.paper import MODEL_NAMES, paper_section, published_test_mae
from crabnet.web.pieces import (
    _esc,
    _file_link,
    _href,
    _link,
    _num,
    _part,
    _row,
    _size,
    _store_attrs,
    csv_table,
    file_links,
    thumbs,
)

SKIP_DIRS = {BENCHMARK, MATBENCH, CACHE}  # inputs and caches are not outputs to show
MEDIA = (".png", ".html", ".mp4", ".csv", ".json", ".svg", ".jpg")
PTABLE_NAMES = {  # captions of the periodic tables (figures/ptable/<dataset>/<quantity>.png)
    "prevalence": "training prevalence",
    "attention": "attention received",
    "shapley": "mean Shapley value",
    "mae": "MAE (captured split)",
    "test_mae": "test MAE (step 4's model)",
}


# --------------------------------------------------------------------------------------------
# reading what exists


@dataclass
class Model:
    """One checkpoint under ``models/``."""

    path: Path
    meta: dict
    figure: Path | None = None
    published: float | None = None


@dataclass
class Found:
    """Outputs found under a data folder, by dataset and kind."""

    root: Path
    datasets: dict[str, dict[str, list]] = field(default_factory=dict)
    used: set[Path] = field(default_factory=set)  # files shown somewhere (the rest go under "other files")

    def add(self, dataset: str, kind: str, item: Any) -> None:
        self.datasets.setdefault(dataset, {}).setdefault(kind, []).append(item)
        for p in item if isinstance(item, tuple) else (item,):
            if isinstance(p, Path):
                self.used.add(p)
            elif isinstance(p, Model):
                self.used.add(p.path)
                if p.figure:
                    self.used.add(p.figure)


def _files(folder: Path, suffixes: Sequence[str] = MEDIA) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".zarr")
    )


def _history_figure(root: Path, ckpt: Path, meta: dict) -> Path | None:
    """``figures/training/<checkpoint stem>.png``, written from ``meta['history']`` when missing or older."""
    fig = Layout(root).training_figure(ckpt)
    history = meta.get("history")
    stale = not fig.is_file() or fig.stat().st_mtime < ckpt.stat().st_mtime
    if stale and isinstance(history, dict) and history:
        recipe = history.get("recipe") or _recipe_text(meta.get("recipe"))
        try:
            write_learning_curve({**history, "recipe": recipe}, fig)
        except Exception as err:  # a broken history must not hide the rest of the report
            warnings.warn(f"report: no learning curve for {ckpt.name}: {err}", stacklevel=2)
    return fig if fig.is_file() else None


def _recipe_text(recipe: Any) -> str:
    if not isinstance(recipe, dict):
        return str(recipe or "")
    parts = [f"{recipe.get('epochs', '?')} epochs", f"epochs_step {recipe.get('epochs_step', '?')}"]
    if recipe.get("batch_size"):
        parts.append(f"batch {recipe['batch_size']}")
    parts.append("SWA" if recipe.get("swa", True) else "no SWA")
    if recipe.get("early_stop"):
        parts.append(f"early stop {recipe['early_stop']}")
    return (f"{recipe['name']}: " if recipe.get("name") else "") + ", ".join(parts)


def _scan_models(found: Found, layout: Layout) -> None:
    """The checkpoints under ``models/`` (their JSON metadata twins count as shown)."""
    root = found.root
    for ckpt in _files(layout.models_dir(), (".pt",)):
        if ckpt.name.endswith(".state.pt"):
            continue
        meta = read_checkpoint_meta(ckpt)
        if meta is None:
            warnings.warn(f"report: cannot read {ckpt}", stacklevel=2)
            meta = {}
        dataset = str(meta.get("dataset") or Layout.name_parts(ckpt, 1)[0])
        features = str(meta.get("features") or "")
        model = Model(
            path=ckpt,
            meta=meta,
            figure=_history_figure(root, ckpt, meta),
            published=published_test_mae(dataset, features) if features else None,
        )
        found.add(dataset, "models", model)
        found.used.add(meta_sidecar(ckpt))


def scan(root: Path | str) -> Found:
    """Find every output under ``root`` and sort it by dataset and kind."""
    root = Path(root)
    found, layout = Found(root=root), Layout(root)
    _scan_models(found, layout)
    for folder in _subdirs(layout.attention_dir()):
        store = layout.attention_store(folder.name) / "zarr.json"
        if store.is_file():
            found.add(folder.name, "store", store)
        for p in _files(folder, (".csv", ".png")):
            kinds = {
                layout.faithfulness_csv(folder.name): "faithfulness_csv",
                layout.ptable_csv(folder.name): "ptable_csv",
            }
            found.add(folder.name, kinds.get(p, "attention_files"), p)
    for p in _files(layout.explorer_dir(), (".html",)):
        found.add(p.stem, "explorer", p)
    for folder in _subdirs(layout.videos_dir()):
        for p in _files(folder, (".mp4",)):
            found.add(folder.name, "videos", p)
    # dataset names hold "__" themselves (aflow__Egap): the parts after the name are cut from the right
    for p in _files(layout.predictions_dir(), (".csv",)):
        found.add(Layout.name_parts(p, 2)[0], "predictions", p)  # <dataset>__<features>__test
    for p in _files(layout.oxidation(), (".csv",)):
        found.add(Layout.name_parts(p, 1)[0], "oxidation", p)  # <dataset>__<split>
    for p in _files(layout.oxidation(), (".json",)):
        if "__" in p.stem:
            found.used.add(p)  # the JSON twin of a CSV shown above
    for features_dir in _subdirs(layout.embeddings_dir()):
        for p in _files(features_dir, (".csv",)):
            found.add(Layout.name_parts(p, 2)[0], "embeddings", p)  # <dataset>__layer<L>__<Q|K|V>
    for scope in ("local", "global"):
        for folder in _subdirs(layout.umap_figures(scope)):
            for p in _files(folder, (".png",)):
                found.add(folder.name, f"umap_{scope}", p)
                found.used.add(p.with_suffix(".html"))
            for p in _files(folder, (".js",)):
                found.used.add(p)
        for folder in _subdirs(layout.umap(scope)):
            for p in _files(folder, (".csv",)):
                found.add(folder.name, f"umap_{scope}_csv", p)
    for p in _files(layout.faithfulness_figures(), (".png",)):
        found.add(p.stem, "faithfulness", p)
    for folder in _subdirs(layout.ptable_figures()):
        rank = {name: i for i, name in enumerate(QUANTITIES)}  # the order of crabnet.explain.ptable, others after
        for p in sorted(_files(folder, (".png",)), key=lambda p: (rank.get(p.stem, len(rank)), p.name)):
            found.add(folder.name, "ptable", p)
            found.used.add(p.with_suffix(".html"))
    for p in _files(layout.prevalence_figures(), (".png",)):
        found.add(Layout.name_parts(p, 1)[0], "prevalence", p)  # <dataset>__by_count
    return found


def _model_facts(root: Path, model: Model) -> list[tuple[str, str]]:
    """(name, escaped value) rows of a checkpoint's summary."""
    m = model.meta
    recipe = m.get("recipe")
    history = m.get("history") if isinstance(m.get("history"), dict) else {}
    val = [v for v in (history.get("val_mae") or []) if isinstance(v, (int, float)) and math.isfinite(v)]
    swa = sum(v for v in (history.get("swa_updates") or []) if isinstance(v, (int, float)) and math.isfinite(v))
    test = m.get("test_mae")
    model_name = MODEL_NAMES.get(str(m.get("features")), "CrabNet variant")
    rows = [
        ("features", f"{m.get('features', '?')} ({model_name})"),
        (
            "recipe",
            (_recipe_text(recipe) + (" (full recipe)" if m.get("full_recipe") else " (short run)")) if recipe else "–",
        ),
        ("precision", m.get("precision", "–")),
        ("epochs run", f"{m.get('epochs_run', '–')}" + (" (stopped early)" if m.get("stopped_early") else "")),
        ("test MAE", _num(test) if test is not None else "–"),
    ]
    if model.published is not None:
        ratio = f" · ours/published {float(test) / model.published:.2f}" if isinstance(test, (int, float)) else ""
        rows.append(("published test MAE", f"{_num(model.published)}{ratio}"))
    if val:
        rows.append(("validation MAE", f"last {_num(val[-1])}, best {_num(min(val))}"))
    if history.get("swa_updates") is not None:
        rows.append(("SWA updates", _num(swa)))
    if m.get("train_seconds") is not None:
        rows.append(("training time", f"{_num(m['train_seconds'], 3)} s"))
    if m.get("written_by"):
        rows.append(("written by", m["written_by"]))
    rows = [(a, _esc(b)) for a, b in rows]
    return [*rows, ("checkpoint", _file_link(root, model.path, model.path.name))]


def _model_section(root: Path, model: Model) -> str:
    facts = "".join(_part("fact", name=_esc(a), value=b) for a, b in _model_facts(root, model))
    if model.figure:
        figure = _part("curve", href=_href(root, model.figure), name=_esc(model.path.stem))
    else:
        figure = _part("muted", text="no learning curve (the checkpoint holds no training history)")
    return _part("model", name=_esc(model.path.stem), facts=facts, figure=figure)


def _videos_section(root: Path, dataset: str, videos: list[Path], explorer: Path | None) -> str:
    merged = [v for v in videos if not re.search(r"_(attention|progress)$", v.stem)]
    cards = []
    for v in merged:
        links = [_link(root, v, "video")]
        for kind in ("attention", "progress"):
            p = v.with_name(f"{v.stem}_{kind}.mp4")
            if p.is_file():
                links.append(_link(root, p, f"{kind} only"))
        formula = re.sub(r"_(layer[\d-]+|layers|row\d+)+$", "", v.stem)
        if explorer is not None:
            view = "compound=" + quote(formula) + "&layer=0&head=all&capture=last"
            links.append(_link(root, explorer, "explore", view))
        cards.append(_part("video", src=_href(root, v, "t=0.01"), name=_esc(v.stem), links=" · ".join(links)))
    return _part("videos", cards="".join(cards)) if cards else ""


def _oxidation_summary(root: Path, paths: list[Path]) -> str:
    """Per oxidation CSV: formulas, how many got a charge-balanced guess, and why the others did not."""
    rows = []
    for p in paths:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                records = list(reader)
                cols = reader.fieldnames or []
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        elements = [c for c in cols if c in SYMBOLS]  # the state columns (not formula, composition, reason)
        reasons: dict[str, int] = {}
        guessed = 0
        for r in records:
            reason = (r.get("reason") or "").strip()
            if any((r.get(c) or "").strip() for c in elements):
                guessed += 1
            else:
                reasons[reason or "none"] = reasons.get(reason or "none", 0) + 1
        share = f"{100 * guessed / len(records):.1f} %" if records else "–"
        why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        twin = p.with_suffix(".json")
        json_link = " · " + _link(root, twin, "JSON") if twin.is_file() else ""
        rows.append(_row([_link(root, p, p.stem) + json_link, len(records), guessed, share, _esc(why) or "–"]))
    return _part("oxidation", rows="".join(rows)) if rows else ""


def _embedding_links(root: Path, paths: list[Path]) -> str:
    by_features: dict[str, list[Path]] = {}
    for p in paths:
        by_features.setdefault(p.parent.name, []).append(p)
    lines = []
    for features, ps in sorted(by_features.items()):
        layers: dict[str, list[Path]] = {}
        order = {"Q": 0, "K": 1, "V": 2}
        for p in sorted(ps, key=lambda p: (Layout.name_parts(p, 1)[0], order.get(Layout.name_parts(p, 1)[-1], 3))):
            layers.setdefault(Layout.name_parts(p, 2)[-2] if p.stem.count("__") >= 2 else p.stem, []).append(p)
        groups = [
            f"{_esc(layer.replace('layer', 'layer '))}: "
            + " ".join(_link(root, p, Layout.name_parts(p, 1)[-1]) for p in files)
            for layer, files in layers.items()
        ]
        lines.append(_part("embedding_features", features=_esc(features), layers=" · ".join(groups)))
    return _part("embeddings", items="".join(lines))


def _attention_section(root: Path, dataset: str, kinds: dict[str, list]) -> list[str]:
    """The attention store, the explorer link, the videos and other files of step 1 and 2."""
    explorer = kinds.get("explorer", [None])[0]
    if not (kinds.get("store") or explorer or kinds.get("videos")):
        return []
    out = [_part("h3", text="Attention through training")]
    for store in kinds.get("store", []):
        a = _store_attrs(store)
        mae = f", test MAE {_esc(_num(a['test_mae']))}" if a.get("test_mae") is not None else ""
        values = {k: a.get(k, "?") for k in ("n_compounds", "n_captures", "n_layers", "n_heads", "epochs_run")}
        values = {k: _esc(v) for k, v in values.items()}
        out.append(
            _part(
                "store",
                path=_esc(store.parent.relative_to(root).as_posix()),
                n=values["n_compounds"],
                split=_esc(a.get("split", "")),
                captures=values["n_captures"],
                capture=_esc(a.get("capture", "epoch")),
                layers=values["n_layers"],
                heads=values["n_heads"],
                features=_esc(a.get("features", "")),
                epochs=values["epochs_run"],
                mae=mae,
            )
        )
    if explorer:
        out.append(_part("explorer_link", href=_href(root, explorer), size=_size(explorer)))
    out.append(_videos_section(root, dataset, kinds.get("videos", []), explorer))
    extra = kinds.get("attention_files", [])
    if extra:
        out.append(thumbs(root, [p for p in extra if p.suffix == ".png"], twins=False))
        out += [csv_table(root, p) for p in extra if p.suffix == ".csv"]
    return out


def _loo_column(name: str) -> bool:
    """A column of faithfulness.csv's table with |attribution| as the reference (standard errors aside)."""
    return not name.endswith("_se") and not name.startswith("shapley_")


def _shapley_column(name: str) -> bool:
    """A column of faithfulness.csv's table with |Shapley| as the reference and the sign test."""
    return not name.endswith("_se") and (name.startswith("shapley_") or name in ("capture", "step"))


def _faithfulness_section(root: Path, kinds: dict[str, list]) -> list[str]:
    """The faithfulness figure, its table with |attribution| as the reference and the one with |Shapley|
    (and the sign test; stores without Shapley values have none), then the periodic tables per element."""
    out = []
    if kinds.get("faithfulness") or kinds.get("faithfulness_csv"):
        out.append(_part("faithfulness"))
        out.append(thumbs(root, kinds.get("faithfulness", []), twins=False))
        for p in kinds.get("faithfulness_csv", []):
            out.append(csv_table(root, p, keep=_loo_column))
            if any(name.startswith("shapley_") for name in _csv_header(p)):
                caption = f"{p.relative_to(root).as_posix()}: |Shapley| as the reference, sign test"
                out.append(_part("faithfulness_shapley") + csv_table(root, p, caption=caption, keep=_shapley_column))
    if kinds.get("ptable") or kinds.get("ptable_csv"):
        out.append(_part("ptables"))
        split = next((_store_attrs(z).get("split") for z in kinds.get("store", [])), None) or "captured"
        names = {**PTABLE_NAMES, "mae": f"MAE ({split} split, the store's model)"}
        grid = thumbs(root, kinds.get("ptable", []), label=lambda p: names.get(p.stem, p.stem))
        out.append(_part("ptable_grid", thumbs=grid) if grid else "")
        out += [csv_table(root, p) for p in kinds.get("ptable_csv", [])]
    return out


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV ([] if unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _dataset_section(root: Path, dataset: str, kinds: dict[str, list]) -> str:
    out = []
    if kinds.get("models"):
        out.append(_part("h3", text="Training"))
        out += [_model_section(root, m) for m in kinds["models"]]
    out += _attention_section(root, dataset, kinds)
    out += _faithfulness_section(root, kinds)
    if kinds.get("predictions") or kinds.get("embeddings"):
        out.append(_part("h3", text="Predictions and element embeddings"))
        out.append(file_links(root, kinds.get("predictions", [])))
        if kinds.get("embeddings"):
            out.append(_embedding_links(root, kinds["embeddings"]))
    if kinds.get("oxidation"):
        out.append(_part("h3", text="Oxidation-state guesses") + _oxidation_summary(root, kinds["oxidation"]))
    for scope, title in (("local", "Local (per-atom) EDM UMAP"), ("global", "Global (per-compound) EDM UMAP")):
        pngs, csvs = kinds.get(f"umap_{scope}", []), kinds.get(f"umap_{scope}_csv", [])
        if pngs or csvs:
            out.append(_part("h3", text=_esc(title)) + thumbs(root, pngs))
            summary = [p for p in csvs if p.name == "summary.csv"]
            out += [csv_table(root, p) for p in summary]
            coords = [p for p in csvs if p.name != "summary.csv"]
            if coords:
                out.append(_part("details", summary=f"{len(coords)} coordinate tables", body=file_links(root, coords)))
    if kinds.get("prevalence"):
        out.append(_part("h3", text="Element prevalence") + thumbs(root, kinds["prevalence"], twins=False))
    return _part("section", id=_esc(_anchor(dataset)), title=_esc(dataset), body="".join(out))


def _anchor(name: str) -> str:
    return "ds-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


# the workflow's steps: script, the folder of its outputs (a Layout method), what it does
STEPS: list[tuple[str, Callable[[Layout], Path], str]] = [
    ("get_training_attention.py", Layout.attention_dir, "train CrabNet and capture attention during training"),
    ("generate_attention_videos.py", Layout.videos_dir, "videos and the attention explorer"),
    ("guess_oxidation.py", Layout.oxidation, "oxidation-state guesses"),
    ("get_crabnet_embeddings.py", Layout.embeddings_dir, "CrabNet / HotCrab element embeddings"),
    ("plot_element_correlation.py", Layout.correlation_figures, "element correlation matrices"),
    ("plot_local_edm_umap.py", lambda lay: lay.umap_figures("local"), "per-atom EDM UMAP"),
    ("plot_global_edm_umap.py", lambda lay: lay.umap_figures("global"), "per-compound EDM UMAP"),
    ("get_dataset_stats.py", Layout.stats, "dataset statistics"),
]


def _workflow_section(layout: Layout) -> str:
    """The eight steps, each ticked when its output folder holds something."""
    steps = []
    for i, (script, folder_of, what) in enumerate(STEPS, 1):
        folder = folder_of(layout)
        done = folder.is_dir() and any(folder.iterdir())
        state, tick = ("done", "✓") if done else ("todo", "·")
        steps.append(_part("step", state=state, tick=tick, n=i, script=_esc(script), what=_esc(what)))
    return _part("workflow", steps="".join(steps))


def _correlation_section(found: Found, layout: Layout) -> str:
    """The element-correlation figures of step 5 ("" when there are none)."""
    root, corr = found.root, layout.correlation_figures()
    summary = corr / "summary.csv"
    pngs = _files(corr, (".png",))
    if not (pngs or summary.is_file()):
        return ""
    pngs = _summary_order(summary, pngs)
    main = [p for p in pngs if not re.search(r"__z\d+$", p.stem)]
    zoom = [p for p in pngs if re.search(r"__z\d+$", p.stem)]
    body = _part(
        "muted",
        text="Pearson correlation between element vectors (lower triangle); thumbnails link to the interactive "
        "version.",
    )
    if summary.is_file():
        body += csv_table(root, summary)
    body += thumbs(root, main)
    if zoom:
        body += _part("details", summary=f"{len(zoom)} figures restricted to Z ≤ 92", body=thumbs(root, zoom))
    found.used.update(pngs + _files(corr, (".html", ".csv", ".js")))
    return _part("section", id="correlation", title="Element correlation", body=body)


def _stats_section(found: Found, layout: Layout) -> str:
    """The statistics tables and figures of step 8 ("" when there are none)."""
    root, stats = found.root, layout.stats()
    stat_figs = _files(layout.stats_figures(), (".png",))
    if not (stats.is_dir() or stat_figs):
        return ""
    body = thumbs(root, stat_figs, twins=False)
    for p in _files(stats, (".csv",)):
        if p.name.startswith("element_counts"):
            body += _part("p", text="Element presence counts: " + _file_link(root, p, p.name))
        else:
            body += csv_table(root, p)
        found.used.add(p)
    found.used.update(stat_figs)
    return _part("section", id="stats", title="Dataset statistics", body=body)


def _other_section(found: Found, layout: Layout) -> str:
    """Oxidation states per element and every output no section above shows ("" when there are none)."""
    root, ox = found.root, layout.element_ox_states()
    if ox.is_file():
        found.used.add(ox)
    other = _other_files(found)
    if not (other or ox.is_file()):
        return ""
    body = ""
    if ox.is_file():
        link = _link(root, ox, ox.relative_to(root).as_posix())
        body += _part("p", text="Common, ICSD and all oxidation states per element: " + link)
    body += file_links(root, other, label=lambda p: p.relative_to(root).as_posix())
    return _part("section", id="other", title="Other outputs", body=body)


def _metas(found: Found) -> dict[Path, dict]:
    """The metadata of every checkpoint found, by path."""
    return {m.path: m.meta for kinds in found.datasets.values() for m in kinds.get("models", [])}


def render_report(found: Found) -> str:
    """The page for what :func:`scan` found (plus the global sections read here)."""
    root, layout = found.root, Layout(found.root)
    sections, toc = [_workflow_section(layout)], []
    try:
        sections.append(
            paper_section(
                found.root, {m.path: m.meta for kinds in found.datasets.values() for m in kinds.get("models", [])}
            )
        )
        toc.append(("paper", "paper vs this run"))
    except Exception as err:
        warnings.warn(f"report: no paper comparison: {type(err).__name__}: {err}", stacklevel=2)
    for dataset in sorted(found.datasets, key=str.lower):
        sections.append(_dataset_section(root, dataset, found.datasets[dataset]))
        toc.append((_anchor(dataset), dataset))
    for anchor, title, section in (
        ("correlation", "element correlation", _correlation_section),
        ("stats", "dataset statistics", _stats_section),
        ("other", "other outputs", _other_section),
    ):
        text = section(found, layout)
        if text:
            sections.append(text)
            toc.append((anchor, title))
    return web.fill(
        "report.html",
        css=web.styles("theme.css", "report.css"),
        stamp=time.strftime("%Y-%m-%d %H:%M"),
        version=_esc(crabnet.__version__),
        nav="".join(_part("link", href="#" + _esc(a), text=_esc(t)) for a, t in toc),
        sections="".join(sections),
    )


def _summary_order(summary: Path, pngs: list[Path]) -> list[Path]:
    """Figures in the row order of the summary's ``representation`` column (the others after, by name)."""
    try:
        with open(summary, newline="", encoding="utf-8") as f:
            names = [r.get("representation", "") for r in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return pngs
    rank = {n: i for i, n in enumerate(names)}
    return sorted(pngs, key=lambda p: (rank.get(re.sub(r"__z\d+$", "", p.stem), len(rank)), p.name))


def _other_files(found: Found, limit: int = 300) -> list[Path]:
    """Output files nothing above shows (inputs, caches, stores and model files excluded), at most ``limit``."""
    import os

    root, out, layout = found.root, [], Layout(found.root)
    skip_top = SKIP_DIRS | {layout.models_dir().name, layout.attention_dir().name, layout.embeddings_dir().name}
    for top in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in skip_top):
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(
                d for d in dirs if d not in SKIP_DIRS and not d.endswith(".zarr") and not d.startswith(".")
            )
            for name in sorted(files):
                p = Path(folder) / name
                if p.suffix.lower() in MEDIA and not name.startswith(".") and p not in found.used:
                    out.append(p)
                    if len(out) >= limit:
                        return out
    return out


def write_report(data_dir: Path | str) -> Path:
    """Rebuild ``<data_dir>/index.html`` from what exists under ``data_dir``; returns its path."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no data folder at {root}")
    text = render_report(scan(root))
    path = Layout(root).report()
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def refresh_report(data_dir: Path | str) -> Path | None:
    """Rebuild the report at the end of a step; a failure is a warning, never the step's failure.

    Returns:
        the page, or None when it could not be written.
    """
    try:
        path = write_report(data_dir)
    except Exception as err:
        say(f"warning: could not refresh the report in {data_dir}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    say(f"report -> {path}")
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="root of inputs and outputs (default data)")
    return p.parse_args(argv)


def main(data_dir: Path) -> int:
    return 0 if refresh_report(data_dir) else 1


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
