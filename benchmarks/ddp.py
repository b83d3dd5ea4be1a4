"""One training in one process against the same training under torchrun, side by side.

The same training — --dataset cut to its first --rows training and --val-rows validation compounds,
the immi recipe (batch size 2^round(log2(rows)-4) clamped to [128, 4096]) for --epochs epochs, seed 0,
on the CPU — runs (a) in one process with --threads torch threads and (b) under ``torchrun
--nproc_per_node --ranks`` with --threads / --ranks threads per rank, each rank on its share of every
global batch (crabnet.jobs.distributed; docs/distributed.md). Prints the seconds per epoch of each side,
their ratio and the validation MAE of each (final weights; they differ only by the ranks' dropout
masks), with the load averages before each side: the machine may be shared.

    python benchmarks/ddp.py                                   # CritExam__Ed, 4096 rows, 4 epochs
    python benchmarks/ddp.py --dataset OQMD_Bandgap --rows 8192 --epochs 2 --precision fp32

Writes nothing but a temporary JSON file per side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="CritExam__Ed", help="default: %(default)s")
    p.add_argument("--features", default="mat2vec", help="default: %(default)s")
    p.add_argument("--rows", type=int, default=4096, help="training compounds used (default: %(default)s)")
    p.add_argument("--val-rows", type=int, default=1024, help="validation compounds used (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs (even: as many SWA epochs as plain ones)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all, per side (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="torchrun processes of side (b) (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="default: %(default)s")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a side's result file
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One side (or one rank of it): train, and on rank 0 write the timings and the validation MAE."""
    import torch

    from crabnet.data import batch_size_for, load_dataset
    from crabnet.jobs import distributed
    from crabnet.training.checkpoint import new_model
    from crabnet.training.evaluate import mae, predict
    from crabnet.training.loop import fit
    from crabnet.training.recipe import make_recipe

    torch.set_num_threads(max(1, args.threads // distributed.world_size()))
    distributed.init("cpu")
    with distributed.main_first():
        splits = load_dataset(args.data_dir, args.dataset, verbose=False)
    splits = {
        "train": splits["train"].subset(np.arange(min(args.rows, len(splits["train"])))),
        "val": splits["val"].subset(np.arange(min(args.val_rows, len(splits["val"])))),
    }
    model, scaler = new_model(args.features, splits, "cpu", seed=0)
    recipe = make_recipe("immi", epochs=args.epochs, batch_size=batch_size_for(len(splits["train"])))
    marks: list[float] = []

    def clock(event: str, epoch: int, step: int) -> None:
        if event in ("start", "epoch"):
            marks.append(time.perf_counter())

    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        seed=0,
        callback=clock,
        progress=False,
        precision=args.precision,
    )
    pred, _ = predict(model, splits["val"], scaler)
    if distributed.is_main():
        epoch_s = np.diff(marks).tolist()
        result = {
            "ranks": distributed.world_size(),
            "threads": torch.get_num_threads(),
            "precision": hist.precision,
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]),
            "batch_size": recipe.batch_size,
            "epoch_s": epoch_s,
            "s_per_epoch": float(np.mean(epoch_s)),
            "val_mae": mae(pred, splits["val"].target),
            "swa_updates": hist.swa_updates,
        }
        args.worker.write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(command: list[str], out: Path) -> dict:
    """Run one side as a subprocess (its output shown), return its result."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text())


def main(args: argparse.Namespace) -> int:
    script = str(Path(__file__).resolve())
    common = [
        *("--dataset", args.dataset, "--features", args.features, "--rows", str(args.rows)),
        *("--val-rows", str(args.val_rows), "--epochs", str(args.epochs), "--threads", str(args.threads)),
        *("--precision", args.precision, "--data-dir", str(args.data_dir)),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(args.ranks)]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    sides = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in (("one process", [sys.executable]), (f"torchrun x{args.ranks}", torchrun)):
            out = Path(tmp) / f"{len(sides)}.json"
            load = os.getloadavg()
            print(f"\n== {name}: load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
            sides.append((name, load, run_side([*launcher, script, *common, "--worker", str(out)], out)))
    r = sides[0][2]
    print(
        f"\n{args.dataset}: {r['n_train']} training / {r['n_val']} validation compounds, batch {r['batch_size']}, "
        f"{args.epochs} epochs, {r['precision']}, {args.threads} threads per side"
    )
    print(
        f"{'side':<16} {'ranks x threads':>15} {'load avg before':>17} {'s/epoch':>8} {'epochs (s)':<28} {'val MAE':>9}"
    )
    for name, load, r in sides:
        epochs = " ".join(f"{s:.1f}" for s in r["epoch_s"])
        print(
            f"{name:<16} {r['ranks']:>7} x {r['threads']:<5} {load[0]:>6.2f} {load[1]:>4.2f} {load[2]:>4.2f} "
            f"{r['s_per_epoch']:>8.2f} {epochs:<28} {r['val_mae']:>9.4g}"
        )
    (_, _, one), (_, _, ddp) = sides
    print(f"speed-up (one process s/epoch / torchrun s/epoch): {one['s_per_epoch'] / ddp['s_per_epoch']:.2f}x")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    if _args.worker is not None:
        worker(_args)
        raise SystemExit(0)
    raise SystemExit(main(_args))
