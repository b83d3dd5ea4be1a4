"""Speed of the attention videos (step 2), side by side.

    python benchmarks/videos.py                    # synthetic 50-capture store shaped like CrabNet (3 layers x 4 heads)
    python benchmarks/videos.py --store data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr
    python benchmarks/videos.py --captures 20 --workers 2

A real 50-capture store: ``python get_training_attention.py --quick --epochs 49``. Prints:

1. rendering alone, one compound, frames per second: new figures for every frame (as the
   original did), one reused figure fully redrawn, and one reused figure with only the changing
   artists blitted and the cell values stamped (what step 2 uses); wall and CPU time;
2. rendering + encoding the three videos of that compound (frames per second of video);
3. total time for the three videos each of three paper compounds, one process vs a LocalCluster of
   --workers processes (the Dask engine step 2 uses).

Timings on a machine shared with other work vary: CPU ms per frame is the steadier figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from crabnet.data import compositions_from_formulas
from crabnet.explain.frames import FrameRenderer, VideoInput
from crabnet.explain.store import AttentionStore, AttentionWriter
from crabnet.explain.video import PAPER_COMPOUNDS, VideoJob, render_job, run_jobs, video_paths
from crabnet.jobs.engine import Engine
from crabnet.utils import available_cpus

DATASET = "aflow__ael_bulk_modulus_vrh"


def synthetic_store(path: Path, captures: int, n_layers: int = 3, n_heads: int = 4) -> Path:
    """A finished store of the paper's compounds with smooth-ish maps and predictions."""
    formulas = PAPER_COMPOUNDS[DATASET]
    rng = np.random.default_rng(0)
    data = compositions_from_formulas(formulas, rng.uniform(50, 350, len(formulas)).astype(np.float32))
    n, E = len(data), data.width
    writer = AttentionWriter(path, data, n_layers, n_heads, {"dataset": DATASET, "split": "val", "capture": "epoch"})
    real = data.elements > 0
    logits = rng.normal(size=(n, n_layers, n_heads, E, E))
    drift = rng.normal(size=logits.shape)
    for c in range(captures):
        writer.begin_capture(c)
        z = logits + drift * c / max(captures - 1, 1)
        maps = np.exp(z) * real[:, None, None, None, :] * real[:, None, None, :, None]
        maps /= np.maximum(maps.sum(-1, keepdims=True), 1e-12)
        writer.write_batch(c, 0, maps.astype(np.float32))
        pred = data.target * (1 - 0.7 * np.exp(-c / 8)) + rng.normal(0, 5, n)
        writer.write_prediction(c, pred.astype(np.float32))
    writer.finalize(progress=False)
    return path


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - w, time.process_time() - c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="attention.zarr to use (default: a synthetic one)")
    p.add_argument("--captures", type=int, default=50, help="captures of the synthetic store (default: %(default)s)")
    p.add_argument("--compound", default="P1W3", help="compound of parts 1-2 (default: %(default)s)")
    p.add_argument(
        "--naive-frames",
        type=int,
        default=10,
        help="frames timed with new figures per frame (slow; default: %(default)s)",
    )
    p.add_argument("--dpi", type=float, default=100, help="default: %(default)s")
    p.add_argument("--workers", type=int, default=0, help="processes for part 3 (0 = all cores)")
    a = p.parse_args()
    workers = a.workers or available_cpus()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = a.store or synthetic_store(tmp / "attention.zarr", a.captures)
        store = AttentionStore(path)
        capture = str(store.attrs.get("capture", "epoch"))
        data = VideoInput.from_history(store.compound(a.compound), [0], capture=capture, dataset=DATASET)
        c = data.n_captures
        print(
            f"store: {'synthetic' if a.store is None else path}; {c} captures, {store.attrs['n_layers']} layers x "
            f"{store.attrs['n_heads']} heads; compound {data.formula} ({len(data.symbols)} elements), "
            f"dpi {a.dpi:g}; {available_cpus()} cores"
        )

        # 1. rendering alone
        rows = []
        n_naive = min(a.naive_frames, c)

        def naive():
            for k in range(n_naive):
                r = FrameRenderer(data, dpi=a.dpi)
                r.frames(k)
                r.close()

        rows.append(("new figures every frame", n_naive, *timed(naive)))
        r = FrameRenderer(data, dpi=a.dpi)
        rows.append(
            (
                "reused figure, full redraw",
                c,
                *timed(lambda: [(r.attention.render(k, full=True), r.progress.render(k, full=True)) for k in range(c)]),
            )
        )
        rows.append(("reused figure, blitted (used)", c, *timed(lambda: [r.frames(k) for k in range(c)])))
        r.close()
        print("\n1. rendering alone (attention + progress + merged frame)")
        head = f"{'':32s}{'frames':>8s}{'frames/s':>10s}{'CPU ms/frame':>14s}"
        print(head + "\n" + "-" * len(head))
        for label, n, wall, cpu in rows:
            print(f"{label:32s}{n:8d}{n / wall:10.1f}{1e3 * cpu / n:14.1f}")

        # 2. rendering + encoding one compound
        out = tmp / "videos"
        job = VideoJob(data=data, outputs=video_paths(out, data.formula, [0], 1), dpi=a.dpi)
        before = _children_cpu()
        wall, cpu = timed(render_job, job, progress=False)
        ffmpeg_cpu = _children_cpu() - before
        size = sum(p.stat().st_size for p in job.outputs.values())
        print(
            f"\n2. rendering + encoding 3 videos of {data.formula}: {c} frames in {wall:.2f} s = "
            f"{c / wall:.1f} frames/s; CPU ms/frame: {1e3 * cpu / c:.1f} rendering, {1e3 * ffmpeg_cpu / c:.1f} "
            f"ffmpeg (3 encoders, preset {job.preset}); {size / 1024:.0f} KiB"
        )

        # 3. three paper compounds
        names = [f for f in PAPER_COMPOUNDS[DATASET] if _has(store, f)][:3]
        jobs = [
            VideoJob(
                data=VideoInput.from_history(store.compound(f), [0], capture=capture, dataset=DATASET),
                outputs=video_paths(out / f"w{w}", f, [0], 1),
                dpi=a.dpi,
            )
            for w in (1, workers)
            for f in names
        ]
        print(f"\n3. three paper compounds ({', '.join(names)}), {c} captures each, 9 videos")
        for i, w in enumerate(dict.fromkeys((1, workers))):
            part = jobs[i * len(names) : (i + 1) * len(names)]
            engine = Engine(scheduler="sequential") if w == 1 else Engine(threads_per_job=max(1, available_cpus() // w))
            wall, _ = timed(run_jobs, part, engine)
            print(f"   workers {w}: {wall:.2f} s total, {len(part) * c / wall:.1f} frames/s")
    return 0


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the ffmpeg encoders)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _has(store: AttentionStore, formula: str) -> bool:
    try:
        store.find(formula)
        return True
    except KeyError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
