"""Cost of steps 6 and 7 on a large set: representation extraction and UMAP, seconds and peak RSS.

    python benchmarks/umap_cost.py                                   # OQMD_Bandgap test set (51k compounds)
    python benchmarks/umap_cost.py --max-compounds 5000 --timeout 300
    python benchmarks/umap_cost.py --parallel                        # also UMAP without a seed (all cores)

Uses ``<data-dir>/models/<dataset>__mat2vec.pt`` when it exists, else an untrained model of the
published size (the cost of a forward pass does not depend on the weights; the report says
which). Each stage runs in its own process (so its peak RSS is its own), bounded by --timeout.
``seconds`` is wall time of the timed part; on a machine shared with other jobs also look at
``cpu_seconds_process`` (CPU time of the whole worker process, all threads):

1. ``extract_global``: one inference pass pooling every layer input ([mean, range, var, max,
   min] -> 5·d_model per layer) into memory-mapped .npy files;
2. ``extract_local``: one inference pass collecting the value vectors of the paper's 19 atoms
   at every layer;
UMAP stages first project 60 random points to let numba compile (``warmup_jit_seconds``, paid
once per process), then time:

3. ``umap_global``: seeded UMAP (cosine, n_neighbors 15, min_dist by size) of the layer-0 pooled
   vectors, plus the kNN-R² and trustworthiness metrics;
4. ``umap_local``: seeded UMAP (n_neighbors 5, min_dist 0.3) of the atom with most compounds;
5. ``plot_global``: the PNG grid and offline HTML of step 7 for four layers (the layer-0
   coordinates of stage 3 drawn in every row), with the HTML's size.

Writes ``<data-dir>/benchmarks/umap__<dataset>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load(data_dir: Path, dataset: str, split: str, max_compounds: int):
    """(model, scaler, data, what the model is)."""
    from crabnet.data import CompositionData, load_dataset
    from crabnet.training.train import Scaler, build_model, checkpoint_path, load_checkpoint
    from crabnet.utils import seed_everything

    data = load_dataset(data_dir, dataset, splits=(split,), verbose=False)[split]
    if max_compounds and len(data) > max_compounds:
        data = CompositionData(
            data.formula[:max_compounds],
            data.elements[:max_compounds],
            data.fractions[:max_compounds],
            data.target[:max_compounds],
            data.rows[:max_compounds],
            data.source,
        )
    ckpt = checkpoint_path(data_dir, dataset, "mat2vec")
    if ckpt.is_file():
        model, scaler, meta = load_checkpoint(ckpt)
        what = f"{ckpt.name} ({'full ' + meta['full_recipe'] + ' recipe' if meta.get('full_recipe') else 'short run'})"
    else:
        seed_everything(0)
        model, scaler = build_model("mat2vec", n_elements=data.width).eval(), Scaler(0.0, 1.0)
        what = "untrained mat2vec model of the published size (no checkpoint)"
    return model, scaler, data, what


def worker(
    stage: str,
    data_dir: Path,
    dataset: str,
    split: str,
    max_compounds: int,
    store_dir: Path,
    threads: int,
    parallel: bool,
) -> dict:
    import numpy as np
    import torch

    from crabnet.elements import ATOMIC_NUMBER
    from crabnet.maps.projection import (
        UmapParams,
        global_metrics,
        global_min_dist,
        local_metrics,
        local_params,
        project,
    )
    from crabnet.maps.vectors import RepresentationStore, collect
    from crabnet.reference import PAPER_ATOMS

    if threads:
        torch.set_num_threads(threads)
    out: dict = {"stage": stage, "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if stage.startswith("extract"):
        model, scaler, data, what = load(data_dir, dataset, split, max_compounds)
        out.update(model=what, n_compounds=len(data), width=data.width)
        t0 = time.perf_counter()
        if stage == "extract_global":
            layers = list(range(model.cfg.n_layers + 1))
            collect(model, data, scaler, store_dir, global_layers=layers, progress=False)
            out["layers"] = layers
        else:
            zs = [ATOMIC_NUMBER[a] for a in PAPER_ATOMS]
            collect(model, data, scaler, store_dir, local=dict.fromkeys(range(model.cfg.n_layers), zs), progress=False)
            out["atoms"] = len(zs)
        out["bytes_written"] = sum(
            p.stat().st_size
            for p in Path(store_dir).glob("global__*.npy" if stage == "extract_global" else "local__*.npy")
        )
    elif stage == "plot_global":
        from crabnet.maps.figures import hover_text, make_colouring, pauling_en_mad, plot_html, plot_png

        comp = RepresentationStore(store_dir).compounds
        found = sorted(Path(store_dir).glob("umap_umap_global/global__layer0__*.npy"))
        if not found:
            raise SystemExit("plot_global needs the coordinates of the umap_global stage (same --store-dir)")
        xy = np.load(found[0], allow_pickle=False)
        t0 = time.perf_counter()
        en = pauling_en_mad(comp.elements, comp.fractions)
        error = comp.prediction - comp.target
        cols = [
            make_colouring("n_elements", "number of elements", comp.n_elements, style="discrete"),
            make_colouring("target", "target", comp.target, cmap="plasma"),
            make_colouring("prediction", "prediction", comp.prediction, cmap="plasma"),
            make_colouring("error", "prediction − target", error, style="diverging"),
            make_colouring("EN_deviation", "Pauling EN deviation", en, cmap="cividis"),
        ]
        coords = dict.fromkeys(range(4), xy)
        plot_png(coords, cols, Path(store_dir) / "bench.png", title="benchmark")
        out["png_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        hover = hover_text(comp.formula, {"target": comp.target, "prediction": comp.prediction, "error": error})
        html = plot_html(coords, cols, hover, Path(store_dir) / "bench.html", title="benchmark")
        out["html_seconds"] = time.perf_counter() - t1
        out["html_mb"] = html.stat().st_size / 1e6
        out["n_compounds"] = len(comp)
    else:
        from crabnet.maps.projection import fit_umap

        store = RepresentationStore(store_dir)
        seed = None if stage.endswith("_parallel") else 0
        t0 = time.perf_counter()  # numba compiles UMAP on first use in a process: time it apart
        fit_umap(
            np.random.default_rng(0).normal(size=(60, 8)),
            UmapParams(5, 0.3, "cosine" if "global" in stage else "euclidean", seed, n_epochs=10),
        )
        out["warmup_jit_seconds"] = time.perf_counter() - t0
        if stage.startswith("umap_global"):
            x = np.asarray(store.global_(0))
            params = UmapParams(15, global_min_dist(len(x)), "cosine", seed)
            t0 = time.perf_counter()
            xy, _ = project(x, params, Path(store_dir) / f"umap_{stage}", "global__layer0", force=True)
            out["umap_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            out.update(dict(global_metrics(x, xy, store.compounds.target).items()))
            out["metrics_seconds"] = time.perf_counter() - t1
        else:
            comp = store.compounds
            counts = {a: len(comp.rows_with(ATOMIC_NUMBER[a])[0]) for a in PAPER_ATOMS}
            atom = max(counts, key=counts.get)
            x = np.asarray(store.local(ATOMIC_NUMBER[atom], 1))
            params = local_params(1, seed=seed)
            t0 = time.perf_counter()
            xy, _ = project(x, params, Path(store_dir) / f"umap_{stage}", f"local__{atom}__layer1", force=True)
            out["umap_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            out.update(atom=atom, **local_metrics(x, xy, np.full(len(x), np.nan)))
            out["metrics_seconds"] = time.perf_counter() - t1
        out["shape"] = list(x.shape)
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds_process"] = time.process_time()  # all threads, imports and compilation included
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="OQMD_Bandgap", help="default: %(default)s")
    p.add_argument("--split", default="test", help="default: %(default)s")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument("--max-compounds", type=int, default=0, help="use only the first N compounds (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per stage (default: %(default)s)")
    p.add_argument("--parallel", action="store_true", help="also time UMAP without a seed (all cores)")
    p.add_argument("--stages", nargs="+", default=None, help="subset of the stages (default all)")
    p.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="keep the collected vectors here (default: a temporary folder, removed at the end)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    if a.worker:
        print(
            json.dumps(
                worker(a.worker, a.data_dir, a.dataset, a.split, a.max_compounds, a.store, a.threads, a.parallel)
            )
        )
        return 0
    stages = a.stages or (
        ["extract_global", "extract_local", "umap_global", "umap_local", "plot_global"]
        + (["umap_global_parallel", "umap_local_parallel"] if a.parallel else [])
    )
    results = []
    with tempfile.TemporaryDirectory(dir=a.data_dir, prefix=".umap-bench-") as tmp:
        if a.store_dir:
            a.store_dir.mkdir(parents=True, exist_ok=True)
            tmp = str(a.store_dir)
        for stage in stages:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                stage,
                "--store",
                tmp,
                "--dataset",
                a.dataset,
                "--split",
                a.split,
                "--data-dir",
                str(a.data_dir),
                "--max-compounds",
                str(a.max_compounds),
                "--threads",
                str(a.threads),
            ]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                results.append({"stage": stage, "error": f"timed out after {a.timeout:.0f} s"})
                print(f"{stage}: timed out after {a.timeout:.0f} s", flush=True)
                continue
            if proc.returncode != 0:
                results.append({"stage": stage, "error": proc.stderr.strip()[-800:]})
                print(f"{stage}: failed\n{proc.stderr.strip()[-800:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["process_seconds"] = time.perf_counter() - t0  # includes imports and numba compilation
            results.append(res)
            print(
                f"{stage}: {res['seconds']:.1f} s (process {res['process_seconds']:.1f} s), "
                f"peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print()
    for r in results:
        print(json.dumps(r))
    out = a.data_dir / "benchmarks" / f"umap__{a.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"dataset": a.dataset, "split": a.split, "max_compounds": a.max_compounds, "results": results}, indent=1
        )
    )
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
