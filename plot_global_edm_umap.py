"""Step 7: the chemical space of whole compounds as CrabNet sees it (pooled layer inputs -> UMAP).

For each layer input x_l (l = n_layers is the encoder output) every compound of the --split
becomes one vector: [mean, range, variance, max, min] of x_l over its *real* elements (5·d_model,
2560 for the published model; padding never enters). UMAP (cosine, n_neighbors 15, seeded,
min_dist by dataset size as in the paper: 0.2, 0.4 above 4,000 compounds, 0.5 above 100,000)
projects it to 2-D. Points are coloured by the number of elements, the
target, the model's prediction, the error (prediction − target) and the fraction-weighted mean
absolute deviation of Pauling electronegativity (Oliynyk table); marker size and opacity follow
the dataset size.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv
        <data-dir>/models/<dataset>__<features>.pt        (trained here if missing, as step 4 does)
Writes  <data-dir>/umap/global/<dataset>/<features>__<split>__layer<l>.csv   coordinates and colours
        <data-dir>/umap/global/<dataset>/summary.csv      kNN R² of the target per layer,
                                                          trustworthiness (printed at the end)
        <data-dir>/figures/umap_global/<dataset>/<features>__<split>.png / .html
        <data-dir>/umap/cache/<dataset>/…                 cached vectors and UMAP coordinates
Next    get_dataset_stats.py

--force recomputes the cached vectors and UMAP coordinates; the checkpoint is kept (it is trained
only when missing: the full --recipe, or a short 8-epoch run with --quick; retrain it with
get_crabnet_embeddings.py --force).

Vectors are collected in one inference pass per dataset and cached with the UMAP coordinates
under a key of the checkpoint content and the split, so re-plotting is instant. With --seed UMAP
is reproducible and single-threaded; --umap-parallel uses all cores but the layout changes.

Examples:
    python plot_global_edm_umap.py --quick                              # CPU demo, ~730 compounds
    python plot_global_edm_umap.py --dataset OQMD_Bandgap               # the paper (51k compounds)
    python plot_global_edm_umap.py --dataset mp_bulk_modulus --dataset aflow__ael_bulk_modulus_vrh
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.cli import DEMO_DATASET, add_common, add_html_js, add_training, make_parser, run
from crabnet.data import SPLITS, load_dataset
from crabnet.report import refresh_report
from crabnet.represent import collect, open_store
from crabnet.train import Recipe, checkpoint_path, ensure_model, make_recipe
from crabnet.umap_plots import (GLOBAL_METRIC, UmapParamError, UmapParams, global_metrics, global_min_dist,
                                hover_text, make_colouring, pauling_en_mad, plot_html, plot_png, project,
                                update_summary, run_datasets, validate_umap, write_csv)
from crabnet.utils import resolve_device, seed_everything

DEFAULT_DATASET = "OQMD_Bandgap"
QUICK = {"dataset": DEMO_DATASET, "epochs": 8}
SUMMARY_KEYS = ["features", "split", "layer"]
EN_LABEL = "fraction-weighted mean absolute\ndeviation of Pauling electronegativity"


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None, quick_help=f"CPU demo: {QUICK['dataset']}, an {QUICK['epochs']}-epoch model if "
                                           "none exists (explicit flags win)")
    p.add_argument("--dataset", action="append", default=None,
                   help=f"dataset folder under <data-dir>/benchmark_data/, repeatable (default {DEFAULT_DATASET}; "
                        f"--quick {QUICK['dataset']})")
    p.add_argument("--features", default="mat2vec", choices=["mat2vec", "onehot"],
                   help="element features of the model: mat2vec = CrabNet, onehot = HotCrab")
    p.add_argument("--split", default="test", choices=list(SPLITS), help="split whose compounds are projected")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer inputs, 0..n_layers where n_layers = the encoder output (default all)")
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP n_neighbors")
    p.add_argument("--min-dist", type=float, default=None,
                   help="UMAP min_dist (default by dataset size, as in the paper: 0.2, 0.4 above 4,000 compounds, "
                        "0.5 above 100,000)")
    p.add_argument("--umap-parallel", action="store_true",
                   help="run UMAP on all cores without a seed (faster, not reproducible)")
    p.add_argument("--batch-size", type=int, default=512, help="compounds per inference batch")
    add_html_js(p)
    add_training(p)
    return p.parse_args(argv)


def run_dataset(data_dir: Path, dataset: str, features: str, split: str, layers: list[int] | None, recipe: Recipe,
                device, seed: int, force: bool, n_neighbors: int, min_dist: float | None, umap_seed: int | None,
                batch_size: int, html_js: str = "inline",
                precision: str = "auto") -> pd.DataFrame:
    """Everything for one dataset; returns its summary rows."""
    t0 = time.perf_counter()
    data = load_dataset(data_dir, dataset, splits=(split,))[split]
    model, scaler, _ = ensure_model(data_dir, dataset, features, recipe, device=device, seed=seed, precision=precision,
                                    written_by="plot_global_edm_umap.py")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers + 1)) if layers is None else layers
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ValueError(f"--layers must be in 0..{n_layers} for this model ({n_layers} = encoder output), got {bad}")
    n = len(data)
    params = UmapParams(n_neighbors, global_min_dist(n) if min_dist is None else min_dist, GLOBAL_METRIC, umap_seed)
    validate_umap(params, n)

    store = open_store(data_dir, dataset, features, split, checkpoint_path(data_dir, dataset, features, recipe.name),
                       Path(data_dir) / "benchmark_data" / dataset / f"{split}.csv", force=force)
    collect(model, data, scaler, store.folder, global_layers=layers, batch_size=batch_size, device=device)
    comp = store.compounds
    print(f"  pooled vectors of {n} compounds x {len(layers)} layer inputs ready in "
          f"{time.perf_counter() - t0:.1f} s ({store.folder})")

    n_el = comp.n_elements.astype(np.float64)
    error = comp.prediction - comp.target
    en = pauling_en_mad(comp.elements, comp.fractions)
    out_dir = Path(data_dir) / "umap" / "global" / dataset
    rows, coords = [], {}
    for layer in layers:
        x = np.asarray(store.global_(layer))
        t1 = time.perf_counter()
        xy, cached = project(x, params, store.umap_dir, f"global__layer{layer}")
        t_umap = time.perf_counter() - t1
        coords[layer] = xy
        m = global_metrics(x, xy, comp.target, seed=seed)
        rows.append({"features": features, "split": split, "layer": layer,
                     "layer_is": "encoder output" if layer == n_layers else "layer input", **m,
                     "n_neighbors": params.n_neighbors, "min_dist": params.min_dist, "metric": params.metric,
                     "umap_seconds": round(t_umap, 2) if not cached else np.nan})
        write_csv(pd.DataFrame({"row": comp.row, "formula": comp.formula, "n_elements": comp.n_elements,
                                "target": comp.target, "prediction": comp.prediction, "error": error,
                                "en_pauling_mad": en, "umap_x": xy[:, 0], "umap_y": xy[:, 1]}),
                  out_dir / f"{features}__{split}__layer{layer}.csv")
        print(f"  layer {layer}: UMAP {'(cached)' if cached else f'{t_umap:.1f} s'}, kNN R² {m['knn_r2_repr']:.3f}")
        del x

    lim = tuple(np.nanpercentile(np.r_[comp.target, comp.prediction], [1, 99]))
    colourings = [make_colouring("n_elements", "number of elements", n_el, style="discrete", cmap="viridis",
                                 title="number of elements"),
                  make_colouring("target", "target", comp.target, cmap="plasma", limits=lim),
                  make_colouring("prediction", "prediction", comp.prediction, cmap="plasma", limits=lim),
                  make_colouring("error", "prediction − target", error, style="diverging"),
                  make_colouring("EN_deviation", EN_LABEL, en, cmap="cividis",
                                 title="Pauling electronegativity deviation")]

    def row_label(layer: int) -> str:
        return f"encoder output (layer {layer})" if layer == n_layers else f"layer {layer} input"

    title = f"{dataset} {split}: {n} compounds, pooled layer inputs ({features}), UMAP cosine"
    stem = Path(data_dir) / "figures" / "umap_global" / dataset / f"{features}__{split}"
    plot_png(coords, colourings, stem.with_suffix(".png"), title=title, row_label=row_label, seed=seed)
    hover = hover_text(comp.formula, {"elements": n_el, "target": comp.target, "prediction": comp.prediction,
                                      "error": error, "Pauling EN deviation": en})
    plot_html(coords, colourings, hover, stem.with_suffix(".html"), title=title, row_label=row_label, js=html_js)
    update_summary(out_dir / "summary.csv", rows, SUMMARY_KEYS)
    print(f"  figures -> {stem}.png/.html\n  coordinates -> {out_dir}/, summary -> {out_dir / 'summary.csv'} "
          f"({time.perf_counter() - t0:.1f} s)")
    return pd.DataFrame(rows)


def main(data_dir: Path, dataset: list[str] | None, device: str, seed: int, quick: bool, force: bool, features: str,
         split: str, layers: list[int] | None, n_neighbors: int, min_dist: float | None, umap_parallel: bool,
         batch_size: int, html_js: str = "inline",
         recipe: str = "immi", precision: str = "auto") -> int:
    datasets = dataset or [QUICK["dataset"] if quick else DEFAULT_DATASET]
    try:
        validate_umap(UmapParams(n_neighbors, 0.2 if min_dist is None else min_dist, GLOBAL_METRIC, seed))
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    except (ValueError, UmapParamError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recipe = make_recipe(recipe, epochs=QUICK["epochs"]) if quick else make_recipe(recipe)
    dev = resolve_device(device)
    seed_everything(seed)
    table = run_datasets(datasets, f"{split}, {features}", lambda ds: run_dataset(
        data_dir, ds, features, split, layers, recipe, dev, seed, force, n_neighbors, min_dist,
        None if umap_parallel else seed, batch_size, html_js, precision))
    if table is None:
        return 2
    cols = ["dataset", "layer", "layer_is", "n_compounds", "knn_r2_repr", "knn_r2_umap", "knn_r2_shuffled",
            "trustworthiness"]
    print("\nkNN (k=10) R² of the target from the pooled vectors (cosine) and from the 2-D UMAP; "
          "shuffled = targets permuted:")
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    refresh_report(data_dir)
    print("next: python get_dataset_stats.py" + (" --quick" if quick else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
