"""Step 2: videos of how chosen compounds' attention maps and predictions develop during training.

Reads   <data-dir>/attention/<dataset>/attention.zarr      (step 1, get_training_attention.py)
Writes  <data-dir>/videos/<dataset>/<formula>_attention.mp4  all heads of --layer, one frame per capture
        <data-dir>/videos/<dataset>/<formula>_progress.mp4   prediction over the captures so far vs target
        <data-dir>/videos/<dataset>/<formula>.mp4            both side by side
        (--layer N other than 0 adds _layerN to the names, --layer all adds _layers)
        <data-dir>/explorer/<dataset>.html                   the attention explorer (--no-explorer skips it)
        <data-dir>/attention/<dataset>/faithfulness.csv      agreement of attention with leave-one-element-out
                                                             attribution per capture, with controls
        <data-dir>/figures/faithfulness/<dataset>.png        the same against epoch/step
        <data-dir>/index.html                                the report of every output (refreshed)
Next    guess_oxidation.py

Frame k of every video shows capture k (capture 0 = the untrained model). Heatmap rows are query
elements, columns key elements (symbols above, fractions below), colour 0-1. Videos are H.264
(libx264, CRF 18, preset veryfast, yuv420p, +faststart) encoded by the system ffmpeg, else the
binary of imageio-ffmpeg; frames are piped, never written to disk. Videos newer than the store and
made with the same settings are skipped unless --force. Several compounds render in parallel
(--workers); a single compound renders in one process beside its three ffmpeg encoders.

Without --formula/--index the paper's compounds of the dataset are rendered (those that are in the
captured split; the others are listed): aflow__ael_bulk_modulus_vrh P1W3, C11N4, HfO2, Pt3Ti1,
GaN, Gd2O7Ti2, BN, AlGdO3, Hf2La2O7; mp_bulk_modulus SiO2, FeCO3, YSF, Fe(HO)2, AgSbTe2, NaNO3,
Al2O3, LiFeO2. For other datasets (aflow__Egap, step 1's default, included) it renders 5
representative compounds (numbers of elements in proportion to how common they are; within each,
the median or the best to the worst final error), names them, and embeds them in the explorer. An
unknown formula is answered with compounds of the store to try instead.

The attention explorer is one offline HTML page: search a compound, pick layer and head (or all
heads), move a slider over the captures or press play; the view is kept in the URL hash
(explorer/<dataset>.html#compound=Hf1O2&layer=0&head=2&capture=8). It embeds the paper's
compounds, the rendered ones and --explore N others chosen across numbers of elements and errors;
where the store holds attribution it shows each element's leave-one-out effect beside the map.

Faithfulness (stores with attribution, crabnet/faithfulness.py): at every capture, Kendall tau
between |attribution| and the attention-based importance of the elements (raw attention received
as a key, fraction-weighted over queries, averaged over heads and layers; attention rollout), for
compounds with >= 3 elements, and top-1 agreement for >= 2 elements, beside a shuffled control
(seeded by --seed) and the fraction-only importance. Skipped when newer than the store (--force
recomputes).

Examples:
    python generate_attention_videos.py --quick                       # paper compounds of the demo store
    python generate_attention_videos.py --dataset aflow__Egap                  # 5 representative compounds
    python generate_attention_videos.py --dataset aflow__Egap --formula ZnO --formula Ga2O3 --layer all
    python generate_attention_videos.py --dataset mp_bulk_modulus --index 0 --index 5 --fps 5
    python generate_attention_videos.py --quick --explore 300         # a larger explorer page
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from crabnet.capture import AttentionStore
from crabnet.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.errors import DataError, UsageError
from crabnet.explorer import DEFAULT_EXPLORE, explorer_path, write_explorer
from crabnet.faithfulness import refresh_faithfulness
from crabnet.layout import Layout
from crabnet.report import refresh_report
from crabnet.utils import available_cpus
from crabnet.video import (
    DEFAULT_PRESET,
    DEFAULT_SAMPLE,
    PAPER_COMPOUNDS,
    VideoError,
    find_ffmpeg,
    parse_layers,
    plan_jobs,
    run_jobs,
    select_compounds,
)

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
    p.add_argument(
        "--formula",
        action="append",
        default=[],
        help="compound to render, matched after normalising (HfO2 finds Hf1O2); repeatable "
        "(default: the paper's compounds of the dataset, else "
        f"{DEFAULT_SAMPLE} representative ones)%(default).0s",
    )
    p.add_argument(
        "--index",
        action="append",
        type=int,
        default=[],
        help="row of the compound in the store (0-based); repeatable (default: none)%(default).0s",
    )
    p.add_argument("--layer", default="0", help="layer whose heads are shown (0-based), or 'all' for one row per layer")
    p.add_argument("--fps", type=float, default=10.0, help="frames (captures) per second")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"processes rendering compounds in parallel (0 = all cores, {available_cpus()} here)",
    )
    p.add_argument("--dpi", type=float, default=100.0, help="resolution of the frames")
    p.add_argument("--crf", type=int, default=18, help="libx264 quality (0-51, lower = better)")
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help="libx264 speed preset (ultrafast … veryslow; slower = smaller files, same quality)",
    )
    p.add_argument(
        "--no-explorer",
        action="store_true",
        help="do not write the attention explorer <data-dir>/explorer/<dataset>.html",
    )
    p.add_argument(
        "--explore",
        type=int,
        default=DEFAULT_EXPLORE,
        help="compounds embedded in the explorer besides the paper's and the rendered ones, "
        "chosen across numbers of elements and errors",
    )
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
    workers: int,
    dpi: float,
    crf: int,
    preset: str,
    no_explorer: bool = False,
    explore: int = DEFAULT_EXPLORE,
) -> int:
    # seed seeds the shuffled faithfulness control
    dataset = dataset or (QUICK_DATASET if quick else DEFAULT_DATASET)
    if fps <= 0 or dpi <= 0 or workers < 0 or not 0 <= crf <= 51 or explore < 0:
        raise UsageError("--fps and --dpi must be > 0, --workers and --explore >= 0, --crf in 0..51")
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
    if missing:
        print(f"not in the captured {store.attrs.get('split', '')} split of {dataset} (skipped): {', '.join(missing)}")
    if not (formula or index) and len(missing) == len(PAPER_COMPOUNDS.get(dataset, [])):  # no paper compound here
        print(
            f"no paper videos for {dataset} in this store: {len(rows)} compounds across numbers of elements and "
            f"errors (--formula/--index choose others): {', '.join(store.formulas[i] for i in rows)}"
        )

    if not no_explorer:
        info = write_explorer(store, explorer_path(data_dir, dataset), dataset, rows=rows, n_others=explore)
        print(f"explorer: {info.n_compounds} compounds ({info.size / 1e6:.1f} MB, {info.seconds:.1f} s) -> {info.path}")
        if info.size > 50e6:
            print(f"  the page is large for a browser; --explore {max(0, explore // 4)} embeds fewer compounds")

    store_time = (store_path / "zarr.json").stat().st_mtime
    refresh_faithfulness(store, data_dir, dataset, seed=seed, force=force, store_time=store_time)

    out_dir = Layout(data_dir).videos(dataset)
    jobs = plan_jobs(
        store, rows, layers, out_dir, dataset=dataset, fps=fps, dpi=dpi, crf=crf, preset=preset, ffmpeg=ffmpeg
    )
    todo = []
    for job in jobs:
        if not force and job.up_to_date(store_time):
            print(f"{job.outputs['merged']} and its _attention/_progress videos are up to date (--force re-renders)")
        else:
            todo.append(job)
    jobs = todo
    if jobs:
        print(
            f"rendering {len(jobs)} compound(s) x {store.n_captures} captures, {len(layers)} layer(s) x "
            f"{store.attrs['n_heads']} heads, {fps:g} fps"
        )
    t0 = time.perf_counter()
    try:
        run_jobs(
            jobs,
            workers=workers,
            on_done=lambda job, paths: print(f"{job.data.formula}: {', '.join(p.name for p in paths.values())}"),
        )
    except VideoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if jobs:
        print(f"{3 * len(jobs)} videos in {time.perf_counter() - t0:.1f} s -> {out_dir}")
    refresh_report(data_dir)
    print("next: python guess_oxidation.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
