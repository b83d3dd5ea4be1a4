"""Step 6: the local chemical environment of an atom as CrabNet sees it (per-atom value vectors -> UMAP).

For each --atom and encoder layer l, the value vector V = x_l·W_in^T + b_in of that atom at its own
position inside every compound of the --split that contains it is projected to 2-D with UMAP
(n_neighbors 5, min_dist 0.3, 0.8 for layer 0, Euclidean, seeded), as in the paper (OQMD_Bandgap
test set). Points are coloured by the atom's fraction, the target, the model's prediction and the
atom's guessed mean oxidation state (from step 3, matched by formula; continuous, e.g. 8/3 for Fe
in Fe3O4; grey when unknown). The kNN accuracy of the summary votes on the rounded state.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv
        <data-dir>/models/<dataset>__<features>.pt        (trained here if missing, as step 4 does)
        <data-dir>/oxidation/<dataset>__<split>.json      (optional; guess_oxidation.py, step 3)
Writes  <data-dir>/umap/local/<dataset>/<features>__<split>__<atom>__layer<l>.csv   coordinates
        <data-dir>/umap/local/<dataset>/summary.csv       kNN accuracy of the rounded oxidation state,
                                                          trustworthiness (printed at the end)
        <data-dir>/figures/umap_local/<dataset>/<features>__<split>__<atom>.png / .html
        <data-dir>/umap/cache/<dataset>/…                 cached vectors and UMAP coordinates
Next    plot_global_edm_umap.py

--force recomputes the cached vectors and UMAP coordinates; the checkpoint is kept (it is trained
only when missing: the full --recipe, or a short 8-epoch run with --quick; retrain it with
get_crabnet_embeddings.py --force).

Vectors are collected in one inference pass per dataset and cached with the UMAP coordinates
under a key of the checkpoint content and the split, so re-plotting is instant. Atoms in fewer
than 2·n_neighbors compounds are skipped with a message. With --seed UMAP is reproducible and
single-threaded; --umap-parallel uses all cores but the layout changes between runs.

Examples:
    python plot_local_edm_umap.py --quick                         # CPU demo: 3 atoms, ~730 compounds
    python plot_local_edm_umap.py --dataset OQMD_Bandgap          # the paper's 19 atoms
    python plot_local_edm_umap.py --dataset mp_bulk_modulus --atom O --atom Fe --layers 0 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.cli import DEMO_DATASET, add_common, add_html_js, add_training, make_parser, run
from crabnet.data import SPLITS, load_dataset
from crabnet.elements import ATOMIC_NUMBER
from crabnet.report import refresh_report
from crabnet.represent import collect, open_store
from crabnet.train import Recipe, checkpoint_path, ensure_model, make_recipe
from crabnet.umap_plots import (PAPER_ATOMS, UmapParamError, UmapParams, hover_text, load_oxidation, local_metrics,
                                local_params, make_colouring, oxidation_path, oxidation_states, plot_html, plot_png,
                                project, run_datasets, update_summary, validate_umap, write_csv)
from crabnet.utils import resolve_device, seed_everything

DEFAULT_DATASET = "OQMD_Bandgap"
QUICK = {"dataset": DEMO_DATASET, "atoms": ("O", "Al", "Si"), "epochs": 8}
SUMMARY_KEYS = ["features", "split", "atom", "layer"]


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None, quick_help=f"CPU demo: {QUICK['dataset']}, atoms {' '.join(QUICK['atoms'])}, "
                                           f"an {QUICK['epochs']}-epoch model if none exists (explicit flags win)")
    p.add_argument("--dataset", action="append", default=None,
                   help=f"dataset folder under <data-dir>/benchmark_data/, repeatable (default {DEFAULT_DATASET}; "
                        f"--quick {QUICK['dataset']})")
    p.add_argument("--features", default="mat2vec", choices=["mat2vec", "onehot"],
                   help="element features of the model: mat2vec = CrabNet, onehot = HotCrab")
    p.add_argument("--split", default="test", choices=list(SPLITS), help="split whose compounds are projected")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="encoder layers (default all)")
    p.add_argument("--atom", action="append", default=None,
                   help="element symbol, repeatable (default the paper's 19: " + " ".join(PAPER_ATOMS) + ")")
    p.add_argument("--n-neighbors", type=int, default=5, help="UMAP n_neighbors")
    p.add_argument("--min-dist", type=float, default=0.3, help="UMAP min_dist for layers > 0")
    p.add_argument("--min-dist-layer0", type=float, default=0.8, help="UMAP min_dist for layer 0")
    p.add_argument("--umap-parallel", action="store_true",
                   help="run UMAP on all cores without a seed (faster, not reproducible)")
    p.add_argument("--batch-size", type=int, default=512, help="compounds per inference batch")
    add_html_js(p)
    add_training(p)
    return p.parse_args(argv)


def check_args(atoms: list[str], n_neighbors: int, min_dist: float, min_dist_layer0: float, seed: int,
               batch_size: int) -> None:
    """Reject bad flags before any work, with one message each."""
    unknown = [a for a in atoms if a not in ATOMIC_NUMBER]
    if unknown:
        raise ValueError(f"unknown element symbol(s) for --atom: {', '.join(unknown)}")
    validate_umap(UmapParams(n_neighbors, min_dist, "euclidean", seed))
    validate_umap(UmapParams(n_neighbors, min_dist_layer0, "euclidean", seed))
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")


def run_dataset(data_dir: Path, dataset: str, features: str, split: str, layers: list[int] | None, atoms: list[str],
                recipe: Recipe, device, seed: int, force: bool, n_neighbors: int, min_dist: float,
                min_dist_layer0: float, umap_seed: int | None, batch_size: int, html_js: str = "inline",
                precision: str = "auto") -> pd.DataFrame:
    """Everything for one dataset; returns its summary rows."""
    t0 = time.perf_counter()
    data = load_dataset(data_dir, dataset, splits=(split,))[split]
    model, scaler, _ = ensure_model(data_dir, dataset, features, recipe, device=device, seed=seed, precision=precision,
                                    written_by="plot_local_edm_umap.py")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else layers
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"--layers must be in 0..{n_layers - 1} for this model, got {bad}")

    counts = {a: int((data.elements == ATOMIC_NUMBER[a]).any(1).sum()) for a in atoms}
    keep = [a for a in atoms if counts[a] >= 2 * n_neighbors]
    for a in atoms:
        if a not in keep:
            print(f"  skipping {a}: in {counts[a]} {split} compound(s) of {dataset}, fewer than "
                  f"2·n_neighbors = {2 * n_neighbors}")
    store = open_store(data_dir, dataset, features, split, checkpoint_path(data_dir, dataset, features, recipe.name),
                       Path(data_dir) / "benchmark_data" / dataset / f"{split}.csv", force=force)
    collect(model, data, scaler, store.folder, local={l: [ATOMIC_NUMBER[a] for a in keep] for l in layers},
            batch_size=batch_size, device=device)
    comp = store.compounds
    print(f"  vectors of {len(keep)} atoms x {len(layers)} layers ready in {time.perf_counter() - t0:.1f} s "
          f"({store.folder})")

    ox_file = oxidation_path(data_dir, dataset, split)
    guesses = load_oxidation(ox_file)
    if guesses is None:
        print(f"  no oxidation guesses at {ox_file} (run guess_oxidation.py --dataset {dataset} --split {split}); "
              f"oxidation states shown grey")
    out_dir = Path(data_dir) / "umap" / "local" / dataset
    fig_dir = Path(data_dir) / "figures" / "umap_local" / dataset
    rows = []
    for atom in keep:
        z = ATOMIC_NUMBER[atom]
        idx, pos = comp.rows_with(z)
        frac = comp.fractions[idx, pos].astype(np.float64)
        target, pred = comp.target[idx], comp.prediction[idx]
        ox = oxidation_states(guesses, comp.formula[idx], atom)
        coords = {}
        for layer in layers:
            x = store.local(z, layer)
            params = local_params(layer, n_neighbors, min_dist, min_dist_layer0, umap_seed)
            t1 = time.perf_counter()
            xy, cached = project(x, params, store.umap_dir, f"local__{atom}__layer{layer}")
            t_umap = time.perf_counter() - t1
            coords[layer] = xy
            m = local_metrics(np.asarray(x), xy, ox, seed=seed)
            rows.append({"features": features, "split": split, "atom": atom, "layer": layer, **m,
                         "n_neighbors": params.n_neighbors, "min_dist": params.min_dist,
                         "umap_seconds": round(t_umap, 2) if not cached else np.nan})
            write_csv(pd.DataFrame({"row": comp.row[idx], "formula": comp.formula[idx], "fraction": frac,
                                    "target": target, "prediction": pred, "oxidation_state": ox,
                                    "umap_x": xy[:, 0], "umap_y": xy[:, 1]}),
                      out_dir / f"{features}__{split}__{atom}__layer{layer}.csv")
        lim = tuple(np.nanpercentile(np.r_[target, pred], [1, 99]))
        colourings = [make_colouring("fraction", f"fraction of {atom}", frac, cmap="viridis"),
                      make_colouring("target", "target", target, cmap="plasma", limits=lim),
                      make_colouring("prediction", "prediction", pred, cmap="plasma", limits=lim),
                      make_colouring("oxidation_state", f"mean oxidation state of {atom}"
                                     + ("; kNN accuracy uses it rounded" if np.isfinite(ox).any() else "; none known"),
                                     ox, style="diverging", cmap="RdYlBu_r")]
        title = f"{atom} in {len(idx)} {dataset} {split} compounds: value vectors ({features}), UMAP"
        stem = fig_dir / f"{features}__{split}__{atom}"
        plot_png(coords, colourings, stem.with_suffix(".png"), title=title, seed=seed)
        hover = hover_text(comp.formula[idx], {"fraction": frac, "target": target, "prediction": pred,
                                               f"oxidation state of {atom}": ox})
        plot_html(coords, colourings, hover, stem.with_suffix(".html"), title=title, js=html_js)
        print(f"  {atom}: {len(idx)} compounds, {int(np.isfinite(ox).sum())} with an oxidation guess -> "
              f"{stem}.png/.html")
    update_summary(out_dir / "summary.csv", rows, SUMMARY_KEYS)
    print(f"  coordinates -> {out_dir}/, summary -> {out_dir / 'summary.csv'} ({time.perf_counter() - t0:.1f} s)")
    return pd.DataFrame(rows)


def main(data_dir: Path, dataset: list[str] | None, device: str, seed: int, quick: bool, force: bool, features: str,
         split: str, layers: list[int] | None, atom: list[str] | None, n_neighbors: int, min_dist: float,
         min_dist_layer0: float, umap_parallel: bool, batch_size: int, html_js: str = "inline",
         recipe: str = "immi", precision: str = "auto") -> int:
    datasets = dataset or [QUICK["dataset"] if quick else DEFAULT_DATASET]
    atoms = list(dict.fromkeys(atom or (QUICK["atoms"] if quick else PAPER_ATOMS)))
    try:
        check_args(atoms, n_neighbors, min_dist, min_dist_layer0, seed, batch_size)
    except (ValueError, UmapParamError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recipe = make_recipe(recipe, epochs=QUICK["epochs"]) if quick else make_recipe(recipe)
    dev = resolve_device(device)
    seed_everything(seed)
    table = run_datasets(datasets, f"{split}, {features}", lambda ds: run_dataset(
        data_dir, ds, features, split, layers, atoms, recipe, dev, seed, force, n_neighbors, min_dist,
        min_dist_layer0, None if umap_parallel else seed, batch_size, html_js, precision))
    if table is None:
        return 2
    if len(table):
        cols = ["dataset", "atom", "layer", "n_compounds", "n_known_ox", "n_ox_classes", "majority_share",
                "knn_acc_repr", "knn_acc_umap", "knn_acc_shuffled", "knn_bacc_repr", "knn_bacc_umap",
                "knn_bacc_shuffled", "trustworthiness"]
        print("\nkNN (k=10) accuracy (acc) and balanced accuracy (bacc) of the rounded oxidation state in the "
              "value vectors (repr) and the 2-D UMAP; shuffled = labels permuted:")
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    refresh_report(data_dir)
    print("next: python plot_global_edm_umap.py" + (" --quick" if quick else " " + " ".join(
        f"--dataset {d}" for d in datasets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
