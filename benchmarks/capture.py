"""Cost of attention capture, side by side: no capture vs epoch capture vs step capture.

    python benchmarks/capture.py                      # aflow__ael_bulk_modulus_vrh, 2 epochs each
    python benchmarks/capture.py --epochs 3 --capture-every 2 --threads 2

Each configuration runs in its own process (so peak RSS is its own) on the same data, model and
seed, and reports: seconds per epoch (training + captures), peak RSS, bytes on disk per capture,
time to reorganise the store, and milliseconds to read one compound's whole history from the
final compound-major store and from the capture-major staging layout it was written in.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(mode: str, dataset: str, epochs: int, every: int, data_dir: Path, threads: int, seed: int) -> dict:
    """Train once with the given capture mode and measure; returns the figures."""
    import numpy as np
    import torch

    from crabnet.capture import AttentionRecorder, AttentionStore, AttentionWriter
    from crabnet.data import load_dataset
    from crabnet.train import Scaler, build_model, fit, make_recipe
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
            writer = AttentionWriter(Path(tmp) / "attention.zarr", splits["val"], model.cfg.n_layers,
                                     model.cfg.n_heads, {"dataset": dataset})
            rec = AttentionRecorder(model, splits["val"], scaler, writer, mode=mode, every=every)
        hist = fit(model, splits["train"], splits["val"], scaler, recipe, seed=seed, callback=rec, progress=False)
        out["s_per_epoch"] = hist.seconds / hist.epochs_run
        out["steps"] = hist.steps
        if writer is not None:
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration (default: %(default)s)")
    p.add_argument("--capture-every", type=int, default=1, help="step capture every k steps (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main(dataset: str, epochs: int, capture_every: int, data_dir: Path, threads: int, seed: int,
         worker_mode: str | None = None) -> int:
    if worker_mode:
        print(json.dumps(worker(worker_mode, dataset, epochs, capture_every, data_dir, threads, seed)))
        return 0
    results = {}
    for mode in ("none", "epoch", "step"):
        cmd = [sys.executable, __file__, "--worker", mode, "--dataset", dataset, "--epochs", str(epochs),
               "--capture-every", str(capture_every), "--data-dir", str(data_dir), "--threads", str(threads),
               "--seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {mode}: done", file=sys.stderr, flush=True)
    base = results["none"]["s_per_epoch"]
    r0 = results["none"]
    print(f"\n{dataset}: {r0['n_val']} val compounds captured, {epochs} epochs per run, "
          f"{r0['steps'] // epochs} steps/epoch, torch threads {r0['threads']}; step capture every {capture_every}")
    head = f"{'':28s}{'no capture':>14s}{'epoch capture':>16s}{'step capture':>16s}"
    print(head)
    print("-" * len(head))

    def row(label, key, fmt, scale=1.0):
        cells = []
        for mode in ("none", "epoch", "step"):
            v = results[mode].get(key)
            cells.append("-" if v is None else format(v * scale if scale != 1.0 else v, fmt))
        print(f"{label:28s}{cells[0]:>14s}{cells[1]:>16s}{cells[2]:>16s}")

    row("seconds / epoch", "s_per_epoch", ".2f")
    ratios = [f"{results[m]['s_per_epoch'] / base:.2f}x" for m in ("none", "epoch", "step")]
    print(f"{'  ratio to no capture':28s}{ratios[0]:>14s}{ratios[1]:>16s}{ratios[2]:>16s}")
    row("peak RSS (MB)", "peak_rss_mb", ".0f")
    row("captures", "captures", "d")
    row("KB on disk / capture", "bytes_per_capture", ".1f", 1 / 1024)
    row("files in final store", "files", "d")
    row("reorganise (s)", "finalize_s", ".2f")
    row("read 1 compound, final (ms)", "read_ms_final", ".2f")
    row("read 1 compound, staging (ms)", "read_ms_staging", ".2f")
    return 0


if __name__ == "__main__":
    a = parse_args()
    raise SystemExit(main(a.dataset, a.epochs, a.capture_every, a.data_dir, a.threads, a.seed, a.worker))
