"""Steps 6 and 7: the chain from a trained model to UMAP maps of its element-derived representations.

Both steps run the same chain for each dataset: load the split and the model of the recipe
(:func:`prepare`: trained if missing), collect vectors in one inference pass (cached by
``crabnet.maps.vectors``), project each group of vectors (``crabnet.maps.projection.project``, cached),
score the map (kNN metrics), write its coordinates, draw the layer × colouring grid
(:func:`draw`), and merge the rows into ``summary.csv``. What differs is the vectors and colours:

- :func:`local_maps` (step 6): the value vector of one atom at its own position in every compound
  containing it, per layer; coloured by fraction, target, prediction, mean oxidation state.
- :func:`global_maps` (step 7): each layer input pooled over the compound's real elements;
  coloured by number of elements, target, prediction, error, electronegativity spread.

Each step runs as jobs of ``crabnet.jobs.engine`` (in this process, on an embedded Dask LocalCluster or on
a cluster, as ``--scheduler`` says), in phases whose jobs are independent:

1. one job per dataset (:func:`local_prepare_job`, :func:`global_prepare_job`): the split, the model
   (trained inside the job when missing) and the one inference pass that caches the vectors;
2. the maps: step 6 one job per dataset and atom (:func:`local_atom_job`: every layer's UMAP, metrics,
   coordinates and the atom's figure), step 7 one job per dataset and layer input
   (:func:`global_layer_job`: UMAP, metrics, coordinates);
3. step 7 only: one job per dataset drawing its layer grid from the cached coordinates
   (:func:`global_draw_job`).

The submitting process (:func:`local_maps`, :func:`global_maps`) merges each dataset's rows into its
``summary.csv`` and returns them for the table the script prints. Run as ``python plot_local_edm_umap.py``
(step 6) or ``python plot_global_edm_umap.py`` (step 7).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.data import CompositionData, load_dataset
from crabnet.elements import ATOMIC_NUMBER
from crabnet.errors import UsageError
from crabnet.jobs.engine import Engine, Job, run_jobs
from crabnet.layout import Layout
from crabnet.maps.figures import Colouring, hover_text, make_colouring, pauling_en_mad, plot_html, plot_png
from crabnet.maps.projection import (
    GLOBAL_METRIC,
    UmapParams,
    global_metrics,
    global_min_dist,
    local_metrics,
    local_params,
    project,
    validate_umap,
)
from crabnet.maps.vectors import RepresentationStore, collect, open_store
from crabnet.oxidation import load_oxidation, oxidation_path, oxidation_states
from crabnet.progress import say
from crabnet.training.checkpoint import ensure_model
from crabnet.training.model import CrabNet
from crabnet.training.recipe import Recipe, Scaler
from crabnet.utils import atomic_path, seed_everything

LOCAL_KEYS = ["features", "split", "atom", "layer"]
GLOBAL_KEYS = ["features", "split", "layer"]
EN_LABEL = "fraction-weighted mean absolute\ndeviation of Pauling electronegativity"


@dataclass
class MapSettings:
    """What steps 6 and 7 share: where, which model, and how to run (small and picklable: jobs take it)."""

    data_dir: Path
    features: str
    split: str
    recipe: Recipe
    device: str  # "cpu", "cuda" or "cuda:N", already checked by map_settings
    seed: int
    force: bool = False
    batch_size: int = 512
    umap_seed: int | None = 0  # None: UMAP on all cores, not reproducible
    html_js: str = "inline"
    precision: str = "auto"


def add_map_flags(parser, *, default_dataset: str, quick_dataset: str) -> None:
    """The flags steps 6 and 7 share (after ``crabnet.jobs.cli.add_common`` without ``--dataset``)."""
    from crabnet.jobs.cli import add_html_js, add_training
    from crabnet.layout import SPLITS

    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help=f"dataset folder under <data-dir>/benchmark_data/, repeatable (default {default_dataset}; "
        f"--quick {quick_dataset})",
    )
    parser.add_argument(
        "--features",
        default="mat2vec",
        choices=["mat2vec", "onehot"],
        help="element features of the model: mat2vec = CrabNet, onehot = HotCrab",
    )
    parser.add_argument("--split", default="test", choices=list(SPLITS), help="split whose compounds are projected")
    parser.add_argument(
        "--umap-parallel", action="store_true", help="run UMAP on all cores without a seed (faster, not reproducible)"
    )
    parser.add_argument("--batch-size", type=int, default=512, help="compounds per inference batch")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="train at most this many epochs where a model is missing (default: "
        "the full recipe; a shorter run reuses any checkpoint of the dataset, e.g. one of step 4 --epochs)",
    )
    add_html_js(parser)
    add_training(parser)


def map_settings(
    data_dir: Path,
    features: str,
    split: str,
    recipe: str,
    quick_epochs: int | None,
    device: str,
    seed: int,
    force: bool,
    batch_size: int,
    umap_parallel: bool,
    html_js: str,
    precision: str,
) -> MapSettings:
    """Settings from the shared flags; ``quick_epochs``: the short recipe of ``--quick``."""
    from crabnet.training.recipe import make_recipe
    from crabnet.utils import resolve_device

    return MapSettings(
        data_dir,
        features,
        split,
        make_recipe(recipe, **({"epochs": quick_epochs} if quick_epochs else {})),
        str(resolve_device(device)),
        seed,
        force,
        batch_size,
        None if umap_parallel else seed,
        html_js,
        precision,
    )


@dataclass
class Prepared:
    """A dataset's split, its model and the cache of its representations."""

    data: CompositionData
    model: CrabNet
    scaler: Scaler
    store: RepresentationStore
    t0: float


def prepare(s: MapSettings, dataset: str, written_by: str) -> Prepared:
    """Load the split, load (or train) the model of the recipe and open the representation cache."""
    t0 = time.perf_counter()
    layout = Layout(s.data_dir)
    data = load_dataset(s.data_dir, dataset, splits=(s.split,))[s.split]
    model, scaler, _ = ensure_model(
        s.data_dir,
        dataset,
        s.features,
        s.recipe,
        device=s.device,
        seed=s.seed,
        precision=s.precision,
        written_by=written_by,
    )
    store = open_store(
        s.data_dir,
        dataset,
        s.features,
        s.split,
        layout.checkpoint(dataset, s.features, s.recipe.name),
        layout.split_csv(dataset, s.split),
        force=s.force,
    )
    return Prepared(data, model, scaler, store, t0)


def check_layers(layers: list[int] | None, n: int, what: str) -> list[int]:
    """``layers`` (default all of 0..n-1), each checked to be in range."""
    layers = list(range(n)) if layers is None else layers
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise UsageError(f"--layers must be in 0..{n - 1} for this model ({what}), got {bad}")
    return layers


def draw(
    coords: dict[int, np.ndarray],
    colourings: list[Colouring],
    hover: list[str],
    stem: Path,
    title: str,
    s: MapSettings,
    row_label: Callable[[int], str] | None = None,
) -> None:
    """The grid of layers × colourings as ``<stem>.png`` and an offline ``<stem>.html``."""
    extra = {} if row_label is None else {"row_label": row_label}
    plot_png(coords, colourings, stem.with_suffix(".png"), title=title, seed=s.seed, **extra)
    plot_html(coords, colourings, hover, stem.with_suffix(".html"), title=title, js=s.html_js, **extra)


def write_csv(df: pd.DataFrame, path: Path | str) -> Path:
    """Write a CSV atomically (no index; floats to 7 significant digits, the precision of float32)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.7g")
    return path


def update_summary(path: Path | str, rows: list[dict], keys: list[str]) -> pd.DataFrame:
    """Merge ``rows`` into the summary CSV at ``path``, replacing rows with the same ``keys``."""
    path = Path(path)
    if not rows:
        return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=keys)
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        if set(keys) <= set(old.columns) and len(new):
            new_keys = set(map(tuple, new[keys].astype(str).to_numpy()))
            old = old[[tuple(r) not in new_keys for r in old[keys].astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    if len(new):
        new = new.sort_values(keys, kind="stable").reset_index(drop=True)
    write_csv(new, path)
    return new


@contextlib.contextmanager
def dataset_errors(dataset: str) -> Iterator[None]:
    """A bad input of a dataset's job (a :class:`~crabnet.utils.UsageError` or a missing file) becomes one
    ``UsageError`` naming the dataset; with a single job the script prints it as one ``error:`` line."""
    try:
        yield
    except (UsageError, FileNotFoundError) as err:
        raise UsageError(f"{dataset}: {err}") from None


def merge_summaries(
    s: MapSettings, kind: str, datasets: list[str], jobs: list[Job], rows: list, keys: list[str], t0: float
) -> pd.DataFrame:
    """Merge the rows the map jobs returned into each dataset's ``summary.csv``; all rows, tagged with ``dataset``.

    Args:
        s: the settings.
        kind: ``local`` or ``global``.
        datasets: the datasets, in order.
        jobs: the map jobs (``kwargs["dataset"]`` names each one's dataset).
        rows: each job's result: one row (dict) or a list of rows.
        keys: the summary's key columns.
        t0: when the step started (``time.perf_counter``), for the elapsed time printed.
    """
    tables = []
    for ds in datasets:
        mine = [
            r
            for job, res in zip(jobs, rows)
            if job.kwargs["dataset"] == ds
            for r in (res if isinstance(res, list) else [res])
        ]
        out_dir = Layout(s.data_dir).umap(kind, ds)
        update_summary(out_dir / "summary.csv", mine, keys)
        say(f"{ds}: coordinates -> {out_dir}/, summary -> {out_dir / 'summary.csv'} ({time.perf_counter() - t0:.1f} s)")
        tables.append(pd.DataFrame(mine).assign(dataset=ds))
    return pd.concat(tables, ignore_index=True)


def _projected(x: np.ndarray, params: UmapParams, store: RepresentationStore, name: str) -> tuple[np.ndarray, float]:
    """2-D coordinates and the UMAP seconds (NaN when they came from the cache)."""
    t1 = time.perf_counter()
    xy, cached = project(x, params, store.umap_dir, name)
    return xy, (np.nan if cached else round(time.perf_counter() - t1, 2))


# --------------------------------------------------------------------------------------------
# step 6


def check_local_args(
    atoms: list[str], n_neighbors: int, min_dist: float, min_dist_layer0: float, seed: int, batch_size: int
) -> None:
    """Reject bad flags of step 6 before any work, with one message each."""
    unknown = [a for a in atoms if a not in ATOMIC_NUMBER]
    if unknown:
        raise UsageError(f"unknown element symbol(s) for --atom: {', '.join(unknown)}")
    validate_umap(UmapParams(n_neighbors, min_dist, "euclidean", seed))
    validate_umap(UmapParams(n_neighbors, min_dist_layer0, "euclidean", seed))
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")


def _prepare(s: MapSettings, datasets: list[str], fn, engine: Engine | None, **kwargs) -> list[dict] | None:
    """The first job of every dataset (``fn``: model, trained if missing, and vectors); None with ``--plan``."""
    return run_jobs(
        [Job(ds, fn, dict(s=s, dataset=ds, **kwargs), gpu=s.device.startswith("cuda")) for ds in datasets],
        engine,
        what="datasets",
    )


def local_maps(
    s: MapSettings,
    datasets: list[str],
    layers: list[int] | None,
    atoms: list[str],
    n_neighbors: int,
    min_dist: float,
    min_dist_layer0: float,
    engine: Engine | None = None,
) -> pd.DataFrame | None:
    """Step 6: per-atom value-vector maps of each dataset, as jobs; returns the summary rows of all datasets.

    Jobs: one per dataset (:func:`local_prepare_job`: model, trained if missing, and vectors), then one per
    dataset and atom (:func:`local_atom_job`). Each dataset's rows are merged into its ``summary.csv`` here.
    With ``engine.plan`` only the dataset jobs are listed (the atoms kept depend on the split) and None is
    returned.
    """
    t0, datasets = time.perf_counter(), list(dict.fromkeys(datasets))
    prepared = _prepare(s, datasets, local_prepare_job, engine, layers=layers, atoms=atoms, n_neighbors=n_neighbors)
    if prepared is None:  # --plan
        return None
    jobs = [
        Job(
            f"{p['dataset']} {atom}",
            local_atom_job,
            dict(
                s=s,
                dataset=p["dataset"],
                store=p["store"],
                atom=atom,
                layers=p["layers"],
                n_neighbors=n_neighbors,
                min_dist=min_dist,
                min_dist_layer0=min_dist_layer0,
            ),
        )
        for p in prepared
        for atom in p["atoms"]
    ]
    rows = run_jobs(jobs, engine, what="atom maps")
    return merge_summaries(s, "local", datasets, jobs, rows, LOCAL_KEYS, t0)


def local_prepare_job(
    s: MapSettings, dataset: str, layers: list[int] | None, atoms: list[str], n_neighbors: int
) -> dict:
    """Step 6, the first job of a dataset: its model (trained here if missing) and the value vectors of its atoms.

    Atoms in fewer than ``2 * n_neighbors`` compounds of the split are skipped with a message.

    Returns:
        ``dataset``, ``layers`` (checked against the model), ``atoms`` (those kept) and ``store`` (the
        vector cache folder, as text) for :func:`local_atom_job`.

    Raises:
        UsageError: naming the dataset (bad ``layers``, missing split, …).
    """
    say(f"{dataset} ({s.split}, {s.features}):")
    seed_everything(s.seed)
    with dataset_errors(dataset):
        p = prepare(s, dataset, "plot_local_edm_umap.py")
        layers = check_layers(layers, p.model.cfg.n_layers, "encoder layers")
        counts = {a: int((p.data.elements == ATOMIC_NUMBER[a]).any(1).sum()) for a in atoms}
        keep = [a for a in atoms if counts[a] >= 2 * n_neighbors]
        for a in atoms:
            if a not in keep:
                say(
                    f"  skipping {a}: in {counts[a]} {s.split} compound(s) of {dataset}, fewer than "
                    f"2·n_neighbors = {2 * n_neighbors}"
                )
        collect(
            p.model,
            p.data,
            p.scaler,
            p.store.folder,
            local={l: [ATOMIC_NUMBER[a] for a in keep] for l in layers},
            batch_size=s.batch_size,
            device=s.device,
        )
    say(
        f"  vectors of {len(keep)} atoms x {len(layers)} layers ready in {time.perf_counter() - p.t0:.1f} s "
        f"({p.store.folder})"
    )
    ox_file = oxidation_path(s.data_dir, dataset, s.split)
    if load_oxidation(ox_file) is None:
        say(
            f"  no oxidation guesses at {ox_file} (run guess_oxidation.py --dataset {dataset} --split {s.split}); "
            f"oxidation states shown grey"
        )
    return {"dataset": dataset, "layers": layers, "atoms": keep, "store": str(p.store.folder)}


def local_atom_job(
    s: MapSettings,
    dataset: str,
    store: str,
    atom: str,
    layers: list[int],
    n_neighbors: int,
    min_dist: float,
    min_dist_layer0: float,
) -> list[dict]:
    """Step 6, one job per dataset and atom: the UMAP of its value vectors at each layer (cached), the kNN
    metrics, the coordinates CSV of each layer and the atom's figure (layers x colourings, PNG and HTML).

    Args:
        s: the settings.
        dataset: the dataset.
        store: the vector cache folder made by :func:`local_prepare_job`.
        atom: element symbol.
        layers: encoder layers.
        n_neighbors, min_dist, min_dist_layer0: UMAP settings (:func:`crabnet.maps.projection.local_params`).

    Returns:
        One summary row per layer.
    """
    seed_everything(s.seed)
    with dataset_errors(dataset):
        p_store = RepresentationStore(store)
        comp = p_store.compounds
        guesses = load_oxidation(oxidation_path(s.data_dir, dataset, s.split))
    layout = Layout(s.data_dir)
    out_dir, fig_dir = layout.umap("local", dataset), layout.umap_figures("local", dataset)
    rows = []
    z = ATOMIC_NUMBER[atom]
    idx, pos = comp.rows_with(z)
    frac = comp.fractions[idx, pos].astype(np.float64)
    target, pred = comp.target[idx], comp.prediction[idx]
    ox = oxidation_states(guesses, comp.formula[idx], atom)
    table = pd.DataFrame({"row": comp.row[idx], "formula": comp.formula[idx], "fraction": frac, "target": target,
                          "prediction": pred, "oxidation_state": ox})  # fmt: skip
    coords = {}
    for layer in layers:
        x = p_store.local(z, layer)
        params = local_params(layer, n_neighbors, min_dist, min_dist_layer0, s.umap_seed)
        coords[layer], seconds = _projected(x, params, p_store, f"local__{atom}__layer{layer}")
        m = local_metrics(np.asarray(x), coords[layer], ox, seed=s.seed)
        umap = {"n_neighbors": params.n_neighbors, "min_dist": params.min_dist, "umap_seconds": seconds}
        rows.append({"features": s.features, "split": s.split, "atom": atom, "layer": layer, **m, **umap})
        xy = {"umap_x": coords[layer][:, 0], "umap_y": coords[layer][:, 1]}
        write_csv(table.assign(**xy), out_dir / f"{s.features}__{s.split}__{atom}__layer{layer}.csv")
    stem = fig_dir / f"{s.features}__{s.split}__{atom}"
    _draw_local_atom(coords, comp.formula[idx], atom, frac, target, pred, ox, stem, dataset, s)
    say(
        f"  {dataset} {atom}: {len(idx)} compounds, {int(np.isfinite(ox).sum())} with an oxidation guess -> "
        f"{stem}.png/.html"
    )
    return rows


def _draw_local_atom(
    coords: dict[int, np.ndarray],
    formula: np.ndarray,
    atom: str,
    frac: np.ndarray,
    target: np.ndarray,
    pred: np.ndarray,
    ox: np.ndarray,
    stem: Path,
    dataset: str,
    s: MapSettings,
) -> None:
    """The figure of one atom: its layers x four colourings (fraction, target, prediction, oxidation state)."""
    lim = tuple(np.nanpercentile(np.r_[target, pred], [1, 99]))
    colourings = [
        make_colouring("fraction", f"fraction of {atom}", frac, cmap="viridis"),
        make_colouring("target", "target", target, cmap="plasma", limits=lim),
        make_colouring("prediction", "prediction", pred, cmap="plasma", limits=lim),
        make_colouring(
            "oxidation_state",
            f"mean oxidation state of {atom}"
            + ("; kNN accuracy uses it rounded" if np.isfinite(ox).any() else "; none known"),
            ox,
            style="diverging",
            cmap="RdYlBu_r",
        ),
    ]
    hover = hover_text(
        formula, {"fraction": frac, "target": target, "prediction": pred, f"oxidation state of {atom}": ox}
    )
    title = f"{atom} in {len(formula)} {dataset} {s.split} compounds: value vectors ({s.features}), UMAP"
    draw(coords, colourings, hover, stem, title, s)


# --------------------------------------------------------------------------------------------
# step 7


def check_global_args(n_neighbors: int, min_dist: float | None, seed: int, batch_size: int) -> None:
    """Reject bad flags of step 7 before any work, with one message each."""
    validate_umap(UmapParams(n_neighbors, 0.2 if min_dist is None else min_dist, GLOBAL_METRIC, seed))
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")


def global_maps(
    s: MapSettings,
    datasets: list[str],
    layers: list[int] | None,
    n_neighbors: int,
    min_dist: float | None,
    engine: Engine | None = None,
) -> pd.DataFrame | None:
    """Step 7: pooled compound-vector maps of each dataset, as jobs; returns the summary rows of all datasets.

    Jobs: one per dataset (:func:`global_prepare_job`: model, trained if missing, and vectors), one per
    dataset and layer input (:func:`global_layer_job`), then one per dataset drawing its figure
    (:func:`global_draw_job`). Each dataset's rows are merged into its ``summary.csv`` here. With
    ``engine.plan`` only the dataset jobs are listed (the layers depend on the model) and None is returned.
    """
    t0, datasets = time.perf_counter(), list(dict.fromkeys(datasets))
    prepared = _prepare(
        s, datasets, global_prepare_job, engine, layers=layers, n_neighbors=n_neighbors, min_dist=min_dist
    )
    if prepared is None:  # --plan
        return None
    shared = ("dataset", "store", "n_layers", "params")
    jobs = [
        Job(f"{p['dataset']} layer {layer}", global_layer_job, dict(s=s, layer=layer, **{k: p[k] for k in shared}))
        for p in prepared
        for layer in p["layers"]
    ]
    table = merge_summaries(s, "global", datasets, jobs, run_jobs(jobs, engine, what="layer maps"), GLOBAL_KEYS, t0)
    run_jobs(
        [
            Job(p["dataset"], global_draw_job, dict(s=s, layers=p["layers"], **{k: p[k] for k in shared}))
            for p in prepared
        ],
        engine,
        what="figures",
    )
    return table


def global_prepare_job(
    s: MapSettings, dataset: str, layers: list[int] | None, n_neighbors: int, min_dist: float | None
) -> dict:
    """Step 7, the first job of a dataset: its model (trained here if missing) and the pooled vectors.

    Returns:
        ``dataset``, ``layers`` (checked against the model), ``n_layers``, ``params`` (the UMAP settings,
        min_dist by dataset size unless given) and ``store`` (the vector cache folder, as text).

    Raises:
        UsageError: naming the dataset (bad ``layers``, UMAP settings that do not fit the split, …).
    """
    say(f"{dataset} ({s.split}, {s.features}):")
    seed_everything(s.seed)
    with dataset_errors(dataset):
        p = prepare(s, dataset, "plot_global_edm_umap.py")
        n_layers = p.model.cfg.n_layers
        layers = check_layers(layers, n_layers + 1, f"{n_layers} = the encoder output")
        n = len(p.data)
        params = validate_umap(
            UmapParams(n_neighbors, global_min_dist(n) if min_dist is None else min_dist, GLOBAL_METRIC, s.umap_seed), n
        )
        collect(
            p.model, p.data, p.scaler, p.store.folder, global_layers=layers, batch_size=s.batch_size, device=s.device
        )
    say(
        f"  pooled vectors of {n} compounds x {len(layers)} layer inputs ready in "
        f"{time.perf_counter() - p.t0:.1f} s ({p.store.folder})"
    )
    return {"dataset": dataset, "layers": layers, "n_layers": n_layers, "params": params, "store": str(p.store.folder)}


def global_layer_job(s: MapSettings, dataset: str, store: str, layer: int, n_layers: int, params: UmapParams) -> dict:
    """Step 7, one job per dataset and layer input: UMAP of the pooled vectors (cached), the kNN metrics and
    the coordinates CSV (with the colours of the figure).

    Returns:
        The layer's summary row.
    """
    seed_everything(s.seed)
    with dataset_errors(dataset):
        p_store = RepresentationStore(store)
        comp = p_store.compounds
        x = np.asarray(p_store.global_(layer))
    coords, seconds = _projected(x, params, p_store, f"global__layer{layer}")
    m = global_metrics(x, coords, comp.target, seed=s.seed)
    del x
    row = {
        "features": s.features,
        "split": s.split,
        "layer": layer,
        "layer_is": "encoder output" if layer == n_layers else "layer input",
        **m,
        "n_neighbors": params.n_neighbors,
        "min_dist": params.min_dist,
        "metric": params.metric,
        "umap_seconds": seconds,
    }
    write_csv(
        pd.DataFrame(
            {
                "row": comp.row,
                "formula": comp.formula,
                "n_elements": comp.n_elements,
                "target": comp.target,
                "prediction": comp.prediction,
                "error": comp.prediction - comp.target,
                "en_pauling_mad": pauling_en_mad(comp.elements, comp.fractions),
                "umap_x": coords[:, 0],
                "umap_y": coords[:, 1],
            }
        ),
        Layout(s.data_dir).umap("global", dataset) / f"{s.features}__{s.split}__layer{layer}.csv",
    )
    say(
        f"  {dataset} layer {layer}: UMAP {'(cached)' if np.isnan(seconds) else f'{seconds:.1f} s'}, "
        f"kNN R² {m['knn_r2_repr']:.3f}"
    )
    return row


def global_draw_job(
    s: MapSettings, dataset: str, store: str, layers: list[int], n_layers: int, params: UmapParams
) -> str:
    """Step 7, the last job of a dataset: the grid of layer inputs x colourings (PNG and HTML), from the
    coordinates the layer jobs cached (read back exactly; no vector is loaded).

    Returns:
        The figure's path without suffix, as text.
    """
    with dataset_errors(dataset):
        p_store = RepresentationStore(store)
        comp = p_store.compounds
        coords = {
            layer: project(p_store.global_(layer), params, p_store.umap_dir, f"global__layer{layer}")[0]
            for layer in layers
        }  # memory-mapped vectors: only their length is read for the cache's name
    n_el = comp.n_elements.astype(np.float64)
    error = comp.prediction - comp.target
    en = pauling_en_mad(comp.elements, comp.fractions)
    lim = tuple(np.nanpercentile(np.r_[comp.target, comp.prediction], [1, 99]))
    colourings = [
        make_colouring(
            "n_elements", "number of elements", n_el, style="discrete", cmap="viridis", title="number of elements"
        ),
        make_colouring("target", "target", comp.target, cmap="plasma", limits=lim),
        make_colouring("prediction", "prediction", comp.prediction, cmap="plasma", limits=lim),
        make_colouring("error", "prediction − target", error, style="diverging"),
        make_colouring("EN_deviation", EN_LABEL, en, cmap="cividis", title="Pauling electronegativity deviation"),
    ]
    stem = Layout(s.data_dir).umap_figures("global", dataset) / f"{s.features}__{s.split}"
    hover = hover_text(
        comp.formula,
        {
            "elements": n_el,
            "target": comp.target,
            "prediction": comp.prediction,
            "error": error,
            "Pauling EN deviation": en,
        },
    )
    draw(
        coords,
        colourings,
        hover,
        stem,
        f"{dataset} {s.split}: {len(comp)} compounds, pooled layer inputs ({s.features}), UMAP cosine",
        s,
        row_label=lambda l: f"encoder output (layer {l})" if l == n_layers else f"layer {l} input",
    )
    say(f"  {dataset}: figures -> {stem}.png/.html")
    return str(stem)


# the columns and heading of the summary table each step prints
