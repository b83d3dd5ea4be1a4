"""Cost of attention capture, side by side: no capture, epoch capture of attention alone, epoch
capture with the attributions too (leave-one-element-out, Shapley values, output contribution, head
ablation; crabnet.explain.attribution), and step capture (attention alone).

    python benchmarks/capture.py                      # aflow__ael_bulk_modulus_vrh, 2 epochs each
    python benchmarks/capture.py --epochs 3 --capture-every 2 --threads 2
    python benchmarks/capture.py --modes epoch,attribution --repeats 2   # the attribution overhead only

Each configuration runs in its own process (so peak RSS is its own) on the same data, model and
seed, and reports: seconds per epoch (training + captures), peak RSS, bytes on disk per capture,
time to reorganise the store, and milliseconds to read one compound's whole history from the
final compound-major store and from the capture-major staging layout it was written in. With
``--repeats N`` the configurations run N times in turn (interleaved, so a change in the machine's
load hits them alike) and the table shows the median. The capture modes also time one capture of
the trained model's split with attention alone and with attribution too, in the same process
(best of 3, interleaved), with leave-one-out only, and with every attribution: their cost without the
noise of training. The 1-minute load
average before and after is printed, since the machine may be shared.

``--parts`` times instead each attribution alone against one capture of attention (and leave-one-out),
on ``--split`` of the dataset with an untrained model of the published architecture (the cost of a
pass does not depend on the weights), best of ``--repeats`` interleaved rounds: Shapley values,
contributions, head ablation of the whole split and of seeded subsamples of 64 and 128 compounds
(with how far the subsample's mean |change| is from the whole split's):

    python benchmarks/capture.py --parts --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(mode: str, dataset: str, epochs: int, every: int, data_dir: Path, threads: int, seed: int) -> dict:
    """Train once with the given capture mode and measure; returns the figures."""
    import numpy as np
    import torch

    from crabnet.data import load_dataset
    from crabnet.explain.capture import AttentionRecorder, capture_split
    from crabnet.explain.store import AttentionStore, AttentionWriter
    from crabnet.training.loop import fit
    from crabnet.training.recipe import Scaler, build_model, make_recipe
    from crabnet.utils import seed_everything

    if threads:
        torch.set_num_threads(threads)
    splits = load_dataset(data_dir, dataset, verbose=False)
    seed_everything(seed)
    model = build_model("mat2vec", n_elements=splits["train"].width)
    scaler = Scaler.fit(splits["train"].target)
    recipe = make_recipe("immi", epochs=epochs, max_batch_size=1024)  # the attention run of step 1
    out: dict = {"mode": mode, "threads": torch.get_num_threads(), "n_val": len(splits["val"])}
    with tempfile.TemporaryDirectory() as tmp:
        writer = rec = None
        if mode != "none":
            writer = AttentionWriter(
                Path(tmp) / "attention.zarr",
                splits["val"],
                model.cfg.n_layers,
                model.cfg.n_heads,
                {"dataset": dataset},
                attribution=mode == "attribution",
            )
            rec = AttentionRecorder(
                model, splits["val"], scaler, writer, mode="step" if mode == "step" else "epoch", every=every
            )
        hist = fit(model, splits["train"], splits["val"], scaler, recipe, seed=seed, callback=rec, progress=False)
        out["s_per_epoch"] = hist.seconds / hist.epochs_run
        out["steps"] = hist.steps
        if writer is not None:
            probes = {"capture_s": False, "capture_loo_s": ("attribution",), "capture_attr_s": True}
            times: dict[str, list[float]] = {k: [] for k in probes}
            for _ in range(3):  # one capture of the trained model: attention alone, + leave-one-out, + all
                for key, kinds in probes.items():
                    w = AttentionWriter(
                        Path(tmp) / f"probe_{key}.zarr",
                        splits["val"],
                        model.cfg.n_layers,
                        model.cfg.n_heads,
                        {"dataset": dataset},
                        attribution=kinds,
                    )
                    t0 = time.perf_counter()
                    capture_split(model, splits["val"], scaler, w, 0)
                    times[key].append(time.perf_counter() - t0)
            out.update({key: min(t) for key, t in times.items()})
            rng = np.random.default_rng(0)
            rows = rng.integers(0, len(splits["val"]), 20)
            t0 = time.perf_counter()
            for i in rows:
                writer.att[int(i)]
            out["read_ms_staging"] = (time.perf_counter() - t0) / len(rows) * 1e3
            out["staging_bytes"] = dir_bytes(writer.staging)
            t0 = time.perf_counter()
            writer.finalize()
            out["finalize_s"] = time.perf_counter() - t0
            store = AttentionStore(writer.path)
            store.compound(0)  # open/warm
            t0 = time.perf_counter()
            for i in rows:
                store.compound(int(i))
            out["read_ms_final"] = (time.perf_counter() - t0) / len(rows) * 1e3
            out["captures"] = store.n_captures
            out["final_bytes"] = dir_bytes(writer.path)
            out["bytes_per_capture"] = out["final_bytes"] / store.n_captures
            out["files"] = sum(1 for p in writer.path.rglob("*") if p.is_file())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


MODES = ("none", "epoch", "attribution", "step")
LABELS = {"none": "no capture", "epoch": "epoch capture", "attribution": "+ attribution", "step": "step capture"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration (default: %(default)s)")
    p.add_argument("--capture-every", type=int, default=1, help="step capture every k steps (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--modes", default=",".join(MODES), help="configurations to run, of %(default)s")
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved (median shown)")
    p.add_argument("--parts", action="store_true", help="time each attribution alone (no training; see above)")
    p.add_argument("--split", default="val", help="the split --parts captures (default: %(default)s)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main(
    dataset: str,
    epochs: int,
    capture_every: int,
    data_dir: Path,
    threads: int,
    seed: int,
    modes: str = ",".join(MODES),
    repeats: int = 1,
    worker_mode: str | None = None,
) -> int:
    if worker_mode:
        print(json.dumps(worker(worker_mode, dataset, epochs, capture_every, data_dir, threads, seed)))
        return 0
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if not chosen or any(m not in MODES for m in chosen) or repeats < 1:
        print(f"error: --modes must name some of {', '.join(MODES)}; --repeats >= 1", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {m: [] for m in chosen}
    for r in range(repeats):
        for mode in chosen:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                "--dataset",
                dataset,
                "--epochs",
                str(epochs),
                "--capture-every",
                str(capture_every),
                "--data-dir",
                str(data_dir),
                "--threads",
                str(threads),
                "--seed",
                str(seed),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"  {mode} (run {r + 1}/{repeats}): {runs[mode][-1]['s_per_epoch']:.2f} s/epoch",
                file=sys.stderr,
                flush=True,
            )
    load_after = os.getloadavg()[0]

    def median(mode: str, key: str):
        values = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(values) if values else None

    keys = {k for rs in runs.values() for r in rs for k in r}
    results = {m: {k: median(m, k) for k in keys if not isinstance(runs[m][0].get(k, 0), str)} for m in chosen}
    r0 = runs[chosen[0]][0]
    print(
        f"\n{dataset}: {r0['n_val']} val compounds captured, {epochs} epochs per run, "
        f"{r0['steps'] // epochs} steps/epoch, torch threads {r0['threads']}; step capture every {capture_every}; "
        f"{repeats} run(s) each, median; load average (1 min) {load_before:.2f} before, {load_after:.2f} after "
        f"on {os.cpu_count()} CPUs"
    )
    head = f"{'':32s}" + "".join(f"{LABELS[m]:>16s}" for m in chosen)
    print(head)
    print("-" * len(head))

    def row(label, key, fmt, scale=1.0):
        cells = []
        for mode in chosen:
            v = results[mode].get(key)
            cells.append("-" if v is None else format(v * scale, fmt))
        print(f"{label:32s}" + "".join(f"{c:>16s}" for c in cells))

    def ratio_row(label: str, base_mode: str) -> None:
        if base_mode not in results:
            return
        base = results[base_mode]["s_per_epoch"]
        print(f"{label:32s}" + "".join(f"{results[m]['s_per_epoch'] / base:>15.2f}x" for m in chosen))

    row("seconds / epoch", "s_per_epoch", ".2f")
    ratio_row("  ratio to no capture", "none")
    ratio_row("  ratio to epoch capture", "epoch")
    if repeats > 1:
        cells = ["/".join(format(r["s_per_epoch"], ".1f") for r in runs[m]) for m in chosen]
        print(f"{'  all runs':32s}" + "".join(f"{c:>16s}" for c in cells))
    row("one capture, attention (s)", "capture_s", ".2f")
    row("one capture, + leave-one-out (s)", "capture_loo_s", ".2f")
    row("one capture, + all (s)", "capture_attr_s", ".2f")
    for label, base in (("  all / attention alone", "capture_s"), ("  all / + leave-one-out", "capture_loo_s")):
        ratios = [results[m]["capture_attr_s"] / results[m][base] if results[m].get(base) else None for m in chosen]
        print(f"{label:32s}" + "".join("-".rjust(16) if r is None else f"{r:>15.2f}x" for r in ratios))
    row("peak RSS (MB)", "peak_rss_mb", ".0f")
    row("captures", "captures", ".0f")
    row("KB on disk / capture", "bytes_per_capture", ".1f", 1 / 1024)
    row("files in final store", "files", ".0f")
    row("reorganise (s)", "finalize_s", ".2f")
    row("read 1 compound, final (ms)", "read_ms_final", ".2f")
    row("read 1 compound, staging (ms)", "read_ms_staging", ".2f")
    return 0


def parts(data_dir: Path, dataset: str, split: str, repeats: int, threads: int) -> int:
    """Each attribution alone against one capture (``--parts``), best of ``repeats`` interleaved rounds."""
    import numpy as np
    import torch

    from crabnet.data import load_dataset
    from crabnet.explain.attribution import contribution, head_ablation, shapley
    from crabnet.explain.capture import capture_split
    from crabnet.training.recipe import Scaler, build_model
    from crabnet.utils import seed_everything

    class NullWriter:  # the interface capture_split writes to, keeping nothing
        E, with_attribution, chunk_n, kinds, final_attrs = 0, True, 256, ("attribution",), {}

        def begin_capture(self, step: int) -> int:
            return 0

        def write_batch(self, *args, **kwargs) -> None:
            pass

        write_prediction = write_attribution = write_batch

    if threads:
        torch.set_num_threads(threads)
    splits = load_dataset(data_dir, dataset, splits=("train", split), verbose=False)
    data, scaler = splits[split], Scaler.fit(splits["train"].target)
    seed_everything(0)
    model = build_model("mat2vec", n_elements=data.width).eval()
    writer = NullWriter()
    writer.E = data.width
    el, fr, y = data.elements, data.fractions, data.target
    tasks = {
        "capture (attention + leave-one-out)": lambda: capture_split(model, data, scaler, writer, 0),
        "shapley": lambda: shapley(model, el, fr, scaler, scaler.mean),
        "contribution": lambda: contribution(model, el, fr, scaler),
        "head_ablation (whole split)": lambda: head_ablation(model, el, fr, y, scaler),
    }
    whole = head_ablation(model, el, fr, y, scaler)["mean_abs_change"]
    notes = {}
    for m in (64, 128):
        rows = np.sort(np.random.default_rng(0).choice(len(data), size=min(m, len(data)), replace=False))
        part = head_ablation(model, el[rows], fr[rows], y[rows], scaler)["mean_abs_change"]
        key = f"head_ablation ({m} compounds)"
        tasks[key] = lambda r=rows: head_ablation(model, el[r], fr[r], y[r], scaler)
        notes[key] = f"  mean |change| off by <= {np.abs(part - whole).max() / whole.max():.0%} of the largest"
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"{dataset} {split}: {len(data)} compounds, {torch.get_num_threads()} torch threads, best of {repeats}")
    base = min(times["capture (attention + leave-one-out)"])
    for name, t in times.items():
        print(f"{name:>36s} {min(t):8.3f} s  {min(t) / base:6.2f}x capture{notes.get(name, '')}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    a = parse_args()
    if a.parts:
        raise SystemExit(parts(a.data_dir, a.dataset, a.split, a.repeats, a.threads))
    raise SystemExit(
        main(a.dataset, a.epochs, a.capture_every, a.data_dir, a.threads, a.seed, a.modes, a.repeats, a.worker)
    )
