"""Training throughput and its share of the machine's measured matmul peak, in one run.

    python benchmarks/throughput.py                   # aflow__ael_bulk_modulus_vrh, recipe batch size
    python benchmarks/throughput.py --device cuda --dataset aflow__Egap
    python benchmarks/throughput.py --precision fp32   # one precision only

Prints, for each precision (fp32 and bf16 autocast by default, side by side), samples/s of full
training steps (forward + backward + Lamb/Lookahead update, with fraction jitter) on batches of
the dataset, the model's FLOPs per step (counted by ``torch.utils.flop_counter``), and that FLOP
rate divided by the FLOP rate of a large square ``torch.matmul`` of the same dtype measured in the
same process; then the bf16/fp32 speed-up and what ``--precision auto`` picks on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from crabnet.data import batch_size_for, load_dataset
from crabnet.training.evaluate import to_tensors
from crabnet.training.model import real_slots
from crabnet.training.optim import Lamb, Lookahead
from crabnet.training.recipe import Scaler, autocast, build_model, jitter_fractions, resolve_precision, robust_l1
from crabnet.utils import resolve_device, seed_everything


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n matmul of ``dtype``, best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="default: %(default)s")
    p.add_argument("--features", default="mat2vec", help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's batch size for the dataset")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default: %(default)s)")
    p.add_argument("--matmul-n", type=int, default=2048, help="matmul size for the peak (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = default")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: %(default)s)")
    return p.parse_args()


def measure(
    model_args: tuple, train, bs: int, dev: torch.device, steps: int, precision: str, overrides: dict | None = None
) -> tuple[float, float]:
    """Seconds per training step and counted FLOPs per step of a fresh model at ``precision``.

    ``overrides``: model config fields replaced (e.g. a smaller model for a smoke run).
    """
    seed_everything(0)
    features, width = model_args
    el, fr, y = to_tensors(train, dev)
    y = Scaler.fit(train.target).scale(y)
    model = build_model(features, n_elements=width, **(overrides or {})).to(dev).train()
    opt = Lookahead(Lamb([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(i: int) -> None:
        idx = torch.arange(i * bs, (i + 1) * bs, device=dev) % len(train)
        # off the CPU the real slots come from the host's rows, as in fit (no host synchronisation)
        real = (
            None if dev.type == "cpu" else real_slots(train.elements[np.arange(i * bs, (i + 1) * bs) % len(train)], dev)
        )
        with autocast(precision, dev):
            out = model(el[idx], jitter_fractions(fr[idx], 0.02, gen), real=real)
        loss = robust_l1(out[:, 0], out[:, 2], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(0)
    for i in range(3):  # warm-up
        step(i)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(dev)
    return (time.perf_counter() - t0) / steps, counter.get_total_flops()


def main(
    dataset: str,
    features: str,
    batch_size: int,
    steps: int,
    matmul_n: int,
    data_dir: Path,
    device: str,
    threads: int,
    precision: str,
) -> int:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    precisions = [p.strip() for p in precision.split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"error: --precision takes fp32 and/or bf16, got {precision!r}")
    train = load_dataset(data_dir, dataset, splits=("train",), verbose=False)["train"]
    bs = batch_size or batch_size_for(train.n_csv_rows)  # the CSV's rows before any drop, as the recipe
    fill = float((train.elements > 0).mean())
    print(
        f"{dataset} ({features}) on {dev}, torch threads {torch.get_num_threads()}, batch {bs}, "
        f"element width {train.width} ({fill:.0%} of the slots hold real elements)"
    )
    print(
        f"{'precision':>9s} {'ms/step':>9s} {'samples/s':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} "
        f"{'matmul peak':>12s} {'share':>7s}"
    )
    dts = {}
    for prec in precisions:
        dt, flops = measure((features, train.width), train, bs, dev, steps, prec)
        peak = matmul_peak(dev, matmul_n, 5, torch.bfloat16 if prec == "bf16" else torch.float32)
        dts[prec] = dt
        print(
            f"{prec:>9s} {dt * 1e3:9.1f} {bs / dt:10.1f} {flops / 1e9:11.2f} {flops / dt / 1e9:9.1f} "
            f"{peak / 1e9:12.1f} {flops / dt / peak:7.1%}"
        )
    if len(dts) == 2:
        print(f"bf16 autocast speed-up over fp32: {dts['fp32'] / dts['bf16']:.2f}x")
    print(f"--precision auto on this machine: {resolve_precision('auto', dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
