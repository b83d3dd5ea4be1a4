"""Step 2: videos of how chosen compounds' attention maps and predictions develop during training.

Reads   <data-dir>/attention/<dataset>/attention.zarr      (step 1, get_training_attention.py)
Writes  <data-dir>/videos/<dataset>/<formula>_attention.mp4  all heads of --layer, one frame per capture
        <data-dir>/videos/<dataset>/<formula>_progress.mp4   prediction over the captures so far vs target
        <data-dir>/videos/<dataset>/<formula>.mp4            both side by side
        (--layer N other than 0 adds _layerN to the names, --layer all adds _layers)
        <data-dir>/explorer/<dataset>.html                   the attention explorer (--no-explorer skips it)
        <data-dir>/attention/<dataset>/faithfulness.csv      agreement of attention with attribution and Shapley
                                                             values per capture (figure: figures/faithfulness/)
        <data-dir>/figures/ptable/<dataset>/                 periodic tables per element (+ per_element.csv)
        <data-dir>/index.html                                the report of every output (refreshed)
Next    guess_oxidation.py

Frame k of every video shows capture k (capture 0 = the untrained model). Heatmap rows are query
elements, columns key elements (symbols above, fractions below), colour 0-1. Videos are H.264
(libx264, CRF 18, preset veryfast, yuv420p, +faststart) encoded by the system ffmpeg, else the
binary of imageio-ffmpeg; frames are piped, never written to disk. Videos newer than the store and
made with the same settings are skipped unless --force. Several compounds render in parallel as
jobs of the Dask engine (--scheduler: a LocalCluster of one worker per core by default, or any
cluster); a single compound renders in this process beside its three ffmpeg encoders.

Without --formula/--index the paper's compounds of the dataset that are in the captured split are
rendered (aflow__ael_bulk_modulus_vrh and mp_bulk_modulus have them), else 5 representative
compounds (numbers of elements as common as in the split; best to worst final error). An unknown
formula is answered with compounds of the store to try instead.

The explorer is one offline page (search a compound, pick layer and head, slide over the captures
or play; the view is kept in the URL hash) of the paper's compounds, the rendered ones and --explore
N others. Faithfulness: Kendall tau and top-1 agreement of attention-based element importance with
|attribution| and |Shapley| per capture, beside shuffled (--seed) and fraction-only controls; then periodic
tables per element (docs/faithfulness.md). Both are skipped when newer than the store (--force recomputes).

Examples:
    python generate_attention_videos.py --quick                       # paper compounds of the demo store
    python generate_attention_videos.py --dataset aflow__Egap                  # 5 representative compounds
    python generate_attention_videos.py --dataset aflow__Egap --formula ZnO --formula Ga2O3 --layer all
    python generate_attention_videos.py --dataset mp_bulk_modulus --index 0 --index 5 --fps 5
    python generate_attention_videos.py --quick --explore 300         # a larger explorer page
"""

from __future__ import annotations

import sys
from pathlib import Path

from crabnet.errors import DataError, UsageError
from crabnet.explain.ptable import refresh_analyses
from crabnet.explain.store import AttentionStore
from crabnet.explain.video import (
    DEFAULT_PRESET,
    DEFAULT_SAMPLE,
    VideoError,
    find_ffmpeg,
    parse_layers,
    plan_jobs,
    print_selection,
    render_videos,
    select_compounds,
)
from crabnet.jobs.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.jobs.engine import add_engine_args, engine_from_args
from crabnet.layout import Layout
from crabnet.web.explorer import DEFAULT_EXPLORE, explorer_path, write_explorer
from crabnet.web.report import refresh_report

DEFAULT_DATASET = "aflow__Egap"  # as step 1
QUICK_DATASET = DEMO_DATASET


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=DEFAULT_DATASET,
        device=False,
        quick_help=f"demo: the paper's {QUICK_DATASET} compounds in the store of get_training_attention.py --quick",
    )
    many = f"repeatable (default: the paper's compounds of the dataset, else {DEFAULT_SAMPLE} representative ones)"
    p.add_argument("--formula", action="append", default=[], help=f"compound to render (HfO2 finds Hf1O2); {many}")
    p.add_argument("--index", action="append", type=int, default=[], help=f"row of a compound in the store; {many}")
    p.add_argument("--layer", default="0", help="layer whose heads are shown (0-based), or 'all' for one row per layer")
    p.add_argument("--fps", type=float, default=10.0, help="frames (captures) per second")
    p.add_argument("--dpi", type=float, default=100.0, help="resolution of the frames")
    p.add_argument("--crf", type=int, default=18, help="libx264 quality (0-51, lower = better)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="libx264 speed preset (ultrafast … veryslow)")
    p.add_argument("--no-explorer", action="store_true", help="do not write the explorer <data-dir>/explorer/<ds>.html")
    more = "compounds the explorer embeds besides the paper's and the rendered ones (across sizes and errors)"
    p.add_argument("--explore", type=int, default=DEFAULT_EXPLORE, help=more)
    add_engine_args(p)
    return p.parse_args(argv)


def main(
    data_dir: Path,
    dataset: str | None,
    seed: int,
    quick: bool,
    force: bool,
    formula: list[str],
    index: list[int],
    layer: str,
    fps: float,
    dpi: float,
    crf: int,
    preset: str,
    no_explorer: bool = False,
    explore: int = DEFAULT_EXPLORE,
    **engine,
) -> int:
    dataset = dataset or (QUICK_DATASET if quick else DEFAULT_DATASET)
    if fps <= 0 or dpi <= 0 or not 0 <= crf <= 51 or explore < 0:
        raise UsageError("--fps and --dpi must be > 0, --explore >= 0, --crf in 0..51")
    eng = engine_from_args(engine, small=quick)
    store_path = Layout(data_dir).attention_store(dataset)
    try:
        store = AttentionStore(store_path)
        layers = parse_layers(layer, int(store.attrs["n_layers"]))
        rows, missing = select_compounds(store, formula, index, dataset, n_sample=DEFAULT_SAMPLE)
        ffmpeg = find_ffmpeg()
    except KeyError as err:
        raise UsageError(err.args[0] if err.args else str(err)) from err
    except FileNotFoundError as err:
        step1 = "--quick" if quick and dataset == QUICK_DATASET else f"--dataset {dataset}"
        raise UsageError(f"{err}:\n  python get_training_attention.py {step1} --data-dir {data_dir}") from err
    except (DataError, ValueError, IndexError, VideoError) as err:
        raise UsageError(str(err)) from err
    print_selection(store, rows, missing, dataset, explicit=bool(formula or index))

    if not no_explorer:
        info = write_explorer(store, explorer_path(data_dir, dataset), dataset, rows=rows, n_others=explore)
        print(f"explorer: {info.n_compounds} compounds ({info.size / 1e6:.1f} MB, {info.seconds:.1f} s) -> {info.path}")
        if info.size > 50e6:
            print(f"  the page is large for a browser; --explore {max(0, explore // 4)} embeds fewer compounds")

    store_time = (store_path / "zarr.json").stat().st_mtime
    refresh_analyses(store, data_dir, dataset, seed=seed, force=force, store_time=store_time)  # faithfulness, ptables

    encoding = {"fps": fps, "dpi": dpi, "crf": crf, "preset": preset, "ffmpeg": ffmpeg}
    jobs = plan_jobs(store, rows, layers, Layout(data_dir).videos(dataset), dataset=dataset, **encoding)
    try:
        render_videos(jobs, store_time, force=force, engine=eng)
    except VideoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    refresh_report(data_dir)
    print("next: python guess_oxidation.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
