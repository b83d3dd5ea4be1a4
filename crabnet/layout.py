"""The data folder: every path under ``--data-dir``, the benchmark set list and what is on disk.

This module only names paths: it imports nothing from the rest of the package (datasets are resolved
and fetched by :mod:`crabnet.data`).

One owner for the layout that connects the eight steps (docs/steps.md). Scripts and modules ask a
:class:`Layout` for a path instead of joining folder names themselves; ``OUTPUTS`` describes each
output for ``data/README.md`` (a test checks that the README lists every one of them).

    layout = Layout("data")
    layout.checkpoint("mp_bulk_modulus", "mat2vec")        # data/models/mp_bulk_modulus__mat2vec.pt
    layout.attention_store("aflow__Egap")                  # data/attention/aflow__Egap/attention.zarr
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCHMARK = "benchmark_data"
MATBENCH = "matbench_cv"
CACHE = "cache"  # the name of the cache folders (oxidation/cache/, umap/cache/): inputs to steps, not outputs
SPLITS = ("train", "val", "test")
RECIPE_NAMES = ("immi", "npj")  # the training recipes (crabnet.training), named in checkpoint file names

# The 18 "extended benchmark" datasets (docs/model-and-recipe.md), in the order of the published MAE table.
BENCHMARK_DATASETS: tuple[str, ...] = (
    "aflow__ael_bulk_modulus_vrh",
    "aflow__ael_debye_temperature",
    "aflow__ael_shear_modulus_vrh",
    "aflow__agl_thermal_conductivity_300K",
    "aflow__agl_thermal_expansion_300K",
    "aflow__Egap",
    "aflow__energy_atom",
    "CritExam__Ed",
    "CritExam__Ef",
    "mp_bulk_modulus",
    "mp_elastic_anisotropy",
    "mp_e_hull",
    "mp_mu_b",
    "mp_shear_modulus",
    "OQMD_Bandgap",
    "OQMD_Energy_per_atom",
    "OQMD_Formation_Enthalpy",
    "OQMD_Volume_per_atom",
)

# (paths, written by, content): the outputs table of data/README.md (``python -m crabnet.layout``
# prints it; a test checks that data/README.md holds it)
OUTPUTS: tuple[tuple[str, str, str], ...] = (
    (
        "`models/<dataset>__<features>.pt`, `…__npj.pt`",
        "1, 4, 6, 7",
        "checkpoint of the immi / npj recipe: weights, model config, target scaler, metadata with the training "
        "history (`torch.load(..., weights_only=True)`); step 1 writes `…__attention.pt` beside a full-recipe one",
    ),
    (
        "`models/<dataset>__<features>[__npj].meta.json`",
        "1, 4, 6, 7",
        "the checkpoint's metadata as JSON, for readers without torch (the report)",
    ),
    (
        "`models/<dataset>__<features>[__npj].state.pt`",
        "1, 4, 6, 7, benchmarks/accuracy.py",
        "state of an unfinished training (weights, optimiser, SWA, RNGs, history), saved about once a minute; the "
        "same command goes on from it; removed when the checkpoint is written",
    ),
    (
        "`attention/<dataset>/attention.zarr`",
        "1",
        "Zarr v3 group of attention captures and, at every capture, each element's leave-one-out effect, Shapley "
        "value and output share, and each head's ablation effect (layout in docs/steps.md; "
        "older stores lack "
        "some); `attention.zarr.partial` = an unfinished run, ignored by readers, with `attention.zarr.state.pt` its "
        "training state",
    ),
    (
        "`attention/<dataset>/<checkpoint>.zarr`, `<checkpoint>.faithfulness.csv`",
        "`python -m crabnet.explain`",
        "one capture of a trained checkpoint's split, as above, and its faithfulness table",
    ),
    (
        "`videos/<dataset>/<formula>.mp4`, `<formula>_attention.mp4`, `<formula>_progress.mp4`",
        "2",
        "H.264 videos, one frame per capture: heatmaps of all heads of a layer, prediction vs target, both side by "
        "side (`_layerN` / `_layers` in the name for `--layer N≠0` / `all`)",
    ),
    (
        "`explorer/<dataset>.html`",
        "2",
        "the attention explorer: one offline page (search, layer/head, capture slider with play; view in the URL "
        "hash `#compound=Hf1O2&layer=0&head=2&capture=8`); cells carry `data-query`, `data-key`, `data-value`",
    ),
    (
        "`attention/<dataset>/faithfulness.csv`, `figures/faithfulness/<dataset>.png`",
        "2",
        "agreement of attention with leave-one-element-out attribution and with Shapley values per capture, "
        "beside shuffled and fraction-only controls; the sign test of the most-attended element's Shapley value",
    ),
    (
        "`attention/<dataset>/per_element.csv`, `figures/ptable/<dataset>/<quantity>.png`, `.html`",
        "2",
        "periodic tables per element: training prevalence, attention received, mean Shapley value, MAE of the "
        "captured split (and of step 4's test predictions); PNG + interactive HTML (`plotly.min.js` beside them)",
    ),
    (
        "`index.html`",
        "every step, at its end",
        "the report: every output below, linked relatively (zip the folder to share it)",
    ),
    (
        "`figures/training/<checkpoint>.png`",
        "the report",
        "learning curve of a checkpoint: train loss, validation MAE, learning rate, SWA updates per epoch",
    ),
    (
        "`oxidation/<dataset>__<split>.json`, `.csv`, `oxidation/element_ox_states.json`",
        "3",
        "{formula: {element: mean oxidation state} or null} in dataset row order; common/ICSD/all states per element",
    ),
    (
        "`oxidation/cache/`",
        "3",
        "every guess, written as each job finishes, shared by all datasets; an interrupted run resumes from it",
    ),
    ("`embeddings/<features>/<dataset>__layer<L>__<Q|K|V>.csv`", "4", "118 rows (H…Og) × d_model"),
    ("`predictions/<dataset>__<features>__test.csv`", "4", "formula, target, prediction, uncertainty"),
    ("`figures/correlation/`", "5", "Pearson matrices (PNG + offline HTML) and `summary.csv`"),
    ("`umap/local/<dataset>/`, `figures/umap_local/<dataset>/`", "6", "per-atom UMAP coordinates, summary, plots"),
    (
        "`umap/global/<dataset>/`, `figures/umap_global/<dataset>/`",
        "7",
        "per-compound UMAP coordinates, summary, plots",
    ),
    ("`umap/cache/`", "6, 7", "cached representations and UMAP coordinates keyed by their inputs"),
    ("`stats/`, `figures/stats/`", "8", "dataset statistics and element-prevalence / diversity plots"),
    ("`benchmarks/`", "benchmarks/*.py", "figures of the benchmark scripts as JSON"),
)


def outputs_table() -> str:
    """The Markdown table of ``OUTPUTS`` (the "Outputs" section of data/README.md)."""
    rows = ["| path | written by | content |", "|---|---|---|"]
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731  (a | inside a cell)
    rows += [f"| {esc(paths)} | {by} | {esc(what)} |" for paths, by, what in OUTPUTS]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Layout:
    """Paths under one ``--data-dir``."""

    root: Path

    def __init__(self, root: Path | str):
        object.__setattr__(self, "root", Path(root))

    # inputs
    def dataset(self, dataset: str) -> Path:
        """``benchmark_data/<dataset>/`` with train.csv, val.csv, test.csv."""
        return self.root / BENCHMARK / dataset

    def matbench(self, dataset: str) -> Path:
        """``matbench_cv/<dataset>/`` with train<k>.csv, val<k>.csv, test<k>.csv."""
        return self.root / MATBENCH / dataset

    def split_csv(self, dataset: str, split: str) -> Path:
        return self.dataset(dataset) / f"{split}.csv"

    # models (steps 1, 4, 6, 7)
    def models_dir(self) -> Path:
        """``models/``: the checkpoints."""
        return self.root / "models"

    @staticmethod
    def name_parts(path: Path | str, parts: int) -> list[str]:
        """``[dataset, part1, …]`` of an output named ``<dataset>__<part1>…__<partN>`` (N = ``parts``).

        Dataset names hold ``__`` themselves (``aflow__Egap``), so the parts are cut from the right:
        ``name_parts("aflow__Egap__mat2vec__test.csv", 2)`` is ``["aflow__Egap", "mat2vec", "test"]``; a name
        with fewer parts gives ``[stem]``.
        """
        split = Path(path).stem.rsplit("__", parts)
        return split if len(split) == parts + 1 else [Path(path).stem]

    def checkpoint(self, dataset: str, features: str, recipe: str = "immi") -> Path:
        """``models/<dataset>__<features>.pt`` for the immi recipe, ``…__<recipe>.pt`` for others."""
        suffix = "" if recipe == "immi" else f"__{recipe}"
        return self.models_dir() / f"{dataset}__{features}{suffix}.pt"

    def training_state(self, dataset: str, features: str, recipe: str = "immi") -> Path:
        """The state of an unfinished training: the checkpoint path with ``.state.pt``."""
        return self.checkpoint(dataset, features, recipe).with_suffix(".state.pt")

    def training_figure(self, checkpoint: Path | str) -> Path:
        """``figures/training/<checkpoint stem>.png``: its learning curve."""
        return self.root / "figures" / "training" / f"{Path(checkpoint).stem}.png"

    # step 1, 2
    def attention_dir(self, dataset: str = "") -> Path:
        """``attention/<dataset>/`` (``attention/`` without a dataset)."""
        return self.root / "attention" / dataset

    def attention_store(self, dataset: str) -> Path:
        return self.attention_dir(dataset) / "attention.zarr"

    def checkpoint_store(self, dataset: str, checkpoint: Path | str) -> Path:
        """``attention/<dataset>/<checkpoint stem>.zarr``: one capture of a trained model (``crabnet.explain.run``)."""
        return self.attention_dir(dataset) / f"{Path(checkpoint).stem}.zarr"

    def videos_dir(self) -> Path:
        """``videos/``: a folder of videos per dataset."""
        return self.root / "videos"

    def videos(self, dataset: str) -> Path:
        return self.videos_dir() / dataset

    def explorer_dir(self) -> Path:
        """``explorer/``: a page per dataset."""
        return self.root / "explorer"

    def explorer(self, dataset: str) -> Path:
        return self.explorer_dir() / f"{dataset}.html"

    def faithfulness_csv(self, dataset: str) -> Path:
        return self.attention_dir(dataset) / "faithfulness.csv"

    def faithfulness_figures(self) -> Path:
        return self.root / "figures" / "faithfulness"

    def faithfulness_figure(self, dataset: str) -> Path:
        return self.faithfulness_figures() / f"{dataset}.png"

    def ptable_csv(self, dataset: str) -> Path:
        """``attention/<dataset>/per_element.csv``: the per-element aggregates of the periodic tables."""
        return self.attention_dir(dataset) / "per_element.csv"

    def ptable_figures(self, dataset: str = "") -> Path:
        """``figures/ptable/<dataset>/`` (``figures/ptable/`` without a dataset)."""
        return self.root / "figures" / "ptable" / dataset

    def ptable_figure(self, dataset: str, quantity: str) -> Path:
        """``figures/ptable/<dataset>/<quantity>.png`` (its interactive ``.html`` twin beside it)."""
        return self.ptable_figures(dataset) / f"{quantity}.png"

    # step 3
    def oxidation(self) -> Path:
        return self.root / "oxidation"

    def oxidation_guesses(self, dataset: str, split: str) -> Path:
        """``oxidation/<dataset>__<split>.json`` (a ``.csv`` twin beside it)."""
        return self.oxidation() / f"{dataset}__{split}.json"

    def element_ox_states(self) -> Path:
        return self.oxidation() / "element_ox_states.json"

    def oxidation_cache(self, name: str) -> Path:
        return self.oxidation() / CACHE / name

    # step 4, 5
    def embeddings_dir(self, features: str = "") -> Path:
        """``embeddings/<features>/`` (``embeddings/`` without features)."""
        return self.root / "embeddings" / features

    def embedding(self, features: str, dataset: str, layer: int, kind: str) -> Path:
        return self.embeddings_dir(features) / f"{dataset}__layer{layer}__{kind}.csv"

    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, dataset: str, features: str, split: str = "test") -> Path:
        return self.predictions_dir() / f"{dataset}__{features}__{split}.csv"

    def correlation_figures(self) -> Path:
        return self.root / "figures" / "correlation"

    # step 6, 7
    def umap(self, scope: str, dataset: str = "") -> Path:
        """``umap/<local|global>/<dataset>/``: coordinates and summary.csv (``umap/<scope>/`` without a dataset)."""
        return self.root / "umap" / scope / dataset

    def umap_figures(self, scope: str, dataset: str = "") -> Path:
        """``figures/umap_<local|global>/<dataset>/`` (``figures/umap_<scope>/`` without a dataset)."""
        return self.root / "figures" / f"umap_{scope}" / dataset

    def umap_cache(self, dataset: str) -> Path:
        return self.root / "umap" / CACHE / dataset

    # step 8, report, benchmarks
    def stats(self) -> Path:
        return self.root / "stats"

    def stats_table(self, kind: str) -> Path:
        """``stats/benchmark.csv`` (kind ``benchmark_data``) or ``stats/matbench_cv.csv`` (``matbench_cv``)."""
        return self.stats() / f"{'benchmark' if kind == BENCHMARK else kind}.csv"

    def stats_figures(self) -> Path:
        return self.root / "figures" / "stats"

    def prevalence_figures(self) -> Path:
        """``figures/stats/prevalence/``: ``<dataset>__by_count.png`` and the like."""
        return self.stats_figures() / "prevalence"

    def report(self) -> Path:
        return self.root / "index.html"

    def benchmarks(self) -> Path:
        return self.root / "benchmarks"


# --------------------------------------------------------------------------------------------
# finding datasets


@dataclass(frozen=True)
class SplitFile:
    """One CSV of a dataset.

    Attributes:
        kind: ``benchmark_data`` or ``matbench_cv``.
        dataset: dataset folder name.
        split: train, val or test.
        fold: matbench fold, ``None`` for benchmark sets.
        path: the CSV file.
    """

    kind: str
    dataset: str
    split: str
    fold: int | None
    path: Path

    @property
    def label(self) -> str:
        """``<dataset>__<split>`` or ``<dataset>__<split><fold>`` (used in output file names)."""
        return f"{self.dataset}__{self.split}{'' if self.fold is None else self.fold}"


def available(data_dir: Path | str, kind: str) -> list[str]:
    """Dataset folders of one kind under ``data_dir``, sorted case-insensitively."""
    root = Path(data_dir) / kind
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str.lower)


def folds_of(data_dir: Path | str, dataset: str) -> list[int]:
    """Fold numbers present for a matbench set (those with all three split files)."""
    folder = Layout(data_dir).matbench(dataset)
    folds = []
    for p in folder.glob("train*.csv"):
        tail = p.stem[len("train") :]
        if tail.isdigit() and all((folder / f"{s}{tail}.csv").is_file() for s in SPLITS):
            folds.append(int(tail))
    return sorted(folds)


if __name__ == "__main__":
    print(outputs_table(), end="")
