"""Step 5: Pearson correlation matrices between element vectors, and how "meaningful" they are.

Representations: the static element tables (oliynyk, magpie, jarvis, mat2vec, onehot), every
learned Q/K/V embedding CSV of step 4 found under <data-dir>/embeddings/, and untrained controls:
a freshly initialised HotCrab (onehot) and CrabNet (mat2vec) of the published architecture, seeded
with --seed, whose Q/K/V are computed in memory exactly as step 4 does (nothing is written under
embeddings/). The HotCrab control shows what the architecture alone gives (its one-hot input has
no chemistry); the CrabNet control what mat2vec passed through random layers gives. --source
picks a subset.

For each: z-score every feature over the elements the representation covers (constant features
dropped, missing values set to the feature mean), Pearson correlation between elements, reindexed
by atomic number (elements not covered are blank), lower triangle without the diagonal, colours
centred at 0 over [-1, 1].

Reads   <data-dir>/embeddings/<features>/<dataset>__layer<L>__<Q|K|V>.csv (step 4), CBFV tables
Writes  <data-dir>/figures/correlation/<name>.png          all elements
        <data-dir>/figures/correlation/<name>__z<Zmax>.png  Z <= --z-max (default 92)
        <data-dir>/figures/correlation/<name>.html         interactive, both ranges, works offline
        <data-dir>/figures/correlation/summary.csv         one row per representation (printed too):
            separation = mean within-group minus mean between-group correlation over alkali
            metals, alkaline earths, halogens, chalcogens, 3d transition metals and lanthanides,
            its permutation p-value, per-group values (sep_<group>), and the Spearman correlation
            of the matrix with the Oliynyk and Magpie matrices over the elements both cover
        <name> = oliynyk, …, <dataset>__<features>__layer<L>__<Q|K|V>, untrained_<features>__layer<L>__<Q|K|V>
Next    plot_local_edm_umap.py

Figures newer than their source are kept unless --force (the controls' figures are always
redrawn, but not at all with --quick); the summary is always recomputed.

Examples:
    python plot_element_correlation.py --quick
    python plot_element_correlation.py --source oliynyk --source aflow__ael_bulk_modulus_vrh__onehot__layer2__V
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from crabnet.cli import add_common, add_html_js, make_parser, run
from crabnet.correlation import (REFERENCE_TABLES, STATIC_TABLES, element_correlation, find_embedding_csvs,
                                 model_of, plot_correlation_html, plot_correlation_png, read_representation_csv,
                                 representation_name, static_representation, summarise)
from crabnet.embeddings import embedding_frames
from crabnet.layout import Layout
from crabnet.plotting import save_html, save_png
from crabnet.report import refresh_report
from crabnet.train import build_model
from crabnet.utils import atomic_path, resolve_device, seed_everything

QUICK_PERMUTATIONS = 999
PERMUTATIONS = 9999
CONTROL_FEATURES = ("onehot", "mat2vec")  # untrained HotCrab, untrained CrabNet


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None, quick_help=f"CPU demo: {QUICK_PERMUTATIONS} permutations for the p-values; "
                                           "the untrained controls go into the summary but are not plotted")
    p.add_argument("--source", action="append", default=None, metavar="NAME_OR_CSV",
                   help="representation to use (repeatable): a static table name, a learned name "
                        "<dataset>__<features>__layer<L>__<K>, a CSV path, or 'control' (default: all found)")
    p.add_argument("--no-control", action="store_true", help="leave out the untrained HotCrab and CrabNet controls")
    p.add_argument("--permutations", type=int, default=None,
                   help=f"permutations for the group-separation p-value (default {PERMUTATIONS}; --quick "
                        f"{QUICK_PERMUTATIONS})")
    p.add_argument("--z-max", type=int, default=92, help="upper atomic number of the restricted plots")
    p.add_argument("--no-html", action="store_true", help="PNG only")
    add_html_js(p)
    return p.parse_args(argv)


def collect_sources(data_dir: Path, sources: list[str] | None) -> dict[str, tuple[str, object]]:
    """{name: (kind, origin)}: origin = table name (static), CSV path (learned) or None (control).

    Raises:
        ValueError: a --source that matches nothing, with what is available.
    """
    found = {representation_name(p): p for p in find_embedding_csvs(data_dir)}
    every = {**{n: ("static", n) for n in STATIC_TABLES}, **{n: ("learned", p) for n, p in found.items()}}
    if sources is None:
        return every
    out = {}
    for s in sources:
        if s in every:
            out[s] = every[s]
        elif s == "control":
            continue
        elif s.endswith(".csv") and Path(s).is_file():
            out[representation_name(s)] = ("learned", Path(s))
        else:
            raise ValueError(f"--source {s!r}: not a static table, learned embedding or CSV file. Available: "
                             f"{', '.join(list(every)[:12])}{' …' if len(every) > 12 else ''}")
    return out


def control_frames(seed: int, device, features: str = "onehot") -> dict[str, pd.DataFrame]:
    """Q/K/V frames of a freshly initialised model (published architecture, seeded), as step 4 makes them.

    Names: ``untrained_<features>__layer<L>__<Q|K|V>``, layers in order, Q, K, V within a layer.
    """
    seed_everything(seed)
    model = build_model(features).to(device)
    frames = embedding_frames(model)
    return {f"untrained_{features}__layer{layer}__{kind}": frames[(layer, kind)]
            for layer in range(model.cfg.n_layers) for kind in "QKV"}


def up_to_date(outputs: list[Path], origin) -> bool:
    """Whether every output exists and is newer than the source CSV (static tables: exists)."""
    if not all(p.exists() for p in outputs):
        return False
    if isinstance(origin, Path):
        return min(p.stat().st_mtime for p in outputs) >= origin.stat().st_mtime
    return origin is not None  # static tables do not change; the control is always redrawn


def main(data_dir: Path, device: str, seed: int, quick: bool, force: bool, source: list[str] | None,
         no_control: bool, permutations: int | None, z_max: int, no_html: bool, html_js: str = "inline") -> int:
    n_perm = (QUICK_PERMUTATIONS if quick else PERMUTATIONS) if permutations is None else permutations
    if n_perm < 0 or not 2 <= z_max <= 118:
        print("error: --permutations must be >= 0 and --z-max in 2..118", file=sys.stderr)
        return 2
    try:
        sources = collect_sources(data_dir, source)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not any(kind == "learned" for kind, _ in sources.values()):
        print(f"note: no learned embeddings under {data_dir}/embeddings/ (run get_crabnet_embeddings.py first)")
    frames = {}
    for name, (kind, origin) in sources.items():
        frames[name] = (kind, origin, static_representation(origin) if kind == "static" else None)
    if not no_control and (source is None or "control" in source):
        for feat in CONTROL_FEATURES:
            for name, frame in control_frames(seed, resolve_device(device), feat).items():
                frames[name] = ("untrained", None, frame)

    out_dir = Layout(data_dir).correlation_figures()
    corrs, extra, n_plotted = [], {}, 0
    for name, (kind, origin, frame) in tqdm(frames.items(), desc="representations", unit="rep", disable=None):
        try:
            frame = read_representation_csv(origin) if frame is None else frame
            corr = element_correlation(frame, name)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        corrs.append(corr)
        extra[name] = {"kind": kind, "model": "static" if kind == "static" else model_of(name)}
        outputs = [out_dir / f"{name}.png", out_dir / f"{name}__z{z_max}.png"] + ([] if no_html else [out_dir / f"{name}.html"])
        if (quick and kind == "untrained") or (not force and up_to_date(outputs, origin)):
            continue
        title = (f"{name}\nPearson r between elements over {corr.n_features} z-scored features"
                 + (f" ({corr.n_dropped} constant dropped)" if corr.n_dropped else ""))
        save_png(plot_correlation_png(corr.matrix, title), outputs[0])
        save_png(plot_correlation_png(corr.matrix, title, z_max=z_max), outputs[1])
        if not no_html:
            save_html(plot_correlation_html(corr.matrix, title, z_maxes=(118, z_max)), outputs[2], js=html_js)
        n_plotted += 1

    refs = {c.name: c for c in corrs if c.name in REFERENCE_TABLES}
    missing = [r for r in REFERENCE_TABLES if r not in refs]
    for r in missing:
        refs[r] = element_correlation(static_representation(r), r)
    summary = summarise(corrs, refs, n_perm=n_perm, seed=seed, extra=extra)
    summary_path = out_dir / "summary.csv"
    with atomic_path(summary_path) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    print_summary(summary, n_perm)
    print(f"\n{n_plotted} representation(s) plotted ({len(corrs) - n_plotted} up to date or not plotted) -> {out_dir}/")
    print(f"summary -> {summary_path}")
    refresh_report(data_dir)
    print("next: python plot_local_edm_umap.py" + (" --quick" if quick else ""))
    return 0


def print_summary(summary: pd.DataFrame, n_perm: int) -> None:
    """Print the main columns, then the means over each model's 3 layers x Q/K/V."""
    cols = ["representation", "separation", "p_value", "spearman_oliynyk", "spearman_magpie"]
    fmt = {"float_format": lambda v: f"{v:.3f}", "formatters": {"p_value": lambda v: f"{v:.4f}",
                                                                "max_p": lambda v: f"{v:.4f}"}}
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.max_colwidth", 60):
        print(summary[cols].to_string(index=False, **fmt))
        learned = summary[summary["kind"] != "static"]
        if len(learned):
            by = learned.groupby(["kind", "model"], sort=False)
            means = by[["separation", "spearman_oliynyk", "spearman_magpie"]].mean()
            means.insert(0, "n", by.size())
            means["max_p"] = by["p_value"].max()
            print(f"\nmean over each model's layers x Q/K/V (p-values from {n_perm} permutations; "
                  "static tables above for scale):")
            print(means.to_string(**fmt))


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
