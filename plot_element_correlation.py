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

from pathlib import Path

from tqdm.auto import tqdm

from crabnet.correlation import (
    REFERENCE_TABLES,
    collect_sources,
    control_frames,
    element_correlation,
    model_of,
    plot_representation,
    print_summary,
    read_representation_csv,
    static_representation,
    summarise,
)
from crabnet.errors import UsageError
from crabnet.jobs.cli import add_common, add_html_js, make_parser, run
from crabnet.layout import Layout
from crabnet.utils import atomic_path, resolve_device
from crabnet.web.report import refresh_report

QUICK_PERMUTATIONS = 999
PERMUTATIONS = 9999
CONTROL_FEATURES = ("onehot", "mat2vec")  # untrained HotCrab, untrained CrabNet


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        quick_help=f"CPU demo: {QUICK_PERMUTATIONS} permutations for the p-values; "
        "the untrained controls go into the summary but are not plotted",
    )
    p.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="NAME_OR_CSV",
        help="representation to use (repeatable): a static table name, a learned name "
        "<dataset>__<features>__layer<L>__<K>, a CSV path, or 'control' (default: all found)",
    )
    p.add_argument("--no-control", action="store_true", help="leave out the untrained HotCrab and CrabNet controls")
    p.add_argument(
        "--permutations",
        type=int,
        default=None,
        help=f"permutations for the group-separation p-value (default {PERMUTATIONS}; --quick {QUICK_PERMUTATIONS})",
    )
    p.add_argument("--z-max", type=int, default=92, help="upper atomic number of the restricted plots")
    p.add_argument("--no-html", action="store_true", help="PNG only")
    add_html_js(p)
    return p.parse_args(argv)


def main(
    data_dir: Path,
    device: str,
    seed: int,
    quick: bool,
    force: bool,
    source: list[str] | None,
    no_control: bool,
    permutations: int | None,
    z_max: int,
    no_html: bool,
    html_js: str = "inline",
) -> int:
    n_perm = (QUICK_PERMUTATIONS if quick else PERMUTATIONS) if permutations is None else permutations
    if n_perm < 0 or not 2 <= z_max <= 118:
        raise UsageError("--permutations must be >= 0 and --z-max in 2..118")
    sources = collect_sources(data_dir, source)
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
        corr = element_correlation(read_representation_csv(origin) if frame is None else frame, name)
        corrs.append(corr)
        extra[name] = {"kind": kind, "model": "static" if kind == "static" else model_of(name)}
        if not (quick and kind == "untrained"):
            n_plotted += plot_representation(
                corr, origin, out_dir, z_max=z_max, html=not no_html, html_js=html_js, force=force
            )

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


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
