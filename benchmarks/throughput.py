"""Training throughput and its share of the machine's measured matmul peak, in one run.

    python benchmarks/throughput.py                   # aflow__ael_bulk_modulus_vrh, recipe batch size
    python benchmarks/throughput.py --device cuda --dataset aflow__Egap

Prints samples/s of full training steps (forward + backward + Lamb/Lookahead update, with
fraction jitter) on batches of the dataset, the model's FLOPs per step (counted by
``torch.utils.flop_counter``), and that FLOP rate divided by the FLOP rate of a large square
``torch.matmul`` measured in the same process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from crabnet.data import batch_size_for, load_dataset  # noqa: E402
from crabnet.optim import Lamb, Lookahead  # noqa: E402
from crabnet.train import Scaler, build_model, jitter_fractions, robust_l1, to_tensors  # noqa: E402
from crabnet.utils import resolve_device, seed_everything  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    """FLOP/s of an n x n float32 matmul, best of ``repeats``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
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
    return p.parse_args()


def main(dataset: str, features: str, batch_size: int, steps: int, matmul_n: int, data_dir: Path,
         device: str, threads: int) -> int:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    seed_everything(0)
    train = load_dataset(data_dir, dataset, splits=("train",), verbose=False)["train"]
    bs = batch_size or batch_size_for(len(train))
    el, fr, y = to_tensors(train, dev)
    y = Scaler.fit(train.target).scale(y)
    model = build_model(features, n_elements=train.width).to(dev).train()
    opt = Lookahead(Lamb([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(i: int) -> None:
        idx = torch.arange(i * bs, (i + 1) * bs, device=dev) % len(train)
        out = model(el[idx], jitter_fractions(fr[idx], 0.02, gen))
        loss = robust_l1(out[:, 0], out[:, 2], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops_per_step = counter.get_total_flops()
    for i in range(3):  # warm-up
        step(i)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    peak = matmul_peak(dev, matmul_n, repeats=5)
    achieved = flops_per_step / dt
    print(f"{dataset} ({features}) on {dev}, torch threads {torch.get_num_threads()}, batch {bs}, "
          f"element width {train.width}")
    print(f"{'training step (fwd+bwd+update)':36s} {dt * 1e3:10.1f} ms")
    print(f"{'throughput':36s} {bs / dt:10.1f} samples/s")
    print(f"{'model FLOPs per step (counted)':36s} {flops_per_step / 1e9:10.2f} GFLOP")
    print(f"{'achieved':36s} {achieved / 1e9:10.1f} GFLOP/s")
    print(f"{'matmul peak ({0}x{0} fp32)'.format(matmul_n):36s} {peak / 1e9:10.1f} GFLOP/s")
    print(f"{'share of matmul peak':36s} {achieved / peak:10.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
